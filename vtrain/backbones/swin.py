"""Swin Transformer (Liu et al., ICCV 2021) on timm's ``SwinTransformer``.

timm's patch embedding, stages and final norm are adopted as this backbone's own
modules (keys as timm's; ``checkpoint_filter`` converts official releases). timm works
in NHWC; ``forward`` returns NCHW maps.

Sizes with a 1000-class classifier (``vtrain.profiling``; paper Table 1):
Swin-T 28.29M / 4.49 GMACs (28M / 4.5G), Swin-S 49.61M / 8.74G (50M / 8.7G),
Swin-B 87.77M / 15.43G (88M / 15.4G), Swin-B 384 (window 12) 87.90M / 47.08G
(88M / 47.0G). The MACs include the attention products.

A classifier's trunk (``out_indices=None``) is exactly timm's / the official classifier:
window sizes and shifts are fixed for ``img_size`` (a stage no larger than the window
gets one un-shifted window, as the official code), inputs must be ``img_size``.

Feature maps (``out_indices=(...)``) follow the official Swin detection / segmentation backbone:

* any input whose sides are multiples of 32: features are padded to whole windows
  and every second block shifts by half a window, whatever the feature size
  (timm's ``always_partition``), with the shift masks built for each input
  (``strict_img_size=False``);
* a LayerNorm on each requested output (``out_norms.<level>``; official ``norm0..3``).
  The classification ``norm`` would then be unused (a parameter without gradient
  under DDP), so it does not exist: ``checkpoint_filter`` loads the classifier's final
  norm into ``out_norms.3``, which sits where it did. Stages past the deepest requested
  level are not built.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer as TimmSwinTransformer
from timm.models.swin_transformer import WindowAttention, checkpoint_filter_fn
from torch import nn

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError


def _tiles(side: float, window: int) -> bool:
    """A stage's side holds whole windows, or fits in one (the window then shrinks to it)."""
    return side == int(side) and (side <= window or side % window == 0)


def _nearest_tiling_sizes(size: int, window: int) -> list[int]:
    """The input sizes nearest to ``size`` (one below, one above; one when ``size`` is below the smallest) whose
    every stage, at strides 4 to 32, tiles into windows of ``window``."""
    def ok(n: int) -> bool:
        return all(_tiles(n / stride, window) for stride in (4, 8, 16, 32))

    below = next((n for n in range(size - size % 32, 0, -32) if ok(n)), None)
    above = next(n for n in range(size - size % 32 + 32, size + 64 * window + 32, 32) if ok(n))
    return [n for n in (below, above) if n is not None]


def resize_position_bias_table(table: torch.Tensor, length: int) -> torch.Tensor:
    """A relative position bias table ``(L1, heads)`` of one window size resized to ``length`` rows (another window):
    the official ``load_pretrained`` (microsoft/Swin-Transformer utils.py), each head's (2W-1)² grid interpolated
    bicubically (align_corners False, no antialias). timm's ``checkpoint_filter_fn`` interpolates these tables
    otherwise (BEiT's geometric grid, linear): the fine-tunes at 384 (window 12 from 7) follow the official code."""
    side, heads = math.isqrt(table.shape[0]), table.shape[1]
    new_side = math.isqrt(length)
    grid = table.permute(1, 0).reshape(1, heads, side, side)
    return F.interpolate(grid, size=(new_side, new_side), mode="bicubic").reshape(heads, length).permute(1, 0)


