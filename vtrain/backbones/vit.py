"""Vision Transformer (Dosovitskiy et al., ICLR 2021) on timm's ``VisionTransformer``,
with ViTDet's simple feature pyramid (Li et al., ECCV 2022) for dense heads.

timm's modules are adopted as this backbone's own (keys as timm's: ``cls_token``,
``pos_embed``, ``patch_embed``, ``blocks``, ``norm``; the classifier ``head.*`` is
split off by ``checkpoint_filter``). Attention runs as fused
``scaled_dot_product_attention``. Inputs of any size divisible by the patch size are
accepted: the position table is resampled to the patch grid on the fly (timm's
``dynamic_img_size``), a no-op at ``img_size``.

Sizes with a 1000-class classifier at 224x224 (``vtrain.profiling``):
ViT-S/16 22.05M / 4.60 GMACs, ViT-B/16 86.57M / 17.56 GMACs, ViT-L/16 304.33M /
61.55 GMACs (attention products included). The ViT paper's Table 1 lists 86M for
ViT-B, 307M for ViT-L and 632M for ViT-H: it counts the encoder with the pre-training
representation layer (D x D + D) and no classifier, which gives B/16 86.39M, H/14
632.40M and, for ViT-L, 306.56M only with 32x32 patches (L/16 gives 304.35M): the
ViT-L row matches the /32 model (``tests/test_backbones.py``). ViT-S is not in that paper (DeiT
Table 1: 22M / 4.6G).

SETR (Zheng et al., CVPR 2021, Sec. 3.2-3.3) reads its heads' maps from inside the encoder instead:
``block_indices`` names one block per output level, whose tokens (no pyramid, all at the patch stride) are the
level's map, as mmseg's ``VisionTransformer(out_indices=(9, 14, 19, 23))``; its SETR configs also run without the
final norm (``final_norm=False``), MLA without the class token in the encoder (``with_cls_token=False``), and resize
the position table bilinearly (``pos_embed_interpolation="bilinear"``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, resample_abs_pos_embed
from timm.models import checkpoint_seq
from timm.models.vision_transformer import Attention
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer
from torch import nn

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError


class SimpleFeaturePyramid(nn.Module):
    """ViTDet simple feature pyramid (Li et al. 2022, Sec. 3 and Fig. 2c), scale part only:
    from the stride-16 map, stride 4 = two 2x2 stride-2 transposed convs (with
    LayerNorm + GELU between), 8 = one, 16 = identity, 32 = 2x2 max-pool. Only the
    branches of the requested ``levels`` are built.

    Channels halve per upsampling: (C/4, C/2, C, C), as in ViTDet before its
    per-level 1x1/3x3 projection, which belongs to the head (an FPN-style neck) here.
    """

    def __init__(self, channels: int, levels: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.levels = tuple(levels)
        if 0 in self.levels:
            self.to_stride4 = nn.Sequential(
                nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2),
                LayerNorm2d(channels // 2),  # ViTDet's channel LayerNorm (eps 1e-6)
                nn.GELU(),
                nn.ConvTranspose2d(channels // 2, channels // 4, kernel_size=2, stride=2),
            )
        if 1 in self.levels:
            self.to_stride8 = nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        branches = {0: lambda: self.to_stride4(x), 1: lambda: self.to_stride8(x), 2: lambda: x,
                    3: lambda: F.max_pool2d(x, kernel_size=2, stride=2)}
        return [branches[level]() for level in self.levels]


# how a position table goes to another patch grid: timm / DeiT, mmseg / SETR, the official ViT code
POS_EMBED_INTERPOLATIONS = ("bicubic", "bilinear", "bilinear_align_corners")


class VisionTransformer(Backbone):
    """ViT backbone.

    ``forward_pooled`` is the class token after the final norm (the reference
    classifier's input). ``forward`` (``out_indices``) reshapes the patch tokens after the
    final norm into the stride-16 map and builds the requested pyramid levels from it;
    going through the final norm keeps every parameter in the graph (no unused parameter
    under DDP; ViTDet drops the norm instead). A classifier's trunk (``out_indices=None``)
    has no pyramid.

    Dropout (none in DeiT's recipe): ``pos_drop_rate`` on the tokens after the position table is added,
    ``proj_drop_rate`` after each block's attention projection and MLP layers (timm's names). DeiT's ``--drop``
    (timm 0.3's ``drop_rate``, its dropout ablation, DeiT Table 8) set both.

    SETR's options (mmseg's ``VisionTransformer``): ``block_indices``, one block per output level, whose patch tokens
    are that level's map at the patch stride (no pyramid; blocks past the deepest one read are not built);
    ``final_norm=False`` leaves the last block's tokens unnormalised (no final norm is built); ``with_cls_token=False``
    drops the class token before the encoder; ``pos_embed_interpolation`` resizes the position table ``bicubic``
    (timm, DeiT), ``bilinear`` (mmseg) or ``bilinear_align_corners`` (the official ViT code's zoom).
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        drop_path_rate: float = 0.1,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        out_indices: Sequence[int] | None = None,
        block_indices: Sequence[int] | None = None,
        final_norm: bool = True,
        with_cls_token: bool = True,
        pos_embed_interpolation: str = "bicubic",
    ):
        super().__init__()
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ConfigError(f"pos_embed_interpolation={pos_embed_interpolation}: use one of "
                              f"{', '.join(POS_EMBED_INTERPOLATIONS)}")
        vit = TimmVisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
            drop_path_rate=drop_path_rate,
            pos_drop_rate=pos_drop_rate,
            proj_drop_rate=proj_drop_rate,
            dynamic_img_size=True,
            # nothing to initialise on the meta device (shape-only builds: counting, benches)
            weight_init="skip" if torch.get_default_device().type == "meta" else "",
        )
        self.patch_size, self.depth = patch_size, depth
        self.cls_token, self.pos_embed = vit.cls_token, vit.pos_embed
        self.patch_embed, self.blocks, self.norm = vit.patch_embed, vit.blocks, vit.norm
        self.pos_drop = vit.pos_drop
        for module in self.blocks.modules():
            if isinstance(module, Attention):
                module.fused_attn = True
        self.num_features = embed_dim
        self.with_cls_token, self.pos_embed_interpolation = with_cls_token, pos_embed_interpolation
        if not final_norm:
            self.norm = nn.Identity()  # mmseg ViT final_norm=False: the last block's tokens as they come
        self.block_indices = tuple(block_indices) if block_indices is not None else None
        if self.block_indices is not None:
            self._set_block_outputs(out_indices, embed_dim, depth)
            return
        # the patch grid is the stride-16 level for /16 models; other patch sizes shift the pyramid
        if out_indices is not None and patch_size % 4:
            raise ConfigError(f"feature maps of {patch_size}x{patch_size} patches would sit at strides "
                              f"{patch_size / 4:g}, {patch_size / 2:g}, {patch_size}, {patch_size * 2}: dense heads need "
                              "a patch size divisible by 4 (ViTDet trains its dense ViT-H with patch_size=16)")
        strides = (patch_size // 4, patch_size // 2, patch_size, patch_size * 2)
        self._set_out_indices(out_indices, (embed_dim // 4, embed_dim // 2, embed_dim, embed_dim), strides)
        if self.out_indices is not None:
            self.pyramid = SimpleFeaturePyramid(embed_dim, self.out_indices)

    def _set_block_outputs(self, out_indices: Sequence[int] | None, embed_dim: int, depth: int) -> None:
        """Output level ``i`` is block ``block_indices[i]``'s tokens at the patch stride (SETR); blocks past the
        deepest one read are not built (nothing without a gradient)."""
        if out_indices is None:
            raise ConfigError("block_indices gives feature maps: build the backbone with out_indices (a segmentation "
                              "head's), or set block_indices=null for a classifier")
        if len(self.block_indices) != 4 or any(not 0 <= b < depth for b in self.block_indices):
            raise ConfigError(f"block_indices={list(self.block_indices)}: name one block (0..{depth - 1}) for each of "
                              "the four output levels, e.g. [9, 14, 19, 23] for ViT-L (SETR)")
        stride = self.patch_size
        self._set_out_indices(out_indices, (embed_dim,) * 4, (stride,) * 4)
        built = max(self.block_indices[level] for level in self.out_indices) + 1
        if built < depth:  # the final norm follows the encoder's last block only (mmseg), which is not built
            self.blocks, self.norm = self.blocks[:built], nn.Identity()

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def _embedded(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1 + H*W, C): the class token and the patches with the position table added."""
        patches = self.patch_embed(x)  # (N, H, W, C) with dynamic_img_size
        n, h, w, c = patches.shape
        pos_embed = self._resized_pos_embed(self.pos_embed, (h, w), self.patch_embed.grid_size)
        tokens = torch.cat([self.cls_token.expand(n, -1, -1), patches.reshape(n, h * w, c)], dim=1)
        return self.pos_drop(tokens + pos_embed)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1 + H*W, C) tokens after the final norm."""
        tokens = self._embedded(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            return self.norm(checkpoint_seq(self.blocks, tokens))
        return self.norm(self.blocks(tokens))

    def _resized_pos_embed(self, pos_embed: torch.Tensor, new_size: Sequence[int], old_size: Sequence[int],
                           antialias: bool = True) -> torch.Tensor:
        """The position table on another patch grid: timm's bicubic, mmseg's ``resize_pos_embed`` (bilinear,
        align_corners False, no antialias; SETR's ``interpolate_mode="bilinear"``), or the official ViT code's
        (``bilinear_align_corners``: vit_jax/checkpoint.py ``interpolate_posembed``, ``scipy.ndimage.zoom(order=1)``,
        whose output samples map onto the input's with the corners aligned)."""
        if self.pos_embed_interpolation == "bilinear_align_corners":
            side = math.isqrt(pos_embed.shape[1] - 1)
            h, w = old_size if old_size else (side, side)
            grid = pos_embed[:, 1:].reshape(1, h, w, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=tuple(new_size), mode="bilinear", align_corners=True)
            return torch.cat([pos_embed[:, :1], grid.flatten(2).transpose(1, 2)], dim=1)
        bilinear = self.pos_embed_interpolation == "bilinear"
        return resample_abs_pos_embed(pos_embed, new_size=tuple(new_size), old_size=tuple(old_size) if old_size else None, num_prefix_tokens=1,
                                      interpolation=self.pos_embed_interpolation, antialias=antialias and not bilinear)

    def _block_maps(self, tokens: torch.Tensor, h: int, w: int) -> list[torch.Tensor]:
        """mmseg ``VisionTransformer.forward``: the class token leaves before the encoder when ``with_cls_token`` is
        false, the final norm (if any) follows the last block, each output is a block's patch tokens as NCHW."""
        if not self.with_cls_token:
            tokens = tokens[:, 1:]
        wanted = {self.block_indices[level]: level for level in self.out_indices}
        maps = {}
        for index, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                tokens = torch.utils.checkpoint.checkpoint(block, tokens, use_reentrant=False)
            else:
                tokens = block(tokens)
            if index == len(self.blocks) - 1:
                tokens = self.norm(tokens)
            if index in wanted:
                patches = tokens[:, 1:] if self.with_cls_token else tokens
                maps[wanted[index]] = patches.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)
        return [maps[level] for level in self.out_indices]

    def init_only(self, key: str) -> bool:
        return key.startswith("pyramid.")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._require_out_indices()
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if self.block_indices is not None:
            return self._block_maps(self._embedded(x), h, w)
        tokens = self._tokens(x)
        return self.pyramid(tokens[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, h, w))

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self._tokens(x)[:, 0]

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """timm ViT checkpoints (or mmseg's ViT layout, :func:`timm_keys_of_mmseg_vit`, or the official JAX release,
        :func:`timm_keys_of_official_vit`): ``head.*`` is the classifier;
        a position table for another grid (a 224 checkpoint into a 384 model, SETR's 384 one into 512) is resampled to
        this one as DeiT's fine-tuning does (bicubic) or as mmseg does (``pos_embed_interpolation``); the final norm
        and blocks this backbone does not build (SETR's ``final_norm=False``, blocks past its deepest output) are left
        out."""
        state_dict = state_dict.get("model", state_dict)
        if "embedding/kernel" in state_dict:
            state_dict = timm_keys_of_official_vit(state_dict)
        elif "layers.0.ln1.weight" in state_dict:
            state_dict = timm_keys_of_mmseg_vit(state_dict)
        backbone, classifier = {}, {}
        for key, value in state_dict.items():
            if key.startswith("head."):
                classifier[key[len("head."):]] = value
                continue
            if key.startswith("norm.") and isinstance(self.norm, nn.Identity):
                continue
            if key.startswith("blocks.") and len(self.blocks) <= int(key.split(".")[1]) < self.depth:
                continue  # a block of this depth past the deepest output read; a deeper file's blocks stay, to be named
            if key == "pos_embed" and value.shape != self.pos_embed.shape:
                # DeiT's fine-tuning at 384 (main.py --finetune): bicubic, align_corners False, no antialias
                # (timm's default antialias=True gives other values when upsampling); mmseg's resize_pos_embed: bilinear
                value = self._resized_pos_embed(value, self.patch_embed.grid_size, None, antialias=False)
            backbone[key] = value
        return backbone, classifier

    @classmethod
    def check_input_size(cls, cfg: Mapping, img_size: int) -> None:
        """Any size that is a whole number of patches (the position table is resampled to the grid)."""
        patch = int(cls._arguments(cfg)["patch_size"])
        if int(img_size) % patch:
            raise ConfigError(f"inputs of {img_size}x{img_size} are not whole {patch}x{patch} patches: use a multiple "
                              f"of {patch} (e.g. {patch * max(1, round(int(img_size) / patch))})")


def timm_keys_of_mmseg_vit(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmseg's ``VisionTransformer`` keys back to timm's: the inverse of mmseg's
    ``tools/model_converters/vit2mmseg.py`` (how mmseg's SETR releases store their ViT-L)."""
    renames = (("patch_embed.projection.", "patch_embed.proj."), ("ffn.layers.0.0.", "mlp.fc1."),
               ("ffn.layers.1.", "mlp.fc2."), ("attn.attn.in_proj_", "attn.qkv."), ("attn.attn.out_proj.", "attn.proj."),
               (".ln1.", ".norm1."), (".ln2.", ".norm2."))
    converted = {}
    for key, value in state_dict.items():
        if key.startswith("ln1."):
            key = "norm." + key[len("ln1."):]
        elif key.startswith("layers."):
            key = "blocks." + key[len("layers."):]
            for old, new in renames:
                key = key.replace(old, new)
        else:
            key = key.replace(*renames[0])
        converted[key] = value
    return converted


# The official release's names (google-research/vision_transformer vit_jax/models_vit.py: the flax modules' names,
# joined with "/" by vit_jax/checkpoint.py), as timm's _load_weights reads them: the whole model but each block, and
# each encoder block (its LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3 by creation order).
_OFFICIAL_NAMES = ("embedding/kernel", "embedding/bias", "cls", "Transformer/posembed_input/pos_embedding",
                   "Transformer/encoder_norm/scale", "Transformer/encoder_norm/bias")
_OFFICIAL_BLOCK_NAMES = tuple(f"{module}/{leaf}" for module, leaves in (
    ("LayerNorm_0", ("scale", "bias")), ("LayerNorm_2", ("scale", "bias")),
    *((f"MultiHeadDotProductAttention_1/{p}", ("kernel", "bias")) for p in ("query", "key", "value", "out")),
    ("MlpBlock_3/Dense_0", ("kernel", "bias")), ("MlpBlock_3/Dense_1", ("kernel", "bias"))) for leaf in leaves)
# the classifier, and the pre-training "representation layer" (Sec. 3.1, tanh) the fine-tuning removes (Appendix
# B.1.1; vit_jax/checkpoint.py load_pretrained's "drop-head variant"): this backbone has no such layer
_OFFICIAL_HEAD_NAMES = ("head/kernel", "head/bias", "pre_logits/kernel", "pre_logits/bias")


def timm_keys_of_official_vit(arrays: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official ViT releases (``imagenet21k/ViT-B_16.npz`` ..., google-research/vision_transformer) as timm's
    keys, as timm's ``_load_weights`` maps them: flax kernels are (in, out), torch weights (out, in); the patch
    embedding's kernel is HWIO; query, key and value kernels are (D, heads, head_dim) and concatenate into ``qkv``;
    ``out`` is (heads, head_dim, D). Every name of a plain ViT must be there and no other (a hybrid R50+ViT or a
    big_vision file is another layout): one line says which are missing or foreign. ``pre_logits`` is dropped."""
    blocks = sorted({int(m.group(1)) for name in arrays if (m := re.match(r"Transformer/encoderblock_(\d+)/", name))})
    expected = set(_OFFICIAL_NAMES) | {f"Transformer/encoderblock_{i}/{n}" for i in range(max(blocks, default=-1) + 1)
                                       for n in _OFFICIAL_BLOCK_NAMES}
    missing = sorted(expected - set(arrays))
    foreign = sorted(set(arrays) - expected - set(_OFFICIAL_HEAD_NAMES))
    if missing or foreign:
        problems = [f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"] if missing else []
        problems += [f"{len(foreign)} foreign ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''})"] if foreign else []
        raise ConfigError(f"not an official plain-ViT release (google-research/vision_transformer .npz): tensor names "
                          f"{' and '.join(problems)}; give a file of gs://vit_models/imagenet21k (e.g. ViT-B_16.npz)")
    converted = {
        "patch_embed.proj.weight": arrays["embedding/kernel"].permute(3, 2, 0, 1),
        "patch_embed.proj.bias": arrays["embedding/bias"],
        "cls_token": arrays["cls"],
        "pos_embed": arrays["Transformer/posembed_input/pos_embedding"],
        "norm.weight": arrays["Transformer/encoder_norm/scale"],
        "norm.bias": arrays["Transformer/encoder_norm/bias"],
    }
    if "head/kernel" in arrays:
        converted["head.weight"], converted["head.bias"] = arrays["head/kernel"].T, arrays["head/bias"]
    for i in blocks:
        block, to = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        attention = block + "MultiHeadDotProductAttention_1/"
        converted |= {
            to + "norm1.weight": arrays[block + "LayerNorm_0/scale"], to + "norm1.bias": arrays[block + "LayerNorm_0/bias"],
            to + "norm2.weight": arrays[block + "LayerNorm_2/scale"], to + "norm2.bias": arrays[block + "LayerNorm_2/bias"],
            to + "attn.qkv.weight": torch.cat([arrays[f"{attention}{p}/kernel"].flatten(1).T for p in ("query", "key", "value")]),
            to + "attn.qkv.bias": torch.cat([arrays[f"{attention}{p}/bias"].reshape(-1) for p in ("query", "key", "value")]),
            to + "attn.proj.weight": arrays[attention + "out/kernel"].flatten(0, 1).T,
            to + "attn.proj.bias": arrays[attention + "out/bias"],
        }
        for dense, fc in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
            converted[f"{to}mlp.{fc}.weight"] = arrays[f"{block}MlpBlock_3/{dense}/kernel"].T
            converted[f"{to}mlp.{fc}.bias"] = arrays[f"{block}MlpBlock_3/{dense}/bias"]
    return {key: value.contiguous() for key, value in converted.items()}
