"""Sparse R-CNN against the official model (PeizeSun/SparseR-CNN, rebuilt below in its detectron2 module layout from a
seeded state, at tiny widths): an official checkpoint loads through ``pretrained=`` and gives the same per-stage
class logits and boxes, detections and every loss term; the parameter counts of the R-50 and Swin-T models against
Swin's Table 2(a); every parameter gets a gradient; a tiny model learns in two optimiser steps."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import FrozenBatchNorm2d, generalized_box_iou, roi_align

from test_deformable_detr import TINY_SWIN, imagenet_like_batch_norm, parity_batch, quickstart_two_steps
from test_detection_models import detector_config
from vtrain.tasks.detection.module import DetectionTask

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- the official model
# A minimal re-statement of PeizeSun/SparseR-CNN (projects/SparseRCNN/sparsercnn/detector.py, head.py, loss.py) and
# of the detectron2 parts it runs on (modeling/backbone/resnet.py BasicStem / BottleneckBlock with FrozenBN,
# backbone/fpn.py FPN, poolers.py ROIPooler with ROIAlignV2, postprocessing.py detector_postprocess), in their module
# layout and with their arithmetic.
class D2Conv(nn.Conv2d):
    """detectron2's Conv2d: the norm inside (``conv1.norm.*``)."""

    def __init__(self, *args, norm: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm = FrozenBatchNorm2d(self.out_channels) if norm else None

    def forward(self, x):
        x = super().forward(x)
        return self.norm(x) if self.norm is not None else x


class D2Bottleneck(nn.Module):
    """BottleneckBlock(stride_in_1x1=False): the stride on the 3x3 conv."""

    def __init__(self, in_channels, bottleneck, out_channels, stride):
        super().__init__()
        self.shortcut = D2Conv(in_channels, out_channels, 1, stride=stride, bias=False) \
            if in_channels != out_channels else None
        self.conv1 = D2Conv(in_channels, bottleneck, 1, bias=False)
        self.conv2 = D2Conv(bottleneck, bottleneck, 3, stride=stride, padding=1, bias=False)
        self.conv3 = D2Conv(bottleneck, out_channels, 1, bias=False)

    def forward(self, x):
        out = self.conv3(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return F.relu(out + (self.shortcut(x) if self.shortcut is not None else x))


class D2ResNet(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.stem = nn.Module()
        self.stem.conv1 = D2Conv(3, 64, 7, stride=2, padding=3, bias=False)
        in_channels = 64
        for index, count in enumerate(blocks):
            out_channels, bottleneck = 256 * 2 ** index, 64 * 2 ** index
            stage = nn.Sequential(*[D2Bottleneck(in_channels if b == 0 else out_channels, bottleneck, out_channels,
                                                 2 if index > 0 and b == 0 else 1) for b in range(count)])
            setattr(self, f"res{index + 2}", stage)
            in_channels = out_channels

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem.conv1(x)), kernel_size=3, stride=2, padding=1)
        outputs = []
        for index in range(2, 6):
            x = getattr(self, f"res{index}")(x)
            outputs.append(x)
        return outputs


class D2FPN(nn.Module):
    """build_resnet_fpn_backbone: laterals and outputs with biases, nearest 2x top-down, P6 by max-pooling."""

    def __init__(self, blocks, out_channels):
        super().__init__()
        self.bottom_up = D2ResNet(blocks)
        for level, channels in zip(range(2, 6), (256, 512, 1024, 2048)):
            setattr(self, f"fpn_lateral{level}", D2Conv(channels, out_channels, 1, norm=False))
            setattr(self, f"fpn_output{level}", D2Conv(out_channels, out_channels, 3, padding=1, norm=False))

    def forward(self, x):
        bottom_up = self.bottom_up(x)
        prev = self.fpn_lateral5(bottom_up[-1])
        results = [self.fpn_output5(prev)]
        for level in (4, 3, 2):
            prev = getattr(self, f"fpn_lateral{level}")(bottom_up[level - 2]) \
                + F.interpolate(prev, scale_factor=2.0, mode="nearest")
            results.insert(0, getattr(self, f"fpn_output{level}")(prev))
        return results  # p2-p5 (p6, the max-pool of p5, is not read)


def roi_pooler(features, boxes):
    """ROIPooler(output 7, scales 1/4..1/32, sampling_ratio 2, ROIAlignV2): assign_boxes_to_levels with canonical
    box 224 at level 4, then ROIAlign(aligned=True) per level."""
    rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype), b], 1) for i, b in enumerate(boxes)])
    sizes = torch.sqrt(torch.cat([(b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) for b in boxes]))
    levels = torch.floor(4 + torch.log2(sizes / 224 + 1e-8)).clamp(min=2, max=5).to(torch.int64) - 2
    output = torch.zeros(len(rois), features[0].shape[1], 7, 7)
    for level, feature in enumerate(features):
        index = torch.nonzero(levels == level, as_tuple=True)[0]
        output[index] = roi_align(feature, rois[index], (7, 7), spatial_scale=1 / 4 / 2 ** level, sampling_ratio=2,
                                  aligned=True)
    return output, levels


