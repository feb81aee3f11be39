"""The two R-CNN stages (RPN and RoI heads) as torchvision's classes, subclassed where vtrain needs more:

* a box head that sees the RoIs' boxes (the relation head, :class:`relation.RelationBoxHead`), run on all of an
  image's RoIs in training with the loss on torchvision's sampled ones (the official Relation Networks code);
* any duplicate removal (``task/detector/nms``: :mod:`nms`, or the learned one, trained with the detector);
* mmdetection v2's settings where torchvision's differ (:class:`RCNNSettings`, ``task/detector/rcnn=mmdet``).

With the defaults (``task/detector/rcnn=torchvision``, ``task/detector/box_head=two_fc``, ``task/detector/nms=nms``) the classes compute
exactly what torchvision's do (held by a test on the same weights and inputs).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.roi_heads import (
    RoIHeads,
    maskrcnn_loss,
)
from torchvision.models.detection.rpn import RegionProposalNetwork, concat_box_prediction_layers
from torchvision.ops import MultiScaleRoIAlign, batched_nms, generalized_box_iou_loss, roi_align
from torchvision.ops import boxes as box_ops
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales
from vtrain.tasks.detection.nms import HardNMS

from vtrain.config import ConfigError

BOX_LOSSES = ("smooth_l1", "giou")


@dataclass(frozen=True)
class RCNNSettings:
    """Where an R-CNN follows torchvision or mmdetection v2 (``conf/task/detector/rcnn/``: ``torchvision``, ``mmdet``).

    mmdet v2's values are those of ``configs/_base_/models/mask_rcnn_r50_fpn.py`` and its heads' ``init_cfg``.

    Args:
        roi_align_aligned: RoIAlign's half-pixel alignment (mmcv ``RoIAlign(aligned=True)``; torchvision's
            ``MultiScaleRoIAlign`` has none).
        roi_align_sampling_ratio: samples per bin side (mmdet 0: adaptive, ``ceil(roi size / output size)``;
            torchvision 2).
        rpn_box_loss_beta, box_loss_beta: smooth-L1 beta of the RPN's and the R-CNN's box loss; 0 is the L1 loss
            (mmdet v2 ``L1Loss`` in both; torchvision 1/9 in both).
        rpn_min_pos_iou: the RPN's low-quality matches (an anchor with a ground truth's highest IoU is positive
            for it): mmdet keeps them only at IoU >= 0.3 (``min_pos_iou``) and gives them to that ground truth;
            ``None``: torchvision's rule (any IoU, the anchor's own best ground truth).
        mmdet_init: mmdet v2's initialisation of the FPN (Xavier uniform convs) and the box head (Xavier uniform
            fc layers, classifier N(0, 0.01), box regressor N(0, 0.001), zero biases); otherwise torchvision's.
        rpn_box_loss, box_loss: ``smooth_l1`` (with the betas above) on the deltas, or ``giou``: the GIoU loss of
            the boxes the deltas give against their ground truth (detectron2's ``BBOX_REG_LOSS_TYPE``; its
            ``mask_rcnn_R_50_FPN_1x_giou.yaml``); the same normaliser either way.
        rpn_box_loss_weight, box_loss_weight: the factor on each (detectron2's ``BBOX_REG_LOSS_WEIGHT``: 1; its
            GIoU config: 2 in the RPN, 10 in the box head).
    """

    roi_align_aligned: bool = False
    roi_align_sampling_ratio: int = 2
    rpn_box_loss_beta: float = 1.0 / 9
    box_loss_beta: float = 1.0 / 9
    rpn_min_pos_iou: float | None = None
    mmdet_init: bool = False
    rpn_box_loss: str = "smooth_l1"
    box_loss: str = "smooth_l1"
    rpn_box_loss_weight: float = 1.0
    box_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        for key in ("rpn_box_loss", "box_loss"):
            if getattr(self, key) not in BOX_LOSSES:
                raise ConfigError(f"task.detector.rcnn.{key}={getattr(self, key)!r}: use one of {', '.join(BOX_LOSSES)}")

    @property
    def is_torchvision(self) -> bool:
        return self == RCNNSettings()

    def rpn_options(self) -> dict[str, Any]:
        """What :class:`DetectionRPN` takes of these settings."""
        return {"box_loss_beta": self.rpn_box_loss_beta, "min_pos_iou": self.rpn_min_pos_iou,
                "box_loss": self.rpn_box_loss, "box_loss_weight": self.rpn_box_loss_weight}


def box_regression_loss(deltas: Tensor, target_deltas: Tensor, box_coder: det_utils.BoxCoder, loss: str,
                        beta: float) -> Tensor:
    """The box loss of matched rows, summed: smooth L1 (``beta`` 0: L1) on the deltas, or the GIoU loss
    (Rezatofighi et al., CVPR 2019; ``torchvision.ops.generalized_box_iou_loss``) of the box the deltas give against
    the ground truth box, detectron2's ``_dense_box_regression_loss`` with ``giou``. GIoU is unchanged when both boxes
    are moved, or scaled along either axis, so decoding both deltas against the unit box gives the GIoU of the
    boxes decoded against their anchor or RoI (and the same clamp of the predicted width and height)."""
    if loss == "smooth_l1":
        return F.smooth_l1_loss(deltas, target_deltas, beta=beta, reduction="sum")
    unit = deltas.new_tensor([[0.0, 0.0, 1.0, 1.0]]).expand(len(deltas), 4)
    predicted = box_coder.decode_single(deltas, unit)
    target = box_coder.decode_single(target_deltas, unit)
    return generalized_box_iou_loss(predicted, target, reduction="sum")


# ----------------------------------------------------------------------------------------------- RoIAlign
class PyramidRoIAlign(MultiScaleRoIAlign):
    """torchvision's ``MultiScaleRoIAlign`` (levels by the FPN paper's Eq. 1, the same as mmdet's
    ``SingleRoIExtractor`` with ``finest_scale=56``) with RoIAlign's ``aligned`` switch."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int, aligned: bool = False):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        if not self.aligned:
            return super().forward(x, boxes, image_shapes)
        levels = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(levels, image_shapes, self.canonical_scale,
                                                         self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        level_of_roi = self.map_levels(boxes)
        result = levels[0].new_zeros((len(rois), levels[0].shape[1], *self.output_size))
        for level, (feature, scale) in enumerate(zip(levels, self.scales)):
            index = torch.where(level_of_roi == level)[0]
            pooled = roi_align(feature, rois[index], self.output_size, spatial_scale=scale,
                               sampling_ratio=self.sampling_ratio, aligned=True)
            result[index] = pooled.to(result.dtype)
        return result


# ----------------------------------------------------------------------------------------------- RPN
class LowQualityMatcher(det_utils.Matcher):
    """torchvision's ``Matcher`` with mmdet v2's low-quality matches (``MaxIoUAssigner`` with
    ``match_low_quality=True``, ``gt_max_assign_all=True``): for each ground truth i in turn, every anchor whose
    IoU with it equals its highest IoU, when that is at least ``min_pos_iou``, is matched to i (a later ground
    truth wins a tie)."""

    def __init__(self, high_threshold: float, low_threshold: float, min_pos_iou: float):
        super().__init__(high_threshold, low_threshold, allow_low_quality_matches=True)
        self.min_pos_iou = float(min_pos_iou)

    def set_low_quality_matches_(self, matches: Tensor, all_matches: Tensor, match_quality_matrix: Tensor) -> None:
        highest = match_quality_matrix.max(dim=1).values[:, None]  # (G, 1)
        hit = (match_quality_matrix == highest) & (highest >= self.min_pos_iou)  # (G, A)
        last_gt = hit.shape[0] - 1 - hit.flip(0).int().argmax(dim=0)
        matched = hit.any(dim=0)
        matches[matched] = last_gt[matched]


class DetectionRPN(RegionProposalNetwork):
    """torchvision's RPN with the box loss's smooth-L1 ``beta`` (0: L1) or GIoU (:func:`box_regression_loss`) and
    its weight, optionally mmdet's matcher, and the maps it reads (``levels``; None: all the neck gives)."""

    def __init__(self, *args: Any, box_loss_beta: float = 1.0 / 9, min_pos_iou: float | None = None,
                 box_loss: str = "smooth_l1", box_loss_weight: float = 1.0, levels: Sequence[str] | None = None,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.box_loss_beta = float(box_loss_beta)
        self.box_loss, self.box_loss_weight = box_loss, float(box_loss_weight)
        self.levels = None if levels is None else list(levels)
        if min_pos_iou is not None:
            matcher = self.proposal_matcher
            self.proposal_matcher = LowQualityMatcher(matcher.high_threshold, matcher.low_threshold, min_pos_iou)

    @classmethod
    def like(cls, rpn: RegionProposalNetwork, **options: Any) -> "DetectionRPN":
        """The same RPN (its modules and numbers) as this class."""
        return cls(rpn.anchor_generator, rpn.head, rpn.proposal_matcher.high_threshold,
                   rpn.proposal_matcher.low_threshold, rpn.fg_bg_sampler.batch_size_per_image,
                   rpn.fg_bg_sampler.positive_fraction, dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n),
                   rpn.nms_thresh, score_thresh=rpn.score_thresh, **options)

    def forward(self, images: Any, features: dict[str, Tensor], targets: list[dict[str, Tensor]] | None = None):
        if not self.training:
            return self.scored_proposals(images, features)[0], {}
        return super().forward(images, self.maps_read(features), targets)

    def maps_read(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        if self.levels is None:
            return features
        return {name: features[name] for name in self.levels}  # Relation Networks' C4 base: on C4 only

    def scored_proposals(self, images: Any, features: dict[str, Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Each image's proposals and their objectness probabilities: torchvision's test-time forward, which drops
        the scores that mmdet's test-time augmentation merges proposals by (``merge_aug_proposals``)."""
        maps = list(self.maps_read(features).values())
        objectness, deltas = self.head(maps)
        anchors = self.anchor_generator(images, maps)
        per_level = [o[0].numel() for o in objectness]
        objectness, deltas = concat_box_prediction_layers(objectness, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        return self.filter_proposals(proposals, objectness, images.image_sizes, per_level)

    def compute_loss(self, objectness: Tensor, pred_bbox_deltas: Tensor, labels: list[Tensor],
                     regression_targets: list[Tensor]) -> tuple[Tensor, Tensor]:
        # torchvision's, with beta: the box loss summed over positives over all sampled anchors (mmdet's
        # avg_factor, the same normaliser)
        sampled_pos, sampled_neg = self.fg_bg_sampler(labels)
        sampled_pos = torch.where(torch.cat(sampled_pos, dim=0))[0]
        sampled_neg = torch.where(torch.cat(sampled_neg, dim=0))[0]
        sampled = torch.cat([sampled_pos, sampled_neg], dim=0)
        labels, regression_targets = torch.cat(labels, dim=0), torch.cat(regression_targets, dim=0)
        box_loss = self.box_loss_weight * box_regression_loss(
            pred_bbox_deltas[sampled_pos], regression_targets[sampled_pos], self.box_coder, self.box_loss,
            self.box_loss_beta) / sampled.numel()
        objectness_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return objectness_loss, box_loss


# ----------------------------------------------------------------------------------------------- RoI heads
def box_losses(class_logits: Tensor, box_regression: Tensor, labels: Tensor, regression_targets: Tensor,
               beta: float, box_coder: det_utils.BoxCoder | None = None, loss: str = "smooth_l1",
               weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """torchvision's ``fastrcnn_loss`` with the smooth-L1 ``beta`` (0: L1) or GIoU and a weight
    (:func:`box_regression_loss`): cross-entropy over the sampled RoIs, the positives' class-specific box loss summed
    over all sampled RoIs (mmdet's ``avg_factor``, detectron2's ``box_reg_loss``: the same)."""
    classification = F.cross_entropy(class_logits, labels)
    positive = torch.where(labels > 0)[0]
    per_class = box_regression.reshape(len(box_regression), -1, 4)
    box = weight * box_regression_loss(per_class[positive, labels[positive]], regression_targets[positive],
                                       box_coder, loss, beta) / labels.numel()
    return classification, box


class DetectionRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with a box head that may see the boxes, any duplicate removal, and the box loss's
    beta.

    Args:
        duplicate_removal: :class:`nms.HardNMS` (``iou_threshold=None``: torchvision's ``box_nms_thresh``),
            :class:`nms.SoftNMS` or :class:`relation.LearnedNMS` (a submodule, trained with the detector).
        box_loss_beta: smooth-L1 beta of the box loss (0: L1).
        box_loss, box_loss_weight: ``smooth_l1`` or ``giou`` (:func:`box_regression_loss`), and its factor.
    """

    def __init__(self, *args: Any, duplicate_removal: Any = None, box_loss_beta: float = 1.0 / 9,
                 box_loss: str = "smooth_l1", box_loss_weight: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.duplicate_removal = HardNMS() if duplicate_removal is None else duplicate_removal
        self.box_loss_beta = float(box_loss_beta)
        self.box_loss, self.box_loss_weight = box_loss, float(box_loss_weight)

    @classmethod
    def like(cls, heads: RoIHeads, **options: Any) -> "DetectionRoIHeads":
        """The same heads (modules and numbers) as this class."""
        return cls(heads.box_roi_pool, heads.box_head, heads.box_predictor, heads.proposal_matcher.high_threshold,
                   heads.proposal_matcher.low_threshold, heads.fg_bg_sampler.batch_size_per_image,
                   heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights, heads.score_thresh,
                   heads.nms_thresh, heads.detections_per_img, mask_roi_pool=heads.mask_roi_pool,
                   mask_head=heads.mask_head, mask_predictor=heads.mask_predictor, **options)

    @property
    def relates_objects(self) -> bool:
        return bool(getattr(self.box_head, "relates_objects", False))

    @property
    def learns_duplicate_removal(self) -> bool:
        return bool(getattr(self.duplicate_removal, "learned", False))

    @property
    def sees_all_rois(self) -> bool:
        """Training runs the box head on all of an image's RoIs (not only the sampled ones) when the RoIs relate
        to each other or the duplicate removal learns from the detections (official Relation Networks)."""
        return self.relates_objects or self.learns_duplicate_removal

    def _box_head(self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]],
                  key_masks: list[Tensor] | None = None) -> Tensor:
        pooled = self.box_roi_pool(features, rois, image_shapes)
        return self.box_head(pooled, rois, key_masks) if self.relates_objects else self.box_head(pooled)

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if not self.training:
            box_features = self._box_head(features, proposals, image_shapes)
            class_logits, box_regression = self.box_predictor(box_features)
            result = self.detect(class_logits, box_regression, box_features, proposals, image_shapes)
            if self.has_mask():
                probabilities = self.mask_probabilities(features, [r["boxes"] for r in result],
                                                        [r["labels"] for r in result], image_shapes)
                for probs, r in zip(probabilities.split([len(r["boxes"]) for r in result]), result):
                    r["masks"] = probs
            return result, {}

        # training: torchvision's select_training_samples, the same steps (and random draws)
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        rois = self.add_gt_proposals(proposals, gt_boxes)  # each image's proposals, then its ground truth
        matched_idxs, labels = self.assign_targets_to_proposals(rois, gt_boxes, gt_labels)
        sampled = self.subsample(labels)
        key_masks = None
        if self.sees_all_rois:
            # official: the ground-truth RoIs are queries, not keys ("non_gt_index")
            key_masks = [torch.arange(len(r), device=r.device) < len(p) for r, p in zip(rois, proposals)]
        else:
            rois = [r[s] for r, s in zip(rois, sampled)]
            matched_idxs = [m[s] for m, s in zip(matched_idxs, sampled)]
            labels = [lab[s] for lab, s in zip(labels, sampled)]
            sampled = [torch.arange(len(s), device=s.device) for s in sampled]
        box_features = self._box_head(features, rois, image_shapes, key_masks)
        class_logits, box_regression = self.box_predictor(box_features)

        offsets = torch.tensor([0] + [len(r) for r in rois][:-1], device=class_logits.device).cumsum(0)
        rows = torch.cat([s + o for s, o in zip(sampled, offsets)])
        sampled_rois = [r[s] for r, s in zip(rois, sampled)]
        matched_gt = [(g if len(g) else g.new_zeros(1, 4))[m[s]] for g, m, s in zip(gt_boxes, matched_idxs, sampled)]
        regression_targets = torch.cat(self.box_coder.encode(matched_gt, sampled_rois))
        sampled_labels = torch.cat([lab[s] for lab, s in zip(labels, sampled)])
        loss_classifier, loss_box_reg = box_losses(class_logits[rows], box_regression[rows], sampled_labels,
                                                   regression_targets, self.box_loss_beta, self.box_coder,
                                                   self.box_loss, self.box_loss_weight)
        losses = {"loss_classifier": loss_classifier, "loss_box_reg": loss_box_reg}

        if self.learns_duplicate_removal:
            losses["loss_duplicate_removal"] = self.duplicate_removal_loss(
                class_logits, box_regression, box_features, rois, [len(p) for p in proposals], image_shapes,
                gt_boxes, gt_labels)

        if self.has_mask():
            positive = [s[lab[s] > 0] for s, lab in zip(sampled, labels)]
            mask_rois = [r[p] for r, p in zip(rois, positive)]
            mask_logits = self.mask_logits(features, mask_rois, image_shapes)
            losses["loss_mask"] = maskrcnn_loss(mask_logits, mask_rois, [t["masks"] for t in targets], gt_labels,
                                                [m[p] for m, p in zip(matched_idxs, positive)])
        return [], losses

    def mask_logits(self, features: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]):
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def mask_probabilities(self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
                           image_shapes: list[tuple[int, int]]) -> Tensor:
        """Each box's mask probabilities ``(N, 1, M, M)`` for its label (torchvision's ``maskrcnn_inference``)."""
        probabilities = self.mask_logits(features, boxes, image_shapes).sigmoid()
        label = torch.cat(labels)
        return probabilities[torch.arange(len(label), device=label.device), label][:, None]

    def scored_boxes(self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]
                     ) -> list[tuple[Tensor, Tensor]]:
        """Each image's class-specific boxes ``(N, K, 4)`` (clipped) and class probabilities ``(N, K)`` of its RoIs,
        background left out: what :meth:`detect` removes duplicates from (mmdet's ``get_bboxes`` with
        ``rescale=False``, the input of its test-time augmentation's ``merge_aug_bboxes``)."""
        if self.learns_duplicate_removal:
            raise ConfigError("the learned duplicate removal scores each view's detections with its RoI features: "
                              "test-time augmentation (task.test_scales / task.test_flip) cannot merge them; use "
                              "task/detector/nms=nms or test without it")
        box_features = self._box_head(features, rois, image_shapes)
        class_logits, box_regression = self.box_predictor(box_features)
        scores = F.softmax(class_logits, -1).split([len(r) for r in rois])
        return [(boxes[:, 1:], image_scores[:, 1:])
                for boxes, image_scores in zip(self.class_boxes(box_regression, rois, image_shapes), scores)]

    def detections(self, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """One image's detections from its class-specific boxes ``(N, K, 4)`` and probabilities ``(N, K)``
        (labels 1..K)."""
        labels = torch.arange(1, scores.shape[1] + 1, device=scores.device).expand_as(scores)
        return self.remove_duplicates(boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1))

    def class_boxes(self, box_regression: Tensor, rois: list[Tensor], image_shapes: list[tuple[int, int]]):
        """Each image's decoded, clipped class-specific boxes ``(N_i, classes, 4)``."""
        decoded = self.box_coder.decode(box_regression, rois).split([len(r) for r in rois])
        return [box_ops.clip_boxes_to_image(b, shape) for b, shape in zip(decoded, image_shapes)]

    def duplicate_removal_loss(self, class_logits: Tensor, box_regression: Tensor, box_features: Tensor,
                               rois: list[Tensor], num_proposals: list[int], image_shapes: list[tuple[int, int]],
                               gt_boxes: list[Tensor], gt_labels: list[Tensor]) -> Tensor:
        """The learned duplicate removal's loss on each image's proposals (its ground-truth RoIs left out, as the
        official code does), averaged over the images; the boxes carry no gradient (official ``BlockGrad``)."""
        boxes = self.class_boxes(box_regression.detach(), rois, image_shapes)
        sizes = [len(r) for r in rois]
        losses = []
        for scores, features, image_boxes, n, gt, gt_label in zip(
                F.softmax(class_logits, -1).split(sizes), box_features.split(sizes), boxes, num_proposals,
                gt_boxes, gt_labels):
            losses.append(self.duplicate_removal.loss(scores[:n], image_boxes[:n], features[:n], gt, gt_label))
        return torch.stack(losses).mean()

    def detect(self, class_logits: Tensor, box_regression: Tensor, box_features: Tensor, rois: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        """torchvision's ``postprocess_detections`` with the duplicate removal swapped: per image, class-specific
        boxes clipped, background dropped, scores above ``score_thresh``, boxes of at least 0.01 px, duplicates
        removed, the best ``detections_per_img`` kept."""
        sizes = [len(r) for r in rois]
        all_scores = F.softmax(class_logits, -1).split(sizes)
        results = []
        for boxes, scores, features in zip(self.class_boxes(box_regression, rois, image_shapes), all_scores,
                                           box_features.split(sizes)):
            if self.learns_duplicate_removal:
                results.append(self.remove_duplicates(*self.duplicate_removal.detect(scores, boxes, features)))
            else:
                results.append(self.detections(boxes[:, 1:], scores[:, 1:]))
        return results

    def remove_duplicates(self, boxes: Tensor, scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
        """Scores above ``score_thresh``, boxes of at least 0.01 px, duplicates removed, the best
        ``detections_per_img`` kept (torchvision's ``postprocess_detections`` after the decoding)."""
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.learns_duplicate_removal:  # the scores already say which detection is kept
            keep = torch.argsort(scores, descending=True, stable=True)
            kept_scores = scores[keep]
        elif isinstance(self.duplicate_removal, HardNMS) and self.duplicate_removal.is_detectors_own:
            keep = batched_nms(boxes, scores, labels, self.nms_thresh)
            kept_scores = scores[keep]
        else:
            keep, kept_scores = self.duplicate_removal(boxes, scores, labels)
        keep, kept_scores = keep[: self.detections_per_img], kept_scores[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": kept_scores}


# ----------------------------------------------------------------------------------------------- assembly
def build_rcnn_heads(detector: nn.Module, settings: RCNNSettings, duplicate_removal: Any,
                     rpn_levels: Sequence[str] | None = None) -> None:
    """Replace a torchvision Faster / Mask R-CNN's RPN and RoI heads by the classes above, in place; the RPN reads
    the maps ``rpn_levels`` (None: all)."""
    detector.rpn = DetectionRPN.like(detector.rpn, levels=rpn_levels, **settings.rpn_options())
    detector.roi_heads = DetectionRoIHeads.like(detector.roi_heads, duplicate_removal=duplicate_removal,
                                                box_loss_beta=settings.box_loss_beta, box_loss=settings.box_loss,
                                                box_loss_weight=settings.box_loss_weight)
    if settings.mmdet_init:
        init_like_mmdet(detector)


def init_like_mmdet(detector: nn.Module) -> None:
    """mmdet v2's initialisation where torchvision's differs: FPN convs Xavier uniform (``FPN.init_cfg``), the box
    head's fc layers Xavier uniform (``ConvFCBBoxHead``), classifier N(0, 0.01) and box regressor N(0, 0.001)
    (``BBoxHead``), all biases 0. The RPN head (N(0, 0.01)) and the mask head (Kaiming normal, fan-out) are the
    same in both. A relation head's relation modules keep their own initialisation."""
    init_fpn_like_mmdet(detector.backbone)
    heads = detector.roi_heads
    for name in ("fc6", "fc7"):
        layer = getattr(heads.box_head, name)
        nn.init.xavier_uniform_(layer.weight)
        nn.init.zeros_(layer.bias)
    for layer, std in ((heads.box_predictor.cls_score, 0.01), (heads.box_predictor.bbox_pred, 0.001)):
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


def init_fpn_like_mmdet(pyramid: nn.Module) -> None:
    """mmdet v2's FPN initialisation (``FPN.init_cfg``): Xavier-uniform convs, zero biases (none without an FPN)."""
    for module in pyramid.fpn.modules() if hasattr(pyramid, "fpn") else ():
        if isinstance(module, nn.Conv2d):
            nn.init.xavier_uniform_(module.weight)
            nn.init.zeros_(module.bias)


def roi_pools(settings: RCNNSettings, masks: bool, levels: Sequence[str], box_size: int = 7) -> dict[str, Any]:
    """The box (7x7; the C4 head's 14x14) and mask (14x14) RoI pools torchvision builds by default, with the
    settings' RoIAlign, over the pyramid's maps named ``levels``."""
    def pool(size: int) -> PyramidRoIAlign:
        return PyramidRoIAlign(list(levels), size, settings.roi_align_sampling_ratio, settings.roi_align_aligned)
    return {"box_roi_pool": pool(box_size), **({"mask_roi_pool": pool(14)} if masks else {})}
