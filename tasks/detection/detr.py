"""DETR (Carion et al., "End-to-End Object Detection with Transformers", ECCV 2020) on any vtrain backbone.

The official architecture (facebookresearch/detr ``models/detr.py``, ``transformer.py``, ``backbone.py``) on the
backbone contract: the backbone is built with ``out_indices=(3,)`` and its C5 map (stride 32; 16 with a dilated
last stage, the paper's DC5) is projected to ``hidden_dim`` by a 1x1 conv, flattened with its sine positions
into the transformer's encoder; the decoder turns ``num_queries`` learned object queries into as many
predictions: class logits over the classifier's classes plus "no object" (a linear layer) and a box
``(cx, cy, w, h)`` relative to the image (a 3-layer MLP, then a sigmoid). Training matches predictions to
objects (:mod:`detr_loss`); there is no NMS.

:class:`DETR` takes what torchvision's detectors take, so that ``DetectionTask`` drives it like them: a list of
images (CHW, 0..1) and, in training, targets (``boxes`` XYXY in pixels, ``labels`` 1..K); training returns the
loss dict, evaluation one dict per image (``boxes`` XYXY, ``scores``, ``labels`` 1..K) in original image
coordinates: the image is resized to the test size (torchvision's ``GeneralizedRCNNTransform``, as for the other
detectors), and the relative boxes are scaled by the original size, as the official ``PostProcess`` does. Every
query is a detection (score: its most probable category), as the official evaluation has it.

The classifier's classes are the categories (label k on row k - 1) or, with ``class_rows: coco`` (the COCO recipes'
default), COCO's category ids 0..90 as the official COCO models have them (:class:`ClassifierRows`): labels are
mapped to their ids' rows in training and predictions back to labels.

Differences from the official code, none of which changes the model: images are padded to a multiple of
``size_divisible`` (32 by default, which Swin needs; the official pads to the largest image of the batch, which
``size_divisible: 1`` reproduces, as the R50 recipes do); the padding mask follows the padding either way.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import box_convert
from vtrain.tasks.detection.detr_loss import HungarianMatcher, SetCriterion, Target
from vtrain.tasks.detection.detr_transformer import (
    DETRTransformer,
    SinePositionEncoding,
)

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError
from vtrain.training.checkpoint import load_matching, read_checkpoint, unwrap_state_dict


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (the official ``MLP``, the box head)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def official_size(height: int, width: int, size: int, max_size: int) -> tuple[int, int]:
    """The official evaluation size (``datasets/transforms.py``, ``get_size_with_aspect_ratio``): the short side
    ``size`` unless the long side would pass ``max_size``, then the short side ``round(max_size * short / long)``
    (torchvision's detectors floor it: a 45x170 image is 353x1333 here, 352x1333 there); the long side floored."""
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
        size = int(round(max_size * short / long))
    if (width <= height and width == size) or (height <= width and height == size):
        return height, width
    if width < height:
        return int(size * height / width), size
    return size, int(size * width / height)


class OfficialTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform (normalise, batch, pad) with the official DETR evaluation resize
    (:func:`official_size`, bilinear); training images keep the data pipeline's size."""

    def resize(self, image: torch.Tensor, target: dict[str, torch.Tensor] | None = None):
        if self.training:
            return super().resize(image, target)
        size = official_size(*image.shape[-2:], int(self.min_size[-1]), int(self.max_size))
        resized = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        return resized, target

    def padded(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
        """The batch (normalised; resized at test time; padded), its padding mask (True on padding, the
        official ``NestedTensor`` mask) and each image's size in it."""
        batch, _ = self(list(images))
        x = batch.tensors
        padding = torch.ones(x.shape[0], *x.shape[-2:], dtype=torch.bool, device=x.device)
        for mask, (h, w) in zip(padding, batch.image_sizes):
            mask[:h, :w] = False
        return x, padding, batch.image_sizes


# COCO's 80 category ids. The official COCO models classify ids 0..90 (``num_classes=91``, "max_obj_id + 1",
# models/detr.py ``build``) plus no-object: row i of ``class_embed`` is category id i.
COCO_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33, 34,
    35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61, 62, 63,
    64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)


class ClassifierRows(nn.Module):
    """Which classifier row each label is (DETR's and Deformable DETR's ``class_rows`` option).

    ``class_rows``: the row of each label, label k on row ``class_rows[k - 1]``, the classifier
    ``max(class_rows) + 1`` classes wide; ``"coco"``: COCO's category ids (the official COCO models' 91-id head,
    ``num_classes=91`` in the official ``build``: rows no category uses are trained as negatives, and a
    detection on one is dropped, as COCO's evaluation ignores its id); None: K rows, label k on row k - 1.
    """

    def __init__(self, num_classes: int, class_rows: Sequence[int] | str | None = None):
        super().__init__()
        if class_rows == "coco":
            if num_classes != len(COCO_CATEGORY_IDS):
                raise ConfigError(f"class_rows=coco puts COCO's 80 categories on their ids' rows; this data has "
                                  f"{num_classes} categories: set task.detector.model.class_rows=null")
            class_rows = COCO_CATEGORY_IDS
        elif isinstance(class_rows, str):
            raise ConfigError(f"class_rows={class_rows!r}: give null, coco or a list of rows, one per category")
        rows = list(range(num_classes)) if class_rows is None else [int(r) for r in class_rows]
        if len(rows) != num_classes or len(set(rows)) != num_classes or min(rows) < 0:
            raise ConfigError(f"class_rows: one distinct row per category ({num_classes}), not {rows}")
        self.num_rows = max(rows) + 1
        label_of_row = torch.zeros(self.num_rows, dtype=torch.int64)  # 0: a row no category uses
        label_of_row[rows] = torch.arange(1, num_classes + 1)
        self.register_buffer("row_of_label", torch.tensor([0, *rows]), persistent=False)  # labels are 1..K
        self.register_buffer("label_of_row", label_of_row, persistent=False)

    def relative_targets(self, targets: list[dict[str, torch.Tensor]], sizes: list[tuple[int, int]]) -> list[Target]:
        """Pixel XYXY boxes, labels 1..K -> ``(cx, cy, w, h)`` over the (unpadded) image size, and each label's
        classifier row, as the official ``Normalize`` transform and dataset give them."""
        relative = []
        for target, (h, w) in zip(targets, sizes):
            scale = torch.tensor([w, h, w, h], dtype=torch.float32, device=target["boxes"].device)
            boxes = box_convert(target["boxes"].float(), "xyxy", "cxcywh") / scale
            relative.append({"boxes": boxes, "labels": self.row_of_label[target["labels"]]})
        return relative


class DETR(nn.Module):
    """DETR on a backbone built with ``out_indices=(3,)``.

    Args:
        backbone: the task's backbone (registered by the task as ``backbone.*``; only called here).
        num_classes: object categories K (labels 1..K).
        class_rows: each label's classifier row (:class:`ClassifierRows`: None, ``coco`` or a list); the classifier
            has one more output, the last, "no object".
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the transformer
            (official 256, 8, 6, 6, 2048, 0.1).
        num_queries: object queries, the most objects an image can have detected (100).
        aux_loss: the Hungarian loss at every decoder layer, not only the last (Sec. 3.2; official on).
        class_cost, bbox_cost, giou_cost: the matching cost weights (official ``set_cost_*``: 1, 5, 2).
        class_loss_weight, bbox_loss_weight, giou_loss_weight: the loss weights (official 1, ``bbox_loss_coef`` 5,
            ``giou_loss_coef`` 2).
        no_object_weight: the no-object class's cross-entropy weight (official ``eos_coef``, 0.1).
        min_size, max_size, image_mean, image_std: the test-time resize and the normalisation (the task's).
        size_divisible: images are padded to a multiple of it (see the module doc).
    """

    no_object_row = True  # the classifier's last row is "no object"

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        class_rows: Sequence[int] | str | None = None,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 2048,
        dropout: float = 0.1,
        num_queries: int = 100,
        aux_loss: bool = True,
        class_cost: float = 1.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        class_loss_weight: float = 1.0,
        bbox_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
        no_object_weight: float = 0.1,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
    ):
        super().__init__()
        if backbone.out_indices != DETRSpec.out_indices:
            raise ValueError(f"DETR reads backbone output {DETRSpec.out_indices}, the backbone gives {backbone.out_indices}")
        object.__setattr__(self, "body", backbone)  # not a submodule: the task registers it (as FeaturePyramid)
        self.num_classes, self.num_queries = num_classes, num_queries
        self.rows = ClassifierRows(num_classes, class_rows)
        self.head_classes = self.rows.num_rows  # the classifier's classes, no-object excluded
        self.transform = OfficialTransform(min_size, max_size, list(image_mean), list(image_std),
                                           size_divisible=size_divisible, _skip_resize=True)
        self.position_encoding = SinePositionEncoding(hidden_dim // 2)
        self.transformer = DETRTransformer(hidden_dim, num_heads, num_encoder_layers, num_decoder_layers,
                                           dim_feedforward, dropout)
        self.class_embed = nn.Linear(hidden_dim, self.head_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.feature_info.channels(-1), hidden_dim, kernel_size=1)
        self.criterion = SetCriterion(
            self.head_classes, HungarianMatcher(class_cost, bbox_cost, giou_cost), class_loss_weight, bbox_loss_weight,
            giou_loss_weight, no_object_weight, aux_loss)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        x, padding, image_sizes = self.transform.padded(images)
        features = self.body(x)[-1]
        # the official mask of a feature map: the image's, nearest-sampled (models/backbone.py)
        mask = F.interpolate(padding[None].float(), size=features.shape[-2:]).to(torch.bool)[0]
        pos = self.position_encoding(mask).to(features.dtype)
        hs = self.transformer(self.input_proj(features), mask, self.query_embed.weight, pos)
        if not self.training:
            hs = hs[-1:]  # evaluation reads the last layer only
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        if self.training:
            if targets is None:
                raise ValueError("DETR in training mode needs targets")
            return self.criterion(logits, boxes, self.rows.relative_targets(targets, image_sizes))
        return self.detections(logits[-1], boxes[-1], original_sizes)

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, sizes: list[tuple[int, int]]
                   ) -> list[dict[str, torch.Tensor]]:
        """The official ``PostProcess``: every query, scored by its most probable class (no-object excluded),
        its relative box scaled to the original image; label 0 on a row no category uses (the evaluator drops it)."""
        scores, classes = logits.softmax(-1)[..., :-1].max(-1)
        results = []
        for image_scores, image_classes, image_boxes, (h, w) in zip(scores, classes, boxes, sizes):
            scale = torch.tensor([w, h, w, h], dtype=image_boxes.dtype, device=image_boxes.device)
            results.append({"boxes": box_convert(image_boxes, "cxcywh", "xyxy") * scale, "scores": image_scores,
                            "labels": self.rows.label_of_row[image_classes]})
        return results