class DynamicConv(nn.Module):
    def __init__(self, hidden_dim, dim_dynamic, pooler_resolution=7):
        super().__init__()
        self.hidden_dim, self.dim_dynamic, self.num_dynamic = hidden_dim, dim_dynamic, 2
        self.num_params = hidden_dim * dim_dynamic
        self.dynamic_layer = nn.Linear(hidden_dim, self.num_dynamic * self.num_params)
        self.norm1, self.norm2 = nn.LayerNorm(dim_dynamic), nn.LayerNorm(hidden_dim)
        self.activation = nn.ReLU(inplace=True)
        self.out_layer = nn.Linear(hidden_dim * pooler_resolution ** 2, hidden_dim)
        self.norm3 = nn.LayerNorm(hidden_dim)

    def forward(self, pro_features, roi_features):
        features = roi_features.permute(1, 0, 2)
        parameters = self.dynamic_layer(pro_features).permute(1, 0, 2)
        param1 = parameters[:, :, :self.num_params].view(-1, self.hidden_dim, self.dim_dynamic)
        param2 = parameters[:, :, self.num_params:].view(-1, self.dim_dynamic, self.hidden_dim)
        features = self.activation(self.norm1(torch.bmm(features, param1)))
        features = self.activation(self.norm2(torch.bmm(features, param2)))
        return self.activation(self.norm3(self.out_layer(features.flatten(1))))


