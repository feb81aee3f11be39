"""Multi-scale + flip test-time augmentation for detection: mmdetection v2's ``MultiScaleFlipAug`` and its merges.

``task.test_scales=[s1, s2, ...]`` and ``task.test_flip=true`` make the views of each test image: the image
resized by the detector's own test resize to short side ``s`` (long side at most ``task.test_max_size``: mmdet's
``img_scale=[(1333, s1), (1333, s2), ...]`` with ``keep_ratio=True``), each scale also flipped horizontally with
``test_flip`` (``MultiScaleFlipAug``: scales outer, flip inner). The detector runs on every view; what it finds is
mapped back to the original image (un-flipped in the view, then rescaled: mmdet's ``bbox_mapping_back``) and
merged, by family:

* **R-CNN** (Faster / Mask R-CNN, C4, DC5, Cascade; mmdet's ``TwoStageDetector.aug_test``): the RPN runs on every
  view; its proposals, mapped back, are concatenated, NMSed at the RPN's test IoU and the best ``post_nms_top_n``
  kept (``merge_aug_proposals``). Those proposals are mapped into each view and the RoI head(s) score them there
  (Cascade: every stage, the stages' logits averaged; ``CascadeRoIHead.aug_test``); the class-specific boxes,
  mapped back, and the class probabilities are averaged over the views (``merge_aug_bboxes``), then the detector's
  own duplicate removal and ``detections_per_img`` apply. Masks: the final boxes are mapped into each view, each
  view's mask probabilities (each cascade stage's) are un-flipped and averaged (``merge_aug_masks``), then pasted
  into the original image.
* **one stage** (RetinaNet, FCOS, ATSS; mmdet's dense heads' ``aug_test_bboxes``): each view's candidates (the
  detector's own per-level score threshold and top-k, before its duplicate removal: ``with_nms=False``), mapped back,
  are concatenated, then the detector's own duplicate removal and ``detections_per_img``.
* **set prediction** (DETR, Deformable DETR, Sparse R-CNN): each view's detections, mapped back, are concatenated,
  then class-wise NMS at IoU 0.5 (mmdet's test-time NMS) and the best 100 (COCO's ``maxDets``). This is vtrain's
  choice: mmdet has no test-time augmentation for set-prediction heads (one prediction per query, no duplicates
  within a view, so nothing of theirs to reuse), and NMS over the views' detections is how mmdet merges the other
  families' views.

With one view (one scale, no flip) nothing is merged: the detections are the plain test's at that size.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import batched_nms
from vtrain.tasks.detection.roi_heads import DetectionRPN

from vtrain.config import ConfigError

SET_PREDICTION_NMS_IOU = 0.5  # mmdet's test-time NMS IoU of its R-CNN and one-stage heads
SET_PREDICTION_DETECTIONS = 100  # COCO's maxDets


@dataclass(frozen=True)
class View:
    """One test view: the image resized to short side ``scale`` (long side capped by the detector), flipped or not."""

    scale: int
    flip: bool


def multi_scale_flip_views(scales: Sequence[int] | None, flip: bool, test_size: int) -> tuple[View, ...] | None:
    """The views of ``task.test_scales`` (None: the one test size, ``task.test_size``) and ``task.test_flip``; None
    when there is only the plain test."""
    if scales is None:
        return (View(test_size, False), View(test_size, True)) if flip else None
    if isinstance(scales, (str, int, float)):
        raise ConfigError(f"task.test_scales={scales!r}: give a list of short sides, e.g. [{scales}] or [480, 640, 800]")
    scales = list(scales)
    if not scales:
        raise ConfigError("task.test_scales=[]: give the test short sides, e.g. [480, 640, 800], or null for the one "
                          "test size (task.test_size)")
    bad = [s for s in scales if isinstance(s, bool) or not isinstance(s, int) or s <= 0]
    if bad:
        raise ConfigError(f"task.test_scales={scales}: {bad[0]!r} is not a short side in pixels; give positive "
                          "integers, e.g. [480, 640, 800]")
    return tuple(View(int(s), f) for s in scales for f in ((False, True) if flip else (False,)))


def flip_boxes(boxes: Tensor, width: int) -> Tensor:
    """XYXY boxes mirrored in an image ``width`` wide (mmdet v2's ``bbox_flip``: ``x -> width - x``)."""
    return torch.stack([width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1)


def to_original(boxes: Tensor, view: View, view_size: Sequence[int], original_size: Sequence[int]) -> Tensor:
    """Boxes ``(..., 4)`` of a view in the original image: un-flipped in the view, then rescaled
    (mmdet's ``bbox_mapping_back``)."""
    if view.flip:
        boxes = flip_boxes(boxes, view_size[1])
    return resize_boxes(boxes.reshape(-1, 4), list(view_size), list(original_size)).reshape(boxes.shape)


def to_view(boxes: Tensor, view: View, view_size: Sequence[int], original_size: Sequence[int]) -> Tensor:
    """Boxes ``(N, 4)`` of the original image in a view: rescaled, then flipped (mmdet's ``bbox_mapping``)."""
    boxes = resize_boxes(boxes, list(original_size), list(view_size))
    return flip_boxes(boxes, view_size[1]) if view.flip else boxes


def merge_proposals(proposals: Sequence[Tensor], scores: Sequence[Tensor], iou_threshold: float, count: int
                    ) -> Tensor:
    """mmdet's ``merge_aug_proposals``: the views' proposals (mapped back) concatenated, NMS, the best ``count``."""
    boxes, scores = torch.cat(list(proposals)), torch.cat(list(scores))
    keep = batched_nms(boxes, scores, torch.zeros_like(scores, dtype=torch.long), iou_threshold)
    return boxes[keep[:count]]


def average_boxes(views: Sequence[View], scored: Sequence[tuple[Tensor, Tensor]], view_sizes: Sequence[Sequence[int]],
                  original_size: Sequence[int]) -> tuple[Tensor, Tensor]:
    """mmdet's ``merge_aug_bboxes``: each view's class-specific boxes ``(N, K, 4)`` of the same RoIs, mapped back,
    and its class probabilities ``(N, K)``, averaged over the views."""
    boxes = [to_original(b, view, size, original_size) for view, (b, _), size in zip(views, scored, view_sizes)]
    return torch.stack(boxes).mean(0), torch.stack([s for _, s in scored]).mean(0)


def average_masks(views: Sequence[View], probabilities: Sequence[Tensor]) -> Tensor:
    """mmdet's ``merge_aug_masks``: each view's RoI mask probabilities ``(N, 1, M, M)``, un-flipped, averaged."""
    return torch.stack([p.flip(-1) if view.flip else p for view, p in zip(views, probabilities)]).mean(0)


def merge_detections(views: Sequence[View], detections: Sequence[dict[str, Tensor]], original_size: Sequence[int],
                     remove_duplicates: Callable[[dict[str, Tensor]], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Each view's detections, already rescaled to the original image by the detector, un-flipped there,
    concatenated, then ``remove_duplicates`` (one view: as it is)."""
    width = original_size[1]
    unflipped = []
    for view, found in zip(views, detections):
        if view.flip:
            found = {**found, "boxes": flip_boxes(found["boxes"], width),
                     **({"masks": found["masks"].flip(-1)} if "masks" in found else {})}
        unflipped.append(found)
    if len(unflipped) == 1:
        return unflipped[0]
    return remove_duplicates({key: torch.cat([found[key] for found in unflipped]) for key in unflipped[0]})


def class_wise_nms(iou_threshold: float, count: int) -> Callable[[dict[str, Tensor]], dict[str, Tensor]]:
    """Class-wise NMS at ``iou_threshold``, the best ``count``: the set-prediction detectors' merge."""
    def remove_duplicates(found: dict[str, Tensor]) -> dict[str, Tensor]:
        keep = batched_nms(found["boxes"], found["scores"], found["labels"], iou_threshold)[:count]
        return {key: value[keep] for key, value in found.items()}
    return remove_duplicates


@contextmanager
def view_resize(detector: nn.Module, scale: int) -> Iterator[None]:
    """The detector's own test resize (every detector's ``transform``, torchvision's) at short side ``scale``."""
    own = detector.transform.min_size
    detector.transform.min_size = (int(scale),)
    try:
        yield
    finally:
        detector.transform.min_size = own


def detect(detector: nn.Module, images: Sequence[Tensor], views: Sequence[View]) -> list[dict[str, Tensor]]:
    """The detections of each image (in its original coordinates), its views merged by the detector's family."""
    two_stage = isinstance(getattr(detector, "rpn", None), DetectionRPN) and hasattr(detector.roi_heads, "scored_boxes")
    return [(detect_two_stage if two_stage else detect_any)(detector, image, views) for image in images]


def detect_any(detector: nn.Module, image: Tensor, views: Sequence[View]) -> dict[str, Tensor]:
    """One-stage detectors (:class:`one_stage.RemovesDuplicates`): each view's candidates before duplicate removal,
    merged by the detector's own removal (mmdet's ``aug_test_bboxes`` of dense heads); the others: each view's
    detections, merged by :func:`class_wise_nms`."""
    one_stage = hasattr(detector, "all_candidates") and len(views) > 1
    found = []
    for view in views:
        with view_resize(detector, view.scale), detector.all_candidates() if one_stage else nullcontext():
            found.append(detector([image.flip(-1) if view.flip else image])[0])
    removal = (detector.remove_duplicates if one_stage
               else class_wise_nms(SET_PREDICTION_NMS_IOU, SET_PREDICTION_DETECTIONS))
    return merge_detections(views, found, image.shape[-2:], removal)


def detect_two_stage(detector: nn.Module, image: Tensor, views: Sequence[View]) -> dict[str, Tensor]:
    original = tuple(image.shape[-2:])
    rpn, heads = detector.rpn, detector.roi_heads
    features, sizes, proposals, scores = [], [], [], []
    for view in views:
        with view_resize(detector, view.scale):
            batch, _ = detector.transform([image.flip(-1) if view.flip else image])
        maps = detector.backbone(batch.tensors)
        maps = OrderedDict([("0", maps)]) if isinstance(maps, Tensor) else maps
        size = tuple(batch.image_sizes[0])
        boxes, box_scores = rpn.scored_proposals(batch, maps)
        features.append(maps)
        sizes.append(size)
        proposals.append(to_original(boxes[0], view, size, original))
        scores.append(box_scores[0])
    rois = proposals[0] if len(views) == 1 else merge_proposals(proposals, scores, rpn.nms_thresh, rpn.post_nms_top_n())
    scored = [heads.scored_boxes(maps, [to_view(rois, view, size, original)], [size])[0]
              for view, maps, size in zip(views, features, sizes)]
    result = heads.detections(*average_boxes(views, scored, sizes, original))
    if heads.has_mask():
        probabilities = [heads.mask_probabilities(maps, [to_view(result["boxes"], view, size, original)],
                                                  [result["labels"]], [size])
                         for view, maps, size in zip(views, features, sizes)]
        result["masks"] = paste_masks_in_image(average_masks(views, probabilities), result["boxes"], original)
    return result
