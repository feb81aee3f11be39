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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from hydra.utils import get_class
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from vtrain.tasks.detection.nms import HardNMS
from vtrain.tasks.detection.one_stage import RemovesDuplicates
from vtrain.tasks.detection.roi_heads import RCNNSettings, build_rcnn_heads, roi_pools

from vtrain.backbones.base import Backbone, require_reductions
from vtrain.config import ConfigError


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

    def macs(self, detector: nn.Module, image_shape: Sequence[int]) -> int:
        """Multiply-accumulates of one test image (:func:`detector_macs`)."""
        return detector_macs(detector, image_shape)

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
    box_head: Callable[..., nn.Module] = TwoMLPHead,
    duplicate_removal: Any = None,
    rcnn: RCNNSettings | None = None,
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
        box_head: the R-CNN box head, called as ``box_head(in_channels=..., representation_size=box_head_dim)``
            (``conf/task/box_head/``: torchvision's 2fc ``TwoMLPHead`` or :class:`relation.RelationBoxHead`).
        duplicate_removal: what replaces the detector's NMS (``conf/task/nms/``); None: the detector's own NMS.
        rcnn: torchvision's or mmdet v2's R-CNN settings (``conf/task/rcnn/``); None: torchvision's.
        detector_kwargs: passed to the torchvision constructor (``min_size``, ``rpn_post_nms_top_n_train``,
            ``box_batch_size_per_image``, ``score_thresh``, ...).
    """
    name = spec.cls.__name__
    if backbone.out_levels != spec.levels:
        raise ValueError(f"{name} reads backbone levels {spec.levels}, the backbone gives {backbone.out_levels}")
    require_reductions(backbone, [4 * 2**level for level in spec.levels], name)
    removal = HardNMS() if duplicate_removal is None else duplicate_removal
    rcnn = RCNNSettings() if rcnn is None else rcnn
    pyramid = FeaturePyramid(
        backbone, fpn_channels, _extra_block(spec.extra_levels, backbone.feature_info[-1].channels, fpn_channels)
    )
    if issubclass(spec.cls, FasterRCNN):  # Mask R-CNN is one
        resolution = 7  # torchvision's MultiScaleRoIAlign output for boxes
        detector_kwargs["box_head"] = box_head(in_channels=fpn_channels * resolution**2,
                                               representation_size=box_head_dim)
        detector_kwargs["box_predictor"] = FastRCNNPredictor(box_head_dim, num_classes)
        detector_kwargs.update(roi_pools(rcnn, spec.masks))
        if spec.masks:
            detector_kwargs["mask_head"] = MaskRCNNHeads(fpn_channels, list(mask_head_dims), 1)
            detector_kwargs["mask_predictor"] = MaskRCNNPredictor(mask_head_dims[-1], mask_head_dims[-1], num_classes)
        detector = spec.cls(pyramid, num_classes=None, **detector_kwargs)
        build_rcnn_heads(detector, rcnn, removal)
        return detector
    refuse_rcnn_options(name, box_head, removal, rcnn)
    if issubclass(spec.cls, RemovesDuplicates):
        detector_kwargs["duplicate_removal"] = removal
    elif not (isinstance(removal, HardNMS) and removal.is_detectors_own):
        raise ConfigError(f"task/nms: {name} has no class-wise NMS to replace; leave task/nms=nms")
    return spec.cls(pyramid, num_classes=num_classes, **detector_kwargs)


def refuse_rcnn_options(name: str, box_head: Any, removal: Any, rcnn: RCNNSettings | None) -> None:
    """One line for an R-CNN choice (``task/box_head``, ``task/nms=learned``, ``task/rcnn``: config groups every
    detector is given) made for a detector without an R-CNN, rather than ignoring it."""
    if getattr(getattr(box_head, "func", box_head), "relates_objects", False):
        raise ConfigError(f"task/box_head relates RoIs, {name} has none: use it with task/detector=faster_rcnn or "
                          "mask_rcnn")
    if getattr(removal, "learned", False):
        raise ConfigError(f"task/nms=learned needs R-CNN RoI features, {name} has none: use task/nms=nms or "
                          "soft_nms, or task/detector=faster_rcnn / mask_rcnn")
    if rcnn is not None and not rcnn.is_torchvision:
        raise ConfigError(f"task/rcnn sets R-CNN details, {name} is not one: leave task/rcnn=torchvision")


def detector_macs(detector: nn.Module, image_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one test image of ``image_shape`` (C, H, W, as the detector pads it), counted as
    :mod:`vtrain.profiling` counts (matrix products and convolutions; RoIAlign, NMS and box decoding are not):
    the backbone, FPN and dense head(s) on the image; for an R-CNN, the box head (relation modules included) on the
    RPN's test-time proposal count (``rpn_post_nms_top_n_test``: the RoIs it sees at most), the mask head on
    ``detections_per_img`` boxes and a learned duplicate removal on the first ``first_n`` RoIs of every class.
    Works on the meta device."""
    device = next(detector.parameters()).device
    with FlopCounterMode(display=False) as counter:
        features = list(detector.backbone(torch.zeros(1, *image_shape, device=device)).values())
        if not isinstance(detector, FasterRCNN):
            detector.head(features)
            return counter.get_total_flops() // 2
        detector.rpn.head(features)
        heads, channels = detector.roi_heads, features[0].shape[1]
        num_rois = detector.rpn._post_nms_top_n["testing"]
        corner = torch.arange(num_rois, device=device, dtype=torch.float32)[:, None] % 100
        boxes = torch.cat([corner, corner, corner + 32, corner + 32], dim=1)
        pooled = torch.zeros(num_rois, channels, *heads.box_roi_pool.output_size, device=device)
        box_features = heads.box_head(pooled, [boxes]) if heads.relates_objects else heads.box_head(pooled)
        class_logits, _ = heads.box_predictor(box_features)
        if heads.learns_duplicate_removal:
            num_classes = class_logits.shape[1]
            heads.duplicate_removal.rescore(class_logits.softmax(-1), boxes[:, None].expand(-1, num_classes, 4),
                                            box_features, torch.arange(1, num_classes, device=device))
        if heads.has_mask():
            masks = torch.zeros(heads.detections_per_img, channels, *heads.mask_roi_pool.output_size, device=device)
            heads.mask_predictor(heads.mask_head(masks))
    return counter.get_total_flops() // 2
