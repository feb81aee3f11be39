"""The R-CNN family (Faster R-CNN, Ren et al. 2015; Mask R-CNN, He et al. 2017) on an FPN: torchvision's classes,
composed by constructor arguments from the parts of ``conf/task/detector/faster_rcnn.yaml`` / ``mask_rcnn.yaml``.

Parts: the pyramid (``neck``), the box head (``task/detector/box_head``: torchvision's 2fc or Relation Networks'
2fc+RM), the duplicate removal (``task/detector/nms``: NMS, Soft-NMS or the learned one), torchvision's or mmdet v2's
R-CNN details (``task/detector/rcnn``), and torchvision's class with its own options (``model``: anchor generator,
RPN and RoI sampling sizes, thresholds). The RPN and RoI heads become :mod:`roi_heads`' subclasses, which compute
what torchvision's do with the defaults.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from vtrain.tasks.detection.detector import torchvision_transform
from vtrain.tasks.detection.mmdet_release import (
    Rows,
    background_first,
    load_mmdet_release,
    mask_head_names,
    pyramid_and_rpn_names,
    with_background_rows,
)
from vtrain.tasks.detection.neck import FeaturePyramid
from vtrain.tasks.detection.nms import HardNMS
from vtrain.tasks.detection.roi_heads import RCNNSettings, build_rcnn_heads, roi_pools

from vtrain.backbones.base import Backbone, require_reductions
from vtrain.config import ConfigError

ROI_SIZE = 7  # torchvision's MultiScaleRoIAlign output for boxes (14 for masks)


def rcnn_class(model: Callable[..., FasterRCNN], mask_head_dims: Sequence[int] | None,
               spec: str) -> tuple[type, list[int] | None]:
    """The torchvision R-CNN class a ``task.detector.model`` partial builds, and its mask heads' conv widths (None
    for a Faster R-CNN); one line for another class, or a Mask R-CNN without widths."""
    cls = getattr(model, "func", model)
    if not (isinstance(cls, type) and issubclass(cls, FasterRCNN)):
        raise ConfigError(f"task.detector.model: {cls} is not torchvision's FasterRCNN or MaskRCNN ({spec} builds "
                          "on those)")
    if not issubclass(cls, MaskRCNN):
        return cls, None
    if not mask_head_dims:
        raise ConfigError("task.detector.mask_head_dims is empty: a mask head needs its conv widths, e.g. "
                          "[256, 256, 256, 256]")
    return cls, [int(d) for d in mask_head_dims]


class PyramidRCNN:
    """What the R-CNN specs share (:class:`RCNNSpec`, :class:`cascade.CascadeSpec`): a pyramid on the backbone,
    boxes and (with ``masks``) instance masks, and mmdetection v2's releases of the detector where the spec says
    where mmdet's modules sit (:meth:`release_names`; :mod:`mmdet_release`)."""

    out_indices: tuple[int, ...]
    neck: Callable[[Backbone], FeaturePyramid]
    masks: bool
    name: str
    reductions: tuple[int, ...] | None = None  # the strides of those outputs; None: 4 * 2**i, a pyramid's

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.masks else ("bbox",)

    def pyramid(self, backbone: Backbone) -> FeaturePyramid:
        """The neck on ``backbone``, once its strides are found to be the pyramid's."""
        if self.reductions is None:
            require_reductions(backbone, [4 * 2**i for i in self.out_indices], self.name)
        else:
            require_reductions(backbone, self.reductions, self.name,
                               "build it with those (a dilated C5 at 16: backbone.output_stride=16)")
        return self.neck(backbone)

    def release_names(self, detector: nn.Module) -> tuple[dict[str, str], dict[str, Rows]] | None:
        """mmdet's module prefixes of this detector's heads -> vtrain's, and the rows to reorder (by vtrain prefix);
        None: no mmdet release of this detector is read."""
        return None

    def load_release(self, task: nn.Module, path: str, strict: bool = True) -> bool:
        """An mmdetection v2 checkpoint of this detector (the Swin detection releases), else False: the file holds
        backbone weights."""
        release = self.release_names(task.detector)
        if release is None:
            return False
        names, rows = release
        names = {**pyramid_and_rpn_names(len(task.detector.backbone.fpn.inner_blocks)), **names}
        return load_mmdet_release(task, path, strict, names, rows, f"{self.name} model")


