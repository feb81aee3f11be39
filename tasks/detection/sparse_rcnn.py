"""Sparse R-CNN (Sun et al., "Sparse R-CNN: End-to-End Object Detection with Learnable Proposals", CVPR 2021) on
any vtrain backbone that gives C2-C5.

The official architecture (PeizeSun/SparseR-CNN ``projects/SparseRCNN/sparsercnn/detector.py``, ``head.py``,
``loss.py``; mmdet v2's port ``SparseRCNN`` / ``EmbeddingRPNHead`` / ``SparseRoIHead`` / ``DIIHead`` computes the
same), with its module names inside a stage, so that an official checkpoint loads tensor for tensor:

* an FPN (P2-P5, 256 channels; :class:`neck.FeaturePyramid`) on the backbone's C2-C5;
* ``num_proposals`` learned proposal boxes ``(cx, cy, w, h)`` relative to the image, initialised to the whole image
  (0.5, 0.5, 1, 1), and as many learned proposal features (Sec. 3.1-3.2);
* 6 iterative stages (:class:`SparseRCNNStage`, the official ``RCNNHead``; Sec. 3.3-3.4), each: RoIAlign 7x7 of every
  box on its FPN level (detectron2's ``ROIAlignV2``: aligned, 2 samples per bin; the FPN paper's level rule);
  multi-head self-attention between the proposal features (the relation between objects); the dynamic instance
  interaction (:class:`DynamicInstanceInteraction`, the official ``DynamicConv``: two 1x1 convolutions of the RoI
  feature whose weights the proposal feature generates, 64 channels between them); an FFN of 2048; one class layer
  and three box layers (Linear, LayerNorm, ReLU), then sigmoid class logits and box deltas, applied with weights
  (2, 2, 1, 1) (:class:`torchvision.models.detection._utils.BoxCoder`, detectron2's arithmetic and clamp). A stage's
  boxes, detached, and its object features are the next stage's proposals;
* the set loss of Deformable DETR's focal variant (:class:`detr_loss.FocalSetCriterion`: focal matching cost 2,
  L1 5, GIoU 2; focal loss 2, L1 5, GIoU 2) on corners relative to the image, every stage supervised (Sec. 3.5);
* inference: the ``num_detections`` best (proposal, class) pairs of the last stage's sigmoid scores (the official
  keeps ``num_proposals`` of them, the default), boxes in original image coordinates, clipped to the image, empty
  ones dropped (detectron2's ``detector_postprocess``). There is no NMS.

Images are normalised, resized at test time and padded to a multiple of 32 by torchvision's detection transform (as
the R-CNN family here; detectron2's ``ImageList`` pads to 32 too); the proposals span each image, not its padding.
"""
from __future__ import annotations

import copy
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert, clip_boxes_to_image
from vtrain.tasks.detection.detector import torchvision_transform
from vtrain.tasks.detection.detr_loss import FocalHungarianMatcher, FocalSetCriterion
from vtrain.tasks.detection.roi_heads import PyramidRoIAlign

from vtrain.backbones.base import Backbone, require_reductions
from vtrain.config import ConfigError
from vtrain.training.checkpoint import load_matching, read_checkpoint, unwrap_state_dict

# detectron2's _DEFAULT_SCALE_CLAMP (head.py): the largest log-scale a box delta may have
SCALE_CLAMP = math.log(100000.0 / 16)


