"""Duplicate removal after a detector's scoring: hard NMS and Soft-NMS, per class, for every detector.

``task/detector/nms=<name>`` (``conf/task/detector/nms/``) picks one; the detector calls it on each image's candidates
(boxes, scores, labels, after its score threshold) and keeps the first ``detections_per_img`` of what it
returns, highest score first:

* :class:`HardNMS` -- greedy NMS (torchvision's ``batched_nms``). With ``iou_threshold=None`` the detector keeps
  its own post-processing untouched (torchvision's ``box_nms_thresh`` / ``nms_thresh``).
* :class:`SoftNMS` -- Soft-NMS (Bodla, Singh, Chellappa, Davis, ICCV 2017, Eq. 3 linear and the Gaussian
  rescoring of Sec. 3): instead of removing a box that overlaps a higher-scoring one, its score is decayed,
  ``s_i <- s_i (1 - IoU)`` when ``IoU >= N_t`` (linear) or ``s_i <- s_i exp(-IoU^2 / sigma)`` (Gaussian).
* the learned duplicate removal of Relation Networks (:class:`vtrain.tasks.detection.relation.LearnedNMS`),
  which needs R-CNN RoI features and is trained with the detector.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms

from vtrain.config import ConfigError

SOFT_NMS_METHODS = ("linear", "gaussian", "hard")


class HardNMS:
    """Greedy NMS per class: a box is removed when its IoU with a higher-scoring kept box of its class is above
    ``iou_threshold``. ``None``: the detector's own threshold and code (torchvision's)."""

    def __init__(self, iou_threshold: float | None = None):
        self.iou_threshold = iou_threshold

    @property
    def is_detectors_own(self) -> bool:
        return self.iou_threshold is None

    def __call__(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        keep = batched_nms(boxes, scores, labels, float(self.iou_threshold))
        return keep, scores[keep]

    def __repr__(self) -> str:
        return f"HardNMS(iou_threshold={self.iou_threshold})"


class SoftNMS:
    """Soft-NMS per class (Bodla et al. 2017): returns the kept boxes' indices and their decayed scores.

    Args:
        method: ``linear`` (``1 - IoU`` when ``IoU >= iou_threshold``; the rule Bodla et al.'s code runs by default),
            ``gaussian`` (``exp(-IoU^2 / sigma)``) or ``hard`` (0 when ``IoU > iou_threshold``: greedy NMS, the limit
            of both, Bodla et al. Eq. 1).
        sigma: the Gaussian's width (0.5 in Bodla et al.'s code; Relation Networks' FPN baseline uses 0.6).
        iou_threshold: ``N_t`` of the linear and hard rules (0.3 in Bodla et al.'s code).
        score_threshold: a box whose decayed score falls below it is discarded (0.001 in Bodla et al.'s code; 0 in
            Relation Networks' code, which never discards by score); a box whose score reaches 0 is always discarded.
    """

    def __init__(self, method: str = "linear", sigma: float = 0.5, iou_threshold: float = 0.3,
                 score_threshold: float = 0.001):
        if method not in SOFT_NMS_METHODS:
            raise ConfigError(f"task.detector.nms.method={method!r}: use one of {', '.join(SOFT_NMS_METHODS)}")
        if method == "gaussian" and sigma <= 0:
            raise ConfigError(f"task.detector.nms.sigma={sigma}: the Gaussian's width must be positive")
        self.method, self.sigma = method, float(sigma)
        self.iou_threshold, self.score_threshold = float(iou_threshold), float(score_threshold)

    def __call__(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        return soft_nms(boxes, scores, labels, self.method, self.sigma, self.iou_threshold, self.score_threshold)

    def __repr__(self) -> str:
        return (f"SoftNMS(method={self.method!r}, sigma={self.sigma}, iou_threshold={self.iou_threshold}, "
                f"score_threshold={self.score_threshold})")


def _decay(iou: Tensor, method: str, sigma: float, iou_threshold: float) -> Tensor:
    if method == "gaussian":
        return torch.exp(-(iou * iou) / sigma)
    if method == "linear":
        return torch.where(iou >= iou_threshold, 1.0 - iou, torch.ones_like(iou))
    return (iou <= iou_threshold).to(iou.dtype)  # hard: torchvision's nms removes IoU > threshold


def soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, method: str = "gaussian", sigma: float = 0.5,
             iou_threshold: float = 0.3, score_threshold: float = 0.001) -> tuple[Tensor, Tensor]:
    """Soft-NMS of each class independently, all classes at once.

    Each class is a row of a ``classes x max_boxes`` table (boxes sorted by score); every step picks the
    highest remaining score of every row together, keeps it, and decays the rest of its row by their IoU with
    it: as many steps as the largest class has boxes, instead of one step per box.

    Returns:
        ``keep`` (indices into ``boxes``) and the kept boxes' final scores, highest score first (ties: by class,
        then by the order they were picked).
    """
    n = scores.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device), scores.new_zeros(0)
    # rows: one per class, boxes by decreasing score (stable, so equal scores keep their input order)
    by_score = torch.argsort(scores, descending=True, stable=True)
    order = by_score[torch.argsort(labels[by_score], stable=True)]
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    num_rows, width = classes.numel(), int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    row = torch.repeat_interleave(torch.arange(num_rows, device=scores.device), counts)
    col = torch.arange(n, device=scores.device) - starts[row]

    table_scores = scores.new_zeros(num_rows, width)
    table_boxes = boxes.new_zeros(num_rows, width, 4)
    table_index = torch.full((num_rows, width), -1, dtype=torch.long, device=scores.device)
    table_scores[row, col], table_boxes[row, col], table_index[row, col] = scores[order], boxes[order], order
    alive = table_index >= 0

    kept_index = torch.full((num_rows, width), -1, dtype=torch.long, device=scores.device)
    kept_score = scores.new_zeros(num_rows, width)
    rows = torch.arange(num_rows, device=scores.device)
    for step in range(width):
        current = torch.where(alive, table_scores, torch.full_like(table_scores, -torch.inf))
        best = current.argmax(dim=1)  # the first of equal maxima: the earlier box of the row
        active = alive[rows, best]
        if not bool(active.any()):
            break
        kept_index[:, step] = torch.where(active, table_index[rows, best], kept_index[:, step])
        kept_score[:, step] = torch.where(active, table_scores[rows, best], kept_score[:, step])
        alive[rows, best] = False
        picked = table_boxes[rows, best]  # (rows, 4)
        iou = _pairwise_row_iou(picked, table_boxes)  # (rows, width)
        decayed = table_scores * _decay(iou, method, sigma, iou_threshold)
        table_scores = torch.where(active[:, None] & alive, decayed, table_scores)
        alive &= (table_scores >= score_threshold) & (table_scores > 0)

    flat_index, flat_score = kept_index.flatten(), kept_score.flatten()
    valid = flat_index >= 0
    flat_index, flat_score = flat_index[valid], flat_score[valid]
    by_final = torch.argsort(flat_score, descending=True, stable=True)
    return flat_index[by_final], flat_score[by_final]


def _pairwise_row_iou(picked: Tensor, table: Tensor) -> Tensor:
    """IoU of each row's picked box (``rows x 4``) with every box of its row (``rows x width x 4``)."""
    top_left = torch.maximum(picked[:, None, :2], table[..., :2])
    bottom_right = torch.minimum(picked[:, None, 2:], table[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=-1)
    area_picked = (picked[:, 2:] - picked[:, :2]).clamp(min=0).prod(dim=-1)
    area = (table[..., 2:] - table[..., :2]).clamp(min=0).prod(dim=-1)
    union = area_picked[:, None] + area - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter))

