"""Deformable DETR (Zhu et al., "Deformable DETR: Deformable Transformers for End-to-End Object Detection", ICLR
2021) on any vtrain backbone that gives C3-C5.

The official architecture (fundamentalvision/Deformable-DETR ``models/deformable_detr.py``,
``deformable_transformer.py``), with its module names, so that an official checkpoint loads key for key:

* C3-C5 (strides 8/16/32; ``out_indices=(1, 2, 3)``) each projected to ``hidden_dim`` by a 1x1 conv and
  GroupNorm(32), plus ``num_feature_levels - 3`` levels made by stride-2 3x3 convs from C5 (Sec. 4.1); each level
  gets DETR's sine positions (counted from pixel centres) plus a learned level embedding; one level reads C5 only;
* the encoder: 6 layers of multi-scale deformable self-attention (:class:`MSDeformAttn`, 4 points per head and
  level) over every level's pixels, each attending around its own position; FFN 1024, post-norm;
* the decoder: 6 layers of self-attention between the 300 queries, then deformable cross-attention around each
  query's reference point (a linear map of its positional half, sigmoid); the box head predicts offsets to the
  reference in inverse-sigmoid space;
* ``with_box_refine`` (Sec. 4.2): one box head per decoder layer, each layer's boxes the next one's references
  (detached); ``two_stage``: the encoder's pixels are proposals scored by an extra head (one class), the top
  ``num_queries`` of them give the decoder's references and queries;
* sigmoid focal classification over the categories (no "no object" output), focal matching cost
  (:class:`detr_loss.FocalSetCriterion`), auxiliary losses at every layer; at inference the 100 best of all
  queries x classes (``PostProcess``).

The input, targets and detections are those of :class:`detr.DETR` (the official transform: normalise, evaluation
resize, padding mask). ``get_proposal_pos_embed`` uses ``hidden_dim // 2`` features per coordinate where the
official hard-codes 128 (the same at the official 256; other widths would not run there).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert
from vtrain.tasks.detection.detr import MLP, ClassifierRows, DETRSpec, OfficialTransform
from vtrain.tasks.detection.detr_loss import FocalHungarianMatcher, FocalSetCriterion
from vtrain.tasks.detection.detr_transformer import SinePositionEncoding

from vtrain.backbones.base import Backbone
from vtrain.layers.ms_deform_attn import MSDeformAttn


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``util/misc.py inverse_sigmoid``: logit of ``x`` clamped to [0, 1], each side at least ``eps``."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


Shapes = list[tuple[int, int]]


class DeformableEncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.dropout2, self.dropout3, self.norm2 = nn.Dropout(dropout), nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, shapes: Shapes, padding_mask):
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference_points, src, shapes, padding_mask)))
        return self.norm2(src + self.dropout3(self.linear2(self.dropout2(F.relu(self.linear1(src))))))


class DeformableDecoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ffn: int, dropout: float, n_levels: int, n_heads: int, n_points: int):
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1, self.norm1 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2, self.norm2 = nn.Dropout(dropout), nn.LayerNorm(d_model)
        self.linear1, self.linear2 = nn.Linear(d_model, d_ffn), nn.Linear(d_ffn, d_model)
        self.dropout3, self.dropout4, self.norm3 = nn.Dropout(dropout), nn.Dropout(dropout), nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, shapes: Shapes, padding_mask):
        q = k = (tgt + query_pos).transpose(0, 1)
        attended = self.self_attn(q, k, tgt.transpose(0, 1), need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(tgt + query_pos, reference_points, src, shapes, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(tgt + self.dropout4(self.linear2(self.dropout3(F.relu(self.linear1(tgt))))))


class DeformableEncoder(nn.Module):
    def __init__(self, layer: DeformableEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))

    @staticmethod
    def reference_points(shapes: Shapes, valid_ratios: torch.Tensor) -> torch.Tensor:
        """Every pixel's centre over the unpadded extent of its level, then scaled to every level's
        (``get_reference_points``): ``(N, pixels, levels, 2)``."""
        points = []
        for level, (h, w) in enumerate(shapes):
            y, x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=valid_ratios.device),
                                  torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=valid_ratios.device),
                                  indexing="ij")
            y = y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * h)
            x = x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * w)
            points.append(torch.stack((x, y), -1))
        return torch.cat(points, 1)[:, :, None] * valid_ratios[:, None]

    def forward(self, src, shapes: Shapes, valid_ratios, pos, padding_mask):
        reference_points = self.reference_points(shapes, valid_ratios)
        for layer in self.layers:
            src = layer(src, pos, reference_points, shapes, padding_mask)
        return src


class DeformableDecoder(nn.Module):
    """Returns every layer's output and references. With box refinement ``bbox_embed`` is the model's per-layer box
    heads (set by :class:`DeformableDETR`, as the official code sets it)."""

    def __init__(self, layer: DeformableDecoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.num_layers = num_layers
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt, reference_points, src, shapes: Shapes, valid_ratios, query_pos, padding_mask):
        outputs, references = [], []
        for lid, layer in enumerate(self.layers):
            ratios = torch.cat([valid_ratios, valid_ratios], -1) if reference_points.shape[-1] == 4 else valid_ratios
            tgt = layer(tgt, query_pos, reference_points[:, :, None] * ratios[:, None], src, shapes, padding_mask)
            if self.bbox_embed is not None:  # iterative refinement: this layer's boxes are the next references
                delta = self.bbox_embed[lid](tgt)
                if reference_points.shape[-1] == 4:
                    refined = delta + inverse_sigmoid(reference_points)
                else:  # points: the centre moves from them, the size is predicted
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                reference_points = refined.sigmoid().detach()
            outputs.append(tgt)
            references.append(reference_points)
        return torch.stack(outputs), torch.stack(references)


class DeformableTransformer(nn.Module):
    """``DeformableTransformer`` of ``models/deformable_transformer.py`` (``return_intermediate_dec=True``)."""

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, num_feature_levels: int = 4,
                 dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300):
        super().__init__()
        self.d_model, self.two_stage, self.two_stage_num_proposals = d_model, two_stage, two_stage_num_proposals
        self.encoder = DeformableEncoder(DeformableEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, enc_n_points), num_encoder_layers)
        self.decoder = DeformableDecoder(DeformableDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, nhead, dec_n_points), num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output, self.enc_output_norm = nn.Linear(d_model, d_model), nn.LayerNorm(d_model)
            self.pos_trans, self.pos_trans_norm = nn.Linear(d_model * 2, d_model * 2), nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of the proposals' (cx, cy, w, h) logits after a sigmoid (``get_proposal_pos_embed``)."""
        num_feats = self.d_model // 2
        dim_t = torch.arange(num_feats, dtype=torch.float32, device=proposals.device)
        dim_t = 10000 ** (2 * (dim_t // 2) / num_feats)
        pos = proposals.sigmoid()[:, :, :, None] * (2 * math.pi) / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def encoder_proposals(self, memory, padding_mask, shapes: Shapes):
        """Two-stage: every pixel a box at its centre, 0.05 x 2**level wide and high, as logits (infinite where
        padded or within 0.01 of the border), and the memory there through a linear layer and LayerNorm
        (``gen_encoder_output_proposals``)."""
        n = memory.shape[0]
        proposals, start = [], 0
        for level, (h, w) in enumerate(shapes):
            mask = padding_mask[:, start:start + h * w].view(n, h, w, 1)
            valid_h, valid_w = torch.sum(~mask[:, :, 0, 0], 1), torch.sum(~mask[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
                torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            start += h * w
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        proposals = proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf")).masked_fill(~valid, float("inf"))
        memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    @staticmethod
    def valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """The unpadded share of a level's width and height, ``(N, 2)`` (``get_valid_ratio``)."""
        _, h, w = mask.shape
        return torch.stack([torch.sum(~mask[:, 0, :], 1).float() / w, torch.sum(~mask[:, :, 0], 1).float() / h], -1)

    def forward(self, srcs: list[torch.Tensor], masks: list[torch.Tensor], pos_embeds: list[torch.Tensor],
                query_embed: torch.Tensor | None = None):
        """The levels ``(N, C, H, W)``, their padding masks and positions; ``query_embed`` ``(Q, 2C)`` (positions,
        then content), None in two-stage. Returns the decoder's outputs ``(layers, N, Q, C)``, the initial and
        every layer's references, and two-stage's encoder logits and box logits (else None)."""
        shapes = [tuple(src.shape[-2:]) for src in srcs]
        src_flatten = torch.cat([src.flatten(2).transpose(1, 2) for src in srcs], 1)
        mask_flatten = torch.cat([mask.flatten(1) for mask in masks], 1)
        pos_flatten = torch.cat([pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                                 for level, pos in enumerate(pos_embeds)], 1)
        valid_ratios = torch.stack([self.valid_ratio(m) for m in masks], 1)
        memory = self.encoder(src_flatten, shapes, valid_ratios, pos_flatten, mask_flatten)

        n, _, c = memory.shape
        enc_class = enc_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.encoder_proposals(memory, mask_flatten, shapes)
            # the extra heads after the decoder's (the official "hack implementation for two-stage")
            enc_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            top = torch.topk(enc_class[..., 0], self.two_stage_num_proposals, dim=1)[1]
            top_coords = torch.gather(enc_coord_unact, 1, top.unsqueeze(-1).repeat(1, 1, 4)).detach()
            reference_points = top_coords.sigmoid()
            pos_trans = self.pos_trans_norm(self.pos_trans(self.proposal_pos_embed(top_coords)))
            query_pos, tgt = torch.split(pos_trans, c, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, c, dim=1)
            # repeat, not the official expand: a view of a parameter made under no_grad has no grad_fn, which
            # torch's FlopCounterMode (the table's MACs) refuses as a module input
            query_pos, tgt = query_pos.unsqueeze(0).repeat(n, 1, 1), tgt.unsqueeze(0).repeat(n, 1, 1)
            reference_points = self.reference_points(query_pos).sigmoid()
        hs, references = self.decoder(tgt, reference_points, memory, shapes, valid_ratios, query_pos, mask_flatten)
        return hs, reference_points, references, enc_class, enc_coord_unact


class DeformableDETR(nn.Module):
    """Deformable DETR on a backbone built with ``out_indices=(1, 2, 3)`` (``(3,)`` with one feature level).

    Args:
        backbone: the task's backbone (registered by the task as ``backbone.*``; only called here).
        num_classes: object categories K (labels 1..K).
        class_rows: each label's classifier row (:class:`detr.ClassifierRows`: None, ``coco`` for the official
            91-id COCO head, or a list).
        hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout: the transformer
            (official 256, 8, 6, 6, 1024, 0.1).
        num_queries: object queries (300); in two-stage the encoder proposals kept.
        num_feature_levels: 4 (C3-C5 and one more, Sec. 4.1) or 1 (C5 only, the "single scale" model).
        enc_n_points, dec_n_points: sampled points per head and level (4).
        with_box_refine, two_stage: the variants of Sec. 4.2.
        aux_loss: losses at every decoder layer (official on).
        class_cost, bbox_cost, giou_cost: matching weights (official ``set_cost_*``: 2, 5, 2).
        class_loss_weight, bbox_loss_weight, giou_loss_weight: loss weights (official ``*_loss_coef``: 2, 5, 2).
        focal_alpha, focal_gamma: the focal loss's (0.25, 2).
        num_detections: detections per image at inference, the best of queries x classes (100).
        min_size, max_size, image_mean, image_std, size_divisible: as :class:`detr.DETR`.
    """

    no_object_row = False  # sigmoid scores: no "no object" output

    def __init__(
        self,
        backbone: Backbone,
        num_classes: int,
        class_rows: Sequence[int] | str | None = None,
        hidden_dim: int = 256,
        num_heads: int = 8,
        num_encoder_layers: int = 6,
        num_decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_queries: int = 300,
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
        dec_n_points: int = 4,
        with_box_refine: bool = False,
        two_stage: bool = False,
        aux_loss: bool = True,
        class_cost: float = 2.0,
        bbox_cost: float = 5.0,
        giou_cost: float = 2.0,
        class_loss_weight: float = 2.0,
        bbox_loss_weight: float = 5.0,
        giou_loss_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        num_detections: int = 100,
        min_size: int = 800,
        max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        size_divisible: int = 32,
    ):
        super().__init__()
        expected = DeformableDETRSpec.levels_read(num_feature_levels)
        if backbone.out_indices != expected:
            raise ValueError(f"Deformable DETR with {num_feature_levels} levels reads backbone outputs {expected}, "
                             f"the backbone gives {backbone.out_indices}")
        object.__setattr__(self, "body", backbone)  # not a submodule: the task registers it (as DETR does)
        self.num_classes, self.num_queries, self.num_detections = num_classes, num_queries, num_detections
        self.with_box_refine, self.two_stage = with_box_refine, two_stage
        self.rows = ClassifierRows(num_classes, class_rows)
        head_rows = self.head_classes = self.rows.num_rows

        self.transform = OfficialTransform(min_size, max_size, list(image_mean), list(image_std),
                                           size_divisible=size_divisible, _skip_resize=True)
        self.position_encoding = SinePositionEncoding(hidden_dim // 2, offset=0.5)
        self.transformer = DeformableTransformer(
            hidden_dim, num_heads, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout,
            num_feature_levels, dec_n_points, enc_n_points, two_stage, num_queries)
        class_embed = nn.Linear(hidden_dim, head_rows)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        channels = backbone.feature_info.channels()
        projections = [nn.Sequential(nn.Conv2d(c, hidden_dim, kernel_size=1), nn.GroupNorm(32, hidden_dim))
                       for c in channels]
        in_channels = channels[-1]
        for _ in range(num_feature_levels - len(channels)):  # extra levels: stride-2 3x3 convs, the first on C5
            projections.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1),
                                             nn.GroupNorm(32, hidden_dim)))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)

        # the official initialisation: classification prior 0.01 (RetinaNet's), box head's last layer zero
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0.0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0.0)
        for projection in self.input_proj:
            nn.init.xavier_uniform_(projection[0].weight, gain=1)
            nn.init.constant_(projection[0].bias, 0)
        num_pred = num_decoder_layers + 1 if two_stage else num_decoder_layers  # two-stage: + the proposal heads
        if with_box_refine:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:  # one head shared by every layer, listed once per layer (the official keys)
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            self.class_embed = nn.ModuleList([class_embed] * num_pred)
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_pred)
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)
        self.criterion = FocalSetCriterion(
            head_rows, FocalHungarianMatcher(class_cost, bbox_cost, giou_cost, focal_alpha, focal_gamma),
            class_loss_weight, bbox_loss_weight, giou_loss_weight, aux_loss, focal_alpha, focal_gamma)

    def levels(self, x: torch.Tensor, padding: torch.Tensor):
        """The transformer's input levels, their padding masks (the image's, nearest-sampled) and positions."""
        srcs, masks = [], []
        features = self.body(x)
        for level, projection in enumerate(self.input_proj):
            if level < len(features):
                srcs.append(projection(features[level]))
            else:
                srcs.append(projection(features[-1] if level == len(features) else srcs[-1]))
            masks.append(F.interpolate(padding[None].float(), size=srcs[-1].shape[-2:]).to(torch.bool)[0])
        return srcs, masks, [self.position_encoding(m).to(s.dtype) for s, m in zip(srcs, masks)]

    def predictions(self, hs, init_reference, references) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's class logits ``(layers, N, Q, rows)`` and boxes ``(layers, N, Q, 4)``: the box head's
        output added to the layer's reference (its input references) in inverse-sigmoid space."""
        logits, boxes = [], []
        for layer in range(hs.shape[0]):
            reference = inverse_sigmoid(init_reference if layer == 0 else references[layer - 1])
            delta = self.bbox_embed[layer](hs[layer])
            if reference.shape[-1] == 4:
                delta = delta + reference
            else:
                delta = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
            logits.append(self.class_embed[layer](hs[layer]))
            boxes.append(delta.sigmoid())
        return torch.stack(logits), torch.stack(boxes)

    def forward(self, images: Sequence[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        x, padding, image_sizes = self.transform.padded(images)
        srcs, masks, pos = self.levels(x, padding)
        query_embed = None if self.two_stage else self.query_embed.weight
        hs, init_reference, references, enc_class, enc_coord_unact = self.transformer(srcs, masks, pos, query_embed)
        logits, boxes = self.predictions(hs, init_reference, references)
        if self.training:
            if targets is None:
                raise ValueError("Deformable DETR in training mode needs targets")
            relative = self.rows.relative_targets(targets, image_sizes)
            enc_boxes = None if enc_coord_unact is None else enc_coord_unact.sigmoid()
            return self.criterion(logits, boxes, relative, enc_class, enc_boxes)
        return self.detections(logits[-1], boxes[-1], original_sizes)

    def detections(self, logits: torch.Tensor, boxes: torch.Tensor, sizes: list[tuple[int, int]]
                   ) -> list[dict[str, torch.Tensor]]:
        """The official ``PostProcess``: the ``num_detections`` best (query, class) pairs by sigmoid score, each
        query's box scaled to the original image; label 0 for a row no category uses (dropped by the evaluator)."""
        rows = logits.shape[-1]
        scores, index = logits.sigmoid().flatten(1).topk(min(self.num_detections, logits.shape[1] * rows), dim=1)
        queries, classes = index // rows, index % rows
        results = []
        for image_scores, image_queries, image_classes, image_boxes, (h, w) in zip(
                scores, queries, classes, boxes, sizes):
            scale = torch.tensor([w, h, w, h], dtype=image_boxes.dtype, device=image_boxes.device)
            results.append({"boxes": box_convert(image_boxes[image_queries], "cxcywh", "xyxy") * scale,
                            "scores": image_scores, "labels": self.rows.label_of_row[image_classes]})
        return results


class DeformableDETRSpec(DETRSpec):
    """``conf/task/detector/deformable_detr.yaml``: Deformable DETR on the task's backbone (a
    :class:`detector.DetectorSpec`); official checkpoints load as DETR's do (:meth:`DETRSpec.load_release`).

    Args:
        model: :class:`DeformableDETR` with its options (a partial).
        num_feature_levels: 4 (C3-C5 + one) or 1 (C5 only); decides what the backbone gives.
        release_category_ids: as :class:`DETRSpec`'s.
    """

    name = "Deformable DETR"

    def __init__(self, model=DeformableDETR, num_feature_levels: int = 4,
                 release_category_ids: Sequence[int] | None = None):
        super().__init__(model, release_category_ids)
        self.num_feature_levels = num_feature_levels
        self.out_indices = self.levels_read(num_feature_levels)

    @staticmethod
    def levels_read(num_feature_levels: int) -> tuple[int, ...]:
        return (1, 2, 3) if num_feature_levels > 1 else (3,)

    def build(self, backbone: Backbone, num_classes: int, transform) -> DeformableDETR:
        return self.model(backbone, num_classes - 1, num_feature_levels=self.num_feature_levels, **transform)