class DynamicInstanceInteraction(nn.Module):
    """The dynamic instance interaction (Sec. 3.4; the official ``DynamicConv``): the proposal feature generates
    the weights of two 1x1 convolutions (``hidden_dim`` -> ``dim_dynamic`` -> ``hidden_dim``, each followed by
    LayerNorm and ReLU) applied to its own RoI feature, then a linear layer of the whole RoI, LayerNorm and ReLU."""

    def __init__(self, hidden_dim: int = 256, dim_dynamic: int = 64, pooler_resolution: int = 7):
        super().__init__()
        self.hidden_dim, self.dim_dynamic = hidden_dim, dim_dynamic
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, 2 * self.num_params)  # the official NUM_DYNAMIC = 2
        self.norm1, self.norm2 = nn.LayerNorm(dim_dynamic), nn.LayerNorm(hidden_dim)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution ** 2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, proposal_features: torch.Tensor, roi_features: torch.Tensor) -> torch.Tensor:
        """``proposal_features`` ``(B, C)``, ``roi_features`` ``(B, S*S, C)`` -> ``(B, C)``."""
        parameters = self.dynamic_layer(proposal_features)
        first = parameters[:, :self.num_params].view(-1, self.hidden_dim, self.dim_dynamic)
        second = parameters[:, self.num_params:].view(-1, self.dim_dynamic, self.hidden_dim)
        x = F.relu(self.norm1(torch.bmm(roi_features, first)))
        x = F.relu(self.norm2(torch.bmm(x, second)))
        return F.relu(self.norm3(self.out_layer(x.flatten(1))))


def linear_norm_relu(dim: int, count: int) -> nn.Sequential:
    """``count`` x (Linear without bias, LayerNorm, ReLU): the official ``cls_module`` / ``reg_module``."""
    return nn.Sequential(*[layer for _ in range(count)
                           for layer in (nn.Linear(dim, dim, bias=False), nn.LayerNorm(dim), nn.ReLU(inplace=True))])