class RCNNHead(nn.Module):
    def __init__(self, d_model, num_classes, dim_feedforward, nhead, dim_dynamic, num_cls=1, num_reg=3,
                 scale_clamp=math.log(100000.0 / 16), bbox_weights=(2.0, 2.0, 1.0, 1.0)):
        super().__init__()
        self.d_model = d_model
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.inst_interact = DynamicConv(d_model, dim_dynamic)
        self.linear1, self.linear2 = nn.Linear(d_model, dim_feedforward), nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.cls_module = nn.ModuleList([m for _ in range(num_cls) for m in (
            nn.Linear(d_model, d_model, False), nn.LayerNorm(d_model), nn.ReLU(inplace=True))])
        self.reg_module = nn.ModuleList([m for _ in range(num_reg) for m in (
            nn.Linear(d_model, d_model, False), nn.LayerNorm(d_model), nn.ReLU(inplace=True))])
        self.class_logits = nn.Linear(d_model, num_classes)
        self.bboxes_delta = nn.Linear(d_model, 4)
        self.scale_clamp, self.bbox_weights = scale_clamp, bbox_weights

    def forward(self, features, bboxes, pro_features):
        N, nr_boxes = bboxes.shape[:2]
        roi_features, self.levels = roi_pooler(features, list(bboxes))
        roi_features = roi_features.view(N * nr_boxes, self.d_model, -1).permute(2, 0, 1)
        pro_features = pro_features.view(N, nr_boxes, self.d_model).permute(1, 0, 2)
        pro_features2 = self.self_attn(pro_features, pro_features, value=pro_features)[0]
        pro_features = self.norm1(pro_features + pro_features2)
        pro_features = pro_features.view(nr_boxes, N, self.d_model).permute(1, 0, 2).reshape(
            1, N * nr_boxes, self.d_model)
        pro_features2 = self.inst_interact(pro_features, roi_features)
        obj_features = self.norm2(pro_features + pro_features2)
        obj_features = self.norm3(obj_features + self.linear2(F.relu(self.linear1(obj_features))))
        fc_feature = obj_features.transpose(0, 1).reshape(N * nr_boxes, -1)
        cls_feature, reg_feature = fc_feature.clone(), fc_feature.clone()
        for cls_layer in self.cls_module:
            cls_feature = cls_layer(cls_feature)
        for reg_layer in self.reg_module:
            reg_feature = reg_layer(reg_feature)
        class_logits = self.class_logits(cls_feature)
        pred_bboxes = self.apply_deltas(self.bboxes_delta(reg_feature), bboxes.view(-1, 4))
        return class_logits.view(N, nr_boxes, -1), pred_bboxes.view(N, nr_boxes, -1), obj_features

    def apply_deltas(self, deltas, boxes):
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.bbox_weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = torch.clamp(deltas[:, 2::4] / ww, max=self.scale_clamp)
        dh = torch.clamp(deltas[:, 3::4] / wh, max=self.scale_clamp)
        pred_ctr_x, pred_ctr_y = dx * widths[:, None] + ctr_x[:, None], dy * heights[:, None] + ctr_y[:, None]
        pred_w, pred_h = torch.exp(dw) * widths[:, None], torch.exp(dh) * heights[:, None]
        pred_boxes = torch.zeros_like(deltas)
        pred_boxes[:, 0::4], pred_boxes[:, 1::4] = pred_ctr_x - 0.5 * pred_w, pred_ctr_y - 0.5 * pred_h
        pred_boxes[:, 2::4], pred_boxes[:, 3::4] = pred_ctr_x + 0.5 * pred_w, pred_ctr_y + 0.5 * pred_h
        return pred_boxes