class SwinTransformer(Backbone):
    """Swin backbone.

    Args:
        img_size: classification input size (and the size the windows are planned
            for); with ``out_indices``, only the reference for the (unused) absolute size.
        embed_dim, depths, num_heads, window_size: architecture (paper Table 7).
        drop_path_rate: stochastic depth (paper: 0.2 T, 0.3 S, 0.5 B).
        frozen_stages: -1 none; 0 patch embedding; N also stages 1..N with their
            patch merging (and output norms), as mmdet's Swin.
        out_indices: the levels ``forward`` returns (``base.Backbone``; see the module doc); None: a
            classifier's trunk.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        drop_path_rate: float = 0.2,
        frozen_stages: int = -1,
        out_indices: Sequence[int] | None = None,
    ):
        super().__init__()
        dense = out_indices is not None
        swin = TimmSwinTransformer(
            img_size=tuple(img_size) if isinstance(img_size, Sequence) else img_size,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            drop_path_rate=drop_path_rate,
            num_classes=0,
            strict_img_size=not dense,
            always_partition=dense,
            # nothing to initialise on the meta device (shape-only builds: counting, benches)
            weight_init="skip" if torch.get_default_device().type == "meta" else "",
        )
        self.patch_embed, self.layers = swin.patch_embed, swin.layers
        for module in self.layers.modules():
            if isinstance(module, WindowAttention):
                # timm leaves it off for Swin ("experimental"). On for CUDA machines only: measured 7% slower
                # than the explicit softmax on CPU (docs/benchmarks.md), the faster path on GPU.
                module.fused_attn = torch.cuda.is_available()
        channels = [int(embed_dim * 2**i) for i in range(len(depths))]
        self.num_features = channels[-1]
        self._set_out_indices(out_indices, channels, [4 * 2**i for i in range(len(depths))])
        if dense:
            self.layers = self.layers[: self.num_stages]
            self.out_norms = nn.ModuleDict({str(level): nn.LayerNorm(channels[level]) for level in self.out_indices})
        else:
            self.norm = swin.norm

        self.freeze_stages(frozen_stages)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        modules: list[nn.Module] = [self.patch_embed]
        for i in range(min(self.frozen_stages, len(self.layers))):
            modules.append(self.layers[i])
            if i + 1 < len(self.layers):
                # the official stage i ends with the patch merging that timm puts first in stage i+1
                modules.append(self.layers[i + 1].downsample)
            if str(i) in getattr(self, "out_norms", {}):
                modules.append(self.out_norms[str(i)])
        return modules

    def no_weight_decay(self) -> set[str]:
        return {name for name, _ in self.named_parameters() if "relative_position_bias_table" in name}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        super().set_grad_checkpointing(enable)
        for stage in self.layers:
            stage.grad_checkpointing = enable  # timm's stage checkpoints its blocks

    def init_only(self, key: str) -> bool:
        return key.startswith("out_norms.") and not key.startswith("out_norms.3.")  # .3 is the final norm

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self._require_out_indices()
        x = self.patch_embed(x)  # NHWC
        features = []
        for index, stage in enumerate(self.layers):
            x = stage(x)
            if str(index) in self.out_norms:
                features.append(self.out_norms[str(index)](x).permute(0, 3, 1, 2).contiguous())
        return features

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_indices is not None:  # a classifier's trunk only (see the module doc)
            raise ConfigError("forward_pooled: this Swin was built with out_indices; build it with out_indices=None")
        return self.norm(self.layers(self.patch_embed(x))).mean(dim=(1, 2))

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Official (``{'model': sd}``, ``layers.i.downsample`` at the end of stage i,
        classifier ``head.*``; the detection code's backbone with output norms ``norm0..3``) or timm (classifier
        ``head.fc.*``) checkpoints.

        timm's ``checkpoint_filter_fn`` moves the official patch merging to timm's
        stage and drops the non-persistent buffers. Relative position bias tables of another window size (a
        window-7 checkpoint into the window-12 Swin-B 384) are resized first, as the official code does
        (:func:`resize_position_bias_table`), so that timm's filter finds them fitting.

        That filter looks up the block of every relative position table: tables of blocks this model does not
        have (a Swin-S file has 18 blocks in stage 2, a Swin-T 6) or with another number of heads (Swin-B's for
        a Swin-T) go past it unchanged, for :func:`vtrain.training.checkpoint.load_matching` to report as not fitting.
        Stages this backbone does not build (past its deepest output level) are left out of the result.
        """
        own = self.state_dict()
        table = "relative_position_bias_table"
        state_dict = state_dict.get("model", state_dict)  # an official release wraps its weights
        # the official detection backbone's output norms (Swin-Transformer-Object-Detection, norm0..norm3)
        state_dict = {re.sub(r"^norm(\d)\.", r"out_norms.\1.", k): v for k, v in state_dict.items()}
        not_fitting = {k: v for k, v in state_dict.items()
                       if k.endswith(table) and (k not in own or own[k].shape[-1] != v.shape[-1])}
        state_dict = {k: resize_position_bias_table(v, own[k].shape[0])
                      if k.endswith(table) and k not in not_fitting and own[k].shape != v.shape else v
                      for k, v in state_dict.items()}
        state_dict = checkpoint_filter_fn({k: v for k, v in state_dict.items() if k not in not_fitting}, self)
        state_dict.update(not_fitting)
        backbone, classifier = {}, {}
        for key, value in state_dict.items():
            stage = re.match(r"layers\.(\d+)\.", key)
            if stage and self.out_indices is not None and int(stage.group(1)) >= self.num_stages:
                continue  # a stage that is not built
            if key.startswith("head.fc."):
                classifier[key[len("head.fc."):]] = value
            elif self.out_indices is not None and re.match(r"norm\.(weight|bias)$", key):
                if "3" in self.out_norms:  # otherwise the final norm of a stage that is not built
                    backbone["out_norms.3." + key[len("norm."):]] = value
            else:
                backbone[key] = value
        return backbone, classifier

    @classmethod
    def check_input_size(cls, cfg: Mapping, img_size: int) -> None:
        """A classifier's trunk takes the ``img_size`` its windows are planned for, and every stage (strides
        4..32) must hold whole windows or fit in one (the module doc)."""
        args = cls._arguments(cfg)
        planned, window = int(args["img_size"]), int(args["window_size"])
        if int(img_size) != planned:
            raise ConfigError(f"inputs of {img_size}x{img_size} but backbone.img_size={planned}: a Swin classifier "
                              f"takes the size its windows are planned for; set backbone.img_size={img_size}")
        for stride in (4, 8, 16, 32):
            if not _tiles(planned / stride, window):
                nearest = " or ".join(str(n) for n in _nearest_tiling_sizes(planned, window))
                raise ConfigError(
                    f"backbone.img_size={planned} does not tile into Swin windows of {window} at stride {stride}: "
                    f"use {nearest} (the nearest sizes that do) or change backbone.window_size"
                )
