"""Object-object relations: Relation Networks for Object Detection (Hu, Gu, Zhang, Dai, Wei, CVPR 2018,
arXiv:1711.11575).

* :class:`ObjectRelation` -- the object relation module (Sec. 3, Eq. 1-6): every object attends to every other
  with weights from appearance (scaled dot product) and geometry (a ReLU prior from the pair's relative
  boxes), ``N_r`` heads, and the heads' outputs are added to the input feature.
* :class:`RelationBoxHead` -- the ``2fc+RM`` box head (Sec. 4.2): a relation module after each of the two fc
  layers; it sees the RoIs' boxes, so :class:`vtrain.tasks.detection.roi_heads.DetectionRoIHeads` passes them.
* :class:`LearnedNMS` -- the duplicate removal network (Sec. 4.3, ``e2e``): rank and appearance features, one
  relation module, a binary classifier per IoU threshold; trained with the detector, it replaces NMS.

Details follow the official MXNet code (msracver/Relation-Networks-for-Object-Detection,
``relation_rcnn/symbols/resnet_v1_101_rcnn_fpn_attention_1024_pairwise_position_multi_head_16_learn_nms.py``:
``extract_position_matrix``, ``extract_position_embedding``, ``attention_module_multi_head``; the learned NMS in
``resnet_v1_101_rcnn_learn_nms_base.py`` and ``operator_py/nms_multi_target.py``), cited below as "official".
Boxes are continuous ``(x1, y1, x2, y2)`` (width ``x2 - x1``, torchvision's convention; the official code
counts pixels, ``x2 - x1 + 1``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from vtrain.config import ConfigError

PRIOR_FLOOR = 1e-6  # official: log(max(w_G, 1e-6)) + appearance logits (Eq. 5 taken to the softmax's log domain)
OFFSET_FLOOR = 1e-3  # official: log(max(|dx| / w, 1e-3)) -- the log of a zero offset is clipped


# ----------------------------------------------------------------------------------------------- geometry
def box_geometry(query_boxes: Tensor, key_boxes: Tensor) -> Tensor:
    """The relative geometry of every (query m, key n) pair (Sec. 3.1; official ``extract_position_matrix``):
    ``(log(|x_m - x_n| / w_m), log(|y_m - y_n| / h_m), log(w_m / w_n), log(h_m / h_n))`` of centres and sizes,
    the offsets clipped below at 1e-3. Invariant to translating and scaling all boxes together.

    Args:
        query_boxes: ``(..., M, 4)``; key_boxes: ``(..., N, 4)``.
    Returns:
        ``(..., M, N, 4)``.
    """
    def centre_size(boxes: Tensor) -> tuple[Tensor, ...]:
        size = (boxes[..., 2:] - boxes[..., :2]).clamp(min=torch.finfo(boxes.dtype).eps)
        return (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2, size[..., 0], size[..., 1]

    qx, qy, qw, qh = centre_size(query_boxes)
    kx, ky, kw, kh = centre_size(key_boxes)
    dx = ((qx[..., :, None] - kx[..., None, :]).abs() / qw[..., :, None]).clamp(min=OFFSET_FLOOR).log()
    dy = ((qy[..., :, None] - ky[..., None, :]).abs() / qh[..., :, None]).clamp(min=OFFSET_FLOOR).log()
    dw = (qw[..., :, None] / kw[..., None, :]).log()
    dh = (qh[..., :, None] / kh[..., None, :]).log()
    return torch.stack((dx, dy, dw, dh), dim=-1)


def sinusoidal_embedding(values: Tensor, dim: int, wave_length: float = 1000.0, scale: float = 100.0) -> Tensor:
    """Each of the last axis' 4 values as ``dim / 4`` sines and cosines (official ``extract_position_embedding``):
    ``sin(scale * v / wave_length^(8k / dim))``, ``k = 0 .. dim/8 - 1``, then the cosines; ``(..., 4) -> (..., dim)``."""
    if dim % 8:
        raise ConfigError(f"geometry_dim={dim}: the sinusoidal embedding needs a multiple of 8")
    exponents = torch.arange(dim // 8, device=values.device, dtype=values.dtype) * (8.0 / dim)
    angles = (scale * values)[..., None] / wave_length**exponents  # (..., 4, dim/8)
    return torch.cat((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def rank_embedding(num_ranks: int, dim: int, wave_length: float = 1000.0) -> Tensor:
    """Ranks ``0 .. num_ranks-1`` as ``dim`` sines and cosines (official ``extract_rank_embedding``)."""
    exponents = torch.arange(dim // 2, dtype=torch.float32) * (2.0 / dim)
    angles = torch.arange(num_ranks, dtype=torch.float32)[:, None] / wave_length**exponents
    return torch.cat((angles.sin(), angles.cos()), dim=-1)


def _normal_init(*layers: nn.Linear, std: float = 0.01) -> None:
    """Official ``init_weight_attention_multi_head`` / ``init_weight_nms``: N(0, 0.01) weights, zero biases."""
    for layer in layers:
        nn.init.normal_(layer.weight, std=std)
        nn.init.zeros_(layer.bias)


# ----------------------------------------------------------------------------------------------- module
class ObjectRelation(nn.Module):
    """The object relation module (Sec. 3, Eq. 1-6), ``f_A^n + Concat_r[f_R^r(n)]``.

    Head ``r`` weighs object ``n``'s relation to ``m`` by ``w_G^{mn} exp(w_A^{mn}) / sum_k w_G^{kn} exp(w_A^{kn})``
    (Eq. 3): ``w_A = <W_K f_m, W_Q f_n> / sqrt(d_k)`` (Eq. 4) and ``w_G = ReLU(W_G E_G(geometry))`` (Eq. 5), added in
    the log domain with the prior floored at 1e-6 (official), and sums ``W_V f_m`` (Eq. 2). ``W_V`` maps ``d_f``
    to ``d_f / N_r`` per head -- the official grouped 1x1 convolution after the weighted sum, applied here before
    it (a linear map commutes with the weights, which sum to one), so the heads concatenate to ``d_f`` (Eq. 6).

    Args:
        feature_dim: ``d_f`` (1024 in the box head; 128 in the duplicate removal network).
        num_heads: ``N_r`` (16).
        key_dim: ``d_k`` per head (64).
        geometry_dim: ``d_g``, the geometry embedding's width (64).
        wave_length, position_scale: the embedding's 1000 and 100 (official).
    Parameters: ``W_Q``, ``W_K`` (``d_f x N_r d_k`` each), ``W_V`` (``d_f x d_f``), ``W_G`` (``d_g x N_r``), with biases.
    """

    def __init__(self, feature_dim: int, num_heads: int = 16, key_dim: int = 64, geometry_dim: int = 64,
                 wave_length: float = 1000.0, position_scale: float = 100.0):
        super().__init__()
        if feature_dim % num_heads:
            raise ConfigError(f"relation feature_dim={feature_dim} is not a multiple of num_heads={num_heads}")
        self.num_heads, self.key_dim, self.geometry_dim = num_heads, key_dim, geometry_dim
        self.wave_length, self.position_scale = wave_length, position_scale
        self.query = nn.Linear(feature_dim, num_heads * key_dim)
        self.key = nn.Linear(feature_dim, num_heads * key_dim)
        self.value = nn.Linear(feature_dim, feature_dim)
        self.geometric_weight = nn.Linear(geometry_dim, num_heads)  # W_G (official pair_pos_fc1, a 1x1 conv)
        _normal_init(self.query, self.key, self.value, self.geometric_weight)

    def geometric_prior(self, query_boxes: Tensor, key_boxes: Tensor) -> Tensor:
        """``w_G = ReLU(W_G E_G)`` of every pair, ``(..., N_r, M, N)`` (Eq. 5)."""
        embedding = sinusoidal_embedding(box_geometry(query_boxes, key_boxes), self.geometry_dim,
                                         self.wave_length, self.position_scale)
        return F.relu(self.geometric_weight(embedding)).movedim(-1, -3)

    def forward(self, features: Tensor, boxes: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``features (..., N, d_f)`` of the objects with ``boxes (..., N, 4)`` -> the same plus their relation
        features. ``key_mask (N,)``: the objects others attend to (all by default; the official code leaves the
        ground-truth boxes added as training RoIs out of the keys)."""
        key_features, key_boxes = features, boxes
        if key_mask is not None:
            key_features, key_boxes = features[..., key_mask, :], boxes[..., key_mask, :]
        heads = self.num_heads

        def split(x: Tensor) -> Tensor:  # (..., N, heads * c) -> (..., heads, N, c)
            return x.unflatten(-1, (heads, -1)).transpose(-3, -2)

        log_prior = self.geometric_prior(boxes, key_boxes).clamp(min=PRIOR_FLOOR).log()
        relation = F.scaled_dot_product_attention(
            split(self.query(features)), split(self.key(key_features)), split(self.value(key_features)),
            attn_mask=log_prior.to(features.dtype),
        )  # scale 1/sqrt(d_k): Eq. 4
        return features + relation.transpose(-3, -2).flatten(-2)