class OfficialSparseRCNN(nn.Module):
    """SparseRCNN (focal, deep supervision) on build_resnet_fpn_backbone: the keys backbone.bottom_up.*,
    backbone.fpn_*, init_proposal_features, init_proposal_boxes, head.head_series.*."""

    def __init__(self, num_classes, blocks=(3, 4, 6, 3), d=256, ffn=2048, heads=8, dim_dynamic=64, stages=6,
                 proposals=300):
        super().__init__()
        self.num_classes, self.num_proposals = num_classes, proposals
        self.backbone = D2FPN(blocks, d)
        self.init_proposal_features = nn.Embedding(proposals, d)
        self.init_proposal_boxes = nn.Embedding(proposals, 4)
        self.head = nn.Module()
        self.head.head_series = nn.ModuleList(RCNNHead(d, num_classes, ffn, heads, dim_dynamic)
                                              for _ in range(stages))

    def forward(self, images):
        """preprocess_image (normalise, ImageList padded to 32), proposals, DynamicHead: every stage's logits and
        boxes, and each image's size."""
        mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        h, w = (math.ceil(max(i.shape[d] for i in images) / 32) * 32 for d in (1, 2))
        tensor = torch.zeros(len(images), 3, h, w)
        for image, padded in zip(images, tensor):
            padded[:, :image.shape[1], :image.shape[2]].copy_((image - mean) / std)
        whwh = torch.stack([torch.tensor([i.shape[2], i.shape[1], i.shape[2], i.shape[1]], dtype=torch.float32)
                            for i in images])
        features = self.backbone(tensor)
        cx, cy, bw, bh = self.init_proposal_boxes.weight.clone().unbind(-1)
        bboxes = torch.stack([cx - 0.5 * bw, cy - 0.5 * bh, cx + 0.5 * bw, cy + 0.5 * bh], -1)[None] * whwh[:, None, :]
        pro_features = self.init_proposal_features.weight[None].repeat(1, len(images), 1).clone()
        classes, coords = [], []
        for rcnn_head in self.head.head_series:
            class_logits, pred_bboxes, pro_features = rcnn_head(features, bboxes, pro_features)
            classes.append(class_logits)
            coords.append(pred_bboxes)
            bboxes = pred_bboxes.detach()
        return torch.stack(classes), torch.stack(coords), whwh

    def inference(self, box_cls, box_pred, sizes):
        """inference (focal) then detector_postprocess at the input size: top num_proposals of proposals x classes,
        clipped, empty boxes dropped (labels 0-based)."""
        results = []
        labels = torch.arange(self.num_classes).unsqueeze(0).repeat(self.num_proposals, 1).flatten(0, 1)
        for scores, boxes, (h, w) in zip(box_cls.sigmoid(), box_pred, sizes):
            scores, topk = scores.flatten(0, 1).topk(self.num_proposals, sorted=False)
            boxes = boxes.view(-1, 1, 4).repeat(1, self.num_classes, 1).view(-1, 4)[topk]
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w),
                                 boxes[:, 3].clamp(0, h)], 1)
            keep = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
            results.append((boxes[keep], scores[keep], labels[topk][keep]))
        return results


def official_matcher(logits, boxes, targets):
    """HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2, use_focal=True)."""
    bs, num_queries = logits.shape[:2]
    out_prob, out_bbox = logits.flatten(0, 1).sigmoid(), boxes.flatten(0, 1)
    tgt_ids, tgt_bbox = torch.cat([v["labels"] for v in targets]), torch.cat([v["boxes_xyxy"] for v in targets])
    alpha, gamma = 0.25, 2.0
    neg_cost_class = (1 - alpha) * (out_prob ** gamma) * (-(1 - out_prob + 1e-8).log())
    pos_cost_class = alpha * ((1 - out_prob) ** gamma) * (-(out_prob + 1e-8).log())
    cost_class = pos_cost_class[:, tgt_ids] - neg_cost_class[:, tgt_ids]
    image_size_out = torch.cat([v["image_size_xyxy"].unsqueeze(0) for v in targets])
    image_size_out = image_size_out.unsqueeze(1).repeat(1, num_queries, 1).flatten(0, 1)
    image_size_tgt = torch.cat([v["image_size_xyxy_tgt"] for v in targets])
    cost_bbox = torch.cdist(out_bbox / image_size_out, tgt_bbox / image_size_tgt, p=1)
    cost_giou = -generalized_box_iou(out_bbox, tgt_bbox)
    C = (5 * cost_bbox + 2 * cost_class + 2 * cost_giou).view(bs, num_queries, -1)
    sizes = [len(v["boxes_xyxy"]) for v in targets]
    indices = [linear_sum_assignment(c[i]) for i, c in enumerate(C.split(sizes, -1))]
    return [(torch.as_tensor(i, dtype=torch.int64), torch.as_tensor(j, dtype=torch.int64)) for i, j in indices]


