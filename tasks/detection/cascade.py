"""Cascade R-CNN and Cascade Mask R-CNN (Cai & Vasconcelos, CVPR 2018 / TPAMI 2019) with mmdetection v2's
``CascadeRoIHead`` semantics, the code behind Swin's released detectors (``cascade_mask_rcnn_swin_*_giou_4conv1f``).

Three R-CNN stages, each trained on the previous stage's refined boxes at a higher IoU:

* stage ``i`` matches its proposals (plus the ground truth) at ``iou_thresholds[i]`` (0.5 / 0.6 / 0.7: positive at
  or above, negative below, no low-quality matches), samples 512 RoIs per image, a quarter positive at most, and its
  losses count ``loss_weights[i]`` times (1 / 0.5 / 0.25);
* its box head (:class:`ConvFCBoxHead`: Swin's "4conv1fc" with BatchNorm, or mmdet's plain 2fc) predicts class
  scores and class-specific (``class_agnostic=False``, Swin's configs) or class-agnostic deltas, encoded with the
  stage's ``target_stds`` (0.1/0.2, 0.05/0.1, 0.033/0.067);
* the box loss is the L1 / smooth-L1 loss on the deltas, or 10 x the GIoU loss on the decoded boxes
  (``reg_decoded_bbox``, Swin's configs), summed over the positives and divided by all sampled RoIs (mmdet's
  ``avg_factor``); the classification loss is the cross-entropy averaged over the sampled RoIs;
* the next stage's proposals are this stage's sampled RoIs (the ground-truth ones left out) moved by its deltas of
  their target class (the highest-scoring one for a negative), clipped to the image, without gradient
  (``refine_bboxes``);
* Cascade Mask R-CNN has a mask head per stage, trained on that stage's positive RoIs.

At test time each stage scores the previous stage's refined boxes; the classification logits of the three stages
are averaged, then soft-maxed, and the last stage's deltas give the boxes; class-wise NMS at 0.5 keeps the best 100
above 0.05. The masks of the final boxes are the three mask heads' probabilities, averaged (``merge_aug_masks``).

Where vtrain follows torchvision instead (held by its tests, the same as its Mask R-CNN): labels 1..K with the
background at 0 (mmdet puts it last; the logits are the same up to the column order); the ground truth appended to
the proposals rather than prepended (the sampled sets are drawn alike); mask targets cropped by torchvision's
RoIAlign (``aligned=False``; mmdet's ``aligned=True``), and boxes under 0.01 px dropped before the NMS.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.models.detection.roi_heads import maskrcnn_loss
from torchvision.ops import batched_nms, generalized_box_iou_loss
from torchvision.ops import boxes as box_ops
from vtrain.tasks.detection.detector import torchvision_transform
from vtrain.tasks.detection.mmdet_release import Rows, background_first, mask_head_names
from vtrain.tasks.detection.neck import FeaturePyramid
from vtrain.tasks.detection.rcnn import PyramidRCNN, rcnn_class
from vtrain.tasks.detection.roi_heads import DetectionRPN, RCNNSettings, init_fpn_like_mmdet, roi_pools

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError

ROI_SIZE = 7


class ConvFCBoxHead(nn.Module):
    """mmdet's ``ConvFCBBoxHead`` trunk: ``num_convs`` 3x3 convs (with BatchNorm when ``norm``: no conv bias, as
    mmcv's ``ConvModule``) then ``num_fcs`` fc layers, each followed by ReLU. Swin's "4conv1fc": 4 convs of 256 and
    one fc of 1024 (``Shared4Conv1FCBBoxHead``, ``norm_cfg=SyncBN``); mmdet's default cascade: no conv, 2 fc
    (``Shared2FCBBoxHead``). mmdet's initialisation: convs Kaiming normal (fan-out), fc layers Xavier uniform."""

    def __init__(self, in_channels: int, num_convs: int = 4, conv_dim: int = 256, num_fcs: int = 1,
                 fc_dim: int = 1024, norm: bool = True, roi_size: int = ROI_SIZE):
        super().__init__()
        convs = []
        for index in range(num_convs):
            conv = nn.Conv2d(in_channels if index == 0 else conv_dim, conv_dim, 3, padding=1, bias=not norm)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
            convs += [conv, nn.BatchNorm2d(conv_dim)] if norm else [conv]
            convs.append(nn.ReLU(inplace=True))
        self.convs = nn.Sequential(*convs)
        width = (conv_dim if num_convs else in_channels) * roi_size * roi_size
        fcs = []
        for index in range(num_fcs):
            fc = nn.Linear(width if index == 0 else fc_dim, fc_dim)
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
            fcs += [fc, nn.ReLU(inplace=True)]
        self.fcs = nn.Sequential(*fcs)
        self.out_channels = fc_dim if num_fcs else width

    def forward(self, pooled: Tensor) -> Tensor:
        return self.fcs(self.convs(pooled).flatten(1))

    def mmdet_names(self) -> dict[str, str]:
        """mmdet's ``ConvFCBBoxHead`` names of its layers -> this trunk's: ``shared_convs.k.conv`` / ``.bn``
        (mmcv's ``ConvModule``; SyncBN's name is ``bn``) and ``shared_fcs.k``."""
        names = {}
        convs = [i for i, m in enumerate(self.convs) if isinstance(m, nn.Conv2d)]
        for k, i in enumerate(convs):
            names[f"shared_convs.{k}.conv"] = f"convs.{i}"
            if isinstance(self.convs[i + 1], nn.BatchNorm2d):
                names[f"shared_convs.{k}.bn"] = f"convs.{i + 1}"
        fcs = [i for i, m in enumerate(self.fcs) if isinstance(m, nn.Linear)]
        return {**names, **{f"shared_fcs.{k}": f"fcs.{i}" for k, i in enumerate(fcs)}}