# ------------------------------------------------------------------------------------------- the official release
OFFICIAL_BACKBONE = "backbone.0.body."  # Joiner(Backbone(body=IntermediateLayerGetter), position encoding)


def is_official_release(state_dict: dict[str, torch.Tensor]) -> bool:
    """An official DETR or Deformable DETR checkpoint: the official backbone's keys beside a transformer's."""
    return (any(k.startswith("transformer.") for k in state_dict)
            and any(k.startswith(OFFICIAL_BACKBONE) for k in state_dict))


def is_classifier_key(key: str) -> bool:
    """``class_embed.weight`` (DETR), ``class_embed.3.bias`` and ``transformer.decoder.class_embed.6.weight``
    (Deformable DETR's per-layer and two-stage heads)."""
    parts = key.split(".")
    return parts[-1] in ("weight", "bias") and "class_embed" in parts and (
        parts[-2] == "class_embed" or (parts[-3] == "class_embed" and parts[-2].isdigit()))


def convert_official_state_dict(state_dict: dict[str, torch.Tensor], num_classes: int,
                                category_ids: Sequence[int] | None = None, no_object: bool = True
                                ) -> dict[str, torch.Tensor]:
    """An official DETR (or Deformable DETR) checkpoint's tensors under ``DetectionTask``'s keys: ``backbone.0.body.*`` ->
    ``backbone.*`` (torchvision's ResNet keys, which vtrain's ResNet has), everything else -> ``detector.*``
    (the same names: ``transformer.*``, ``class_embed``, ``bbox_embed.layers.*``, ``query_embed``, ``input_proj``).

    ``num_classes``: the classes of the model's classifier (no-object excluded). When the checkpoint has as many,
    it loads as it is (the official 91-id head into a model with COCO's ids as rows). Otherwise the classifier
    keeps the rows of our categories, in label order, and the no-object row (``no_object``: DETR's; Deformable
    DETR has none): row ``c`` of an official head is category id ``c``. ``category_ids``: the dataset's ids
    (label k is ``category_ids[k - 1]``); None with an 80-category model and a 91-id head (the official COCO
    models): COCO's ids. The rows no category uses (COCO's 11 unused ids and 0) are dropped; they were never a
    target, so their probability is near zero and the softmax over the rest barely moves.
    """
    unsupported = sorted(k for k in state_dict if k.startswith("backbone.") and not k.startswith(OFFICIAL_BACKBONE))
    if unsupported or "transformer.encoder.norm.weight" in state_dict:
        what = "learned position embeddings" if unsupported else "a pre-norm transformer (--pre_norm)"
        raise ConfigError(f"this DETR checkpoint has {what}, which vtrain's DETR does not build: use a checkpoint of "
                          "the default model (sine positions, post-norm)")
    converted = {}
    for key, value in state_dict.items():
        if key.startswith(OFFICIAL_BACKBONE):
            converted["backbone." + key[len(OFFICIAL_BACKBONE):]] = value
        else:
            converted["detector." + key] = value
    classifier = sorted(k for k in converted if is_classifier_key(k))
    classes = converted[classifier[0]].shape[0] - no_object
    if classes != num_classes:
        if category_ids is None and classes == 91 and num_classes == len(COCO_CATEGORY_IDS):
            category_ids = COCO_CATEGORY_IDS
        if category_ids is None or len(category_ids) != num_classes or max(category_ids) >= classes:
            raise ConfigError(
                f"the checkpoint's classifier has {classes} classes, this model {num_classes} categories: give their "
                "category ids (task.detector.release_category_ids=[...], label order) when they index its rows")
        keep = torch.tensor([*category_ids, classes] if no_object else list(category_ids))
        for key in classifier:
            converted[key] = converted[key][keep]
    return converted