def official_losses(logits, boxes, targets, num_classes, suffix=""):
    """SetCriterion.loss_labels (sigmoid_focal_loss_jit, sum / num_boxes) and loss_boxes (GIoU on pixels, L1 on
    corners over the image size), times the weight_dict's 2 / 5 / 2."""
    indices = official_matcher(logits, boxes, targets)
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for (src, _) in indices])
    target_classes = torch.full(logits.shape[:2], num_classes, dtype=torch.int64)
    target_classes[batch_idx, src_idx] = torch.cat([t["labels"][J] for t, (_, J) in zip(targets, indices)])
    src_logits, target_classes = logits.flatten(0, 1), target_classes.flatten(0, 1)
    pos_inds = torch.nonzero(target_classes != num_classes, as_tuple=True)[0]
    labels = torch.zeros_like(src_logits)
    labels[pos_inds, target_classes[pos_inds]] = 1
    p = torch.sigmoid(src_logits)
    ce_loss = F.binary_cross_entropy_with_logits(src_logits, labels, reduction="none")
    p_t = p * labels + (1 - p) * (1 - labels)
    focal = (0.25 * labels + 0.75 * (1 - labels)) * ce_loss * ((1 - p_t) ** 2)
    num_boxes = max(float(sum(len(t["labels"]) for t in targets)), 1.0)
    src_boxes = boxes[batch_idx, src_idx]
    target_boxes = torch.cat([t["boxes_xyxy"][i] for t, (_, i) in zip(targets, indices)], dim=0)
    loss_giou = (1 - torch.diag(generalized_box_iou(src_boxes, target_boxes))).sum() / num_boxes
    image_size = torch.cat([v["image_size_xyxy_tgt"] for v in targets])
    loss_bbox = F.l1_loss(src_boxes / image_size, target_boxes / image_size, reduction="none").sum() / num_boxes
    return {f"loss_ce{suffix}": 2 * focal.sum() / num_boxes, f"loss_bbox{suffix}": 5 * loss_bbox,
            f"loss_giou{suffix}": 2 * loss_giou}


# ----------------------------------------------------------------------------------------------- parity
OPTIM = dict(_target_="torch.optim.AdamW", lr=1e-4, weight_decay=0.05)
SCHED = dict(_target_="vtrain.training.optim.multistep", milestones_epochs=[27, 33])
RESNET26 = dict(_target_="vtrain.backbones.ResNet", depth=26, frozen_stages=1)
TINY = dict(hidden_dim=32, dim_feedforward=64, num_heads=2, dim_dynamic=8, num_stages=3, num_proposals=12)


def sparse_rcnn_task(backbone: dict, num_classes: int, model: dict, **kwargs) -> DetectionTask:
    """Sparse R-CNN of ``conf/task/detector/sparse_rcnn.yaml`` with ``model`` options on ``backbone``."""
    overrides = [f"{'' if k == 'num_proposals' else '+'}task.detector.model.{k}={v}" for k, v in model.items()]
    if "hidden_dim" in model:
        overrides.append(f"task.detector.neck.out_channels={model['hidden_dim']}")
    spec = detector_config("sparse_rcnn", *overrides)
    return DetectionTask(OmegaConf.create(backbone), OPTIM, SCHED, num_classes=num_classes, detector=spec, **kwargs)


def seeded_official() -> OfficialSparseRCNN:
    torch.manual_seed(0)
    model = OfficialSparseRCNN(4, (2, 2, 2, 2), d=32, ffn=64, heads=2, dim_dynamic=8, stages=3, proposals=12).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("head.") and p.dim() > 1:
                nn.init.xavier_uniform_(p)  # DynamicHead._reset_parameters
            elif name.startswith("head."):  # biases and norms away from 0 and 1: every term matters
                p.normal_(0, 0.2).add_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
        imagenet_like_batch_norm(model)
        # proposals of every size, some beyond the image: the RoIs fall on P2, P3 and P4
        model.init_proposal_boxes.weight[:, :2].uniform_(0.2, 0.8)
        model.init_proposal_boxes.weight[:, 2:].uniform_(0.1, 4.0)
    return model


