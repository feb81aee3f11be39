"""RepPoints (Yang et al., ICCV 2019: "RepPoints: Point Set Representation for Object Detection") as RepPointsV2
(Chen et al., NeurIPS 2020: "RepPoints V2: Verification Meets Regression for Object Detection") builds its regression
core: the official code (Scalsol/RepPointsV2, mmdet v2.0: ``mmdet/models/dense_heads/reppoints_v2_head.py``,
``mmdet/core/bbox/assigners/point_assigner_v2.py``, ``configs/reppoints_v2/reppoints_v2_r50_fpn_giou_1x_coco.py``).
v2's verification branches (corner heatmaps + offsets with corner pooling, the foreground map, their losses and the
corner-refined inference) are not here yet: see docs/detection.md, "RepPoints".

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
from vtrain.tasks.detection.atss import ATSSAssigner, PyramidAnchorGenerator
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


class RepPointsDetector(nn.Module):
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
        **kwargs: torchvision's transform options.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, point_strides: Sequence[int] = (8, 16, 32, 64, 128),
                 point_base_scale: int = 4, init_assigner: PointAssignerV2 | None = None,
                 refine_assigner: ATSSAssigner | None = None, head: nn.Module | None = None,
                 head_options: dict[str, Any] | None = None, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, init_loss_weight: float = 1.0, refine_loss_weight: float = 2.0,
                 min_size: int = 800, max_size: int = 1333, image_mean: Sequence[float] | None = None,
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

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        images, targets = self.transform(images, targets)
        features = list(self.backbone(images.tensors).values())
        head_outputs = {k: [x.float() for x in v] for k, v in self.head(features).items()}
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        boxes = self.point_generator(images, features)[0]
        points = (boxes[:, :2] + boxes[:, 2:]) / 2
        if self.training:
            valid = torch.stack([self.point_generator.valid_flags(size, grid_sizes, self.transform.size_divisible)
                                 for size in images.image_sizes]).to(points.device)
            return self.compute_loss(targets, head_outputs, points, valid, grid_sizes)
        detections = self.postprocess_detections(head_outputs, points, grid_sizes, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

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
            class_targets[image, pos, target["labels"][refine[image, pos]] - 1] = 1.0
        num_pos = (refine >= 0).sum(1).clamp(min=1).sum()
        loss_cls = sigmoid_focal_loss(logits[valid], class_targets[valid], self.focal_alpha, self.focal_gamma,
                                      reduction="sum") / num_pos
        return {"loss_cls": loss_cls,
                "loss_pts_init": self.init_loss_weight * self.box_loss(boxes_init, init, targets, strides),
                "loss_pts_refine": self.refine_loss_weight * self.box_loss(boxes_refine, refine, targets, strides)}

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
            for level_probabilities, level_boxes in zip(probabilities[image].split(counts),
                                                        all_boxes[image].split(counts)):
                if 0 < self.topk_candidates < len(level_boxes):
                    keep = level_probabilities.amax(1).topk(self.topk_candidates).indices
                    level_probabilities, level_boxes = level_probabilities[keep], level_boxes[keep]
                bound = level_boxes.new_tensor([width, height, width, height])
                boxes.append(torch.minimum(level_boxes.clamp(min=0), bound))
                scores.append(level_probabilities)
            boxes, scores = torch.cat(boxes), torch.cat(scores)
            box_index, class_index = (scores > self.score_thresh).nonzero(as_tuple=True)
            final_scores = scores[box_index, class_index]
            keep = batched_nms(boxes[box_index], final_scores, class_index, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[box_index[keep]], "scores": final_scores[keep],
                               "labels": class_index[keep] + 1})
        return detections
