"""Faster R-CNN with the ResNet C4 head (He et al., CVPR 2016, Appendix A; Detectron's and detectron2's
``faster_rcnn_R_50_C4``): the RPN and the RoI pooling read C4 (stride 16, one map), and the ResNet's own stage 5
runs on each pooled RoI as the box head.

As detectron2 builds it (``configs/Base-RCNN-C4.yaml``, ``modeling/roi_heads/roi_heads.py`` ``Res5ROIHeads``):
each RoI is pooled to 14x14 from C4 (ROIAlignV2: ``task/detector/rcnn=detectron2``), stage 5 (stride 2 in its first
block) makes it 7x7, the average over those 49 positions (``box_features.mean(dim=[2, 3])``) feeds the class and box
layers. The trunk runs the image only up to C4. Stage 5 is the backbone's own ``layer4``, held by the head without
being registered there: its parameters exist once, under ``backbone.layer4.*``, so ImageNet weights, frozen stages,
the BatchNorm mode and the backbone's lr multiplier reach it as any other stage.

Where it follows torchvision: its class and box layers regress all ``num_classes`` rows including the background
(``FastRCNNPredictor``: 2048 x 4 + 4 more parameters than detectron2's 80-category ``bbox_pred``), and the RPN
head, losses and post-processing are torchvision's classes with the settings of ``task/detector/rcnn``.

Relation Networks' "C4" rows (Hu et al., CVPR 2018, Table 5) use another C4 detector, Deformable ConvNets' ResNet
Faster R-CNN (Dai et al., ICCV 2017, Sec. 4; msracver/Relation-Networks-for-Object-Detection
``relation_rcnn/symbols/resnet_v1_101_rcnn.py``): the RPN on C4 with a 512-channel 3x3 conv (:class:`NarrowRPNHead`),
stage 5 dilated over the whole image (stride 16), a 1x1 conv to 256 channels and ReLU on it, 7x7 RoI pooling of
that map and the 2fc (+ relation modules) box head. :class:`C4AndReducedC5` is that neck, for
``conf/task/detector/faster_rcnn_c4_2fc.yaml`` (an :class:`rcnn.RCNNSpec`).
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.misc import Conv2dNormActivation
from vtrain.tasks.detection.detector import torchvision_transform
from vtrain.tasks.detection.rcnn import PyramidRCNN
from vtrain.tasks.detection.roi_heads import RCNNSettings, build_rcnn_heads, roi_pools

from vtrain.backbones.base import Backbone, require_reductions
from vtrain.config import ConfigError

C4, C5 = 2, 3  # the backbone's output indices (stride 16 and 32)


class ResNetC4(nn.Module):
    """The trunk up to C4, what torchvision's detector calls its backbone: ``{"2": C4}``, ``out_channels`` its width.
    Stage 5 is not run on the image (:class:`Res5BoxHead` runs it on the RoIs). The backbone is only called, as in
    :class:`neck.FeaturePyramid`."""

    level_names = [str(C4)]

    def __init__(self, backbone: Backbone):
        super().__init__()
        object.__setattr__(self, "body", backbone)  # registered once, on the task module
        self.out_channels = backbone.feature_info.channels(0)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict([(self.level_names[0], self.body.forward_level(images, C4))])


class Res5BoxHead(nn.Module):
    """detectron2's ``Res5ROIHeads`` box head: the backbone's stage 5 on each pooled RoI, then the average over its
    positions (``_shared_roi_transform``, ``box_features.mean(dim=[2, 3])``): ``(R, C4, 14, 14) -> (R, C5)``."""

    def __init__(self, backbone: Backbone):
        super().__init__()
        object.__setattr__(self, "body", backbone)  # stage 5 stays the backbone's: its parameters exist once
        self.out_channels = backbone.feature_info.channels(1)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.body.run_stage(C5, pooled).mean(dim=(2, 3))


class C4AndReducedC5(nn.Module):
    """Deformable ConvNets' / Relation Networks' C4 base as a neck: ``{"2": C4, "3": ReLU(conv1x1(C5))}`` from a
    ResNet built with C4 and a dilated C5 (both stride 16); the RPN reads C4 (``rpn_levels``), the RoI pools read the
    reduced C5 (``level_names``, ``out_channels``). The official ``conv_new_1``: N(0, 0.01) weights, zero bias."""

    rpn_levels = [str(C4)]
    level_names = [str(C5)]

    def __init__(self, backbone: Backbone, out_channels: int = 256):
        super().__init__()
        object.__setattr__(self, "body", backbone)  # registered once, on the task module
        self.reduce = nn.Conv2d(backbone.feature_info.channels(1), out_channels, 1)
        nn.init.normal_(self.reduce.weight, std=0.01)
        nn.init.zeros_(self.reduce.bias)
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        c4, c5 = self.body(images)
        return OrderedDict([(self.rpn_levels[0], c4), (self.level_names[0], torch.relu(self.reduce(c5)))])


class NarrowRPNHead(RPNHead):
    """torchvision's RPN head with its 3x3 conv to ``channels`` instead of the input's width (the official
    ``rpn_conv_3x3``: 512 channels on the 1024 of C4), initialised as torchvision's (N(0, 0.01), zero biases)."""

    def __init__(self, in_channels: int, num_anchors: int, channels: int = 512):
        super().__init__(channels, num_anchors)
        self.conv = nn.Sequential(Conv2dNormActivation(in_channels, channels, kernel_size=3, norm_layer=None))
        nn.init.normal_(self.conv[0][0].weight, std=0.01)
        nn.init.zeros_(self.conv[0][0].bias)