# ------------------------------------------------------------------------------------------- the detector config
class DETRSpec:
    """``conf/task/detector/detr.yaml``: DETR on the task's backbone (a :class:`detector.DetectorSpec`).

    Args:
        model: :class:`DETR` with its options (a partial: ``hidden_dim``, ``num_queries``, the costs and loss
            weights; the official values by default).
        release_category_ids: the category ids, in label order, whose rows an official checkpoint's classifier
            holds (None: COCO's, for the official COCO models).
    """

    out_indices = (3,)  # C5 only
    iou_types = ("bbox",)
    name = "DETR"

    def __init__(self, model: Callable[..., DETR] = DETR, release_category_ids: Sequence[int] | None = None):
        self.model, self.release_category_ids = model, release_category_ids

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> DETR:
        """DETR on ``backbone``; ``num_classes`` counts categories + 1 (what the task gives every detector: their
        background, here "no object")."""
        return self.model(backbone, num_classes - 1, **transform)

    def load_release(self, task: nn.Module, path: str, strict: bool = True) -> bool:
        """Load an official DETR checkpoint into ``task`` (backbone and detector) and return True; False when the
        file is not one (then it holds backbone weights)."""
        state_dict = unwrap_state_dict(read_checkpoint(path))
        if not is_official_release(state_dict):
            return False
        ids = None if self.release_category_ids is None else [int(i) for i in self.release_category_ids]
        detector = task.detector
        converted = convert_official_state_dict(state_dict, detector.head_classes, ids, detector.no_object_row)
        own = task.state_dict()
        unexpected = [k for k in converted if k not in own]
        if unexpected and strict:
            raise ConfigError(f"{path}: {len(unexpected)} tensors of this {self.name} checkpoint have no place in the "
                              f"model ({', '.join(unexpected[:3])}): is it of another architecture (e.g. "
                              "with_box_refine / two_stage)? pretrained_strict=false loads the rest")
        load_matching(task, converted, str(path), f"{self.name} model", strict=strict)
        return True