class RCNNSpec(PyramidRCNN):
    """Faster / Mask R-CNN on a backbone (a :class:`detector.DetectorSpec`).

    Args:
        model: torchvision's ``FasterRCNN`` or ``MaskRCNN`` with its options (a partial: ``rpn_anchor_generator``,
            ``rpn_post_nms_top_n_train``, ``box_batch_size_per_image``, ``box_score_thresh``, ...); the backbone,
            heads and RoI pools come from the parts below.
        out_indices: the backbone outputs (0 = stride 4) that feed the pyramid; RoIs are pooled from all of them.
        neck: the pyramid on the backbone (:class:`neck.FeaturePyramid`, called with the backbone).
        box_head: called with ``in_channels`` (the pooled RoI's size) and ``representation_size`` (``box_head_dim``).
        box_head_dim: the box head's width (1024 in the FPN paper), the predictor's input.
        nms: the duplicate removal replacing torchvision's class-wise NMS (:mod:`nms`, :class:`relation.LearnedNMS`).
        rcnn: torchvision's or mmdetection v2's R-CNN details.
        mask_head_dims: Mask R-CNN's mask head convs (four 256-channel 3x3 convs, Fig. 4 right); the last is also the
            up-sampling deconvolution's width. Only for ``MaskRCNN``.
        reductions: the strides the backbone outputs must have (None: a pyramid's 4 * 2**i; DC5's dilated C5:
            ``[16]``).
        box_roi_pool: the boxes' RoI pool, called with the neck's ``featmap_names`` and ``channels``, giving
            ``7 x 7`` RoIs (None: RoIAlign with ``rcnn``'s settings; Deformable ConvNets' head:
            :class:`deformable_roi_pool.DeformableRoIPool`).
    """

    def __init__(self, model: Callable[..., FasterRCNN], out_indices: Sequence[int], neck: Callable[[Backbone], FeaturePyramid],
                 box_head: Callable[..., nn.Module], box_head_dim: int = 1024, nms: Any = None,
                 rcnn: RCNNSettings | None = None, mask_head_dims: Sequence[int] | None = None,
                 reductions: Sequence[int] | None = None, box_roi_pool: Callable[..., nn.Module] | None = None):
        self.box_roi_pool = box_roi_pool
        self.model, self.out_indices, self.neck = model, tuple(int(i) for i in out_indices), neck
        self.reductions = None if reductions is None else tuple(int(r) for r in reductions)
        self.box_head, self.box_head_dim = box_head, int(box_head_dim)
        self.nms = HardNMS() if nms is None else nms
        self.rcnn = RCNNSettings() if rcnn is None else rcnn
        cls, self.mask_head_dims = rcnn_class(model, mask_head_dims, "RCNNSpec")
        self.masks = self.mask_head_dims is not None
        self.name = cls.__name__

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> nn.Module:
        pyramid = self.pyramid(backbone)
        width = pyramid.out_channels
        parts: dict[str, Any] = {
            "box_head": self.box_head(in_channels=width * ROI_SIZE**2, representation_size=self.box_head_dim),
            "box_predictor": FastRCNNPredictor(self.box_head_dim, num_classes),
            **roi_pools(self.rcnn, self.masks, pyramid.level_names),
        }
        if self.masks:
            parts["mask_head"] = MaskRCNNHeads(width, list(self.mask_head_dims), 1)
            parts["mask_predictor"] = MaskRCNNPredictor(self.mask_head_dims[-1], self.mask_head_dims[-1], num_classes)
        detector = self.model(pyramid, num_classes=None, **parts, **torchvision_transform(transform))
        build_rcnn_heads(detector, self.rcnn, self.nms, getattr(pyramid, "rpn_levels", None))
        if self.box_roi_pool is not None:  # set after: torchvision's FasterRCNN takes only its MultiScaleRoIAlign
            pool = self.box_roi_pool(featmap_names=pyramid.level_names, channels=width)
            if tuple(pool.output_size) != (ROI_SIZE, ROI_SIZE):
                raise ConfigError(f"task.detector.box_roi_pool.output_size: the box head reads {ROI_SIZE}x{ROI_SIZE} "
                                  f"RoIs, set it to {ROI_SIZE}")
            detector.roi_heads.box_roi_pool = pool
        return detector

    def release_names(self, detector: nn.Module) -> tuple[dict[str, str], dict[str, Rows]]:
        """mmdet's ``StandardRoIHead`` (``roi_head.bbox_head``: ``Shared2FCBBoxHead``, ``roi_head.mask_head``:
        ``FCNMaskHead``) on torchvision's 2fc head and predictors: ``fc_cls`` has the background last; ``fc_reg``
        (class-specific, ``reg_class_agnostic=False``) and ``conv_logits`` have no background row, which
        torchvision's regressor and mask predictor have and never read (zeros here)."""
        own = "detector.roi_heads"
        names = {"roi_head.bbox_head.shared_fcs.0": f"{own}.box_head.fc6",
                 "roi_head.bbox_head.shared_fcs.1": f"{own}.box_head.fc7",
                 "roi_head.bbox_head.fc_cls": f"{own}.box_predictor.cls_score",
                 "roi_head.bbox_head.fc_reg": f"{own}.box_predictor.bbox_pred"}
        rows = {f"{own}.box_predictor.cls_score": background_first,
                f"{own}.box_predictor.bbox_pred": with_background_rows(4)}
        if self.masks:
            names.update(mask_head_names("roi_head.mask_head", f"{own}.mask_head", len(self.mask_head_dims),
                                         logits=f"{own}.mask_predictor.mask_fcn_logits",
                                         upsample=f"{own}.mask_predictor.conv5_mask"))
            rows[f"{own}.mask_predictor.mask_fcn_logits"] = with_background_rows(1)
        return names, rows
