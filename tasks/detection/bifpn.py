"""BiFPN (Tan, Pang, Le, CVPR 2020: "EfficientDet: Scalable and Efficient Object Detection", Sec. 3) as the Swin
detection repository builds it for Table 2(a)'s RepPointsV2 rows (SwinTransformer/Swin-Transformer-Object-Detection
``mmdet/models/necks/bifpn.py``; ``configs/_base_/models/reppointsv2_swin_bifpn.py``: C3-C5, 256 channels, 5 levels,
2 repeats, GN-32 everywhere, no extra convs).

P6 and P7 are 3x3 stride-2 max-poolings of C5 and of P6. Each repeat (``SingleBiFPN``) takes the 5 maps through a
1x1 conv + GN where their width is not ``out_channels`` (the first repeat's laterals; the identity elsewhere), then a
top-down pass (level i from itself and level i+1 upsampled, nearest) and a bottom-up pass (level i+1 from level i
max-pooled, itself after the top-down pass and its lateral; the top level from the first two): each fusion is a
weighted sum with weights ReLU(w) / (sum + 1e-4) (EfficientDet's fast normalised fusion, Eq. 3), w starting at 1,
then swish, then a 3x3 conv + GN without activation. Every conv: Xavier-uniform, no bias (the GN's).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError


class WeightedFusion(nn.Module):
    """EfficientDet's fast normalised fusion then swish (the repository's ``LayerCombineModule``)."""

    def __init__(self, num_inputs: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(1, 1, 1, 1, num_inputs))

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        weights = self.weights.relu()
        return F.silu((weights / (weights.sum() + 0.0001) * torch.stack(list(inputs), dim=-1)).sum(dim=-1))


def _conv_gn(in_channels: int, out_channels: int, kernel: int, num_groups: int) -> nn.Sequential:
    """mmcv's ``ConvModule`` with GN and no activation: a conv without bias, then GN."""
    conv = nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False)
    nn.init.xavier_uniform_(conv.weight)
    return nn.Sequential(conv, nn.GroupNorm(num_groups, out_channels))


class BiFPNLayer(nn.Module):
    """One repeat (``SingleBiFPN``), with the repository's module names."""

    def __init__(self, in_channels: Sequence[int], out_channels: int, num_groups: int = 32):
        super().__init__()
        levels = len(in_channels)
        self.lateral_convs = nn.ModuleList([nn.Identity() if c == out_channels else
                                            _conv_gn(c, out_channels, 1, num_groups) for c in in_channels])
        self.lateral_combine = nn.ModuleList([WeightedFusion(2) for _ in range(levels - 1)])
        self.lateral_combine_conv = nn.ModuleList([_conv_gn(out_channels, out_channels, 3, num_groups)
                                                   for _ in range(levels - 1)])
        self.out_combine = nn.ModuleList([WeightedFusion(3 if i != levels - 1 else 2) for i in range(1, levels)])
        self.out_combine_conv = nn.ModuleList([_conv_gn(out_channels, out_channels, 3, num_groups)
                                               for _ in range(levels - 1)])

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        outs = list(laterals)
        for i in range(len(outs) - 1, 0, -1):  # top-down
            upsampled = F.interpolate(outs[i], size=outs[i - 1].shape[2:], mode="nearest")
            outs[i - 1] = self.lateral_combine_conv[i - 1](self.lateral_combine[i - 1]([outs[i - 1], upsampled]))
        for i in range(len(outs) - 1):  # bottom-up
            down = F.max_pool2d(outs[i], 3, stride=2, padding=1)
            fused = [down, outs[i + 1], laterals[i + 1]] if i != len(outs) - 2 else [down, outs[i + 1]]
            outs[i + 1] = self.out_combine_conv[i](self.out_combine[i](fused))
        return outs


class BiFPN(nn.Module):
    """Backbone + BiFPN, the contract of :class:`neck.FeaturePyramid`: image batch -> ordered ``{"<level>": map}``
    (the backbone's levels, then ``"pool"`` levels above), ``out_channels`` each. The backbone is only called.

    Args:
        backbone: the task's backbone, built with the levels the detector reads (C3-C5).
        out_channels: the width (256).
        num_outs: maps out, the backbone's and max-pooled ones above them (5: P3-P7).
        num_repeat: BiFPN layers (2).
        num_groups: GN groups (32).
        extra_block: ``None``: the levels above the backbone's are max-poolings (the repository's
            ``add_extra_convs=False``, what its config uses); the convolutional variant is not built.
    """

    def __init__(self, backbone: Backbone, out_channels: int = 256, num_outs: int = 5, num_repeat: int = 2,
                 num_groups: int = 32, extra_block: Any = None):
        super().__init__()
        if extra_block is not None:
            raise ConfigError("task.detector.neck.extra_block: the BiFPN max-pools its levels above the backbone's "
                              "(add_extra_convs=False): set task.detector.neck.extra_block=null")
        object.__setattr__(self, "body", backbone)  # not a submodule: see neck.FeaturePyramid
        channels = list(backbone.feature_info.channels())
        self.num_outs = num_outs
        widths = channels + [channels[-1]] * (num_outs - len(channels))
        self.bi_fpn = nn.ModuleList([BiFPNLayer(widths if i == 0 else [out_channels] * num_outs, out_channels,
                                                num_groups) for i in range(num_repeat)])
        self.out_channels = out_channels

    @property
    def level_names(self) -> list[str]:
        return [str(level) for level in self.body.out_indices]

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        outs = list(self.body(images))
        while len(outs) < self.num_outs:
            outs.append(F.max_pool2d(outs[-1], 3, stride=2, padding=1))
        for layer in self.bi_fpn:
            outs = layer(outs)
        names = self.level_names + [f"pool{i}" for i in range(self.num_outs - len(self.level_names))]
        return OrderedDict(zip(names, outs))
