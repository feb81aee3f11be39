"""The feature pyramid every detector family here puts between the backbone and its heads (FPN, Lin et al. 2017).

:class:`FeaturePyramid` is torchvision's ``BackboneWithFPN`` for vtrain's backbone contract: it takes the channels of
the levels the backbone was built with from ``feature_info``. What sits above the top level is its ``extra_block``,
a part of the config (``conf/task/detector/*.yaml``, ``neck.extra_block``), one per paper:

* Mask / Faster R-CNN (FPN paper Sec. 4.1): P6 by max-pooling P5 (stride 2, kernel 1), for the RPN only
  (:class:`MaxPoolP6`);
* RetinaNet (Lin et al. 2017, Sec. 4): P6 a 3x3 stride-2 conv on **C5**, P7 one on ReLU(P6) (:class:`P6P7`,
  ``from_p5: false``);
* FCOS (Tian et al. 2019, Sec. 3.2): the same convs on **P5** (``from_p5: true``);
* ATSS as mmdet v2 builds it (``add_extra_convs='on_output'``, ``relu_before_extra_convs`` left False): the same
  convs on P5, with P7 on P6 itself (``from_p5: true, relu_before_p7: false``).

:class:`SingleMap` is no pyramid: the one map a detector reads as the backbone gives it (detectron2's DC5 Faster
R-CNN, ``Base-RCNN-DilatedC5.yaml``: RPN and box head on the dilated C5).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from vtrain.backbones.base import Backbone


class MaxPoolP6(LastLevelMaxPool):
    """torchvision's P6 = max-pool of P5, built like the other extra blocks (from C5's and the pyramid's widths,
    which it does not need)."""

    def __init__(self, in_channels: int | None = None, out_channels: int | None = None):
        super().__init__()


class P6P7(LastLevelP6P7):
    """torchvision's P6/P7 block with its input chosen explicitly: torchvision takes P5 whenever C5 happens
    to have as many channels as the FPN (e.g. a small Swin with 256-channel C5), RetinaNet wants C5 always.
    ``relu_before_p7``: P7 from ReLU(P6) (RetinaNet, FCOS) or from P6 (mmdet's FPN unless
    ``relu_before_extra_convs``, as its ATSS config)."""

    def __init__(self, in_channels: int, out_channels: int, from_p5: bool, relu_before_p7: bool = True):
        super().__init__(out_channels if from_p5 else in_channels, out_channels)
        self.use_P5, self.relu_before_p7 = from_p5, relu_before_p7

    def forward(self, p: list[torch.Tensor], c: list[torch.Tensor], names: list[str]
                ) -> tuple[list[torch.Tensor], list[str]]:
        if self.relu_before_p7:
            return super().forward(p, c, names)
        p6 = self.p6(p[-1] if self.use_P5 else c[-1])
        return [*p, p6, self.p7(p6)], [*names, "p6", "p7"]


class FeaturePyramid(nn.Module):
    """Backbone + FPN, what torchvision's detectors call their ``backbone``: image batch -> ordered
    ``{"<level>": map}`` with ``out_channels`` channels each, the backbone's level numbers as names.

    The backbone is owned (registered) by the task module, whose keys must be ``backbone.*`` for pretrained
    weights and the backbone lr multiplier; here it is only called, so its parameters exist once.

    Args:
        backbone: the task's backbone, built with the levels the detector reads.
        out_channels: the pyramid's width (256 in the FPN, RetinaNet and FCOS papers).
        extra_block: what builds the levels above the top one, called with (C5 channels, ``out_channels``).
    """

    def __init__(self, backbone: Backbone, out_channels: int = 256,
                 extra_block: Callable[[int, int], ExtraFPNBlock] = MaxPoolP6):
        super().__init__()
        object.__setattr__(self, "body", backbone)  # not a submodule: see the class doc
        channels = backbone.feature_info.channels()
        self.fpn = FeaturePyramidNetwork(channels, out_channels, extra_blocks=extra_block(channels[-1], out_channels))
        self.out_channels = out_channels

    @property
    def level_names(self) -> list[str]:
        """The names of the maps it gives for the backbone's levels (RoI pools read these), extra levels left out."""
        return [str(level) for level in self.body.out_indices]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(OrderedDict(zip(self.level_names, self.body(images))))


class SingleMap(nn.Module):
    """No pyramid: the backbone's one output as it is, named by its level (``{"3": C5}``), ``out_channels`` its width.
    The backbone is only called, as in :class:`FeaturePyramid`."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        object.__setattr__(self, "body", backbone)  # not a submodule: see FeaturePyramid
        self.out_channels = backbone.feature_info.channels(0)

    @property
    def level_names(self) -> list[str]:
        return [str(level) for level in self.body.out_indices]

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict(zip(self.level_names, self.body(images)))
