"""Duplicate removal: Soft-NMS equals a plain per-box reference loop (Bodla et al. 2017) on random boxes, greedy
NMS is its hard limit, and every detector applies the chosen removal to torchvision's own candidates."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import batched_nms, box_iou

from vtrain.tasks.detection.nms import HardNMS, SoftNMS, soft_nms

pytestmark = pytest.mark.usefixtures("one_thread")


def reference_soft_nms(boxes, scores, labels, method, sigma, nt, threshold):
    """Bodla et al.'s algorithm written out: per class, repeatedly keep the highest remaining score and rescore
    the rest by their IoU with it, dropping a box whose score falls below the threshold or reaches 0."""
    kept = []
    for label in sorted(set(labels.tolist())):
        remaining = {i: float(scores[i]) for i in range(len(scores)) if int(labels[i]) == label}
        while remaining:
            best = max(remaining, key=lambda i: (remaining[i], -i))  # highest score, earlier box on a tie
            kept.append((best, remaining.pop(best)))
            for i in list(remaining):
                iou = float(box_iou(boxes[best][None], boxes[i][None]))
                if method == "gaussian":
                    remaining[i] *= math.exp(-iou * iou / sigma)
                elif method == "linear":
                    remaining[i] *= (1 - iou) if iou >= nt else 1.0
                elif iou > nt:
                    remaining[i] = 0.0
                if remaining[i] < threshold or remaining[i] <= 0:
                    del remaining[i]
    kept.sort(key=lambda k: -k[1])  # stable: classes in order, picks in order
    return [k[0] for k in kept], [k[1] for k in kept]


def random_detections(n=60, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(n, 2, generator=g) * 60
    sizes = 8 + torch.rand(n, 2, generator=g) * 20
    boxes = torch.cat([centres - sizes / 2, centres + sizes / 2], dim=1)
    return boxes, torch.rand(n, generator=g), torch.randint(1, classes + 1, (n,), generator=g)


@pytest.mark.parametrize("seed, method, sigma, nt, threshold", [
    (0, "gaussian", 0.5, 0.3, 0.001), (1, "gaussian", 0.6, 0.3, 0.05), (2, "linear", 0.5, 0.3, 0.001),
    (3, "linear", 0.5, 0.5, 0.0), (4, "hard", 0.5, 0.5, 0.0),
])
def test_soft_nms_equals_the_reference_loop(seed, method, sigma, nt, threshold):
    boxes, scores, labels = random_detections(seed=seed)
    keep, kept_scores = soft_nms(boxes, scores, labels, method, sigma, nt, threshold)
    ref_keep, ref_scores = reference_soft_nms(boxes, scores, labels, method, sigma, nt, threshold)
    assert keep.tolist() == ref_keep
    assert torch.allclose(kept_scores, torch.tensor(ref_scores), atol=1e-6)
    assert len(keep) > 10 and (method == "hard" or (kept_scores < scores[keep] - 1e-4).any())  # something decayed


def test_hard_nms_is_the_limit():
    """The hard rule equals torchvision's batched_nms (indices and order); the Gaussian with a vanishing width
    removes every overlapping box, i.e. greedy NMS at IoU threshold 0 (on boxes whose overlaps are 0 or > 0.1)."""
    boxes, scores, labels = random_detections(n=80, seed=3)
    for threshold in (0.3, 0.5, 0.7):
        keep, kept_scores = soft_nms(boxes, scores, labels, "hard", iou_threshold=threshold, score_threshold=0.0)
        assert keep.tolist() == batched_nms(boxes, scores, labels, threshold).tolist()
        assert torch.equal(kept_scores, scores[keep])
        assert HardNMS(threshold)(boxes, scores, labels)[0].tolist() == keep.tolist()
    grid = torch.tensor([[x, y, x + 10, y + 10] for x in range(0, 60, 7) for y in range(0, 30, 12)], dtype=torch.float)
    iou = box_iou(grid, grid)
    assert ((iou == 0) | (iou > 0.1)).all()
    g = torch.Generator().manual_seed(1)
    grid_scores, grid_labels = torch.rand(len(grid), generator=g), torch.ones(len(grid), dtype=torch.long)
    limit, _ = soft_nms(grid, grid_scores, grid_labels, "gaussian", sigma=1e-4, score_threshold=1e-3)
    assert limit.tolist() == batched_nms(grid, grid_scores, grid_labels, 0.0).tolist()


def test_soft_nms_of_no_box_and_one_class_per_box():
    keep, scores = soft_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))
    assert keep.numel() == 0 and scores.numel() == 0
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10.0]])
    keep, scores = soft_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([1, 2]))
    assert keep.tolist() == [0, 1] and scores.tolist() == pytest.approx([0.9, 0.8])  # different classes: untouched


def _retinanet_and_rcnn(*nms: str):
    from test_detection_models import TINY_SWIN, _task

    torch.manual_seed(0)
    options = {"retinanet": ["+task.detector.model.score_thresh=0.0"],
               "faster_rcnn": ["+task.detector.model.box_score_thresh=0.0",
                               "+task.detector.model.rpn_pre_nms_top_n_test=50",
                               "+task.detector.model.rpn_post_nms_top_n_test=30"]}
    return [_task(TINY_SWIN, name, *nms, *options[name]) for name in ("retinanet", "faster_rcnn")]


def test_every_detector_removes_duplicates_of_its_own_candidates():
    """RetinaNet (one stage) and Faster R-CNN under task/detector/nms=soft_nms: the detections equal Soft-NMS applied
    to the detector's candidates, which are the detections of the same weights with NMS switched off."""
    soft = ["task/detector/nms=soft_nms"]
    none = ["task/detector/nms=soft_nms", "task.detector.nms.method=hard", "task.detector.nms.iou_threshold=2.0",
            "task.detector.nms.score_threshold=0.0"]
    image = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))]
    for with_soft, without in zip(_retinanet_and_rcnn(*soft), _retinanet_and_rcnn(*none)):
        for task in (with_soft, without):
            task.eval()
            getattr(task.detector, "roi_heads", task.detector).detections_per_img = 10_000
        with torch.no_grad():
            out, candidates = with_soft(image)[0], without(image)[0]
        keep, scores = SoftNMS()(candidates["boxes"], candidates["scores"], candidates["labels"])
        assert len(candidates["boxes"]) > len(keep) > 5
        assert torch.equal(out["boxes"], candidates["boxes"][keep]) and torch.allclose(out["scores"], scores)
