"""DETR's set prediction loss (Carion et al., ECCV 2020, Sec. 3.1, Eq. 1-2; facebookresearch/detr
``models/matcher.py`` and ``SetCriterion`` in ``models/detr.py``).

Each image's predictions are matched one-to-one to its ground-truth objects by the Hungarian algorithm
(``scipy.optimize.linear_sum_assignment``) on the cost
``class_cost * (-p(class)) + bbox_cost * L1(boxes) + giou_cost * (-GIoU(boxes))`` (the official 1 / 5 / 2);
the unmatched predictions are "no object". The loss then is cross-entropy over the classes plus no-object (whose
weight is ``no_object_weight``, 0.1), plus the L1 and generalized-IoU losses of the matched boxes, with the same
weights as the cost. Boxes are ``(cx, cy, w, h)`` relative to the image (padding excluded).

With auxiliary decoding losses (Sec. 3.2) every decoder layer's predictions are matched and scored the same
way. The box losses are divided by the number of ground-truth boxes averaged over the processes (at least 1),
so that every process's loss has the same scale.

Deformable DETR's variant (:class:`FocalHungarianMatcher`, :class:`FocalSetCriterion`) changes only the class
terms, to sigmoid focal ones over the classes without a no-object output; the matching, box terms, box count and
auxiliary losses are these. Sparse R-CNN's set loss is that variant on ``(x1, y1, x2, y2)`` boxes relative to the
image (the matcher's ``box_format="xyxy"``): its L1 cost and loss compare corners, not centres and sizes.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import box_convert, generalized_box_iou

# One image's targets: ``labels`` (int64, class indices 0..K-1) and ``boxes`` (float, relative to the image, in
# the matcher's ``box_format``: cxcywh for DETR, xyxy for Sparse R-CNN).
Target = dict[str, torch.Tensor]
# One image's matching: (prediction indices, target indices), both int64, pairwise in order.
Match = tuple[torch.Tensor, torch.Tensor]


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return box_convert(boxes, "cxcywh", "xyxy")


class HungarianMatcher(nn.Module):
    """The minimum-cost one-to-one matching of predictions and targets, image by image (``models/matcher.py``).

    The class term is ``-p(target class)``: the official code's approximation of the negative log-likelihood
    (``1 - p`` without the constant). ``box_format``: how predicted and target boxes are written, relative to the
    image: ``cxcywh`` (DETR's) or ``xyxy`` (Sparse R-CNN's); the L1 terms compare these four numbers, and the set
    criterion built on this matcher reads the same.
    """

    def __init__(self, class_cost: float = 1.0, bbox_cost: float = 5.0, giou_cost: float = 2.0,
                 box_format: str = "cxcywh"):
        super().__init__()
        if class_cost == 0 and bbox_cost == 0 and giou_cost == 0:
            raise ValueError("HungarianMatcher: at least one cost weight must be non-zero")
        if box_format not in ("cxcywh", "xyxy"):
            raise ValueError(f"HungarianMatcher: box_format is cxcywh or xyxy, not {box_format!r}")
        self.class_cost, self.bbox_cost, self.giou_cost = class_cost, bbox_cost, giou_cost
        self.box_format = box_format

    def xyxy(self, boxes: torch.Tensor) -> torch.Tensor:
        """Boxes of this matcher's ``box_format`` as corners (what the GIoU reads)."""
        return boxes if self.box_format == "xyxy" else cxcywh_to_xyxy(boxes)

    @torch.no_grad()
    def cost(self, logits: torch.Tensor, boxes: torch.Tensor, target: Target) -> torch.Tensor:
        """``(queries, targets)`` cost matrix of one image: ``logits`` ``(Q, K + 1)``, ``boxes`` ``(Q, 4)``."""
        boxes = boxes.float()
        target_boxes = target["boxes"].float()
        class_cost = self.class_cost_matrix(logits.float(), target["labels"])
        bbox_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(self.xyxy(boxes), self.xyxy(target_boxes))
        return self.bbox_cost * bbox_cost + self.class_cost * class_cost + self.giou_cost * giou_cost

    def class_cost_matrix(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(queries, targets)``: minus the softmax probability of each target's class."""
        return -logits.softmax(-1)[:, labels]

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[Target]) -> list[Match]:
        """``logits`` ``(N, Q, K + 1)``, ``boxes`` ``(N, Q, 4)``: one match per image, predictions in increasing
        order, ``min(Q, targets)`` pairs. The costs of the whole batch are computed at once and brought to the
        host once, as the official matcher does."""
        sizes = [len(t["labels"]) for t in targets]
        empty = torch.zeros(0, dtype=torch.int64)
        if not sum(sizes):
            return [(empty, empty) for _ in targets]
        batch, queries = logits.shape[:2]
        everything = {"labels": torch.cat([t["labels"] for t in targets]), "boxes": torch.cat([t["boxes"] for t in targets])}
        cost = self.cost(logits.flatten(0, 1), boxes.flatten(0, 1), everything).view(batch, queries, -1).cpu()
        matches = []
        for image, image_cost in enumerate(cost.split(sizes, dim=-1)):
            if sizes[image] == 0:
                matches.append((empty, empty))
                continue
            rows, cols = linear_sum_assignment(image_cost[image].numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches


def average_box_count(targets: list[Target], device: torch.device) -> float:
    """The number of target boxes per process, averaged over the processes, at least 1 (``SetCriterion.forward``)."""
    count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
    world_size = 1
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(count)
        world_size = dist.get_world_size()
    return max(count.item() / world_size, 1.0)


class SetCriterion(nn.Module):
    """The Hungarian loss of every decoder layer, each term already weighted: ``loss_ce``, ``loss_bbox``,
    ``loss_giou`` for the last layer and ``loss_ce_0`` ... for the layers before it (the official names).

    Args:
        num_classes: object categories K; class index K is "no object".
        matcher: the :class:`HungarianMatcher`.
        class_weight, bbox_weight, giou_weight: the loss weights (official 1 / 5 / 2).
        no_object_weight: the cross-entropy weight of the no-object class (``eos_coef``, 0.1).
        aux_loss: score every decoder layer, not only the last.
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 1.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0, no_object_weight: float = 0.1,
                 aux_loss: bool = True):
        super().__init__()
        self.num_classes, self.matcher, self.aux_loss = num_classes, matcher, aux_loss
        self.class_weight, self.bbox_weight, self.giou_weight = class_weight, bbox_weight, giou_weight
        class_weights = torch.ones(num_classes + 1)
        class_weights[-1] = no_object_weight
        self.register_buffer("class_weights", class_weights, persistent=False)

    def layer_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[Target], num_boxes: float
                     ) -> dict[str, torch.Tensor]:
        """One decoder layer's weighted losses: ``logits`` ``(N, Q, K + 1)``, ``boxes`` ``(N, Q, 4)``."""
        matches = self.matcher(logits, boxes, targets)
        image_index = torch.cat([torch.full_like(rows, i) for i, (rows, _) in enumerate(matches)]).to(logits.device)
        query_index = torch.cat([rows for rows, _ in matches]).to(logits.device)
        matched_labels = torch.cat([t["labels"][cols.to(t["labels"].device)] for t, (_, cols) in zip(targets, matches)])
        classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        classes[image_index, query_index] = matched_labels.to(logits.device)
        loss_ce = self.class_loss(logits.float(), classes, num_boxes)

        predicted = boxes[image_index, query_index].float()
        target_boxes = torch.cat([t["boxes"][cols.to(t["boxes"].device)] for t, (_, cols) in zip(targets, matches)])
        target_boxes = target_boxes.to(predicted)
        loss_bbox = F.l1_loss(predicted, target_boxes, reduction="none").sum() / num_boxes
        giou = torch.diag(generalized_box_iou(self.matcher.xyxy(predicted), self.matcher.xyxy(target_boxes)))
        loss_giou = (1 - giou).sum() / num_boxes
        return {"loss_ce": self.class_weight * loss_ce, "loss_bbox": self.bbox_weight * loss_bbox,
                "loss_giou": self.giou_weight * loss_giou}

    def class_loss(self, logits: torch.Tensor, classes: torch.Tensor, num_boxes: float) -> torch.Tensor:
        """The classification term (unweighted): ``classes`` ``(N, Q)``, K for no object. Cross-entropy, the
        no-object class weighted by ``no_object_weight``, averaged over the weights."""
        return F.cross_entropy(logits.transpose(1, 2), classes, self.class_weights)

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[Target]) -> dict[str, torch.Tensor]:
        """``logits`` ``(layers, N, Q, K + 1)`` and ``boxes`` ``(layers, N, Q, 4)``, the last layer last."""
        num_boxes = average_box_count(targets, logits.device)
        losses = self.layer_losses(logits[-1], boxes[-1], targets, num_boxes)
        if self.aux_loss:
            for layer in range(len(logits) - 1):
                for name, value in self.layer_losses(logits[layer], boxes[layer], targets, num_boxes).items():
                    losses[f"{name}_{layer}"] = value
        return losses