class C4Spec(PyramidRCNN):
    """Faster R-CNN with the C4 head on a ResNet / ResNeXt (a :class:`detector.DetectorSpec`):
    ``conf/task/detector/faster_rcnn_c4.yaml``.

    Args:
        model: torchvision's ``FasterRCNN`` with its options (a partial: the single-map anchor generator, RPN
            proposal counts, ...); backbone, box head, predictor and RoI pool come from here.
        nms: the duplicate removal (:mod:`nms`).
        rcnn: the R-CNN details (:class:`roi_heads.RCNNSettings`; detectron2's in the config).
        roi_size: the RoI pool's side on C4 (14: ``ROI_BOX_HEAD.POOLER_RESOLUTION``), halved by stage 5.
    """

    out_indices = (C4, C5)  # stage 5 must be built (its weights are the head's); only C4 is computed on the image
    masks = False
    name = "Faster R-CNN C4"

    def __init__(self, model: Callable[..., FasterRCNN], nms: Any = None, rcnn: RCNNSettings | None = None,
                 roi_size: int = 14):
        cls = getattr(model, "func", model)
        if not (isinstance(cls, type) and issubclass(cls, FasterRCNN)) or issubclass(cls, MaskRCNN):
            raise ConfigError(f"task.detector.model: {cls} is not torchvision's FasterRCNN (the C4 head builds Faster "
                              "R-CNN only)")
        self.model, self.nms, self.roi_size = model, nms, int(roi_size)
        self.rcnn = RCNNSettings() if rcnn is None else rcnn
        if self.rcnn.mmdet_init:
            raise ConfigError("task/detector/rcnn=mmdet initialises an FPN and fc layers the C4 head does not have: "
                              "use task/detector/rcnn=detectron2")

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> nn.Module:
        if not (hasattr(backbone, "forward_level") and hasattr(backbone, "run_stage")):
            raise ConfigError(f"task/detector=faster_rcnn_c4 runs a ResNet's stage 5 on each RoI; "
                              f"{type(backbone).__name__} has none: use a ResNet or ResNeXt backbone")
        require_reductions(backbone, [16, 32], self.name)
        trunk, head = ResNetC4(backbone), Res5BoxHead(backbone)
        detector = self.model(trunk, num_classes=None, box_head=head,
                              box_predictor=FastRCNNPredictor(head.out_channels, num_classes),
                              **roi_pools(self.rcnn, False, trunk.level_names, box_size=self.roi_size),
                              **torchvision_transform(transform))
        build_rcnn_heads(detector, self.rcnn, self.nms)
        return detector