class SparseRCNNStage(nn.Module):
    """One iterative stage (the official ``RCNNHead``): proposal boxes and features in, class logits, refined boxes
    and object features out. Attribute names are the official ones (``self_attn``, ``inst_interact``,
    ``cls_module``, ``bboxes_delta``, ...): an official checkpoint's ``head.head_series.<i>.*`` loads as it is."""

    def __init__(self, num_classes: int, hidden_dim: int = 256, dim_feedforward: int = 2048, num_heads: int = 8,
                 dropout: float = 0.0, dim_dynamic: int = 64, pooler_resolution: int = 7, num_cls: int = 1,
                 num_reg: int = 3, bbox_weights: Sequence[float] = (2.0, 2.0, 1.0, 1.0)):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.self_attn = nn.MultiheadAttention(hidden_dim, num_heads, dropout=dropout)
        self.inst_interact = DynamicInstanceInteraction(hidden_dim, dim_dynamic, pooler_resolution)
        self.linear1, self.linear2 = nn.Linear(hidden_dim, dim_feedforward), nn.Linear(dim_feedforward, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.norm1, self.norm2 = nn.LayerNorm(hidden_dim), nn.LayerNorm(hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)
        self.dropout1, self.dropout2, self.dropout3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.Dropout(dropout)
        self.cls_module = linear_norm_relu(hidden_dim, num_cls)
        self.reg_module = linear_norm_relu(hidden_dim, num_reg)
        self.class_logits = nn.Linear(hidden_dim, num_classes)  # sigmoid focal: no "no object" output
        self.bboxes_delta = nn.Linear(hidden_dim, 4)
        self.box_coder = BoxCoder(tuple(bbox_weights), bbox_xform_clip=SCALE_CLAMP)

    def forward(self, features: Mapping[str, torch.Tensor], boxes: torch.Tensor, proposal_features: torch.Tensor,
                pooler: PyramidRoIAlign, image_sizes: list[tuple[int, int]]):
        """``boxes`` ``(N, P, 4)`` XYXY pixels, ``proposal_features`` ``(N, P, C)`` -> class logits ``(N, P, K)``,
        boxes ``(N, P, 4)`` and object features ``(N, P, C)``."""
        rois = pooler(features, list(boxes), image_sizes)  # (N * P, C, S, S), image by image
        logits, deltas, objects = self.predict(rois.flatten(2).transpose(1, 2), proposal_features)
        refined = self.box_coder.decode_single(deltas.reshape(-1, 4), boxes.reshape(-1, 4).to(deltas.dtype))
        return logits, refined.view(boxes.shape), objects

    def predict(self, rois: torch.Tensor, proposal_features: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The stage on pooled RoIs ``(N * P, S * S, C)``: class logits ``(N, P, K)``, box deltas ``(N, P, 4)`` and
        object features ``(N, P, C)`` (what the table's MAC count runs: RoIAlign and box decoding count none)."""
        n, p = proposal_features.shape[:2]
        x = proposal_features.transpose(0, 1)  # (P, N, C): attention between the proposals of an image
        x = self.norm1(x + self.dropout1(self.self_attn(x, x, x, need_weights=False)[0]))
        x = x.transpose(0, 1).reshape(n * p, self.hidden_dim)
        x = self.norm2(x + self.dropout2(self.inst_interact(x, rois)))
        x = self.norm3(x + self.dropout3(self.linear2(self.dropout(F.relu(self.linear1(x))))))
        logits = self.class_logits(self.cls_module(x))
        deltas = self.bboxes_delta(self.reg_module(x))
        return logits.view(n, p, -1), deltas.view(n, p, 4), x.view(n, p, self.hidden_dim)


class SparseRCNN(nn.Module):
    """Sparse R-CNN on a backbone built with ``out_indices=(0, 1, 2, 3)``.

    Args:
        neck: the backbone with its FPN (:class:`neck.FeaturePyramid`); P2-P5 are read.
        num_classes: object categories K (labels 1..K).
        num_proposals: learned proposals (100 or 300 in the paper's Table 1-4; official 300 default).
        num_stages: iterative stages (6).
        hidden_dim, dim_feedforward, num_heads, dropout, dim_dynamic: a stage's widths (official 256, 2048, 8, 0.0,
            64).
        num_cls, num_reg: Linear-LayerNorm-ReLU layers before the class and box outputs (official 1 and 3).
        pooler_resolution, sampling_ratio: RoIAlign's output size and samples per bin (official 7, 2; aligned).
        class_cost, bbox_cost, giou_cost: matching weights (official ``*_WEIGHT``: 2, 5, 2).
        class_loss_weight, bbox_loss_weight, giou_loss_weight: loss weights (the same 2, 5, 2).
        focal_alpha, focal_gamma, prior_prob: the focal loss's (0.25, 2) and the class bias's prior (0.01).
        deep_supervision: every stage's loss, not only the last's (official on).
        num_detections: detections per image, the best of proposals x classes (None: ``num_proposals``, the
            official ``topk(self.num_proposals)``).
        min_size, max_size, image_mean, image_std, _skip_resize: torchvision's detection transform (the task's).
    """

    def __init__(
        self,
        neck: nn.Module,
        num_classes: int,
        num_proposals: int = 300,
        num_stages: int = 6,
        hidden_dim: int = 256,
        dim_feedforward: int = 2048,
        num_heads: int = 8,
        dropout: float = 0.0,
        dim_dynamic: int = 64,
        num_cls: int = 1,
        num_reg: int = 3,
        pooler_resolution: int = 7,
        sampling_ratio: int = 2,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        class_loss_weight: float = 2.0,
        bbox_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        prior_prob: float = 0.01,
        deep_supervision: bool = True,
        num_detections: int | None = None,
        **transform: Any,
    ):
        super().__init__()
        if neck.out_channels != hidden_dim:
            raise ValueError(f"Sparse R-CNN pools FPN maps of hidden_dim={hidden_dim} channels, the FPN has "
                             f"{neck.out_channels}")
        self.neck, self.num_classes, self.num_proposals = neck, num_classes, num_proposals
        self.num_detections = num_proposals if num_detections is None else num_detections
        self.transform = GeneralizedRCNNTransform(**transform)
        self.pooler = PyramidRoIAlign(neck.level_names, pooler_resolution, sampling_ratio, aligned=True)
        self.init_proposal_features = nn.Embedding(num_proposals, hidden_dim)
        self.init_proposal_boxes = nn.Embedding(num_proposals, 4)
        nn.init.constant_(self.init_proposal_boxes.weight[:, :2], 0.5)  # the whole image (detector.py)
        nn.init.constant_(self.init_proposal_boxes.weight[:, 2:], 1.0)
        stage = SparseRCNNStage(num_classes, hidden_dim, dim_feedforward, num_heads, dropout, dim_dynamic,
                                pooler_resolution, num_cls, num_reg)
        self.stages = nn.ModuleList(copy.deepcopy(stage) for _ in range(num_stages))
        # DynamicHead._reset_parameters: Xavier-uniform for every matrix of the stages, the class bias at the prior
        for parameter in self.stages.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for s in self.stages:
            nn.init.constant_(s.class_logits.bias, -math.log((1 - prior_prob) / prior_prob))
        self.criterion = FocalSetCriterion(
            num_classes, FocalHungarianMatcher(class_cost, bbox_cost, giou_cost, focal_alpha, focal_gamma, "xyxy"),
            class_loss_weight, bbox_loss_weight, giou_loss_weight, deep_supervision, focal_alpha, focal_gamma)

    def whwh(self, image_sizes: list[tuple[int, int]]) -> torch.Tensor:
        """``(N, 4)``: each image's (unpadded) width, height, width, height, what relative boxes are scaled by."""
        return torch.tensor([[w, h, w, h] for h, w in image_sizes], dtype=torch.float32,
                            device=self.init_proposal_boxes.weight.device)

    def predictions(self, features: Mapping[str, torch.Tensor], image_sizes: list[tuple[int, int]]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every stage's class logits ``(stages, N, P, K)`` and boxes ``(stages, N, P, 4)`` (XYXY pixels)."""
        boxes = box_convert(self.init_proposal_boxes.weight, "cxcywh", "xyxy")[None] * self.whwh(image_sizes)[:, None]
        proposal_features = self.init_proposal_features.weight[None].repeat(len(image_sizes), 1, 1)
        logits, stage_boxes = [], []
        for stage in self.stages:
            stage_logits, refined, proposal_features = stage(features, boxes, proposal_features, self.pooler,
                                                             image_sizes)
            logits.append(stage_logits)
            stage_boxes.append(refined)
            boxes = refined.detach()  # each stage learns its own refinement (head.py DynamicHead.forward)
        return torch.stack(logits), torch.stack(stage_boxes)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, _ = self.transform(list(images))
        pyramid = self.neck(batch.tensors)
        features = OrderedDict((name, pyramid[name]) for name in self.neck.level_names)
        logits, boxes = self.predictions(features, batch.image_sizes)
        if self.training:
            if targets is None:
                raise ValueError("Sparse R-CNN in training mode needs targets")
            whwh = self.whwh(batch.image_sizes)
            relative = [{"boxes": t["boxes"].float() / scale, "labels": t["labels"] - 1}
                        for t, scale in zip(targets, whwh)]
            return self.criterion(logits, boxes / whwh[None, :, None], relative)
        return self.detections(logits[-1], boxes[-1], batch.image_sizes, original_sizes)

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, image_sizes: list[tuple[int, int]],
                   original_sizes: list[tuple[int, int]]) -> list[dict[str, torch.Tensor]]:
        """The official ``inference`` (focal): the ``num_detections`` best (proposal, class) pairs by sigmoid
        score, then ``detector_postprocess``: boxes scaled to the original image, clipped to it, empty ones
        dropped."""
        k = logits.shape[-1]
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_detections, logits.shape[1] * k), dim=1)
        results = []
        for image_scores, image_index, image_boxes in zip(scores, index, boxes):
            results.append({"boxes": image_boxes[image_index // k], "scores": image_scores,
                            "labels": image_index % k + 1})
        results = self.transform.postprocess(results, image_sizes, original_sizes)
        for result, size in zip(results, original_sizes):
            result["boxes"] = clip_boxes_to_image(result["boxes"], size)
            width, height = (result["boxes"][:, 2:] - result["boxes"][:, :2]).unbind(1)
            keep = (width > 0) & (height > 0)
            result.update({key: value[keep] for key, value in result.items()})
        return results


# ------------------------------------------------------------------------------------------- the official release
# detectron2's layout of an official checkpoint (PeizeSun/SparseR-CNN, build_resnet_fpn_backbone): the ResNet under
# backbone.bottom_up (stem, res2-res5, convs with their norm inside), the FPN's convs beside it, the head's stages
# under head.head_series.
OFFICIAL_KEYS = (
    (r"backbone\.bottom_up\.stem\.conv1\.norm\.", "backbone.bn1."),
    (r"backbone\.bottom_up\.stem\.conv1\.", "backbone.conv1."),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1."),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0."),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}."),
    (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.",
     lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}."),
    (r"backbone\.fpn_lateral(\d)\.", lambda m: f"detector.neck.fpn.inner_blocks.{int(m[1]) - 2}.0."),
    (r"backbone\.fpn_output(\d)\.", lambda m: f"detector.neck.fpn.layer_blocks.{int(m[1]) - 2}.0."),
    (r"head\.head_series\.", "detector.stages."),
    (r"(init_proposal_(features|boxes)\.)", r"detector.\1"),
)


