"""ATSS (Zhang, Chi, Yao, Lei, Li, CVPR 2020: "Bridging the Gap Between Anchor-based and Anchor-free Detection via
Adaptive Training Sample Selection") as mmdetection v2 builds it: the mmdet 2.11 of the Swin detection repository
(SwinTransformer/Swin-Transformer-Object-Detection ``mmdet/models/dense_heads/atss_head.py``,
``mmdet/core/bbox/assigners/atss_assigner.py``, ``configs/atss/atss_r50_fpn_1x_coco.py``), which Swin's Table 2(a)
trains. On torchvision's parts: its FCOS detector (transform, pyramid, head call), anchor generator, box coder,
``sigmoid_focal_loss`` and ``generalized_box_iou_loss``; written here only what none has: the assignment
(:class:`ATSSAssigner`), the centerness target and the head's layout (:class:`ATSSHead`).

One square anchor of side 8 x stride per location of P3-P7 (``octave_base_scale=8``, ratio 1), centred on the
location's top-left corner as mmdet v2 and torchvision both place them. Each anchor predicts K sigmoid class logits,
four deltas (mmdet's ``DeltaXYWHBBoxCoder``, stds 0.1, 0.1, 0.2, 0.2) scaled by a learnt scalar per level, and a
centerness logit. Losses (mmdet ``ATSSHead.loss``): focal (alpha 0.25, gamma 2) over the valid anchors and the K
classes, summed and divided by the positives (at least 1 per image, averaged over the processes); 2 x GIoU on the
positives' decoded boxes, weighted by their centerness targets and divided by the sum of those targets (averaged over
the processes); the centerness BCE on the positives, divided by the positives. Inference (mmdet 2.11
``ATSSHead._get_bboxes`` and ``multiclass_nms``): on each level the ``topk_candidates`` (1000) anchors with the
highest max over classes of sigmoid(class) x sigmoid(centerness), decoded and clipped; every (anchor, class) whose
class probability exceeds ``score_thresh`` (0.05) is scored by probability x centerness, class-wise NMS at
``nms_thresh`` (0.6), the best ``detections_per_img`` (100). Later mmdet v2 (2.18+) takes the top 1000 by class
probability alone and clamps the box loss's normaliser at 1 instead of at 1e-12: mmdet 2.11 is the one followed.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import Conv2dNormActivation, batched_nms, box_iou, clip_boxes_to_image
from torchvision.ops import generalized_box_iou_loss, sigmoid_focal_loss
from vtrain.tasks.detection.roi_heads import init_fpn_like_mmdet

from vtrain.config import ConfigError

# mmdet's divisor of the centerness-weighted box loss falls back to 1 below this (atss_head.py's EPS)
BOX_NORMALISER_EPS = 1e-12


class PyramidAnchorGenerator(AnchorGenerator):
    """torchvision's anchor generator at the pyramid's own strides, as mmdet's ``AnchorGenerator(strides=...)``:
    torchvision derives each stride from the padded batch (``image_size // grid_size``), which for a coarse level of
    a batch not divisible by it is not the level's stride (an 800-high batch has a 13-row P6: 800 // 13 = 61, not 64).

    Args:
        sizes, aspect_ratios: torchvision's, one tuple per level (ATSS: ``[[64], [128], ..., [1024]]``, ratio 1:
            mmdet's octave_base_scale 8 x each stride).
        strides: each level's stride in pixels (P3-P7: 8, 16, 32, 64, 128).
    """

    def __init__(self, sizes: Sequence[Sequence[int]], aspect_ratios: Sequence[Sequence[float]],
                 strides: Sequence[int]):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(r) for r in aspect_ratios))
        if len(strides) != len(self.sizes):
            raise ConfigError(f"task.detector.model.anchor_generator.strides: {len(strides)} strides for "
                              f"{len(self.sizes)} levels of sizes: give one stride per level")
        self.strides = tuple(int(s) for s in strides)

    def forward(self, image_list: ImageList, feature_maps: list[Tensor]) -> list[Tensor]:
        device = feature_maps[0].device
        strides = [[torch.tensor(s, device=device)] * 2 for s in self.strides]
        self.set_cell_anchors(torch.float32, device)  # pixel coordinates, whatever precision the maps have
        anchors = torch.cat(self.grid_anchors([f.shape[-2:] for f in feature_maps], strides))
        return [anchors] * len(image_list.image_sizes)

    def valid_flags(self, image_size: Sequence[int], grid_sizes: Sequence[Sequence[int]], size_divisible: int
                    ) -> Tensor:
        """Which anchors lie on the image rather than on the batch's padding (mmdet's ``valid_flags`` on the image's
        own ``pad_shape``: its size padded to ``size_divisible``): a level's first ceil(padded side / stride) rows and
        columns."""
        padded = [math.ceil(side / size_divisible) * size_divisible for side in image_size]
        flags = []
        for (rows, cols), stride in zip(grid_sizes, self.strides):
            valid_rows, valid_cols = min(math.ceil(padded[0] / stride), rows), min(math.ceil(padded[1] / stride), cols)
            grid = torch.zeros(rows, cols, dtype=torch.bool)
            grid[:valid_rows, :valid_cols] = True
            flags.append(grid.flatten().repeat_interleave(self.num_anchors_per_location()[0]))
        return torch.cat(flags)


class DeltaXYWHCoder(BoxCoder):
    """mmdet's ``DeltaXYWHBBoxCoder`` (means 0, ``stds``): torchvision's ``BoxCoder`` with weights 1 / std, whose
    decoding clamps the log-size deltas from below as well as from above, as mmdet's ``delta2bbox`` does
    (``|log(16 / 1000)|`` both ways)."""

    def __init__(self, stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2)):
        super().__init__(weights=tuple(1.0 / s for s in stds))

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        low = rel_codes.new_tensor([-math.inf, -math.inf, -self.bbox_xform_clip * self.weights[2],
                                    -self.bbox_xform_clip * self.weights[3]])
        return super().decode_single(torch.maximum(rel_codes, low), boxes)


class ATSSAssigner:
    """Adaptive training sample selection (ATSS paper Alg. 1; mmdet ``ATSSAssigner.assign``), for one image.

    For each ground-truth box: on every level the ``topk`` anchors whose centres are closest to its centre (fewer
    where a level has fewer) are its candidates; the candidates whose IoU with it reaches the mean + standard deviation
    (unbiased, torch's) of their IoUs, and whose centre lies inside it by more than 0.01 pixel, are its positives. An
    anchor that is a positive of several boxes goes to the one it overlaps most (the first such box on a tie).
    """

    def __init__(self, topk: int = 9):
        self.topk = int(topk)

    def __call__(self, anchors: Tensor, num_level_anchors: Sequence[int], gt_boxes: Tensor) -> Tensor:
        """The index of each anchor's ground-truth box, -1 for a negative. ``anchors`` (A, 4) XYXY, all levels in
        order, ``num_level_anchors`` counting each level's; ``gt_boxes`` (G, 4) XYXY."""
        matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
        if len(gt_boxes) == 0 or len(anchors) == 0:
            return matched
        ious = box_iou(anchors, gt_boxes)  # (A, G)
        anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
        distances = torch.cdist(anchor_centres, (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2)
        candidates, start = [], 0
        for count in num_level_anchors:
            nearest = distances[start:start + count].topk(min(self.topk, count), dim=0, largest=False).indices
            candidates.append(nearest + start)
            start += count
        candidates = torch.cat(candidates)  # (sum of k per level, G)
        candidate_ious = ious.gather(0, candidates)
        threshold = candidate_ious.mean(0) + candidate_ious.std(0)
        centres = anchor_centres[candidates]  # (C, G, 2)
        inside = torch.cat([centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres], dim=-1).amin(-1) > 0.01
        positive = (candidate_ious >= threshold) & inside
        # IoU of each (anchor, box) pair where the anchor is that box's positive, -inf elsewhere
        positive_ious = torch.full_like(ious, -math.inf)
        columns = torch.arange(len(gt_boxes), device=anchors.device).expand_as(candidates)
        positive_ious[candidates[positive], columns[positive]] = candidate_ious[positive]
        best_iou, best_box = positive_ious.max(dim=1)
        return torch.where(best_iou > -math.inf, best_box, matched)


class ATSSHead(nn.Module):
    """The ATSS head (mmdet ``ATSSHead``): two towers of ``stacked_convs`` 3x3 convs with GroupNorm and ReLU (no conv
    bias, mmdet's ``ConvModule`` with a norm), shared across levels; the classification tower ends in a 3x3 conv to
    ``num_anchors x num_classes`` logits, the regression tower in one to 4 deltas per anchor (times a learnt
    scalar per level, mmdet's ``Scale(1.0)``; no exp) and one to a centerness logit. mmdet's initialisation: every conv
    N(0, 0.01), biases 0, the classifier's bias at the prior 0.01 (``bias_init_with_prob``).

    ``forward`` returns torchvision's head layout: ``cls_logits`` (N, sum HWA, num_classes), ``bbox_regression``
    (N, sum HWA, 4), ``bbox_ctrness`` (N, sum HWA, 1), levels in order, each position's anchors together.
    """

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5, num_anchors: int = 1,
                 stacked_convs: int = 4, num_groups: int = 32, prior_prob: float = 0.01):
        super().__init__()
        if in_channels % num_groups:
            raise ConfigError(f"task.detector.neck.out_channels={in_channels}: ATSS's head normalises it in "
                              f"{num_groups} groups: use a multiple of {num_groups}")
        norm = partial(nn.GroupNorm, num_groups)

        def tower() -> nn.Sequential:
            return nn.Sequential(*[Conv2dNormActivation(in_channels, in_channels, 3, norm_layer=norm)
                                   for _ in range(stacked_convs)])

        self.cls_convs, self.reg_convs = tower(), tower()
        self.cls_logits = nn.Conv2d(in_channels, num_anchors * num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(in_channels, num_anchors * 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(in_channels, num_anchors, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        self.num_classes, self.num_anchors = num_classes, num_anchors
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def _flatten(self, x: Tensor, channels: int) -> Tensor:
        n, _, h, w = x.shape  # (N, A*C, H, W) -> (N, H*W*A, C), torchvision's order
        return x.view(n, self.num_anchors, channels, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, channels)

    def forward(self, features: list[Tensor]) -> dict[str, Tensor]:
        outputs: dict[str, list[Tensor]] = {"cls_logits": [], "bbox_regression": [], "bbox_ctrness": []}
        for level, x in enumerate(features):
            cls_feature, reg_feature = self.cls_convs(x), self.reg_convs(x)
            outputs["cls_logits"].append(self._flatten(self.cls_logits(cls_feature), self.num_classes))
            deltas = self.bbox_reg(reg_feature) * self.scales[level]
            outputs["bbox_regression"].append(self._flatten(deltas, 4))
            outputs["bbox_ctrness"].append(self._flatten(self.bbox_ctrness(reg_feature), 1))
        return {key: torch.cat(value, dim=1) for key, value in outputs.items()}


def centerness_target(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS's centerness (Tian et al. 2019, Eq. 3) of each anchor's centre in its matched box, as ATSS trains it
    (mmdet ``ATSSHead.centerness_target``): sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b)). The centres are
    inside their boxes (the assigner's rule), so no ratio is 0 / 0."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    near, far = centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres  # (l, t), (r, b)
    ratios = torch.minimum(near, far) / torch.maximum(near, far)
    return torch.sqrt(ratios[:, 0] * ratios[:, 1])


def mean_over_processes(value: Tensor) -> Tensor:
    """``value`` averaged over the DDP processes (mmdet's ``reduce_mean``); itself in one process."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value = value / dist.get_world_size()
    return value


class LocationDetector:
    """The forward pass of a dense detector that assigns targets at each feature location itself (ATSS's anchors,
    RepPoints' points): torchvision's transform, the backbone with its pyramid, the head (its outputs in fp32, mmdet's
    ``force_fp32`` on the losses and boxes), the locations of ``location_generator`` (a
    :class:`PyramidAnchorGenerator`, its boxes the same for every image of the batch, as ``locations`` reads them),
    then ``compute_loss(targets, head_outputs, locations, valid, grid_sizes)`` in training (``valid``: each image's
    locations on the image rather than on the batch's padding) or ``postprocess_detections(head_outputs, locations,
    grid_sizes, image_sizes)``."""

    def forward(self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None):
        original_sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
        images, targets = self.transform(images, targets)
        features = list(self.backbone(images.tensors).values())
        head_outputs = {k: [x.float() for x in v] if isinstance(v, list) else v.float()
                        for k, v in self.head(features).items()}
        generator = self.location_generator
        locations = self.locations(generator(images, features)[0])
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        if self.training:
            valid = torch.stack([generator.valid_flags(size, grid_sizes, self.transform.size_divisible)
                                 for size in images.image_sizes]).to(locations.device)
            return self.compute_loss(targets, head_outputs, locations, valid, grid_sizes)
        detections = self.postprocess_detections(head_outputs, locations, grid_sizes, images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)


class ATSSDetector(LocationDetector, FCOS):
    """ATSS on a pyramid: torchvision's FCOS (transform, backbone + pyramid, head, anchors) with ATSS's head,
    assignment, losses and post-processing (see the module doc). ``num_classes`` counts the background, as every
    torchvision detector here: the head has ``num_classes - 1`` sigmoid outputs, label l's being output l - 1.

    Args:
        backbone: the pyramid (:class:`neck.FeaturePyramid`), P3-P7; its convs get mmdet's FPN initialisation.
        anchor_generator: one anchor per location (:class:`PyramidAnchorGenerator`).
        assigner: :class:`ATSSAssigner` (``topk`` 9).
        head: the head; by default :class:`ATSSHead` on the pyramid's width.
        score_thresh, nms_thresh, detections_per_img, topk_candidates: mmdet's ``test_cfg`` ``score_thr``, ``nms``
            IoU, ``max_per_img``, ``nms_pre`` (0.05, 0.6, 100, 1000).
        focal_alpha, focal_gamma, box_loss_weight, centerness_loss_weight: the loss config (0.25, 2, 2, 1).
        box_coder_stds: ``DeltaXYWHBBoxCoder``'s ``target_stds``.
        **kwargs: torchvision's transform options.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, anchor_generator: PyramidAnchorGenerator,
                 assigner: ATSSAssigner | None = None, head: nn.Module | None = None, score_thresh: float = 0.05,
                 nms_thresh: float = 0.6, detections_per_img: int = 100, topk_candidates: int = 1000,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0, box_loss_weight: float = 2.0,
                 centerness_loss_weight: float = 1.0, box_coder_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2),
                 **kwargs: Any):
        if not isinstance(anchor_generator, PyramidAnchorGenerator):
            raise ConfigError(f"task.detector.model.anchor_generator: ATSS needs each level's stride, "
                              f"{type(anchor_generator).__name__} has none: use "
                              "vtrain.tasks.detection.atss.PyramidAnchorGenerator with strides")
        if head is None:
            head = ATSSHead(backbone.out_channels, num_classes - 1, num_levels=len(anchor_generator.sizes),
                            num_anchors=anchor_generator.num_anchors_per_location()[0])
        super().__init__(backbone, num_classes, anchor_generator=anchor_generator, head=head,
                         score_thresh=score_thresh, nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                         topk_candidates=topk_candidates, **kwargs)
        init_fpn_like_mmdet(backbone)
        self.assigner = ATSSAssigner() if assigner is None else assigner
        self.box_coder = DeltaXYWHCoder(box_coder_stds)
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.box_loss_weight, self.centerness_loss_weight = box_loss_weight, centerness_loss_weight

    @property
    def location_generator(self) -> PyramidAnchorGenerator:
        return self.anchor_generator

    def locations(self, boxes: Tensor) -> Tensor:
        return boxes  # the anchors themselves

    def level_counts(self, grid_sizes: Sequence[Sequence[int]]) -> list[int]:
        per_location = self.anchor_generator.num_anchors_per_location()
        return [h * w * a for (h, w), a in zip(grid_sizes, per_location)]

    def assign(self, anchors: Tensor, valid: Tensor, grid_sizes: Sequence[Sequence[int]], gt_boxes: Tensor
               ) -> Tensor:
        """One image's assignment over its valid anchors (mmdet assigns only those, level by level), -1 for a
        negative or an anchor on the padding."""
        level_valid = valid.split(self.level_counts(grid_sizes))
        matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
        matched[valid] = self.assigner(anchors[valid], [int(v.sum()) for v in level_valid], gt_boxes)
        return matched

    def compute_loss(self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], anchors: Tensor,
                     valid: Tensor, grid_sizes: Sequence[Sequence[int]]) -> dict[str, Tensor]:
        logits = head_outputs["cls_logits"]
        matched = torch.stack([self.assign(anchors, v, grid_sizes, t["boxes"]) for v, t in zip(valid, targets)])
        positive = matched >= 0
        class_targets = torch.zeros_like(logits)
        gt_boxes = torch.zeros(*matched.shape, 4, dtype=anchors.dtype, device=anchors.device)
        for image, target in enumerate(targets):
            pos = positive[image]
            gt_boxes[image, pos] = target["boxes"][matched[image, pos]]
            class_targets[image, pos, target["labels"][matched[image, pos]] - 1] = 1.0
        # positives per image, at least 1 each, averaged over the processes, at least 1 (mmdet's num_total_samples)
        num_pos = max(mean_over_processes(positive.sum(1).clamp(min=1).sum().to(logits.dtype)).item(), 1.0)
        loss_cls = sigmoid_focal_loss(logits[valid], class_targets[valid], self.focal_alpha, self.focal_gamma,
                                      reduction="sum") / num_pos
        pos_anchors, pos_gt = anchors.expand(len(targets), -1, -1)[positive], gt_boxes[positive]
        boxes = self.box_coder.decode_single(head_outputs["bbox_regression"][positive], pos_anchors)
        centerness = centerness_target(pos_anchors, pos_gt)
        box_normaliser = mean_over_processes(centerness.sum().detach()).item()
        box_normaliser = box_normaliser if box_normaliser >= BOX_NORMALISER_EPS else 1.0
        loss_bbox = (centerness * generalized_box_iou_loss(boxes, pos_gt)).sum() / box_normaliser
        loss_centerness = F.binary_cross_entropy_with_logits(head_outputs["bbox_ctrness"][positive][:, 0], centerness,
                                                             reduction="sum") / num_pos
        return {"loss_cls": loss_cls, "loss_bbox": self.box_loss_weight * loss_bbox,
                "loss_centerness": self.centerness_loss_weight * loss_centerness}

    def postprocess_detections(self, head_outputs: dict[str, Tensor], anchors: Tensor,
                               grid_sizes: Sequence[Sequence[int]], image_sizes: list[tuple[int, int]]
                               ) -> list[dict[str, Tensor]]:
        counts = self.level_counts(grid_sizes)
        probabilities = head_outputs["cls_logits"].sigmoid()
        centerness = head_outputs["bbox_ctrness"][..., 0].sigmoid()
        detections = []
        for image, image_size in enumerate(image_sizes):
            boxes, scores, factors = [], [], []
            for level_probabilities, level_centerness, deltas, level_anchors in zip(
                    probabilities[image].split(counts), centerness[image].split(counts),
                    head_outputs["bbox_regression"][image].split(counts), anchors.split(counts)):
                if 0 < self.topk_candidates < len(level_anchors):
                    ranking = (level_probabilities * level_centerness[:, None]).amax(1)
                    keep = ranking.topk(self.topk_candidates).indices
                    level_probabilities, level_centerness = level_probabilities[keep], level_centerness[keep]
                    deltas, level_anchors = deltas[keep], level_anchors[keep]
                boxes.append(clip_boxes_to_image(self.box_coder.decode_single(deltas, level_anchors), image_size))
                scores.append(level_probabilities)
                factors.append(level_centerness)
            boxes, scores, factors = torch.cat(boxes), torch.cat(scores), torch.cat(factors)
            # the threshold is on the class probability; the score is that times the centerness (multiclass_nms)
            box_index, class_index = (scores > self.score_thresh).nonzero(as_tuple=True)
            final_scores = scores[box_index, class_index] * factors[box_index]
            keep = batched_nms(boxes[box_index], final_scores, class_index, self.nms_thresh)[:self.detections_per_img]
            detections.append({"boxes": boxes[box_index[keep]], "scores": final_scores[keep],
                               "labels": class_index[keep] + 1})
        return detections