# ------------------------------------------------------------------------------------ the focal-loss variant
def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
                       ) -> torch.Tensor:
    """Element-wise focal loss (Lin et al., ICCV 2017, Eq. 5), binary cross-entropy scaled by ``(1 - p_t) ** gamma``
    and by ``alpha`` on positives, ``1 - alpha`` on negatives (Deformable DETR's ``models/segmentation.py``)."""
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss * (1 - p_t) ** gamma


class FocalHungarianMatcher(HungarianMatcher):
    """The matching of Deformable DETR (fundamentalvision/Deformable-DETR ``models/matcher.py``): its class term is
    the focal loss of the target class as a positive minus as a negative, on sigmoid probabilities (the official
    alpha 0.25, gamma 2, hard-coded there); the box terms are DETR's. Official weights: class 2, bbox 5, giou 2."""

    def __init__(self, class_cost: float = 2.0, bbox_cost: float = 5.0, giou_cost: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0, box_format: str = "cxcywh"):
        super().__init__(class_cost, bbox_cost, giou_cost, box_format)
        self.alpha, self.gamma = alpha, gamma

    def class_cost_matrix(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        prob = logits.sigmoid()[:, labels]
        negative = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        return positive - negative


class FocalSetCriterion(SetCriterion):
    """Deformable DETR's set loss (``SetCriterion`` of ``models/deformable_detr.py``): the sigmoid focal loss over
    the K classes (no "no object" logit: an unmatched query's target is all zeros), summed and divided by the box
    count; L1 and GIoU as DETR's. Two-stage adds the encoder's proposals (``*_enc``): matched to the objects as one
    class (every label 0) and scored the same way. Official weights: class 2, bbox 5, giou 2."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 bbox_weight: float = 5.0, giou_weight: float = 2.0, aux_loss: bool = True, alpha: float = 0.25,
                 gamma: float = 2.0):
        super().__init__(num_classes, matcher, class_weight, bbox_weight, giou_weight, 1.0, aux_loss)
        self.alpha, self.gamma = alpha, gamma

    def class_loss(self, logits: torch.Tensor, classes: torch.Tensor, num_boxes: float) -> torch.Tensor:
        # one-hot over K + 1 columns, the no-object column dropped: unmatched queries are negatives everywhere
        onehot = F.one_hot(classes, logits.shape[-1] + 1)[..., :-1].to(logits.dtype)
        loss = sigmoid_focal_loss(logits, onehot, self.alpha, self.gamma)
        return loss.mean(1).sum() / num_boxes * logits.shape[1]  # the official arithmetic: the sum over num_boxes

    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[Target],
                encoder_logits: torch.Tensor | None = None, encoder_boxes: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        """DETR's layers; ``encoder_logits`` ``(N, tokens, K)`` and ``encoder_boxes``: two-stage's proposals."""
        losses = super().forward(logits, boxes, targets)
        if encoder_logits is not None:
            num_boxes = average_box_count(targets, logits.device)
            one_class = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            for name, value in self.layer_losses(encoder_logits, encoder_boxes, one_class, num_boxes).items():
                losses[f"{name}_enc"] = value
        return losses
