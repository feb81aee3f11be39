"""RepPoints (Yang et al., ICCV 2019: "RepPoints: Point Set Representation for Object Detection") and RepPointsV2
(Chen et al., NeurIPS 2020: "RepPoints V2: Verification Meets Regression for Object Detection") as the official
RepPointsV2 code builds them (Scalsol/RepPointsV2, mmdet v2.0: ``mmdet/models/dense_heads/reppoints_v2_head.py``,
``mmdet/core/bbox/assigners/point_assigner_v2.py`` and ``point_hm_assigner.py``, ``mmdet/ops/corner_pool``,
``configs/reppoints_v2/reppoints_v2_r50_fpn_giou_1x_coco.py``). :class:`RepPointsDetector` is the regression core
(below); :class:`RepPointsV2Detector` adds v2's verification branches (at the end of this module).

Per location of P3-P7 (a point at ``(x, y) = (column, row) x stride``, the location's top-left corner, as mmdet's
``PointGenerator``) the head predicts 9 points as (dy, dx) offsets in units of the level's stride:

* init: a 3x3 conv + ReLU and a 1x1 conv on the regression tower (``reppoints_pts_init_conv`` / ``_out``);
* refine: a 3x3 *deformable* conv sampling the tower at those 9 points (``reppoints_pts_refine_conv``), then a 1x1
  conv to a residual added to the (detached) init points; the classifier is a deformable conv on the classification
  tower at the same points. The sampling offsets are the points minus the regular 3x3 grid (``dcn_base_offset``):
  points on the grid give a plain 3x3 conv. The points reach the deformable convs with 0.1 of their gradient
  (``gradient_mul``).

A point set becomes a box (``points2bbox``): ``exact_minmax`` (the first point is the top-left corner, the second the
bottom-right; what every RepPointsV2 config uses), ``minmax`` (the extreme coordinates) or ``moment`` (mean +- exp(a
learnt transfer) x standard deviation, the transfer's gradient scaled by ``moment_mul``: RepPoints v1).

Training (``RepPointsV2Head.loss`` without its heatmap / offset / foreground terms): the init points are assigned by
:class:`PointAssignerV2` (the ground truth's level from its size, the nearest location there), the refined points by
ATSS (:class:`atss.ATSSAssigner`, top 9) on the boxes of the detached init points; focal loss (alpha 0.25, gamma 2)
over the valid locations divided by the refine positives (at least 1 per image), GIoU on the boxes divided by
``point_base_scale x stride`` (weights 1 init, 2 refine) divided by each stage's positives (at least 1 per image).
Inference (``_get_bboxes_single`` without the corner verification): per level the ``topk_candidates`` (1000)
locations of highest class probability, the refined points' boxes clipped to the image, every (location, class)
above ``score_thresh`` (0.05), class-wise NMS at 0.6, the best 100.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import Conv2dNormActivation, batched_nms, deform_conv2d, generalized_box_iou_loss
from torchvision.ops import sigmoid_focal_loss
from vtrain.tasks.detection.atss import ATSSAssigner, LocationDetector, PyramidAnchorGenerator
from vtrain.tasks.detection.roi_heads import init_fpn_like_mmdet

from vtrain.config import ConfigError

POINT_TO_BOX = ("exact_minmax", "minmax", "moment")
INF = 100000000.0  # point_assigner_v2.py's INF


def dcn_base_offset(kernel: int) -> Tensor:
    """The regular ``kernel x kernel`` grid as (dy, dx) pairs, row by row: the official head's ``dcn_base_offset``,
    which is also ``deform_conv2d``'s order of kernel positions and of the (dy, dx) in its offsets."""
    base = torch.arange(-(kernel // 2), kernel // 2 + 1, dtype=torch.float32)
    return torch.stack([base.repeat_interleave(kernel), base.repeat(kernel)], dim=1).reshape(-1)


def points_to_box(points: Tensor, method: str, y_first: bool = True, moment_transfer: Tensor | None = None,
                  moment_mul: float = 0.01) -> Tensor:
    """``RepPointsV2Head.points2bbox``: point sets (N, 2P, ...) as (y, x) pairs (``y_first``) or (x, y) pairs ->
    boxes (N, 4, ...) XYXY."""
    pairs = points.view(points.shape[0], -1, 2, *points.shape[2:])
    ys, xs = (pairs[:, :, 0], pairs[:, :, 1]) if y_first else (pairs[:, :, 1], pairs[:, :, 0])
    if method == "exact_minmax":  # the first point is the top-left corner, the second the bottom-right
        return torch.cat([xs[:, 0:1], ys[:, 0:1], xs[:, 1:2], ys[:, 1:2]], dim=1)
    if method == "minmax":
        return torch.cat([xs.amin(1, keepdim=True), ys.amin(1, keepdim=True), xs.amax(1, keepdim=True),
                          ys.amax(1, keepdim=True)], dim=1)
    if method == "moment":
        if moment_transfer is None:
            raise ValueError("points_to_box(method='moment') needs the head's moment_transfer")
        x_mean, y_mean = xs.mean(1, keepdim=True), ys.mean(1, keepdim=True)
        x_std, y_std = torch.std(xs - x_mean, dim=1, keepdim=True), torch.std(ys - y_mean, dim=1, keepdim=True)
        # the transfer learns at moment_mul of its gradient (RepPoints v1, Sec. 3.2)
        transfer = moment_transfer * moment_mul + moment_transfer.detach() * (1 - moment_mul)
        half_width, half_height = x_std * torch.exp(transfer[0]), y_std * torch.exp(transfer[1])
        return torch.cat([x_mean - half_width, y_mean - half_height, x_mean + half_width, y_mean + half_height],
                         dim=1)
    raise ConfigError(f"task.detector.model.transform_method={method!r}: use one of {', '.join(POINT_TO_BOX)}")


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """Generalized Focal Loss's quality focal loss (Li et al., NeurIPS 2020, Eq. 5; the Swin repository's
    ``quality_focal_loss``), per element: BCE against a soft target (the positive's IoU at its class, 0 elsewhere)
    times |target - sigmoid|^beta."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * \
        (targets - logits.sigmoid()).abs().pow(beta)


def paired_iou(boxes: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of each box with its own target (mmdet's ``bbox_overlaps(..., is_aligned=True)``: the union at least
    ``eps``, so that a degenerate point-set box scores 0)."""
    overlap = (torch.min(boxes[:, 2:], targets[:, 2:]) - torch.max(boxes[:, :2], targets[:, :2])).clamp(min=0)
    areas = [(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in (boxes, targets)]
    overlap = overlap[:, 0] * overlap[:, 1]
    return overlap / (areas[0] + areas[1] - overlap).clamp(min=eps)


def giou_loss_plus_one(boxes: Tensor, targets: Tensor, eps: float = 1e-6) -> Tensor:
    """mmdet v1's GIoU loss with its +1 on every width and height (the Swin repository's ``giou_loss_oldver``, which
    its ``RPDGIoULoss`` applies to boxes divided by 4 x stride), per box."""
    overlap = (torch.min(boxes[:, 2:], targets[:, 2:]) - torch.max(boxes[:, :2], targets[:, :2]) + 1).clamp(min=0)
    overlap = overlap[:, 0] * overlap[:, 1]
    areas = [(b[:, 2] - b[:, 0] + 1) * (b[:, 3] - b[:, 1] + 1) for b in (boxes, targets)]
    union = areas[0] + areas[1] - overlap + eps
    enclose = (torch.max(boxes[:, 2:], targets[:, 2:]) - torch.min(boxes[:, :2], targets[:, :2]) + 1).clamp(min=0)
    enclose = enclose[:, 0] * enclose[:, 1] + eps
    return 1 - (overlap / union - (enclose - union) / enclose)


class PointAssignerV2:
    """The init stage's assignment (``PointAssignerV2.assign``), for one image. A ground-truth box of size (w, h)
    belongs to level ``int((log2(w / scale) + log2(h / scale)) / 2)``, clamped to the pyramid's; its ``pos_num``
    locations of that level nearest its centre, in distance divided by (w, h), are its candidates; a location that
    is a candidate of several boxes goes to the nearest one (the first on a tie)."""

    def __init__(self, scale: float = 4, pos_num: int = 1):
        self.scale, self.pos_num = float(scale), int(pos_num)

    def __call__(self, points: Tensor, strides: Tensor, gt_boxes: Tensor) -> Tensor:
        """The index of each point's ground-truth box, -1 for a negative. ``points`` (A, 2) XY, ``strides`` (A,)
        each point's level stride; ``gt_boxes`` (G, 4) XYXY."""
        matched = torch.full((len(points),), -1, dtype=torch.int64, device=points.device)
        if len(gt_boxes) == 0 or len(points) == 0:
            return matched
        point_levels = torch.log2(strides).int()
        centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        sizes = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
        gt_levels = ((torch.log2(sizes[:, 0] / self.scale) + torch.log2(sizes[:, 1] / self.scale)) / 2).int()
        gt_levels = gt_levels.clamp(int(point_levels.min()), int(point_levels.max()))
        distances = ((points[:, None, :] - centres[None]) / sizes[None]).norm(dim=2)
        distances[point_levels[:, None] != gt_levels[None, :]] = INF
        nearest, nearest_index = distances.topk(min(self.pos_num, len(points)), dim=0, largest=False)
        candidates = torch.full_like(distances, INF)
        candidates[nearest_index, torch.arange(len(gt_boxes), device=points.device)] = nearest
        best, best_box = candidates.min(dim=1)
        return torch.where(best != INF, best_box, matched)


class RepPointsHead(nn.Module):
    """The RepPoints head, the official layout and names (``RepPointsV2Head`` less its verification branches).

    Args:
        in_channels: the pyramid's width.
        num_classes: sigmoid outputs (no background).
        feat_channels, point_feat_channels: the towers' and the point convs' widths (256, 256).
        stacked_convs: 3x3 GN convs per tower (3).
        num_points: points per location, an odd square (9).
        gradient_mul: the share of the gradient the deformable convs pass to the init points (0.1).
        transform_method: points -> box, one of ``exact_minmax``, ``minmax``, ``moment``.
        moment_mul: the learning-rate share of ``moment_transfer`` (0.01).
    """

    def __init__(self, in_channels: int, num_classes: int, feat_channels: int = 256, point_feat_channels: int = 256,
                 stacked_convs: int = 3, num_points: int = 9, gradient_mul: float = 0.1,
                 transform_method: str = "exact_minmax", moment_mul: float = 0.01, num_groups: int = 32,
                 prior_prob: float = 0.01):
        super().__init__()
        kernel = math.isqrt(num_points)
        if kernel * kernel != num_points or kernel % 2 == 0:
            raise ConfigError(f"task.detector.model.num_points={num_points}: the points sample a square deformable "
                              "kernel: use an odd square (9, 25)")
        if transform_method not in POINT_TO_BOX:
            raise ConfigError(f"task.detector.model.transform_method={transform_method!r}: use one of "
                              f"{', '.join(POINT_TO_BOX)}")
        if feat_channels % num_groups:
            raise ConfigError(f"task.detector.model.feat_channels={feat_channels}: the towers normalise it in "
                              f"{num_groups} groups: use a multiple of {num_groups}")
        norm = partial(nn.GroupNorm, num_groups)
        self.cls_convs = nn.ModuleList([Conv2dNormActivation(in_channels if i == 0 else feat_channels, feat_channels,
                                                             3, norm_layer=norm) for i in range(stacked_convs)])
        self.reg_convs = nn.ModuleList([Conv2dNormActivation(in_channels if i == 0 else feat_channels, feat_channels,
                                                             3, norm_layer=norm) for i in range(stacked_convs)])
        # mmdet v2.0's DeformConv has no bias; its weight is (out, in, k, k) as a conv's
        self.reppoints_cls_conv = nn.Conv2d(feat_channels, point_feat_channels, kernel, padding=kernel // 2,
                                            bias=False)
        self.reppoints_cls_out = nn.Conv2d(point_feat_channels, num_classes, 1)
        self.reppoints_pts_init_conv = nn.Conv2d(feat_channels, point_feat_channels, 3, padding=1)
        self.reppoints_pts_init_out = nn.Conv2d(point_feat_channels, 2 * num_points, 1)
        self.reppoints_pts_refine_conv = nn.Conv2d(feat_channels, point_feat_channels, kernel, padding=kernel // 2,
                                                   bias=False)
        self.reppoints_pts_refine_out = nn.Conv2d(point_feat_channels, 2 * num_points, 1)
        if transform_method == "moment":
            self.moment_transfer = nn.Parameter(torch.zeros(2))
        self.register_buffer("dcn_base_offset", dcn_base_offset(kernel).view(1, -1, 1, 1), persistent=False)
        self.num_classes, self.num_points, self.gradient_mul = num_classes, num_points, gradient_mul
        self.transform_method, self.moment_mul = transform_method, moment_mul
        for module in self.modules():  # init_weights: every conv N(0, 0.01), biases 0
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.reppoints_cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def points_to_box(self, points: Tensor, y_first: bool = True) -> Tensor:
        return points_to_box(points, self.transform_method, y_first, getattr(self, "moment_transfer", None),
                             self.moment_mul)

    @staticmethod
    def deform(conv: nn.Conv2d, x: Tensor, offset: Tensor) -> Tensor:
        return deform_conv2d(x, offset, conv.weight, conv.bias, padding=conv.padding)

    def forward_single(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One level: class logits (N, K, H, W), init and refined points (N, 2P, H, W), (dy, dx) pairs in strides."""
        cls_feat, pts_feat = x, x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            pts_feat = conv(pts_feat)
        pts_init = self.reppoints_pts_init_out(F.relu(self.reppoints_pts_init_conv(pts_feat)))
        pts_grad_mul = (1 - self.gradient_mul) * pts_init.detach() + self.gradient_mul * pts_init
        offset = pts_grad_mul - self.dcn_base_offset.to(pts_init.dtype)
        cls_out = self.reppoints_cls_out(F.relu(self.deform(self.reppoints_cls_conv, cls_feat, offset)))
        pts_refine = self.reppoints_pts_refine_out(F.relu(self.deform(self.reppoints_pts_refine_conv, pts_feat,
                                                                      offset)))
        return cls_out, pts_init, pts_refine + pts_init.detach()

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        outputs = [self.forward_single(x) for x in features]
        return {"cls_scores": [o[0] for o in outputs], "pts_init": [o[1] for o in outputs],
                "pts_refine": [o[2] for o in outputs]}


def _flatten(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, H*W, C), row-major locations as mmdet's."""
    return x.flatten(2).transpose(1, 2)


class RepPointsDetector(LocationDetector, nn.Module):
    """RepPoints on a pyramid (see the module doc). ``num_classes`` counts the background, as every torchvision
    detector here: the head has ``num_classes - 1`` sigmoid outputs, label l's being output l - 1.

    Args:
        backbone: the pyramid (:class:`neck.FeaturePyramid`), P3-P7; its convs get mmdet's FPN initialisation.
        point_strides: each level's stride (8 ... 128).
        point_base_scale: the box side, in strides, that defines a location's box for assignment and the losses'
            normaliser (4).
        init_assigner, refine_assigner: :class:`PointAssignerV2` (scale 4, pos_num 1), :class:`atss.ATSSAssigner`.
        head: the head; by default :class:`RepPointsHead` on the pyramid's width with ``head_options``.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: ``test_cfg`` (0.05, 0.6, 100, 1000).
        focal_alpha, focal_gamma, init_loss_weight, refine_loss_weight: the loss config (0.25, 2; GIoU 1 and 2).
        quality_focal_beta: ``None``: the focal loss; a beta (2): the quality focal loss instead (the Swin
            repository's ``RPDQualityFocalLoss``), the positives' targets their refined boxes' IoU.
        giou_plus_one: mmdet v1's GIoU with +1 (the Swin repository's ``RPDGIoULoss``) instead of GIoU.
        **kwargs: torchvision's transform options.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, point_strides: Sequence[int] = (8, 16, 32, 64, 128),
                 point_base_scale: int = 4, init_assigner: PointAssignerV2 | None = None,
                 refine_assigner: ATSSAssigner | None = None, head: nn.Module | None = None,
                 head_options: dict[str, Any] | None = None, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, init_loss_weight: float = 1.0, refine_loss_weight: float = 2.0,
                 quality_focal_beta: float | None = None, giou_plus_one: bool = False, min_size: int = 800,
                 max_size: int = 1333, image_mean: Sequence[float] | None = None,
                 image_std: Sequence[float] | None = None, **kwargs: Any):
        super().__init__()
        self.backbone = backbone
        init_fpn_like_mmdet(backbone)
        self.head = RepPointsHead(backbone.out_channels, num_classes - 1, **(head_options or {})) if head is None \
            else head
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                                  image_std or [0.229, 0.224, 0.225], **kwargs)
        self.point_strides = tuple(int(s) for s in point_strides)
        # a location's box of side point_base_scale x stride centred on it (centers_to_bboxes) is the anchor of
        # that size, and its validity (the image's padded extent) the anchors'
        self.point_generator = PyramidAnchorGenerator([[point_base_scale * s] for s in self.point_strides],
                                                      [[1.0]] * len(self.point_strides), self.point_strides)
        self.point_base_scale = point_base_scale
        self.init_assigner = PointAssignerV2() if init_assigner is None else init_assigner
        self.refine_assigner = ATSSAssigner() if refine_assigner is None else refine_assigner
        self.score_thresh, self.nms_thresh = score_thresh, nms_thresh
        self.detections_per_img, self.topk_candidates = detections_per_img, topk_candidates
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.init_loss_weight, self.refine_loss_weight = init_loss_weight, refine_loss_weight
        self.quality_focal_beta, self.giou_plus_one = quality_focal_beta, giou_plus_one

    @property
    def location_generator(self) -> PyramidAnchorGenerator:
        return self.point_generator

    def locations(self, boxes: Tensor) -> Tensor:
        return (boxes[:, :2] + boxes[:, 2:]) / 2  # each location's box centred on it: its point

    def point_strides_per_location(self, grid_sizes: Sequence[Sequence[int]], device: torch.device) -> Tensor:
        return torch.cat([torch.full((h * w,), float(s), device=device)
                          for (h, w), s in zip(grid_sizes, self.point_strides)])

    def boxes_of(self, points_out: list[Tensor], points: Tensor, strides: Tensor) -> Tensor:
        """(N, A, 4) XYXY boxes in pixels of the per-level head outputs (N, 2P, H, W), (dy, dx) in strides."""
        relative = torch.cat([_flatten(self.head.points_to_box(p)) for p in points_out], dim=1)
        return relative * strides[:, None] + points.repeat(1, 2)

    def assign(self, valid: Tensor, grid_sizes: Sequence[Sequence[int]], gt_boxes: Tensor, points: Tensor,
               strides: Tensor, init_boxes: Tensor) -> tuple[Tensor, Tensor]:
        """One image's init and refine assignments over its valid locations (-1 for a negative or the padding)."""
        init = torch.full((len(points),), -1, dtype=torch.int64, device=points.device)
        refine = init.clone()
        init[valid] = self.init_assigner(points[valid], strides[valid], gt_boxes)
        counts = [int(v.sum()) for v in valid.split([h * w for h, w in grid_sizes])]
        refine[valid] = self.refine_assigner(init_boxes[valid], counts, gt_boxes)
        return init, refine

    def box_loss(self, boxes: Tensor, matched: Tensor, targets: list[dict[str, Tensor]], strides: Tensor) -> Tensor:
        """GIoU of the positives' boxes and their ground truth, both divided by point_base_scale x stride (mmdet's
        ``GIoULoss``: 1 - GIoU, summed), over the stage's positives (at least 1 per image)."""
        positive = matched >= 0
        gt = torch.cat([t["boxes"][m[p]] for t, m, p in zip(targets, matched, positive)])
        normaliser = (self.point_base_scale * strides).expand_as(matched)[positive][:, None]
        num_pos = positive.sum(1).clamp(min=1).sum()
        if self.giou_plus_one:
            return giou_loss_plus_one(boxes[positive] / normaliser, gt / normaliser).sum() / num_pos
        return generalized_box_iou_loss(boxes[positive] / normaliser, gt / normaliser, reduction="sum") / num_pos

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, list[Tensor]], points: Tensor,
                     valid: Tensor, grid_sizes: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        strides = self.point_strides_per_location(grid_sizes, points.device)
        boxes_init = self.boxes_of(head_outputs["pts_init"], points, strides)
        boxes_refine = self.boxes_of(head_outputs["pts_refine"], points, strides)
        init, refine = zip(*[self.assign(v, grid_sizes, t["boxes"], points, strides, b.detach())
                             for v, t, b in zip(valid, targets, boxes_init)])
        init, refine = torch.stack(init), torch.stack(refine)
        logits = torch.cat([_flatten(c) for c in head_outputs["cls_scores"]], dim=1)
        class_targets = torch.zeros_like(logits)
        for image, target in enumerate(targets):
            pos = refine[image] >= 0
            gt = target["boxes"][refine[image, pos]]
            # the quality focal loss's target: the refined box's IoU with its ground truth (detached)
            quality = 1.0 if self.quality_focal_beta is None else paired_iou(boxes_refine[image, pos].detach(), gt)
            class_targets[image, pos, target["labels"][refine[image, pos]] - 1] = quality
        num_pos = (refine >= 0).sum(1).clamp(min=1).sum()
        if self.quality_focal_beta is None:
            loss_cls = sigmoid_focal_loss(logits[valid], class_targets[valid], self.focal_alpha, self.focal_gamma,
                                          reduction="sum") / num_pos
        else:
            loss_cls = quality_focal_loss(logits[valid], class_targets[valid], self.quality_focal_beta).sum() / num_pos
        return {"loss_cls": loss_cls,
                "loss_pts_init": self.init_loss_weight * self.box_loss(boxes_init, init, targets, strides),
                "loss_pts_refine": self.refine_loss_weight * self.box_loss(boxes_refine, refine, targets, strides)}

    def level_boxes(self, level: int, boxes: Tensor, head_outputs: dict[str, list[Tensor]], image: int,
                    image_size: tuple[int, int]) -> Tensor:
        """A level's candidate boxes, clipped to the image, as they go to NMS (RepPointsV2 verifies them)."""
        return boxes

    def postprocess_detections(self, head_outputs: dict[str, list[Tensor]], points: Tensor,
                               grid_sizes: Sequence[Sequence[int]], image_sizes: list[tuple[int, int]]
                               ) -> list[dict[str, Tensor]]:
        counts = [h * w for h, w in grid_sizes]
        strides = self.point_strides_per_location(grid_sizes, points.device)
        all_boxes = self.boxes_of(head_outputs["pts_refine"], points, strides)
        probabilities = torch.cat([_flatten(c) for c in head_outputs["cls_scores"]], dim=1).sigmoid()
        detections = []
        for image, (height, width) in enumerate(image_sizes):
            boxes, scores = [], []
            for level, (level_probabilities, level_boxes) in enumerate(zip(probabilities[image].split(counts),
                                                                           all_boxes[image].split(counts))):
                if 0 < self.topk_candidates < len(level_boxes):
                    keep = level_probabilities.amax(1).topk(self.topk_candidates).indices
                    level_probabilities, level_boxes = level_probabilities[keep], level_boxes[keep]
                bound = level_boxes.new_tensor([width, height, width, height])
                level_boxes = torch.minimum(level_boxes.clamp(min=0), bound)
                boxes.append(self.level_boxes(level, level_boxes, head_outputs, image, (height, width)))
                scores.append(level_probabilities)
            boxes, scores = torch.cat(boxes), torch.cat(scores)
            box_index, class_index = (scores > self.score_thresh).nonzero(as_tuple=True)
            final_scores = scores[box_index, class_index]
            keep = batched_nms(boxes[box_index], final_scores, class_index, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[box_index[keep]], "scores": final_scores[keep],
                               "labels": class_index[keep] + 1})
        return detections


# ------------------------------------------------------------------------------------------------ RepPoints v2
def corner_pool(x: Tensor, direction: str) -> Tensor:
    """CornerNet's corner pooling (Law & Deng, ECCV 2018, Sec. 3.4; mmdet's ``CornerPool``): each position takes the
    maximum over the positions below it (``top``), to its right (``left``), above it (``bottom``) or to its left
    (``right``), itself included."""
    dim, flip = {"top": (2, True), "left": (3, True), "bottom": (2, False), "right": (3, False)}[direction]
    if flip:
        return torch.cummax(x.flip(dim), dim=dim).values.flip(dim)
    return torch.cummax(x, dim=dim).values


def _conv_norm_relu(in_channels: int, out_channels: int, kernel: int, num_groups: int) -> Conv2dNormActivation:
    """mmcv's ``ConvModule`` with GN and ReLU (no conv bias) and its own initialisation: Kaiming normal, fan-out."""
    module = Conv2dNormActivation(in_channels, out_channels, kernel, norm_layer=partial(nn.GroupNorm, num_groups))
    nn.init.kaiming_normal_(module[0].weight, mode="fan_out", nonlinearity="relu")
    return module


class CornerPoolPack(nn.Module):
    """The official ``CornerPoolPack`` (``mmdet/ops/corner_pool/corner_pool.py``; ``TLPool``: top + left pooling,
    ``BRPool``: bottom + right): two ``corner_dim`` conv branches, each pooled in one direction, summed, a 3x3 conv
    + GN added to a 1x1 conv + GN of the input, ReLU, then a conv + GN + ReLU. The plain convs keep torch's
    initialisation (the official head leaves them to theirs)."""

    def __init__(self, dim: int, directions: tuple[str, str], first_kernel_size: int = 3, kernel_size: int = 1,
                 corner_dim: int = 64, num_groups: int = 32):
        super().__init__()
        self.directions = directions
        self.p1_conv1 = _conv_norm_relu(dim, corner_dim, first_kernel_size, num_groups)
        self.p2_conv1 = _conv_norm_relu(dim, corner_dim, first_kernel_size, num_groups)
        self.p_conv1 = nn.Conv2d(corner_dim, dim, 3, padding=1, bias=False)
        self.p_gn1 = nn.GroupNorm(32, dim)  # the official 32 groups, whatever norm_cfg says
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.gn1 = nn.GroupNorm(32, dim)
        self.conv2 = _conv_norm_relu(dim, dim, kernel_size, num_groups)

    def forward(self, x: Tensor) -> Tensor:
        pooled = corner_pool(self.p1_conv1(x), self.directions[0]) + corner_pool(self.p2_conv1(x), self.directions[1])
        return self.conv2(F.relu(self.p_gn1(self.p_conv1(pooled)) + self.gn1(self.conv1(x))))


class RepPointsV2Head(RepPointsHead):
    """The RepPointsV2 head (``RepPointsV2Head``, the official names): :class:`RepPointsHead` with v2's verification
    branches (paper Sec. 3.2-3.3). On the regression tower, ``shared_convs`` (one 3x3 GN conv) feed

    * the foreground branch: ``reppoints_sem_out``, a 1x1 conv to K class-wise foreground logits, and
      ``reppoints_sem_embedding`` (1x1 GN conv), added to the classification, regression and corner features;
    * the corner branch: ``hem_tl`` / ``hem_br`` (:class:`CornerPoolPack`), each to a corner heatmap logit and a
      (dx, dy) sub-stride offset (``reppoints_hem_{tl,br}_{score,offset}_out``, 3x3 convs).

    The 6 verification maps (2 heatmap logits, 4 offsets) are concatenated to the features the two deformable convs
    read (the paper's "joint" feature, Sec. 3.3). ``forward_single`` returns the class logits, init and refined
    points, heatmap logits (tl, br), offsets (tl xy, br xy) and foreground logits.
    """

    def __init__(self, in_channels: int, num_classes: int, feat_channels: int = 256, point_feat_channels: int = 256,
                 stacked_convs: int = 3, shared_stacked_convs: int = 1, first_kernel_size: int = 3,
                 kernel_size: int = 1, corner_dim: int = 64, num_groups: int = 32, prior_prob: float = 0.01,
                 **options: Any):
        super().__init__(in_channels, num_classes, feat_channels, point_feat_channels, stacked_convs,
                         num_groups=num_groups, prior_prob=prior_prob, **options)
        kernel = self.reppoints_cls_conv.kernel_size[0]
        joint = feat_channels + 6  # the features and the 6 verification maps
        self.reppoints_cls_conv = nn.Conv2d(joint, point_feat_channels, kernel, padding=kernel // 2, bias=False)
        self.reppoints_pts_refine_conv = nn.Conv2d(joint, point_feat_channels, kernel, padding=kernel // 2,
                                                   bias=False)
        self.shared_convs = nn.ModuleList([_conv_norm_relu(feat_channels, feat_channels, 3, num_groups)
                                           for _ in range(shared_stacked_convs)])
        corner = partial(CornerPoolPack, feat_channels, first_kernel_size=first_kernel_size,
                         kernel_size=kernel_size, corner_dim=corner_dim, num_groups=num_groups)
        self.hem_tl, self.hem_br = corner(("top", "left")), corner(("bottom", "right"))
        self.reppoints_hem_tl_score_out = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.reppoints_hem_br_score_out = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.reppoints_hem_tl_offset_out = nn.Conv2d(feat_channels, 2, 3, padding=1)
        self.reppoints_hem_br_offset_out = nn.Conv2d(feat_channels, 2, 3, padding=1)
        self.reppoints_sem_out = nn.Conv2d(feat_channels, num_classes, 1)
        self.reppoints_sem_embedding = _conv_norm_relu(feat_channels, feat_channels, 1, num_groups)
        # init_weights: these N(0, 0.01), the three classifiers' biases at the prior
        prior = -math.log((1 - prior_prob) / prior_prob)
        for conv in (self.reppoints_cls_conv, self.reppoints_pts_refine_conv, self.shared_convs[0][0] if
                     shared_stacked_convs else None, self.reppoints_hem_tl_score_out, self.reppoints_hem_br_score_out,
                     self.reppoints_hem_tl_offset_out, self.reppoints_hem_br_offset_out, self.reppoints_sem_out):
            if conv is not None:
                nn.init.normal_(conv.weight, std=0.01)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)
        for conv in (self.reppoints_hem_tl_score_out, self.reppoints_hem_br_score_out, self.reppoints_sem_out):
            nn.init.constant_(conv.bias, prior)
        for convs in self.shared_convs[1:]:
            nn.init.normal_(convs[0].weight, std=0.01)

    def forward_single(self, x: Tensor) -> tuple[Tensor, ...]:
        cls_feat, pts_feat = x, x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        for conv in self.reg_convs:
            pts_feat = conv(pts_feat)
        shared_feat = pts_feat
        for conv in self.shared_convs:
            shared_feat = conv(shared_feat)
        sem_scores = self.reppoints_sem_out(shared_feat)
        sem_feat = self.reppoints_sem_embedding(shared_feat)
        cls_feat, pts_feat, hem_feat = cls_feat + sem_feat, pts_feat + sem_feat, shared_feat + sem_feat
        hem_tl, hem_br = self.hem_tl(hem_feat), self.hem_br(hem_feat)
        hem_scores = torch.cat([self.reppoints_hem_tl_score_out(hem_tl), self.reppoints_hem_br_score_out(hem_br)], 1)
        hem_offsets = torch.cat([self.reppoints_hem_tl_offset_out(hem_tl),
                                 self.reppoints_hem_br_offset_out(hem_br)], 1)
        pts_init = self.reppoints_pts_init_out(F.relu(self.reppoints_pts_init_conv(pts_feat)))
        pts_grad_mul = (1 - self.gradient_mul) * pts_init.detach() + self.gradient_mul * pts_init
        offset = pts_grad_mul - self.dcn_base_offset.to(pts_init.dtype)
        verification = torch.cat([hem_scores, hem_offsets], dim=1)
        cls_out = self.reppoints_cls_out(F.relu(self.deform(self.reppoints_cls_conv,
                                                            torch.cat([cls_feat, verification], 1), offset)))
        pts_refine = self.reppoints_pts_refine_out(F.relu(self.deform(
            self.reppoints_pts_refine_conv, torch.cat([pts_feat, verification], 1), offset)))
        return cls_out, pts_init, pts_refine + pts_init.detach(), hem_scores, hem_offsets, sem_scores

    def forward(self, features: list[Tensor]) -> dict[str, list[Tensor]]:
        outputs = list(zip(*[self.forward_single(x) for x in features]))
        names = ("cls_scores", "pts_init", "pts_refine", "hm_scores", "hm_offsets", "sem_scores")
        return {name: list(output) for name, output in zip(names, outputs)}


def gaussian_radius(height: Tensor, width: Tensor, min_overlap: float) -> Tensor:
    """CornerNet's radius (``point_hm_assigner.gaussian_radius``): the smallest of the three radii within which a
    corner keeps a box of IoU >= ``min_overlap`` with the ground truth."""
    b1, c1 = height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 - torch.sqrt(b2 ** 2 - 16 * c2)) / 8
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / (2 * a3)
    return torch.stack([r1, r2, r3], dim=1).amin(1)


class PointHMAssigner:
    """The corner targets (``PointHMAssigner.assign``, ``gaussian_bump=True``), for one image. On every level, the
    location nearest each ground-truth corner is a positive (heatmap 1) with the corner's offset from it in strides;
    around each corner, the locations closer than CornerNet's radius (``gaussian_iou`` 0.7) get exp(-d^2 / 2
    sigma^2), sigma = (2 radius + 1) / 6, the largest over the boxes."""

    def __init__(self, gaussian_iou: float = 0.7):
        self.gaussian_iou = float(gaussian_iou)

    def __call__(self, points: Tensor, strides: Tensor, gt_boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Heatmap (A,) and offset (A, 2) targets of the top-left then the bottom-right corners; ``points`` (A, 2)
        XY, ``strides`` (A,)."""
        heatmaps = [points.new_zeros(len(points)), points.new_zeros(len(points))]
        offsets = [points.new_zeros(len(points), 2), points.new_zeros(len(points), 2)]
        if len(gt_boxes) == 0 or len(points) == 0:
            return heatmaps[0], offsets[0], heatmaps[1], offsets[1]
        radius = gaussian_radius(gt_boxes[:, 3] - gt_boxes[:, 1], gt_boxes[:, 2] - gt_boxes[:, 0], self.gaussian_iou)
        sigma = (2 * radius + 1) / 6
        point_levels = torch.log2(strides).int()
        for corner, heatmap, offset in zip((gt_boxes[:, :2], gt_boxes[:, 2:]), heatmaps, offsets):
            distances = (points[:, None] - corner[None]).norm(dim=2)  # (A, G)
            for level in point_levels.unique():
                index = (point_levels == level).nonzero()[:, 0]
                level_distances = distances[index]
                nearest = index[level_distances.argmin(0)]
                offset[nearest] = (corner - points[nearest]) / 2 ** level.float()
                bump = torch.exp(-level_distances ** 2 / (2 * sigma * sigma)[None])
                bump[level_distances >= radius[None]] = -INF
                best = bump.amax(1)
                heatmap[index[best != -INF]] = best[best != -INF]
                heatmap[nearest] = 1.0
        return heatmaps[0], offsets[0], heatmaps[1], offsets[1]


def gaussian_focal_loss(probability: Tensor, target: Tensor, alpha: float = 2.0, gamma: float = 4.0) -> Tensor:
    """CornerNet's focal loss on a Gaussian target (mmdet's ``gaussian_focal_loss``), per element."""
    eps = 1e-12
    positive = -(probability + eps).log() * (1 - probability).pow(alpha) * target.eq(1)
    negative = -(1 - probability + eps).log() * probability.pow(alpha) * (1 - target).pow(gamma)
    return positive + negative


def separate_sigmoid_focal_loss(logits: Tensor, target: Tensor, weight: Tensor, normaliser: Tensor,
                                gamma: float = 2.0, alpha: float = 0.25) -> Tensor:
    """The foreground loss (``separate_sigmoid_focal_loss``): focal loss whose positives are weighted by ``weight``
    and divided by its sum, and whose negatives are divided by ``normaliser`` (the number of positives)."""
    probability = logits.sigmoid()
    positive, negative = target.eq(1), target.lt(1)
    neg = -F.logsigmoid(-logits[negative]) * probability[negative].pow(gamma) * (1 - alpha)
    if not positive.any():
        return neg.sum() / normaliser
    pos_prob, pos_weight = probability[positive], weight[positive]
    pos = -F.logsigmoid(logits[positive]) * (1 - pos_prob).pow(gamma) * pos_weight * alpha
    return pos.sum() / pos_weight.sum() + neg.sum() / normaliser


def foreground_targets(boxes: Tensor, labels: Tensor, num_classes: int, extent: tuple[int, int],
                       shape: tuple[int, int], stride: int = 8) -> tuple[Tensor, Tensor]:
    """One image's foreground map and weights at stride 8 (``LoadRPDV2Annotations._load_semantic_map_from_box``):
    class c is 1 on the stride-8 cells a box of class c covers (rows int(y1 / 8) .. int(y2 / 8)), weighted by 1 /
    the area of the smallest such box; ``extent`` is the image's own padded extent in cells, ``shape`` the batch's."""
    sem_map = boxes.new_zeros(num_classes, *shape)
    weights = boxes.new_zeros(num_classes, *shape)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    for index in areas.argsort(descending=True).tolist():  # the smaller boxes written last
        x1, y1, x2, y2 = (int(v / stride) for v in boxes[index].tolist())
        rows, cols = slice(y1, min(y2 + 1, extent[0])), slice(x1, min(x2 + 1, extent[1]))
        sem_map[labels[index], rows, cols] = 1.0
        weights[labels[index], rows, cols] = 1.0 / areas[index]
    return sem_map, weights


class RepPointsV2Detector(RepPointsDetector):
    """RepPointsV2 (see the module doc): :class:`RepPointsDetector` with :class:`RepPointsV2Head` and v2's
    verification losses and inference (``RepPointsV2Head.loss`` / ``_get_bboxes_single``).

    Training adds (weights of the official config): the corner heatmaps' Gaussian focal loss (alpha 2, gamma 4,
    weight 0.25) and the corner offsets' smooth L1 (beta 1/9, weight 1) at the corners' positives, both divided by
    the positives (at least 1 per image) and averaged over the two corners; the foreground map's separate focal loss
    (weight 0.1) over every level, its target the stride-8 box map resized to each level (nearest).
    Inference moves each refined box's corners, on levels 2-5, to the best heatmap location of the 2x2 cells at the
    corner on P3 (levels 2-3) or P4 (levels 4-5), plus its predicted offset.

    Args:
        heatmap_assigner: :class:`PointHMAssigner` (gaussian_iou 0.7).
        heatmap_loss_weight, offset_loss_weight, foreground_loss_weight: 0.25, 1, 0.1.
        **options: :class:`RepPointsDetector`'s.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, heatmap_assigner: PointHMAssigner | None = None,
                 heatmap_loss_weight: float = 0.25, offset_loss_weight: float = 1.0,
                 foreground_loss_weight: float = 0.1, head: nn.Module | None = None,
                 head_options: dict[str, Any] | None = None, **options: Any):
        if head is None:
            head = RepPointsV2Head(backbone.out_channels, num_classes - 1, **(head_options or {}))
        super().__init__(backbone, num_classes, head=head, **options)
        self.heatmap_assigner = PointHMAssigner() if heatmap_assigner is None else heatmap_assigner
        self.heatmap_loss_weight, self.offset_loss_weight = heatmap_loss_weight, offset_loss_weight
        self.foreground_loss_weight = foreground_loss_weight

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, list[Tensor]], points: Tensor,
                     valid: Tensor, grid_sizes: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        losses = super().compute_loss(targets, head_outputs, points, valid, grid_sizes)
        return {**losses, **self.corner_losses(targets, head_outputs, points, valid, grid_sizes),
                "loss_sem": self.foreground_loss(targets, head_outputs["sem_scores"], valid, grid_sizes)}

    def corner_losses(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, list[Tensor]], points: Tensor,
                      valid: Tensor, grid_sizes: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        strides = self.point_strides_per_location(grid_sizes, points.device)
        scores = torch.cat([_flatten(s) for s in head_outputs["hm_scores"]], dim=1).sigmoid()  # (N, A, 2)
        offsets = torch.cat([_flatten(o) for o in head_outputs["hm_offsets"]], dim=1)  # (N, A, 4)
        loss_heatmap, loss_offset = scores.new_zeros(()), scores.new_zeros(())
        per_image = []
        for image_valid, target in zip(valid, targets):
            found = self.heatmap_assigner(points[image_valid], strides[image_valid], target["boxes"])
            corner_targets = [part.new_zeros(len(points), *part.shape[1:]) for part in found]
            for full, part in zip(corner_targets, found):  # zero on the padding, where the weights are zero
                full[image_valid] = part
            per_image.append(corner_targets)
        for corner in range(2):
            heatmap = torch.stack([t[2 * corner] for t in per_image])
            offset = torch.stack([t[2 * corner + 1] for t in per_image])
            positive = heatmap.eq(1) & valid
            num_pos = positive.sum(1).clamp(min=1).sum()
            heatmap_loss = gaussian_focal_loss(scores[..., corner][valid], heatmap[valid]).sum()
            loss_heatmap = loss_heatmap + heatmap_loss / num_pos
            loss_offset = loss_offset + F.smooth_l1_loss(offsets[..., 2 * corner:2 * corner + 2][positive],
                                                         offset[positive], beta=1.0 / 9, reduction="sum") / num_pos
        return {"loss_heatmap": self.heatmap_loss_weight * loss_heatmap / 2,
                "loss_offset": self.offset_loss_weight * loss_offset / 2}

    def foreground_loss(self, targets: list[dict[str, Tensor]], sem_scores: list[Tensor], valid: Tensor,
                        grid_sizes: Sequence[Sequence[int]]) -> Tensor:
        shape = tuple(grid_sizes[0])  # the stride-8 map of the batch
        first_level = valid[:, :shape[0] * shape[1]].view(-1, *shape)
        maps, weights = zip(*[foreground_targets(t["boxes"], t["labels"] - 1, sem_scores[0].shape[1],
                                                 (int(v.any(1).sum()), int(v.any(0).sum())), shape)
                              for t, v in zip(targets, first_level)])
        maps, weights = torch.stack(maps), torch.stack(weights)
        logits = torch.cat([s.reshape(-1) for s in sem_scores])
        level_maps = torch.cat([F.interpolate(maps, s.shape[-2:]).reshape(-1) for s in sem_scores])
        level_weights = torch.cat([F.interpolate(weights, s.shape[-2:]).reshape(-1) for s in sem_scores])
        return self.foreground_loss_weight * separate_sigmoid_focal_loss(logits, level_maps, level_weights,
                                                                         (level_maps > 0).sum())

    def verified_corners(self, boxes: Tensor, heatmaps: Tensor, offsets: Tensor, stride: int,
                         image_size: tuple[int, int]) -> Tensor:
        """``_get_bboxes_single``'s ``select``: each corner moves to the best of the 2x2 heatmap cells whose top-left
        cell holds it, plus that cell's offset, in pixels; ``heatmaps`` (2, H, W) logits, ``offsets`` (4, H, W)."""
        height, width = image_size
        corners = []
        for corner, (x, y) in enumerate(((boxes[:, 0], boxes[:, 1]), (boxes[:, 2], boxes[:, 3]))):
            score_map = heatmaps[corner].sigmoid()
            rows, cols = score_map.shape
            _, indices = F.max_pool2d_with_indices(score_map[None], kernel_size=2, stride=1)
            indices = indices[0]
            col = torch.floor((x / stride).clamp(min=0, max=indices.shape[-1] - 1)).long()
            row = torch.floor((y / stride).clamp(min=0, max=indices.shape[-2] - 1)).long()
            chosen = indices[row, col]
            new_col, new_row = chosen % cols, torch.div(chosen, cols, rounding_mode="floor")
            corners.append(((new_col.float() + offsets[2 * corner, new_row, new_col]) * stride).clamp(0, width))
            corners.append(((new_row.float() + offsets[2 * corner + 1, new_row, new_col]) * stride).clamp(0, height))
        return torch.stack(corners, dim=1)

    def level_boxes(self, level: int, boxes: Tensor, head_outputs: dict[str, list[Tensor]], image: int,
                    image_size: tuple[int, int]) -> Tensor:
        if level == 0:
            return boxes
        source = 0 if level in (1, 2) else 1  # the official levels: P3's heatmaps for P4-P5, P4's for P6-P7
        return self.verified_corners(boxes, head_outputs["hm_scores"][source][image],
                                     head_outputs["hm_offsets"][source][image], self.point_strides[source],
                                     image_size)
