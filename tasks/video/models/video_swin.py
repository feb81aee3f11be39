"""Video Swin Transformer (Liu et al., "Video Swin Transformer", CVPR 2022) on torchvision's ``SwinTransformer3d``.

torchvision's patch embedding (2x4x4 patches), stages and final norm are adopted as this
backbone's own modules, so a torchvision ``swin3d_t/s/b`` weights file (e.g.
``swin3d_t-7615ae03.pth``, the paper's Kinetics-400 weights ported) loads as is; its
classifier is split off. Sizes with a 400-class classifier: Swin3D-T 28.16M params.

``checkpoint_filter`` also takes

* a 2D Swin ImageNet checkpoint (official release, timm, or this framework's
  ``SwinTransformer`` run) and inflates it as the paper initialises Video Swin
  (Sec. 3.3, "Initialization from Pre-trained Model"): the 2D patch embedding is
  repeated over the 2 temporal positions of a patch and divided by 2, and the 2D
  relative position bias table, (2M-1)^2 entries, is repeated over the 2P-1 temporal
  offsets of the (2P-1)(2M-1)^2 table (resized first when M differs);
* the official Video Swin (mmaction2) checkpoints, whose ``backbone.*`` keys follow
  the official 2D layout with 3D tensors.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.models.video.swin_transformer import SwinTransformer3d
from vtrain.tasks.video.models.base import VideoBackbone
from vtrain.tasks.video.models.inflation import inflate_state_dict


class VideoSwinTransformer(VideoBackbone):
    """Video Swin; the paper's Table 1 variants are ``conf/video_backbone/videoswin_{t,s,b}.yaml``
    (torchvision's ``swin3d_t/s/b`` arguments).

    Args:
        patch_size: (t, h, w) of a patch, 2x4x4 in the paper.
        embed_dim, depths, num_heads: the Swin-T/S/B architecture (C = 96/96/128, 2-2-6-2 / 2-2-18-2 blocks).
        window_size: (P, M, M) = 8x7x7 in the paper.
        drop_path_rate: stochastic depth, linear over blocks (0.1 for Swin-T on Kinetics-400).
    """

    def __init__(
        self,
        patch_size: Sequence[int] = (2, 4, 4),
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: Sequence[int] = (8, 7, 7),
        drop_path_rate: float = 0.1,
    ):
        super().__init__()
        swin = SwinTransformer3d(
            patch_size=list(patch_size),
            embed_dim=embed_dim,
            depths=list(depths),
            num_heads=list(num_heads),
            window_size=list(window_size),
            stochastic_depth_prob=drop_path_rate,
            num_classes=1,
        )
        self.patch_embed, self.pos_drop, self.features, self.norm = swin.patch_embed, swin.pos_drop, swin.features, swin.norm
        self.window_size = tuple(window_size)
        self.num_features = swin.num_features

    def forward_pooled(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.features(self.pos_drop(self.patch_embed(clips)))  # (N, T', H', W', C)
        return self.norm(x).mean(dim=(1, 2, 3))

    def no_weight_decay(self) -> set[str]:
        # as the official code's paramwise_cfg: no decay on the relative position bias tables
        return {name for name, _ in self.named_parameters() if "relative_position_bias_table" in name}

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        state_dict = state_dict.get("model", state_dict)
        if not any(k.startswith("features.") for k in state_dict):
            state_dict = _official_to_torchvision_keys(state_dict)
        backbone, classifier = {}, {}
        for key, value in state_dict.items():
            if key.startswith("head."):
                classifier[key[len("head."):]] = value
            elif "relative_position_index" not in key and "attn_mask" not in key:
                backbone[key] = value
        own = self.state_dict()
        backbone = inflate_state_dict(backbone, own)
        for key, value in backbone.items():
            if key.endswith("relative_position_bias_table") and key in own and own[key].shape != value.shape:
                backbone[key] = inflate_relative_position_bias(value, self.window_size)
        return backbone, classifier


def _official_to_torchvision_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official / timm / this framework's Swin keys -> torchvision ``SwinTransformer3d`` keys.

    torchvision's ``features`` alternates stages and patch mergings (``features.2i`` = stage i,
    ``features.2i+1`` = the merging after it). The official code puts the merging at the end of
    stage i (``layers.i.downsample``, stage 0 has one), timm at the start of stage i+1.
    """
    official = "layers.0.downsample.reduction.weight" in state_dict
    out = {}
    for key, value in state_dict.items():
        if match := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            stage, block, rest = int(match[1]), match[2], match[3]
            rest = rest.replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
            key = f"features.{2 * stage}.{block}.{rest}"
        elif match := re.match(r"layers\.(\d+)\.downsample\.(.+)", key):
            stage = int(match[1]) if official else int(match[1]) - 1
            key = f"features.{2 * stage + 1}.{match[2]}"
        elif key.startswith("out_norms.3."):  # a Swin built with out_indices keeps the final norm there
            key = "norm." + key[len("out_norms.3."):]
        elif key.startswith("out_norms."):
            continue
        elif key.startswith("head.fc."):
            key = "head." + key[len("head.fc."):]
        out[key] = value
    return out


def inflate_relative_position_bias(table: torch.Tensor, window_size: Sequence[int]) -> torch.Tensor:
    """A 2D table ((2M-1)^2, heads) -> the 3D ((2P-1)(2M-1)(2M-1), heads) table, the same bias for every
    temporal offset (Video Swin Sec. 3.3); bicubic resize first when the 2D window differs."""
    p, h, w = (2 * s - 1 for s in window_size)
    side = round(table.shape[0] ** 0.5)
    if side * side != table.shape[0]:
        raise ValueError(f"a relative position bias table of {table.shape[0]} rows is not a 2D Swin table")
    grid = table.T.reshape(1, table.shape[1], side, side)
    if (side, side) != (h, w):
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    # torchvision indexes the 3D table as (d * (2M-1) + h) * (2M-1) + w: the temporal offset varies slowest
    return grid.reshape(table.shape[1], h * w).T.repeat(p, 1)