# ----------------------------------------------------------------------------------------------- box head
class RelationBoxHead(nn.Module):
    """``2fc+RM`` (Sec. 4.2; official ``get_symbol_rcnn``): ``fc6 -> RM -> ReLU -> fc7 -> RM -> ReLU``, each
    relation module over the RoIs of one image. The two fc layers are torchvision's ``TwoMLPHead``'s
    (same names, so checkpoints and initialisation carry over); ``relates_objects`` tells the RoI heads to pass
    the boxes (and to run it on all of an image's RoIs in training, as the official code does).

    Args:
        in_channels: the pooled RoI feature's size (256 x 7 x 7 on an FPN).
        representation_size: the fc width ``d_f`` (1024).
        num_heads, key_dim, geometry_dim: of both relation modules (16, 64, 64).
    """

    relates_objects = True

    def __init__(self, in_channels: int, representation_size: int, num_heads: int = 16, key_dim: int = 64,
                 geometry_dim: int = 64):
        super().__init__()
        self.fc6 = nn.Linear(in_channels, representation_size)
        self.fc7 = nn.Linear(representation_size, representation_size)
        self.relation6 = ObjectRelation(representation_size, num_heads, key_dim, geometry_dim)
        self.relation7 = ObjectRelation(representation_size, num_heads, key_dim, geometry_dim)

    def forward(self, x: Tensor, boxes: Sequence[Tensor], key_masks: Sequence[Tensor] | None = None) -> Tensor:
        """``x (sum N_i, C, 7, 7)``: the RoIs of all images in order; ``boxes``: each image's ``(N_i, 4)``."""
        sizes = [len(b) for b in boxes]
        masks = key_masks if key_masks is not None else [None] * len(boxes)

        def relate(module: ObjectRelation, features: Tensor) -> Tensor:
            parts = features.split(sizes)
            return torch.cat([module(f, b, m) for f, b, m in zip(parts, boxes, masks)])

        x = F.relu(relate(self.relation6, self.fc6(x.flatten(start_dim=1))))
        return F.relu(relate(self.relation7, self.fc7(x)))


