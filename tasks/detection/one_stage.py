"""torchvision's one-stage detectors with the duplicate removal of ``task/nms`` (:mod:`nms`).

The candidates are torchvision's own (per level: score threshold, top-k, decoding, clipping); only the
class-wise NMS at the end is replaced. With the default (``HardNMS(iou_threshold=None)``) nothing changes.
"""
from __future__ import annotations

import sys
from typing import Any

from torchvision.models import detection
from vtrain.tasks.detection.nms import HardNMS


class RemovesDuplicates:
    """Mixin for a torchvision detector whose ``postprocess_detections`` ends in ``batched_nms(..., nms_thresh)``
    and keeps ``detections_per_img``: runs it with nothing suppressed and none dropped, then removes duplicates
    with ``duplicate_removal`` and keeps the best ``detections_per_img``."""

    nms_thresh: float
    detections_per_img: int

    def __init__(self, *args: Any, duplicate_removal: Any = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.duplicate_removal = HardNMS() if duplicate_removal is None else duplicate_removal

    def postprocess_detections(self, *args: Any):
        removal = self.duplicate_removal
        if isinstance(removal, HardNMS) and removal.is_detectors_own:
            return super().postprocess_detections(*args)
        own = self.nms_thresh, self.detections_per_img
        # IoU never exceeds 1: a threshold of 2 suppresses nothing
        self.nms_thresh, self.detections_per_img = 2.0, sys.maxsize
        try:
            detections = super().postprocess_detections(*args)
        finally:
            self.nms_thresh, self.detections_per_img = own
        for d in detections:
            keep, scores = removal(d["boxes"], d["scores"], d["labels"])
            keep = keep[: self.detections_per_img]
            d.update(boxes=d["boxes"][keep], labels=d["labels"][keep], scores=scores[: self.detections_per_img])
        return detections


class RetinaNet(RemovesDuplicates, detection.RetinaNet):
    """torchvision's RetinaNet with ``duplicate_removal``."""


class FCOS(RemovesDuplicates, detection.FCOS):
    """torchvision's FCOS with ``duplicate_removal``."""