def is_official_release(state_dict: Mapping[str, torch.Tensor]) -> bool:
    return "init_proposal_boxes.weight" in state_dict and any(k.startswith("head.head_series.") for k in state_dict)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official Sparse R-CNN checkpoint's tensors under ``DetectionTask``'s keys: detectron2's ResNet ->
    ``backbone.*`` (torchvision's names, which vtrain's ResNet has), its FPN -> ``detector.neck.fpn.*``
    (torchvision's), the stages -> ``detector.stages.*``. A key no rule names keeps its name (and is reported)."""
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in OFFICIAL_KEYS:
            new, count = re.subn("^" + pattern, replacement, key)
            if count:
                converted[new] = value
                break
        else:
            converted[key] = value
    return converted


# ------------------------------------------------------------------------------------------- the detector config
class SparseRCNNSpec:
    """``conf/task/detector/sparse_rcnn.yaml``: Sparse R-CNN on the task's backbone (a
    :class:`detector.DetectorSpec`); official checkpoints load through ``pretrained=``.

    Args:
        model: :class:`SparseRCNN` with its options (a partial: ``num_proposals``, widths, costs, loss weights).
        neck: the pyramid on the backbone (:class:`neck.FeaturePyramid`).
    """

    out_indices = (0, 1, 2, 3)  # C2-C5 (strides 4-32) under P2-P5
    iou_types = ("bbox",)

    def __init__(self, model: Callable[..., SparseRCNN], neck: Callable[[Backbone], nn.Module]):
        self.model, self.neck = model, neck

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> SparseRCNN:
        """``num_classes`` counts categories + 1 (the background every detector is given); Sparse R-CNN's
        sigmoid classifier has the categories only."""
        require_reductions(backbone, [4 * 2**i for i in self.out_indices], "Sparse R-CNN")
        return self.model(self.neck(backbone), num_classes - 1, **torchvision_transform(transform))

    def load_release(self, task: nn.Module, path: str, strict: bool = True) -> bool:
        """Load an official Sparse R-CNN checkpoint into ``task`` (backbone and detector) and return True; False
        when the file is not one (then it holds backbone weights)."""
        state_dict = unwrap_state_dict(read_checkpoint(path))
        if not is_official_release(state_dict):
            return False
        proposals, own = len(state_dict["init_proposal_boxes.weight"]), task.detector.num_proposals
        if proposals != own and strict:
            raise ConfigError(f"{path}: this Sparse R-CNN checkpoint has {proposals} proposals, the model {own}: set "
                              f"task.detector.model.num_proposals={proposals} (pretrained_strict=false loads the rest)")
        load_matching(task, convert_official_state_dict(state_dict), str(path), "Sparse R-CNN model", strict=strict)
        return True