def official_targets(images, targets):
    """prepare_targets: 0-based classes, pixel corners, the image size as (w, h, w, h) per image and per box."""
    out = []
    for image, target in zip(images, targets):
        h, w = image.shape[1:]
        size = torch.tensor([w, h, w, h], dtype=torch.float32)
        out.append({"labels": target["labels"] - 1, "boxes_xyxy": target["boxes"], "image_size_xyxy": size,
                    "image_size_xyxy_tgt": size.repeat(len(target["boxes"]), 1)})
    return out


def test_an_official_checkpoint_gives_the_official_outputs_and_losses(tmp_path):
    """The official model's state dict (detectron2's {"model": ...}) through ``load_pretrained``: every stage's
    class logits and boxes (RoIs on three FPN levels), the detections, and every loss term (each stage's) equal the
    official to 1e-5. A file of another proposal count stops with one line."""
    from vtrain.config import ConfigError

    official = seeded_official()
    path = tmp_path / "sparse_rcnn.pth"
    torch.save({"model": official.state_dict()}, path)
    ours = sparse_rcnn_task(RESNET26, 4, TINY, batch_norm="frozen", test_size=64, test_max_size=80)
    ours.load_pretrained(str(path))
    ours.eval()
    images, targets = parity_batch()
    with torch.no_grad():
        logits, boxes, _ = official(images)
    assert set(official.head.head_series[0].levels.tolist()) == {0, 1, 2}
    captured = []
    for stage in ours.detector.stages:
        stage.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        detections = ours(images)
    close = dict(rtol=1e-5, atol=1e-5)
    assert len(captured) == 3
    for stage, (our_logits, our_boxes, _) in enumerate(captured):
        torch.testing.assert_close(our_logits, logits[stage], **close, msg=f"stage {stage} logits")
        torch.testing.assert_close(our_boxes, boxes[stage], rtol=1e-5, atol=1e-4, msg=f"stage {stage} boxes")
    for out, (b, s, labels) in zip(detections, official.inference(logits[-1], boxes[-1],
                                                                  [i.shape[1:] for i in images])):
        order, official_order = out["scores"].argsort(descending=True), s.argsort(descending=True)
        torch.testing.assert_close(out["scores"][order], s[official_order], **close)
        assert torch.equal(out["labels"][order], labels[official_order] + 1)
        torch.testing.assert_close(out["boxes"][order], b[official_order], rtol=1e-5, atol=1e-4)

    ours.train()
    with torch.no_grad():
        losses = ours(images, targets)
    relative = official_targets(images, targets)
    expected = official_losses(logits[-1], boxes[-1], relative, 4)
    for stage in range(len(logits) - 1):
        expected.update(official_losses(logits[stage], boxes[stage], relative, 4, f"_{stage}"))
    assert sorted(losses) == sorted(expected)
    for name, value in expected.items():
        torch.testing.assert_close(losses[name], value, **close, msg=name)


    # a file of another proposal count (a 100-proposal release into the 300-proposal recipe) is one line saying
    # both counts and the option to set
    state = official.state_dict()
    for name in ("init_proposal_features.weight", "init_proposal_boxes.weight"):
        state[name] = state[name][:10]
    torch.save({"model": state}, path)
    expected = (r"sparse_rcnn.pth: this Sparse R-CNN checkpoint has 10 proposals, the model 12: set "
                r"task.detector.model.num_proposals=10 \(pretrained_strict=false loads the rest\)$")
    with pytest.raises(ConfigError, match=expected):
        ours.load_pretrained(str(path))


