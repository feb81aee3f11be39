"""timm's own model of a vtrain backbone's architecture: what the bench measures vtrain against (``--vs timm``).

One function per family, given the backbone config's constructor arguments (its values, else the class's defaults);
architecture arguments go in timm's kwargs, so a resized configuration gets its exact twin. A family timm has no
model of (LR-Net, a ResNet with context blocks or dilation) has none; a new family with a timm twin adds its function
to :data:`TWINS`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from hydra.utils import get_class

from vtrain.backbones.lrnet import LRNet
from vtrain.backbones.resnet import ResNet
from vtrain.backbones.swin import SwinTransformer
from vtrain.backbones.vit import VisionTransformer

Twin = tuple[str, dict[str, Any]]  # (timm model name, timm.create_model kwargs)

# timm's names of the sizes: Swin by (embed_dim, depths) (paper Table 7: T, S, B, L), ViT by embed_dim
SWIN_SIZES = {(96, (2, 2, 6, 2)): "tiny", (96, (2, 2, 18, 2)): "small", (128, (2, 2, 18, 2)): "base",
              (192, (2, 2, 18, 2)): "large"}
VIT_SIZES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}


def resnet_twin(args: Mapping[str, Any]) -> Twin | None:
    """timm's ``resnet<depth>`` (the same v1.5 layout; ``resnet<depth>c`` with the deep stem; given ``layers``, its
    ``resnet50`` entry with those stages) or
    ``resnext<depth>_<cardinality>x<base_width>d``; None with context blocks, deformable convolutions or dilation, or a width timm has no
    model of."""
    if args["gc"] or args["nl"] or args["dnl"] or args["dcn"] or args["output_stride"] != 32:
        return None
    cardinality, width = int(args["cardinality"]), int(args["base_width"])
    kwargs = {"drop_path_rate": float(args["drop_path_rate"]), "zero_init_last": bool(args["zero_init_last"])}
    depth = args["depth"]
    if args.get("layers") is not None:  # SAN's ResNet-26 / -38: timm's resnet50 entry with these stages
        depth, kwargs["layers"] = 50, [int(n) for n in args["layers"]]
    if cardinality == 1 and width == 64:
        name = f"resnet{depth}{'c' if args['deep_stem'] else ''}"
    elif cardinality > 1 and not args["deep_stem"]:
        name = f"resnext{depth}_{cardinality}x{width}d"
    else:
        return None
    import timm

    if not timm.is_model(name):
        return None
    return name, kwargs


def swin_twin(args: Mapping[str, Any]) -> Twin:
    """timm's Swin of this size (``swin_tiny_patch4_window7_224``); a resized configuration gets the family's entry
    point with every size argument given."""
    import timm

    kwargs = {"img_size": args["img_size"], "embed_dim": args["embed_dim"], "depths": tuple(args["depths"]),
              "num_heads": tuple(args["num_heads"]), "window_size": args["window_size"],
              "drop_path_rate": float(args["drop_path_rate"])}
    size = SWIN_SIZES.get((kwargs["embed_dim"], kwargs["depths"]), "tiny")
    name = f"swin_{size}_patch4_window{kwargs['window_size']}_{kwargs['img_size']}"
    return (name if timm.is_model(name) else "swin_tiny_patch4_window7_224"), kwargs


def vit_twin(args: Mapping[str, Any]) -> Twin:
    """timm's ViT of this size (``vit_small_patch16_224``); a resized configuration gets the family's entry point
    with every size argument given."""
    import timm

    kwargs = {k: args[k] for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
    kwargs["drop_path_rate"] = float(args["drop_path_rate"])
    name = f"vit_{VIT_SIZES.get(kwargs['embed_dim'], 'base')}_patch{kwargs['patch_size']}_{kwargs['img_size']}"
    return (name if timm.is_model(name) else "vit_base_patch16_224"), kwargs


# The most specific class first: an LR-Net is a ResNet, but timm has no LR-Net (a ResNet would be the wrong twin).
TWINS: tuple[tuple[type, Callable[[Mapping[str, Any]], Twin | None] | None], ...] = (
    (LRNet, None),
    (ResNet, resnet_twin),
    (SwinTransformer, swin_twin),
    (VisionTransformer, vit_twin),
)


def timm_twin(backbone_cfg: Mapping[str, Any]) -> Twin | None:
    """timm's model of the architecture ``backbone_cfg`` builds, or None where timm has none."""
    cls = get_class(backbone_cfg["_target_"])
    twin = next((twin for family, twin in TWINS if issubclass(cls, family)), None)
    return twin(cls._arguments(backbone_cfg)) if twin is not None else None
