"""The one-stage family: torchvision's RetinaNet and FCOS, ATSS on torchvision's parts (:mod:`atss`) and RepPoints
(:mod:`reppoints`), with the duplicate removal of ``task/detector/nms`` (:mod:`nms`), and :class:`OneStageSpec`, which
puts them on a backbone.

The candidates are each detector's own (per level: score threshold, top-k, decoding, clipping); only the
class-wise NMS at the end is replaced. With the default (``HardNMS(iou_threshold=None)``) nothing changes.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import Tensor, nn
from torchvision.models import detection
from torchvision.ops import batched_nms
from vtrain.tasks.detection.atss import ATSSDetector
from vtrain.tasks.detection.detector import torchvision_transform
from vtrain.tasks.detection.nms import HardNMS
from vtrain.tasks.detection.reppoints import RepPointsDetector, RepPointsV2Detector

from vtrain.backbones.base import Backbone, require_reductions
from vtrain.config import ConfigError


class RemovesDuplicates:
    """Mixin for a torchvision detector whose ``postprocess_detections`` ends in ``batched_nms(..., nms_thresh)``
    and keeps ``detections_per_img``: runs it with nothing suppressed and none dropped, then removes duplicates
    with ``duplicate_removal`` and keeps the best ``detections_per_img``. Under :meth:`all_candidates` it returns the
    candidates before that step (mmdet's ``get_bboxes(with_nms=False)``, what test-time augmentation merges)."""

    nms_thresh: float
    detections_per_img: int
    keeps_candidates = False

    def __init__(self, *args: Any, duplicate_removal: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.duplicate_removal = HardNMS() if duplicate_removal is None else duplicate_removal

    @contextmanager
    def all_candidates(self) -> Iterator[None]:
        self.keeps_candidates = True
        try:
            yield
        finally:
            self.keeps_candidates = False

    def postprocess_detections(self, *args: Any):
        removal = self.duplicate_removal
        if isinstance(removal, HardNMS) and removal.is_detectors_own and not self.keeps_candidates:
            return super().postprocess_detections(*args)
        own = self.nms_thresh, self.detections_per_img
        # IoU never exceeds 1: a threshold of 2 suppresses nothing
        self.nms_thresh, self.detections_per_img = 2.0, sys.maxsize
        try:
            detections = super().postprocess_detections(*args)
        finally:
            self.nms_thresh, self.detections_per_img = own
        return detections if self.keeps_candidates else [self.remove_duplicates(d) for d in detections]

    def remove_duplicates(self, candidates: dict[str, Tensor]) -> dict[str, Tensor]:
        """One image's candidates (``boxes``, ``scores``, ``labels``) less their duplicates, the best
        ``detections_per_img``."""
        boxes, scores, labels = candidates["boxes"], candidates["scores"], candidates["labels"]
        removal = self.duplicate_removal
        if isinstance(removal, HardNMS) and removal.is_detectors_own:
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)
            kept_scores = scores[keep]
        else:
            keep, kept_scores = removal(boxes, scores, labels)
        keep = keep[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": kept_scores[: self.detections_per_img]}


class RetinaNet(RemovesDuplicates, detection.RetinaNet):
    """torchvision's RetinaNet with ``duplicate_removal``."""


class FCOS(RemovesDuplicates, detection.FCOS):
    """torchvision's FCOS with ``duplicate_removal``."""


class ATSS(RemovesDuplicates, ATSSDetector):
    """ATSS (:mod:`atss`) with ``duplicate_removal``."""


class RepPoints(RemovesDuplicates, RepPointsDetector):
    """RepPoints (:mod:`reppoints`) with ``duplicate_removal``."""


class RepPointsV2(RemovesDuplicates, RepPointsV2Detector):
    """RepPointsV2 (:mod:`reppoints`) with ``duplicate_removal``."""


class OneStageSpec:
    """RetinaNet, FCOS, ATSS, RepPoints or RepPointsV2 on a backbone (a :class:`detector.DetectorSpec`):
    ``conf/task/detector/retinanet.yaml``, ``fcos.yaml``, ``atss.yaml``, ``reppoints.yaml``, ``reppoints_v2.yaml``.

    Args:
        model: the detector class with its options (a partial of :class:`RetinaNet`, :class:`FCOS`, :class:`ATSS`,
            :class:`RepPoints` or :class:`RepPointsV2`: ``anchor_generator``, ``head``, ``score_thresh``,
            ``nms_thresh``, ...).
        out_indices: the backbone outputs (0 = stride 4) that feed the pyramid (C3-C5 in all three papers).
        neck: the pyramid on the backbone, with the paper's P6/P7 (:class:`neck.FeaturePyramid`).
        nms: the duplicate removal after torchvision's candidates (``task/detector/nms``: NMS or Soft-NMS).
    """

    iou_types = ("bbox",)

    def __init__(self, model: Callable[..., nn.Module], out_indices: Sequence[int], neck: Callable[[Backbone], Any],
                 nms: Any = None):
        self.model, self.out_indices, self.neck = model, tuple(int(i) for i in out_indices), neck
        self.nms = HardNMS() if nms is None else nms
        cls = getattr(model, "func", model)
        if not (isinstance(cls, type) and issubclass(cls, RemovesDuplicates)):
            raise ConfigError(f"task.detector.model: {cls} is not a one-stage detector of this module (RetinaNet, "
                              "FCOS, ATSS, RepPoints, RepPointsV2)")
        if getattr(self.nms, "learned", False):
            raise ConfigError(f"task/detector/nms=learned needs R-CNN RoI features, {cls.__name__} has none: use "
                              "nms or soft_nms, or task/detector=faster_rcnn / mask_rcnn")
        self.name = cls.__name__

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> nn.Module:
        require_reductions(backbone, [4 * 2**i for i in self.out_indices], self.name)
        return self.model(self.neck(backbone), num_classes=num_classes, duplicate_removal=self.nms,
                          **torchvision_transform(transform))

    def load_release(self, task: nn.Module, path: str, strict: bool = True) -> bool:
        return False  # the file holds backbone weights