# ----------------------------------------------------------------------------------------------- duplicate removal
class LearnedNMS(nn.Module):
    """The duplicate removal network (Sec. 4.3, Fig. 3(b); official ``learn_nms`` symbols), per class.

    For each foreground class, the ``first_n`` highest-scoring RoIs (score ``s_0``) get an appearance feature
    (``W_fR``: the box head's output to ``embed_dim``) plus a rank feature (the rank's sinusoidal embedding to
    ``embed_dim``), one relation module over them with their class-specific boxes, ReLU, and one logit per IoU
    threshold; ``s_1 = sigmoid(logit)`` says "this detection is the one kept for its object at that threshold",
    and the score is ``s_0 * s_1``, averaged over the thresholds at test (official ``MERGE_METHOD=-1``).

    Training (joint, as the paper's ``e2e``): for each class, ground truth and threshold, the highest-scoring
    detection whose best-overlapping ground truth is this one, with IoU above the threshold, is positive;
    binary cross-entropy on ``s_0 * s_1`` (gradients reach ``s_0``, the box head's features, not the boxes),
    positives weighted ``positive_weight``, summed over classes, over ``first_n * thresholds`` per image.

    Args:
        feature_dim: the box head's output width (1024).
        thresholds: the IoU thresholds (official ``NMS_TARGET_THRESH``: 0.5, 0.6, 0.7, 0.8, 0.9).
        first_n: detections per class (150, official ``FIRST_N`` in training and test).
        embed_dim: width of the rank and appearance features and of the relation module (128).
        rank_dim: the rank embedding's width before its fc (1024).
        num_heads, key_dim, geometry_dim: the relation module's (16; 64, so ``W_Q``, ``W_K`` give 1024; 64).
        class_score_threshold: at test, classes whose best score is below it are skipped (0.05, official
            ``LEARN_NMS_CLASS_SCORE_TH``; lowered to the image's best class score when no class reaches it).
        positive_weight: the positives' loss weight (official ``nms_pos_scale`` 4.0).
        loss_weight: the loss's weight (official ``nms_loss_scale`` 1.0).
    """

    learned = True

    def __init__(self, feature_dim: int = 1024, thresholds: Sequence[float] = (0.5, 0.6, 0.7, 0.8, 0.9),
                 first_n: int = 150, embed_dim: int = 128, rank_dim: int = 1024, num_heads: int = 16,
                 key_dim: int = 64, geometry_dim: int = 64, class_score_threshold: float = 0.05,
                 positive_weight: float = 4.0, loss_weight: float = 1.0):
        super().__init__()
        if not thresholds:
            raise ConfigError("task.detector.nms.thresholds is empty: give the IoU thresholds, e.g. [0.5, 0.6, 0.7, 0.8, 0.9]")
        self.register_buffer("thresholds", torch.tensor([float(t) for t in thresholds]), persistent=False)
        self.first_n, self.class_score_threshold = int(first_n), float(class_score_threshold)
        self.positive_weight, self.loss_weight = float(positive_weight), float(loss_weight)
        self.register_buffer("ranks", rank_embedding(self.first_n, rank_dim), persistent=False)
        self.rank = nn.Linear(rank_dim, embed_dim)  # official nms_rank
        self.appearance = nn.Linear(feature_dim, embed_dim)  # official roi_feat_embedding
        self.relation = ObjectRelation(embed_dim, num_heads, key_dim, geometry_dim)
        self.classifier = nn.Linear(embed_dim, len(thresholds))  # official nms_logit
        _normal_init(self.rank, self.appearance, self.classifier)
        nn.init.constant_(self.classifier.bias, -3.0)  # official init_weight_nms

    def rescore(self, scores: Tensor, boxes: Tensor, features: Tensor, classes: Tensor) -> tuple[Tensor, ...]:
        """One image: ``scores (N, K)`` class probabilities, ``boxes (N, K, 4)`` class-specific boxes, ``features
        (N, feature_dim)``, ``classes (C,)`` the columns to process.

        Returns ``(s0, s0 * s1, boxes, index)`` for the top ``n = min(first_n, N)`` RoIs of each class, shaped
        ``(C, n)``, ``(C, n, thresholds)``, ``(C, n, 4)`` and ``(C, n)`` (RoI indices)."""
        n = min(self.first_n, scores.shape[0])
        s0, index = scores[:, classes].topk(n, dim=0)  # (n, C), by decreasing score
        s0, index = s0.t(), index.t()  # (C, n)
        top_boxes = boxes[index, classes[:, None]]  # (C, n, 4)
        x = self.appearance(features)[index] + self.rank(self.ranks[:n])  # (C, n, embed_dim)
        x = F.relu(self.relation(x, top_boxes.detach()))
        s1 = torch.sigmoid(self.classifier(x))
        return s0, s0[..., None] * s1, top_boxes, index

    def loss(self, scores: Tensor, boxes: Tensor, features: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
        """One training image: ``scores (N, K+1)`` softmax probabilities, ``boxes (N, K+1, 4)``, ``features``;
        its ground truth with labels 1..K. Every foreground class is processed (official)."""
        classes = torch.arange(1, scores.shape[1], device=scores.device)
        s0, score, top_boxes, _ = self.rescore(scores, boxes, features, classes)
        targets = self.targets(s0.detach(), top_boxes.detach(), classes, gt_boxes, gt_labels)
        eps = 1e-8  # official nms_eps
        positive = -targets * torch.log(score + eps) * self.positive_weight
        negative = -(1 - targets) * torch.log(1 - score + eps)
        return self.loss_weight * (positive + negative).sum() / (score.shape[1] * score.shape[2])

    @torch.no_grad()
    def targets(self, s0: Tensor, top_boxes: Tensor, classes: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
        """``(C, n, thresholds)``: 1 where the detection is the highest-scoring one among those whose
        best-overlapping ground truth of the class is g, with IoU above the threshold, for some g. Every class at
        once, on the device (a training step makes no host round trip here)."""
        num_classes, n = s0.shape
        targets = s0.new_zeros(num_classes, n, len(self.thresholds))
        if gt_boxes.shape[0] == 0:
            return targets
        of_class = gt_labels[None, :] == classes[:, None]  # (C, G): the ground truth a class's detections match
        iou = box_iou(top_boxes.reshape(-1, 4), gt_boxes).view(num_classes, n, -1)
        iou = torch.where(of_class[:, None, :], iou, -1.0)  # another class's ground truth is never the best
        is_best = F.one_hot(iou.argmax(dim=-1), iou.shape[-1]).bool() & of_class[:, None, :]  # (C, n, G)
        thresholds = self.thresholds.to(iou)
        candidate = is_best[..., None] & (iou[..., None] > thresholds)  # (C, n, G, T)
        ranked = torch.where(candidate, s0[:, :, None, None], -1.0)
        best_score, best_det = ranked.max(dim=1)  # (C, G, T): per ground truth and threshold, the best detection
        return targets.scatter_reduce_(1, best_det, (best_score >= 0).to(targets.dtype), reduce="amax")

    @torch.no_grad()
    def detect(self, scores: Tensor, boxes: Tensor, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One test image -> candidate ``(boxes, scores, labels)``: every processed class's top RoIs, scored
        ``s_0`` times the mean of ``s_1`` over the thresholds; the caller thresholds and keeps the best."""
        best = scores[:, 1:].max(dim=0).values if scores.shape[0] else scores.new_zeros(scores.shape[1] - 1)
        threshold = min(self.class_score_threshold, float(best.max())) if best.numel() else 0.0
        classes = torch.where(best >= threshold)[0] + 1
        if scores.shape[0] == 0 or classes.numel() == 0:
            return boxes.new_zeros(0, 4), scores.new_zeros(0), torch.zeros(0, dtype=torch.long, device=scores.device)
        _, score, top_boxes, _ = self.rescore(scores, boxes, features, classes)
        final = score.mean(dim=-1)  # (C, n)
        labels = classes[:, None].expand_as(final)
        return top_boxes.reshape(-1, 4), final.reshape(-1), labels.reshape(-1)


def relation_parameter_count(feature_dim: int, num_heads: int, key_dim: int, geometry_dim: int) -> int:
    """The paper's ``O(Space) = N_r (2 d_f d_k + d_g) + d_f^2`` of one module (Sec. 3, biases not counted)."""
    return num_heads * (2 * feature_dim * key_dim + geometry_dim) + feature_dim**2
