"""torchvision's detectors on any vtrain backbone: the four maps -> an FPN -> Mask R-CNN, Faster R-CNN, RetinaNet or FCOS.

The detectors are torchvision's own classes, composed by constructor arguments; only the part
torchvision builds for its ResNets (``BackboneWithFPN``) is replaced, by :class:`FeaturePyramid`, which
takes the backbone contract: the task builds the backbone with the levels its detector's pyramid reads
(``DetectorSpec.levels``), and the pyramid takes their channels from ``feature_info``.

Each detector gets the pyramid its paper uses:

* Mask / Faster R-CNN (FPN paper, Lin et al. 2017, Sec. 4.1): P2-P5 from C2-C5, plus P6 by max-pooling
  P5 (stride-2, kernel 1), used only by the RPN; RoIs are pooled from P2-P5.
* RetinaNet (Lin et al. 2017, Sec. 4 "Feature Pyramid Network Backbone"): P3-P5 from C3-C5, P6 a 3x3
  stride-2 conv on **C5**, P7 a 3x3 stride-2 conv on ReLU(P6).
* FCOS (Tian et al. 2019, Sec. 3.2): P3-P5 from C3-C5, P6 and P7 the same convs but on **P5**.

Classes: label 0 is the background for every detector (torchvision's convention, ``num_classes`` counts
it); dataset categories are labels 1..K. RetinaNet and FCOS thus carry one logit that is never a
positive target, as torchvision's own COCO models do.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from vtrain import ConfigError
from vtrain.backbones.base import Backbone, require_reductions


class P6P7(LastLevelP6P7):
    """torchvision's P6/P7 block with its input chosen explicitly: torchvision takes P5 whenever C5 happens
    to have as many channels as the FPN (e.g. a small Swin with 256-channel C5), RetinaNet wants C5 always."""

    def __init__(self, in_channels: int, out_channels: int, from_p5: bool):
        super().__init__(in_channels, out_channels)
        self.use_P5 = from_p5


class FeaturePyramid(nn.Module):
    """Backbone + FPN, what torchvision's detectors call their ``backbone``: image batch -> ordered
    ``{"<level>": map}`` with ``out_channels`` channels each (torchvision's ``BackboneWithFPN`` for our contract).

    The backbone is owned (registered) by the task module, whose keys must be ``backbone.*`` for pretrained
    weights and the backbone lr multiplier; here it is only called, so its parameters exist once.
    """

    def __init__(self, backbone: Backbone, out_channels: int, extra_block: ExtraFPNBlock):
        super().__init__()
        object.__setattr__(self, "body", backbone)  # not a submodule: see the class doc
        self.fpn = FeaturePyramidNetwork(
            [info.channels for info in backbone.feature_info], out_channels, extra_blocks=extra_block
        )
        self.out_channels = out_channels

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        # Names "0".."3" are the levels torchvision's MultiScaleRoIAlign pools from by default.
        return self.fpn(OrderedDict((str(level), x) for level, x in zip(self.body.out_levels, self.body(images))))


@dataclass(frozen=True)
class DetectorSpec:
    """How one of torchvision's detectors is put on a backbone: a file of ``conf/task/detector/``.

    Args:
        detector: the torchvision class (``torchvision.models.detection.RetinaNet``).
        levels: backbone levels (0 = stride 4) that feed the FPN: what the backbone is built with.
        extra_levels: the pyramid above them: ``maxpool`` (P6 = max-pool of P5), ``p6p7_from_c5`` or ``p6p7_from_p5``.
        masks: whether it predicts instance masks.
    """

    detector: str
    levels: Sequence[int]
    extra_levels: str
    masks: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(int(level) for level in self.levels))
        if self.extra_levels not in EXTRA_LEVELS:
            raise ConfigError(f"task.detector.extra_levels={self.extra_levels!r}: use one of {', '.join(EXTRA_LEVELS)}")

    @property
    def cls(self) -> type[nn.Module]:
        return get_class(self.detector)

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.masks else ("bbox",)

    def build(self, backbone: Backbone, num_classes: int, **options: Any) -> nn.Module:
        """The detector on ``backbone`` (:func:`build_detector`); every detector config has this method."""
        return build_detector(self, backbone, num_classes, **options)

    def load_release(self, task: nn.Module, path: str, strict: bool = True) -> bool:
        """Load a whole-detector release into ``task`` if ``path`` is one this detector reads; none here (the file
        then holds backbone weights)."""
        return False


EXTRA_LEVELS = ("maxpool", "p6p7_from_c5", "p6p7_from_p5")


def _extra_block(kind: str, c5_channels: int, out_channels: int) -> ExtraFPNBlock:
    if kind == "maxpool":
        return LastLevelMaxPool()
    if kind == "p6p7_from_c5":
        return P6P7(c5_channels, out_channels, from_p5=False)
    return P6P7(out_channels, out_channels, from_p5=True)


def build_detector(
    spec: DetectorSpec,
    backbone: Backbone,
    num_classes: int,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    mask_head_dims: Sequence[int] = (256, 256, 256, 256),
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector on ``backbone``, built with ``out_levels=spec.levels``.

    Args:
        spec: which detector, on which levels (``conf/task/detector/*.yaml``).
        num_classes: categories + 1 (background).
        fpn_channels: FPN width (256 in all four papers); RetinaNet's and FCOS's heads have this width too.
        box_head_dim: R-CNN box head width (torchvision's ``TwoMLPHead``, 1024 in the FPN paper).
        mask_head_dims: Mask R-CNN mask head convs (four 256-channel 3x3 convs in the paper, Fig. 4 right);
            the last one is also the width of the 2x up-sampling deconvolution.
        detector_kwargs: passed to the torchvision constructor (``min_size``, ``rpn_post_nms_top_n_train``,
            ``box_batch_size_per_image``, ``score_thresh``, ...).
    """
    name = spec.cls.__name__
    if backbone.out_levels != spec.levels:
        raise ValueError(f"{name} reads backbone levels {spec.levels}, the backbone gives {backbone.out_levels}")
    require_reductions(backbone, [4 * 2**level for level in spec.levels], name)
    pyramid = FeaturePyramid(
        backbone, fpn_channels, _extra_block(spec.extra_levels, backbone.feature_info[-1].channels, fpn_channels)
    )
    if spec.cls in (MaskRCNN, FasterRCNN):
        resolution = 7  # torchvision's MultiScaleRoIAlign output for boxes
        detector_kwargs["box_head"] = TwoMLPHead(fpn_channels * resolution**2, box_head_dim)
        detector_kwargs["box_predictor"] = FastRCNNPredictor(box_head_dim, num_classes)
        if spec.masks:
            detector_kwargs["mask_head"] = MaskRCNNHeads(fpn_channels, list(mask_head_dims), 1)
            detector_kwargs["mask_predictor"] = MaskRCNNPredictor(mask_head_dims[-1], mask_head_dims[-1], num_classes)
        return spec.cls(pyramid, num_classes=None, **detector_kwargs)
    return spec.cls(pyramid, num_classes=num_classes, **detector_kwargs)