def test_sizes_equal_the_official_and_swin_table_2a():
    """At full size on the meta device (80 categories, d 256, FFN 2048, 6 stages). Parameters: ours equals the
    official R-50 model (detectron2's FrozenBN: its norms are buffers) with 300 proposals, 106,289,768; 100 proposals
    hold 200 x (256 + 4) fewer. The recipes' ResNet keeps mmdet's BatchNorm affine as parameters (norm_eval):
    106,342,888; the Swin-T model 109,741,154. Swin Table 2(a): 106M and 110M.

    MACs: table=swin_coco_frameworks counts the backbone and FPN on the image (168.3 G in all on 1280x800; paper
    166G) plus every stage's products on its 300 proposals (here on a small image: the stages' share does not depend
    on its size), written out here per proposal from the architecture: self-attention 4d^2 + 2Pd, the dynamic layer
    d x 2 x 64d, the two dynamic 1x1 convolutions 2 x 49 x 64d, the RoI's linear layer 49d^2, the FFN 2 x 2048d,
    class d^2 + 80d, box 3d^2 + 4d."""
    from vtrain.profiling import count_macs
    from vtrain.tools.table.macs import task_macs

    resnet50 = dict(RESNET26, depth=50)
    swin_t = dict(_target_="vtrain.backbones.SwinTransformer", embed_dim=96, depths=[2, 2, 6, 2],
                  num_heads=[3, 6, 12, 24])
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    with torch.device("meta"):
        official = OfficialSparseRCNN(80)
        frozen = sparse_rcnn_task(resnet50, 80, {}, batch_norm="frozen")
        fewer = sparse_rcnn_task(resnet50, 80, dict(num_proposals=100), batch_norm="frozen")
        recipe = sparse_rcnn_task(resnet50, 80, {}, batch_norm="eval")
        swin = sparse_rcnn_task(swin_t, 80, {})
    assert count(official) == count(frozen) == 106_289_768
    assert count(fewer) == 106_289_768 - 200 * (256 + 4)
    assert count(recipe) == 106_342_888 and count(swin) == 109_741_154

    d, p, s, dd, ffn, k = 256, 300, 49, 64, 2048, 80
    per_proposal = (4 * d * d + 2 * p * d + d * 2 * dd * d + 2 * s * dd * d + s * d * d + 2 * ffn * d + d * d + k * d
                    + 3 * d * d + 4 * d)
    assert task_macs(recipe, (3, 64, 96)) == count_macs(recipe.detector.neck, (1, 3, 64, 96)) + 6 * p * per_proposal


# ----------------------------------------------------------------------------------------------- training
def test_every_parameter_gets_a_gradient_and_stages_see_detached_boxes():
    """DDP's condition (no search for unused parameters): on a Swin with C2-C5 the loss reaches every parameter. The
    last stage's loss alone gives the learned proposal boxes no gradient: each stage's boxes reach the next one
    detached (head.py), and RoIAlign passes none to its boxes."""
    torch.manual_seed(0)
    task = sparse_rcnn_task(TINY_SWIN, 4, TINY, test_size=64).train()
    images, targets = parity_batch()
    losses = task(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward(retain_graph=True)
    assert {n for n, p in task.named_parameters() if p.grad is None} == set()
    assert task.backbone.out_indices == (0, 1, 2, 3)
    task.zero_grad()
    (losses["loss_bbox"] + losses["loss_giou"]).backward()
    boxes = task.detector.init_proposal_boxes.weight
    assert boxes.grad is None or not boxes.grad.any()
    assert task.detector.init_proposal_features.weight.grad.any()


def test_quickstart_trains_two_steps_and_evaluates(tmp_path):
    """quickstart_sparse_rcnn in process, cut to 2 training steps and one validation batch: the set loss trains
    (finite, logged per stage), the learned proposal boxes move from their whole-image start (0.5, 0.5, 1, 1), and the
    COCO evaluation reads the detections."""
    metrics = quickstart_two_steps("quickstart_sparse_rcnn", tmp_path)
    final = metrics["final"]
    assert math.isfinite(final["train/loss_epoch"]) and "train/loss_ce_1" in final
    assert 0.0 <= final["val/bbox_AP"] <= 1.0
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    start = torch.tensor([0.5, 0.5, 1.0, 1.0]).expand(16, 4)
    assert not torch.allclose(state["detector.init_proposal_boxes.weight"], start, atol=1e-6)