class CascadeStage(nn.Module):
    """One stage's box head and predictor: ``num_classes`` + 1 scores (background first), and 4 deltas per
    category (mmdet: none for the background) or 4 in all (``class_agnostic``). Classifier N(0, 0.01), box
    regressor N(0, 0.001), as mmdet's ``BBoxHead``."""

    def __init__(self, head: nn.Module, num_classes: int, class_agnostic: bool):
        super().__init__()
        self.head = head
        self.cls_score = nn.Linear(head.out_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(head.out_channels, 4 if class_agnostic else 4 * num_classes)
        self.class_agnostic = class_agnostic
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: Tensor) -> tuple[Tensor, Tensor]:
        features = self.head(pooled)
        return self.cls_score(features), self.bbox_pred(features)

    def deltas_of(self, deltas: Tensor, labels: Tensor) -> Tensor:
        """Each RoI's 4 deltas for its label (1..K; class-agnostic: the only ones)."""
        if self.class_agnostic:
            return deltas
        return deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels - 1]


class MaskStage(nn.Module):
    """torchvision's mask head (4 convs of 256) and an up-sampling deconvolution, with ``num_classes`` mask logits
    (mmdet's ``FCNMaskHead``: none for the background)."""

    def __init__(self, in_channels: int, dims: Sequence[int], num_classes: int):
        super().__init__()
        self.head = MaskRCNNHeads(in_channels, list(dims), 1)
        self.upsample = nn.ConvTranspose2d(dims[-1], dims[-1], 2, stride=2)
        self.logits = nn.Conv2d(dims[-1], num_classes, 1)
        for layer in (self.upsample, self.logits):
            nn.init.kaiming_normal_(layer.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(layer.bias)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.logits(F.relu(self.upsample(self.head(pooled))))


class CascadeRoIHeads(nn.Module):
    """The cascade's RoI heads (see the module doc), called as torchvision's ``RoIHeads``:
    ``(features, proposals, image_shapes, targets) -> (detections, losses)``."""

    def __init__(self, box_roi_pool: nn.Module, stages: Sequence[CascadeStage], iou_thresholds: Sequence[float],
                 loss_weights: Sequence[float], target_stds: Sequence[Sequence[float]], box_loss: str = "giou",
                 box_loss_weight: float = 10.0, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 mask_roi_pool: nn.Module | None = None, mask_stages: Sequence[MaskStage] | None = None):
        super().__init__()
        if not len(stages) == len(iou_thresholds) == len(loss_weights) == len(target_stds):
            raise ConfigError(f"task.detector.stages: {len(iou_thresholds)} IoU thresholds, {len(loss_weights)} loss "
                              f"weights and {len(target_stds)} target stds for {len(stages)} stages: give one per stage")
        if box_loss not in ("giou", "l1", "smooth_l1"):
            raise ConfigError(f"task.detector.box_loss={box_loss!r}: use giou, l1 or smooth_l1")
        self.box_roi_pool, self.stages = box_roi_pool, nn.ModuleList(stages)
        self.matchers = [det_utils.Matcher(t, t, allow_low_quality_matches=False) for t in iou_thresholds]
        self.loss_weights = [float(w) for w in loss_weights]
        self.box_coders = [det_utils.BoxCoder(tuple(1.0 / float(s) for s in stds)) for stds in target_stds]
        self.box_loss, self.box_loss_weight = box_loss, float(box_loss_weight)
        self.sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.mask_roi_pool = mask_roi_pool
        self.mask_stages = nn.ModuleList(mask_stages) if mask_stages else None

    def has_mask(self) -> bool:
        return self.mask_stages is not None

    def forward(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
                targets: list[dict[str, Tensor]] | None = None):
        if self.training:
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    # ----------------------------------------------------------------------------------------------- training
    def sample(self, stage: int, proposals: list[Tensor], gt_boxes: list[Tensor], gt_labels: list[Tensor]):
        """Per image: the sampled RoIs, their labels (0: background), matched ground truth, and which are ground
        truth themselves (appended to the proposals, matched to themselves)."""
        rois, labels, matched, is_gt = [], [], [], []
        for boxes, gt, gt_label in zip(proposals, gt_boxes, gt_labels):
            candidates = torch.cat([boxes, gt])
            if len(gt):
                index = self.matchers[stage](box_ops.box_iou(gt, candidates))
                label = gt_label[index.clamp(min=0)].clone()
                label[index < 0] = 0
                match = index.clamp(min=0)
            else:
                label = torch.zeros(len(candidates), dtype=torch.int64, device=boxes.device)
                match = torch.zeros_like(label)
            pos, neg = self.sampler([label])
            kept = torch.where(pos[0] | neg[0])[0]
            rois.append(candidates[kept])
            labels.append(label[kept])
            matched.append(match[kept])
            is_gt.append(kept >= len(boxes))
        return rois, labels, matched, is_gt

    def losses(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]],
               targets: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        gt_boxes = [t["boxes"].to(proposals[0].dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        losses: dict[str, Tensor] = {}
        for i, stage in enumerate(self.stages):
            rois, labels, matched, is_gt = self.sample(i, proposals, gt_boxes, gt_labels)
            class_logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            label = torch.cat(labels)
            weight = self.loss_weights[i]
            losses[f"s{i}.loss_cls"] = weight * F.cross_entropy(class_logits, label)
            losses[f"s{i}.loss_bbox"] = weight * self.stage_box_loss(i, stage, deltas, rois, label, matched, gt_boxes)
            if self.has_mask():
                positive = [lab > 0 for lab in labels]
                mask_rois = [r[p] for r, p in zip(rois, positive)]
                logits = self.mask_stages[i](self.mask_roi_pool(features, mask_rois, image_shapes))
                losses[f"s{i}.loss_mask"] = weight * maskrcnn_loss(
                    logits, mask_rois, [t["masks"] for t in targets], [lab - 1 for lab in gt_labels],
                    [m[p] for m, p in zip(matched, positive)])
            if i + 1 < len(self.stages):
                with torch.no_grad():  # the next stage's proposals: this stage's RoIs refined, the ground truth left out
                    fallback = class_logits[:, 1:].argmax(1) + 1
                    label = torch.where(label > 0, label, fallback)
                    refined = self.refine(i, stage, deltas, rois, label, image_shapes)
                    proposals = [r[~g] for r, g in zip(refined, is_gt)]
        return losses

    def stage_box_loss(self, i: int, stage: CascadeStage, deltas: Tensor, rois: list[Tensor], label: Tensor,
                       matched: list[Tensor], gt_boxes: list[Tensor]) -> Tensor:
        positive = torch.where(label > 0)[0]
        if not len(positive):
            return deltas.sum() * 0
        target = torch.cat([(g if len(g) else g.new_zeros(1, 4))[m] for g, m in zip(gt_boxes, matched)])[positive]
        anchor = torch.cat(rois)[positive]
        predicted = stage.deltas_of(deltas[positive], label[positive])
        if self.box_loss == "giou":  # on the decoded boxes (mmdet's reg_decoded_bbox)
            boxes = self.box_coders[i].decode_single(predicted, anchor)
            per_roi = generalized_box_iou_loss(boxes, target, reduction="none")
        else:
            encoded = self.box_coders[i].encode_single(target, anchor)
            beta = 1.0 if self.box_loss == "smooth_l1" else 0.0
            per_roi = F.smooth_l1_loss(predicted, encoded, beta=beta, reduction="none").sum(1)
        return self.box_loss_weight * per_roi.sum() / len(label)

    def refine(self, i: int, stage: CascadeStage, deltas: Tensor, rois: list[Tensor], labels: Tensor,
               image_shapes: list[tuple[int, int]]) -> list[Tensor]:
        """Each image's RoIs moved by their deltas for ``labels``, clipped to the image (mmdet's
        ``regress_by_class`` with ``max_shape``)."""
        boxes = self.box_coders[i].decode_single(stage.deltas_of(deltas, labels), torch.cat(rois))
        return [box_ops.clip_boxes_to_image(b, shape) for b, shape in
                zip(boxes.split([len(r) for r in rois]), image_shapes)]

    # ----------------------------------------------------------------------------------------------- inference
    def detect(self, features: dict[str, Tensor], proposals: list[Tensor],
               image_shapes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        results = [self.detections(boxes, scores) for boxes, scores in self.scored_boxes(features, proposals, image_shapes)]
        if self.has_mask():
            probabilities = self.mask_probabilities(features, [r["boxes"] for r in results],
                                                    [r["labels"] for r in results], image_shapes)
            for result, masks in zip(results, probabilities.split([len(r["boxes"]) for r in results])):
                result["masks"] = masks
        return results

    def scored_boxes(self, features: dict[str, Tensor], proposals: list[Tensor], image_shapes: list[tuple[int, int]]
                     ) -> list[tuple[Tensor, Tensor]]:
        """Each image's class-specific boxes ``(N, K, 4)`` (the last stage's, clipped) and class probabilities
        ``(N, K)`` (the stages' logits averaged), background left out: mmdet's ``CascadeRoIHead`` test up to
        ``get_bboxes`` with ``rescale=False``, the input of its test-time augmentation's ``merge_aug_bboxes``."""
        rois, logits = proposals, []
        for i, stage in enumerate(self.stages):
            class_logits, deltas = stage(self.box_roi_pool(features, rois, image_shapes))
            logits.append(class_logits)
            if i + 1 < len(self.stages):
                rois = self.refine(i, stage, deltas, rois, class_logits[:, 1:].argmax(1) + 1, image_shapes)
        scores = F.softmax(torch.stack(logits).mean(0), -1)  # the stages' logits averaged (mmdet's ms_scores)
        coder = self.box_coders[-1]
        num_classes = scores.shape[1] - 1
        per_class = deltas.view(len(deltas), -1, 4)
        if per_class.shape[1] == 1:
            per_class = per_class.expand(-1, num_classes, 4)
        anchors = torch.cat(rois)
        boxes = coder.decode_single(per_class.reshape(-1, 4), anchors.repeat_interleave(num_classes, 0))
        boxes = boxes.view(len(anchors), num_classes, 4)
        sizes = [len(r) for r in rois]
        return [(box_ops.clip_boxes_to_image(image_boxes, shape), image_scores[:, 1:])
                for image_boxes, image_scores, shape in zip(boxes.split(sizes), scores.split(sizes), image_shapes)]

    def detections(self, boxes: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """One image's detections from its class-specific boxes ``(N, K, 4)`` and probabilities ``(N, K)``: above
        ``score_thresh``, boxes of at least 0.01 px, class-wise NMS, the best ``detections_per_img``."""
        boxes = boxes.reshape(-1, 4)
        labels = torch.arange(1, scores.shape[1] + 1, device=scores.device).repeat(len(scores))
        scores = scores.reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
        return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}

    def mask_probabilities(self, features: dict[str, Tensor], boxes: list[Tensor], labels: list[Tensor],
                           image_shapes: list[tuple[int, int]]) -> Tensor:
        """Each box's mask probabilities ``(N, 1, M, M)`` for its label: the mask heads' averaged
        (``merge_aug_masks`` over the stages)."""
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        probabilities = torch.stack([m(pooled).sigmoid() for m in self.mask_stages]).mean(0)
        label = torch.cat(labels)
        return probabilities[torch.arange(len(label), device=label.device), label - 1][:, None]


class CascadeSpec(PyramidRCNN):
    """Cascade (Mask) R-CNN on a backbone (a :class:`detector.DetectorSpec`): ``conf/task/detector/cascade_mask_rcnn.yaml``.

    Args:
        model: torchvision's ``FasterRCNN`` or ``MaskRCNN`` with its RPN options (a partial: the anchor generator,
            ``rpn_pre_nms_top_n_train``, ...): its RPN and transform; its RoI heads become :class:`CascadeRoIHeads`.
        out_indices: the backbone outputs that feed the pyramid.
        neck: the pyramid on the backbone (:class:`neck.FeaturePyramid`).
        box_head: each stage's trunk (:class:`ConvFCBoxHead`, a partial called with ``in_channels`` and ``fc_dim``).
        box_head_dim: the trunk's width, the stage predictors' input (1024; ``RCNNSpec.box_head_dim`` likewise).
        iou_thresholds, loss_weights, target_stds: one per stage (the module doc).
        class_agnostic: one set of deltas per RoI (mmdet's default cascade) instead of one per category (Swin's).
        box_loss: ``giou`` (on decoded boxes, Swin's), ``smooth_l1`` (beta 1, mmdet's default cascade) or ``l1``.
        box_loss_weight: its weight (10 for GIoU in Swin's configs, 1 otherwise).
        rcnn: mmdetection v2's or torchvision's RoIAlign and RPN details (:class:`roi_heads.RCNNSettings`).
        mask_head_dims: each stage's mask head convs (Cascade Mask R-CNN; ``MaskRCNN`` only).
        batch_size_per_image, positive_fraction: each stage's RoI sampling (512, 0.25).
        score_thresh, nms_thresh, detections_per_img: the test-time selection (0.05, 0.5, 100).
    """

    def __init__(self, model: Callable[..., FasterRCNN], out_indices: Sequence[int],
                 neck: Callable[[Backbone], FeaturePyramid], box_head: Callable[..., nn.Module],
                 box_head_dim: int = 1024, iou_thresholds: Sequence[float] = (0.5, 0.6, 0.7),
                 loss_weights: Sequence[float] = (1.0, 0.5, 0.25),
                 target_stds: Sequence[Sequence[float]] = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1),
                                                          (0.033, 0.033, 0.067, 0.067)),
                 class_agnostic: bool = False, box_loss: str = "giou", box_loss_weight: float = 10.0,
                 rcnn: RCNNSettings | None = None, mask_head_dims: Sequence[int] | None = None,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100):
        self.model, self.out_indices, self.neck, self.box_head = model, tuple(int(i) for i in out_indices), neck, box_head
        self.box_head_dim = int(box_head_dim)
        cls, self.mask_head_dims = rcnn_class(model, mask_head_dims, "CascadeSpec")
        self.masks = self.mask_head_dims is not None
        self.stage_options = dict(iou_thresholds=[float(t) for t in iou_thresholds],
                                  loss_weights=[float(w) for w in loss_weights],
                                  target_stds=[[float(s) for s in stds] for stds in target_stds],
                                  box_loss=box_loss, box_loss_weight=float(box_loss_weight),
                                  batch_size_per_image=int(batch_size_per_image),
                                  positive_fraction=float(positive_fraction), score_thresh=float(score_thresh),
                                  nms_thresh=float(nms_thresh), detections_per_img=int(detections_per_img))
        self.class_agnostic = bool(class_agnostic)
        self.rcnn = RCNNSettings() if rcnn is None else rcnn
        if (self.rcnn.box_loss, self.rcnn.box_loss_weight) != ("smooth_l1", 1.0):
            raise ConfigError("task.detector.rcnn.box_loss / box_loss_weight: the cascade's stages take "
                              "task.detector.box_loss and task.detector.box_loss_weight instead")
        self.name = "Cascade" + cls.__name__

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> nn.Module:
        """``num_classes`` counts the categories and the background (what the task gives every detector)."""
        pyramid = self.pyramid(backbone)
        width = pyramid.out_channels
        pools = roi_pools(self.rcnn, self.masks, pyramid.level_names)
        detector = self.model(pyramid, num_classes=num_classes, **torchvision_transform(transform))
        detector.rpn = DetectionRPN.like(detector.rpn, **self.rcnn.rpn_options())
        categories = num_classes - 1
        stages = [CascadeStage(self.box_head(in_channels=width, fc_dim=self.box_head_dim), categories,
                               self.class_agnostic) for _ in self.stage_options["iou_thresholds"]]
        masks = ([MaskStage(width, self.mask_head_dims, categories) for _ in stages] if self.masks else None)
        detector.roi_heads = CascadeRoIHeads(pools["box_roi_pool"], stages, mask_roi_pool=pools.get("mask_roi_pool"),
                                             mask_stages=masks, **self.stage_options)
        if self.rcnn.mmdet_init:  # the FPN's (the heads initialise themselves as mmdet's)
            init_fpn_like_mmdet(pyramid)
        return detector

    def release_names(self, detector: nn.Module) -> tuple[dict[str, str], dict[str, Rows]]:
        """mmdet's ``CascadeRoIHead`` (``roi_head.bbox_head.<stage>``, ``roi_head.mask_head.<stage>``): each stage's
        ``ConvFCBBoxHead`` (``fc_cls`` background last; ``fc_reg`` 4 deltas per category, none for the background,
        or 4 class-agnostic: as vtrain's) and ``FCNMaskHead`` (``conv_logits`` one per category, as vtrain's)."""
        heads = detector.roi_heads
        names: dict[str, str] = {}
        rows: dict[str, Rows] = {}
        for s, stage in enumerate(heads.stages):
            own = f"detector.roi_heads.stages.{s}"
            names.update({f"roi_head.bbox_head.{s}.{k}": f"{own}.head.{v}" for k, v in stage.head.mmdet_names().items()})
            names.update({f"roi_head.bbox_head.{s}.fc_cls": f"{own}.cls_score",
                          f"roi_head.bbox_head.{s}.fc_reg": f"{own}.bbox_pred"})
            rows[f"{own}.cls_score"] = background_first
        for s, stage in enumerate(heads.mask_stages or ()):
            own = f"detector.roi_heads.mask_stages.{s}"
            names.update(mask_head_names(f"roi_head.mask_head.{s}", f"{own}.head", len(stage.head),
                                         logits=f"{own}.logits", upsample=f"{own}.upsample"))
        return names, rows
