"""ATSS against mmdetection v2 (the mmdet 2.11 of SwinTransformer/Swin-Transformer-Object-Detection, which Swin's
Table 2(a) trains): its ``ATSSAssigner.assign``, ``ATSSHead`` (forward, targets, losses, ``_get_bboxes``), anchor
generator, delta coder, focal / GIoU / cross-entropy losses and ``multiclass_nms`` re-stated below in their own
layout, in plain torch, from that source; vtrain's assignment, every loss term and the detections compared to them."""
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from torch import nn
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import batched_nms

from vtrain.profiling import count_params
from vtrain.tasks.detection.atss import ATSSAssigner, DeltaXYWHCoder, PyramidAnchorGenerator
from vtrain.tasks.detection.module import DetectionTask
from vtrain.tasks.detection.nms import HardNMS
from vtrain.tasks.detection.one_stage import ATSS

pytestmark = pytest.mark.usefixtures("one_thread")

STRIDES = (8, 16, 32, 64, 128)
OPTIM = dict(_target_="torch.optim.AdamW", lr=1e-4, weight_decay=0.05)
SCHED = dict(_target_="vtrain.training.optim.multistep", milestones_epochs=[8, 11])
INF = 100000000


# ----------------------------------------------------------------------- mmdet v2, re-stated in its own layout
def mm_bbox_overlaps(bboxes1, bboxes2, mode="iou", is_aligned=False, eps=1e-6):
    """mmdet.core.bbox.iou_calculators.iou2d_calculator.bbox_overlaps (iou, giou)."""
    area1 = (bboxes1[..., 2] - bboxes1[..., 0]) * (bboxes1[..., 3] - bboxes1[..., 1])
    area2 = (bboxes2[..., 2] - bboxes2[..., 0]) * (bboxes2[..., 3] - bboxes2[..., 1])
    if is_aligned:
        lt = torch.max(bboxes1[..., :2], bboxes2[..., :2])
        rb = torch.min(bboxes1[..., 2:], bboxes2[..., 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        union = area1 + area2 - overlap
        enclosed_lt = torch.min(bboxes1[..., :2], bboxes2[..., :2])
        enclosed_rb = torch.max(bboxes1[..., 2:], bboxes2[..., 2:])
    else:
        lt = torch.max(bboxes1[..., :, None, :2], bboxes2[..., None, :, :2])
        rb = torch.min(bboxes1[..., :, None, 2:], bboxes2[..., None, :, 2:])
        wh = (rb - lt).clamp(min=0)
        overlap = wh[..., 0] * wh[..., 1]
        union = area1[..., None] + area2[..., None, :] - overlap
    union = torch.max(union, union.new_tensor([eps]))
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], union.new_tensor([eps]))
    return ious - (enclose_area - union) / enclose_area


def mm_atss_assign(bboxes, num_level_bboxes, gt_bboxes, topk=9):
    """ATSSAssigner.assign (ignore_iof_thr=-1): assigned_gt_inds, 0 negative, i + 1 the i-th gt. Also returns the
    candidates' positive mask, to show which edge cases a test set reaches."""
    num_gt, num_bboxes = gt_bboxes.size(0), bboxes.size(0)
    overlaps = mm_bbox_overlaps(bboxes, gt_bboxes)
    assigned_gt_inds = overlaps.new_full((num_bboxes,), 0, dtype=torch.long)
    if num_gt == 0 or num_bboxes == 0:
        return assigned_gt_inds, None
    gt_cx = (gt_bboxes[:, 0] + gt_bboxes[:, 2]) / 2.0
    gt_cy = (gt_bboxes[:, 1] + gt_bboxes[:, 3]) / 2.0
    gt_points = torch.stack((gt_cx, gt_cy), dim=1)
    bboxes_cx = (bboxes[:, 0] + bboxes[:, 2]) / 2.0
    bboxes_cy = (bboxes[:, 1] + bboxes[:, 3]) / 2.0
    bboxes_points = torch.stack((bboxes_cx, bboxes_cy), dim=1)
    distances = (bboxes_points[:, None, :] - gt_points[None, :, :]).pow(2).sum(-1).sqrt()
    candidate_idxs = []
    start_idx = 0
    for bboxes_per_level in num_level_bboxes:
        end_idx = start_idx + bboxes_per_level
        distances_per_level = distances[start_idx:end_idx, :]
        selectable_k = min(topk, bboxes_per_level)
        _, topk_idxs_per_level = distances_per_level.topk(selectable_k, dim=0, largest=False)
        candidate_idxs.append(topk_idxs_per_level + start_idx)
        start_idx = end_idx
    candidate_idxs = torch.cat(candidate_idxs, dim=0)
    candidate_overlaps = overlaps[candidate_idxs, torch.arange(num_gt)]
    overlaps_thr_per_gt = candidate_overlaps.mean(0) + candidate_overlaps.std(0)
    is_pos = candidate_overlaps >= overlaps_thr_per_gt[None, :]
    for gt_idx in range(num_gt):
        candidate_idxs[:, gt_idx] += gt_idx * num_bboxes
    ep_bboxes_cx = bboxes_cx.view(1, -1).expand(num_gt, num_bboxes).contiguous().view(-1)
    ep_bboxes_cy = bboxes_cy.view(1, -1).expand(num_gt, num_bboxes).contiguous().view(-1)
    candidate_idxs = candidate_idxs.view(-1)
    l_ = ep_bboxes_cx[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 0]
    t_ = ep_bboxes_cy[candidate_idxs].view(-1, num_gt) - gt_bboxes[:, 1]
    r_ = gt_bboxes[:, 2] - ep_bboxes_cx[candidate_idxs].view(-1, num_gt)
    b_ = gt_bboxes[:, 3] - ep_bboxes_cy[candidate_idxs].view(-1, num_gt)
    is_in_gts = torch.stack([l_, t_, r_, b_], dim=1).min(dim=1)[0] > 0.01
    is_pos = is_pos & is_in_gts
    overlaps_inf = torch.full_like(overlaps, -INF).t().contiguous().view(-1)
    index = candidate_idxs.view(-1)[is_pos.view(-1)]
    overlaps_inf[index] = overlaps.t().contiguous().view(-1)[index]
    overlaps_inf = overlaps_inf.view(num_gt, -1).t()
    max_overlaps, argmax_overlaps = overlaps_inf.max(dim=1)
    assigned_gt_inds[max_overlaps != -INF] = argmax_overlaps[max_overlaps != -INF] + 1
    positives_per_anchor = torch.zeros(num_bboxes, dtype=torch.long)
    positives_per_anchor.index_add_(0, index % num_bboxes, torch.ones_like(index))
    return assigned_gt_inds, dict(is_pos=is_pos, positives_per_anchor=positives_per_anchor)


def mm_grid_anchors(featmap_sizes, octave_base_scale=8):
    """AnchorGenerator(ratios=[1.0], octave_base_scale=8, scales_per_octave=1, strides) .grid_anchors (v2:
    center_offset 0), and its valid_flags for a pad_shape."""
    anchors = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, STRIDES):
        ws = hs = torch.tensor([stride * 1.0 * octave_base_scale])
        base_anchors = torch.stack([0 - 0.5 * ws, 0 - 0.5 * hs, 0 + 0.5 * ws, 0 + 0.5 * hs], dim=-1)
        shift_x = torch.arange(0, feat_w) * stride
        shift_y = torch.arange(0, feat_h) * stride
        shift_xx = shift_x.repeat(len(shift_y))
        shift_yy = shift_y.view(-1, 1).repeat(1, len(shift_x)).view(-1)
        shifts = torch.stack([shift_xx, shift_yy, shift_xx, shift_yy], dim=-1).type_as(base_anchors)
        anchors.append((base_anchors[None, :, :] + shifts[:, None, :]).view(-1, 4))
    return anchors


def mm_valid_flags(featmap_sizes, pad_shape):
    flags = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, STRIDES):
        h, w = pad_shape
        valid_feat_h, valid_feat_w = min(int(np.ceil(h / stride)), feat_h), min(int(np.ceil(w / stride)), feat_w)
        valid_x = torch.zeros(feat_w, dtype=torch.bool)
        valid_y = torch.zeros(feat_h, dtype=torch.bool)
        valid_x[:valid_feat_w] = 1
        valid_y[:valid_feat_h] = 1
        valid_xx = valid_x.repeat(len(valid_y))
        valid_yy = valid_y.view(-1, 1).repeat(1, len(valid_x)).view(-1)
        flags.append(valid_xx & valid_yy)
    return flags


def mm_bbox2delta(proposals, gt, stds=(0.1, 0.1, 0.2, 0.2)):
    px, py = (proposals[..., 0] + proposals[..., 2]) * 0.5, (proposals[..., 1] + proposals[..., 3]) * 0.5
    pw, ph = proposals[..., 2] - proposals[..., 0], proposals[..., 3] - proposals[..., 1]
    gx, gy = (gt[..., 0] + gt[..., 2]) * 0.5, (gt[..., 1] + gt[..., 3]) * 0.5
    gw, gh = gt[..., 2] - gt[..., 0], gt[..., 3] - gt[..., 1]
    deltas = torch.stack([(gx - px) / pw, (gy - py) / ph, torch.log(gw / pw), torch.log(gh / ph)], dim=-1)
    return deltas.sub_(deltas.new_tensor([0.0] * 4)).div_(deltas.new_tensor(stds))


def mm_delta2bbox(rois, deltas, stds=(0.1, 0.1, 0.2, 0.2), max_shape=None, wh_ratio_clip=16 / 1000):
    denorm_deltas = deltas * deltas.new_tensor(stds)
    dx, dy, dw, dh = denorm_deltas[:, 0], denorm_deltas[:, 1], denorm_deltas[:, 2], denorm_deltas[:, 3]
    max_ratio = np.abs(np.log(wh_ratio_clip))
    dw, dh = dw.clamp(min=-max_ratio, max=max_ratio), dh.clamp(min=-max_ratio, max=max_ratio)
    px, py = ((rois[:, 0] + rois[:, 2]) * 0.5), ((rois[:, 1] + rois[:, 3]) * 0.5)
    pw, ph = (rois[:, 2] - rois[:, 0]), (rois[:, 3] - rois[:, 1])
    gw, gh = pw * dw.exp(), ph * dh.exp()
    gx, gy = px + pw * dx, py + ph * dy
    x1, y1, x2, y2 = gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5
    if max_shape is not None:
        x1, x2 = x1.clamp(min=0, max=max_shape[1]), x2.clamp(min=0, max=max_shape[1])
        y1, y2 = y1.clamp(min=0, max=max_shape[0]), y2.clamp(min=0, max=max_shape[0])
    return torch.stack([x1, y1, x2, y2], dim=-1)


def mm_py_sigmoid_focal_loss(pred, target, weight, gamma=2.0, alpha=0.25, avg_factor=None):
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight
    return (loss * weight.view(-1, 1)).sum() / avg_factor


def mm_centerness_target(anchors, bbox_targets):
    gts = mm_delta2bbox(anchors, bbox_targets)
    anchors_cx = (anchors[:, 2] + anchors[:, 0]) / 2
    anchors_cy = (anchors[:, 3] + anchors[:, 1]) / 2
    l_, t_ = anchors_cx - gts[:, 0], anchors_cy - gts[:, 1]
    r_, b_ = gts[:, 2] - anchors_cx, gts[:, 3] - anchors_cy
    left_right, top_bottom = torch.stack([l_, r_], dim=1), torch.stack([t_, b_], dim=1)
    return torch.sqrt((left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0])
                      * (top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0]))


def mm_forward_single(head, x, level):
    """ATSSHead.forward_single with vtrain's head's weights: towers, atss_cls, Scale(atss_reg), atss_centerness."""
    cls_feat, reg_feat = head.cls_convs(x), head.reg_convs(x)
    return head.cls_logits(cls_feat), head.bbox_reg(reg_feat) * head.scales[level], head.bbox_ctrness(reg_feat)


def mm_get_target_single(flat_anchors, valid_flags, num_level_anchors, gt_bboxes, gt_labels, num_classes):
    """ATSSHead._get_target_single (allowed_border -1: inside_flags = valid_flags; PseudoSampler; pos_weight -1)."""
    inside_flags = valid_flags
    anchors = flat_anchors[inside_flags, :]
    num_level_anchors_inside = [int(flags.sum()) for flags in torch.split(inside_flags, num_level_anchors)]
    assigned_gt_inds, _ = mm_atss_assign(anchors, num_level_anchors_inside, gt_bboxes)
    pos_inds = torch.nonzero(assigned_gt_inds > 0, as_tuple=False).squeeze(-1).unique()
    neg_inds = torch.nonzero(assigned_gt_inds == 0, as_tuple=False).squeeze(-1).unique()
    bbox_targets = torch.zeros_like(anchors)
    labels = anchors.new_full((anchors.shape[0],), num_classes, dtype=torch.long)
    label_weights = anchors.new_zeros(anchors.shape[0], dtype=torch.float)
    if len(pos_inds) > 0:
        pos_assigned_gt_inds = assigned_gt_inds[pos_inds] - 1
        bbox_targets[pos_inds, :] = mm_bbox2delta(anchors[pos_inds], gt_bboxes[pos_assigned_gt_inds])
        labels[pos_inds] = gt_labels[pos_assigned_gt_inds]
        label_weights[pos_inds] = 1.0
    if len(neg_inds) > 0:
        label_weights[neg_inds] = 1.0

    def unmap(data, fill=0):
        ret = data.new_full((flat_anchors.size(0),) + data.size()[1:], fill)
        ret[inside_flags.type(torch.bool)] = data
        return ret

    assigned = unmap(assigned_gt_inds) - 1  # vtrain's convention: -1 negative or off the image
    return (unmap(labels, fill=num_classes), unmap(label_weights), unmap(bbox_targets), pos_inds, assigned)


def mm_atss_loss(head, features, gt_bboxes, gt_labels, img_shapes, num_classes):
    """ATSSHead.forward + loss (one process: reduce_mean is the identity); labels 0..K-1 (mmdet's)."""
    outs = [mm_forward_single(head, x, level) for level, x in enumerate(features)]
    cls_scores, bbox_preds, centernesses = zip(*outs)
    featmap_sizes = [f.shape[-2:] for f in cls_scores]
    anchors_levels = mm_grid_anchors(featmap_sizes)
    num_level_anchors = [a.size(0) for a in anchors_levels]
    flat_anchors = torch.cat(anchors_levels)
    targets = []
    for gt, labels, (h, w) in zip(gt_bboxes, gt_labels, img_shapes):
        pad_shape = (int(np.ceil(h / 32)) * 32, int(np.ceil(w / 32)) * 32)  # Pad(size_divisor=32)
        valid = torch.cat(mm_valid_flags(featmap_sizes, pad_shape))
        targets.append(mm_get_target_single(flat_anchors, valid, num_level_anchors, gt, labels, num_classes))
    labels, label_weights, bbox_targets, pos_inds_list, assigned = zip(*targets)
    num_total_samples = max(float(sum(max(inds.numel(), 1) for inds in pos_inds_list)), 1.0)

    def to_levels(per_image):
        return torch.stack(per_image).split(num_level_anchors, dim=1)

    losses_cls, losses_bbox, losses_centerness, bbox_avg_factor = [], [], [], 0.0
    for level, (anchors, labels_l, weights_l, targets_l) in enumerate(zip(
            anchors_levels, to_levels(labels), to_levels(label_weights), to_levels(bbox_targets))):
        cls_score = cls_scores[level].permute(0, 2, 3, 1).reshape(-1, num_classes).contiguous()
        bbox_pred = bbox_preds[level].permute(0, 2, 3, 1).reshape(-1, 4)
        centerness = centernesses[level].permute(0, 2, 3, 1).reshape(-1)
        anchors = anchors.expand(len(gt_bboxes), -1, -1).reshape(-1, 4)
        labels_l, weights_l, targets_l = labels_l.reshape(-1), weights_l.reshape(-1), targets_l.reshape(-1, 4)
        one_hot = F.one_hot(labels_l, num_classes=num_classes + 1)[:, :num_classes]
        losses_cls.append(mm_py_sigmoid_focal_loss(cls_score, one_hot, weights_l, avg_factor=num_total_samples))
        pos_inds = ((labels_l >= 0) & (labels_l < num_classes)).nonzero().squeeze(1)
        if len(pos_inds) > 0:
            pos_anchors, pos_targets = anchors[pos_inds], targets_l[pos_inds]
            centerness_targets = mm_centerness_target(pos_anchors, pos_targets)
            pos_decode_bbox_pred = mm_delta2bbox(pos_anchors, bbox_pred[pos_inds])
            pos_decode_bbox_targets = mm_delta2bbox(pos_anchors, pos_targets)
            giou = mm_bbox_overlaps(pos_decode_bbox_pred, pos_decode_bbox_targets, mode="giou", is_aligned=True)
            losses_bbox.append(2.0 * ((1 - giou) * centerness_targets).sum() / 1.0)
            losses_centerness.append(F.binary_cross_entropy_with_logits(
                centerness[pos_inds], centerness_targets, reduction="none").sum() / num_total_samples)
            bbox_avg_factor += centerness_targets.sum().item()
        else:
            losses_bbox.append(bbox_pred.sum() * 0)
            losses_centerness.append(centerness.sum() * 0)
    bbox_avg_factor = 1 if bbox_avg_factor < 1e-12 else bbox_avg_factor
    losses = {"loss_cls": sum(losses_cls), "loss_bbox": sum(x / bbox_avg_factor for x in losses_bbox),
              "loss_centerness": sum(losses_centerness)}
    return losses, torch.stack(assigned), outs


def mm_get_bboxes(outs, img_shape, nms_pre=1000, score_thr=0.05, iou_threshold=0.6, max_per_img=100):
    """ATSSHead._get_bboxes (mmdet 2.11) for one image + multiclass_nms (score_factors = centerness)."""
    cls_scores, bbox_preds, centernesses = zip(*outs)
    anchors_levels = mm_grid_anchors([c.shape[-2:] for c in cls_scores])
    mlvl_bboxes, mlvl_scores, mlvl_centerness = [], [], []
    for cls_score, bbox_pred, centerness, anchors in zip(cls_scores, bbox_preds, centernesses, anchors_levels):
        num_classes = cls_score.shape[1]
        scores = cls_score[0].permute(1, 2, 0).reshape(-1, num_classes).sigmoid()
        centerness = centerness[0].permute(1, 2, 0).reshape(-1).sigmoid()
        bbox_pred = bbox_pred[0].permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < scores.shape[0]:
            max_scores, _ = (scores * centerness[:, None]).max(dim=1)
            _, topk_inds = max_scores.topk(nms_pre)
            anchors, bbox_pred = anchors[topk_inds, :], bbox_pred[topk_inds, :]
            scores, centerness = scores[topk_inds, :], centerness[topk_inds]
        mlvl_bboxes.append(mm_delta2bbox(anchors, bbox_pred, max_shape=img_shape))
        mlvl_scores.append(scores)
        mlvl_centerness.append(centerness)
    bboxes, scores, factors = torch.cat(mlvl_bboxes), torch.cat(mlvl_scores), torch.cat(mlvl_centerness)
    num_classes = scores.size(1)  # multiclass_nms, the background column left out
    bboxes = bboxes[:, None].expand(scores.size(0), num_classes, 4).reshape(-1, 4)
    labels = torch.arange(num_classes, dtype=torch.long).view(1, -1).expand_as(scores).reshape(-1)
    factors = factors.view(-1, 1).expand(scores.size(0), num_classes).reshape(-1)
    scores = scores.reshape(-1)
    valid_mask = scores > score_thr
    scores = scores * factors
    inds = valid_mask.nonzero(as_tuple=False).squeeze(1)
    bboxes, scores, labels = bboxes[inds], scores[inds], labels[inds]
    keep = batched_nms(bboxes, scores, labels, iou_threshold)[:max_per_img]  # mmcv's batched_nms: the same rule
    return bboxes[keep], scores[keep], labels[keep]


# --------------------------------------------------------------------------------------------------- the tests
def _grid_anchors(grid_sizes, sizes):
    """Square anchors of side ``sizes[l]`` centred at multiples of each level's stride (torchvision's / mmdet's)."""
    generator = PyramidAnchorGenerator([[s] for s in sizes], [[1.0]] * len(sizes), STRIDES[:len(sizes)])
    features = [torch.zeros(1, 1, h, w) for h, w in grid_sizes]
    return generator(ImageList(torch.zeros(1, 3, 1, 1), [(1, 1)]), features)[0]


def test_the_assignment_is_mmdets_on_its_edge_cases():
    """Three levels of 6x6, 3x3 and 2x2 anchors (4 < topk on the last: every one is a candidate); two overlapping
    boxes that share positives (each goes to the box it overlaps more); a small box between the anchor centres
    (no candidate's centre inside: no positive)."""
    anchors = _grid_anchors([(6, 6), (3, 3), (2, 2)], [24, 48, 96])
    gt = torch.tensor([[2.0, 3.0, 30.0, 35.0], [6.0, 1.0, 38.0, 29.0], [17.5, 33.0, 22.5, 38.0],
                       [20.0, 2.0, 47.0, 21.0]])
    reference, seen = mm_atss_assign(anchors, [36, 9, 4], gt)
    # the edge cases are reached: shared positives, a box with none
    assert (seen["positives_per_anchor"] >= 2).any()
    assert not (reference == 3).any() and seen["is_pos"][:, 2].sum() == 0
    matched = ATSSAssigner(topk=9)(anchors, [36, 9, 4], gt)
    assert torch.equal(matched, reference - 1)
    shared = seen["positives_per_anchor"] >= 2
    ious = mm_bbox_overlaps(anchors, gt)
    positive = torch.zeros_like(ious, dtype=torch.bool)  # the boxes each shared anchor is a positive of
    for gt_index in range(len(gt)):
        positive[:, gt_index] = ATSSAssigner(topk=9)(anchors, [36, 9, 4], gt[gt_index:gt_index + 1]) == 0
    best = torch.where(positive, ious, torch.full_like(ious, -1.0)).argmax(1)
    assert torch.equal(matched[shared], best[shared])
    assert torch.equal(ATSSAssigner()(anchors, [36, 9, 4], gt[:0]), torch.full((49,), -1))


def test_the_assignment_is_mmdets_at_its_thresholds():
    """Four anchors of side 96 centred at (0|8, 0|8) (fewer than topk: all candidates). A box inside all four: equal
    IoUs, a standard deviation of 0, all four positive (mmdet's ``>=``). A box whose top-left corner is 0.005 pixel
    up-left of the last anchor's centre: not inside by 0.01, no positive; 0.1 pixel: that anchor is its positive."""
    anchors = _grid_anchors([(2, 2)], [96])
    for gt, expected in (([[-10.0, -10.0, 42.0, 42.0]], [0, 0, 0, 0]), ([[7.995, 7.995, 60.0, 60.0]], [-1] * 4),
                         ([[7.9, 7.9, 60.0, 60.0]], [-1, -1, -1, 0])):
        gt = torch.tensor(gt)
        reference, _ = mm_atss_assign(anchors, [4], gt)
        assert torch.equal(ATSSAssigner()(anchors, [4], gt), reference - 1)
        assert (reference - 1).tolist() == expected


def test_the_box_decoding_is_mmdets():
    """``DeltaXYWHCoder`` = mmdet's ``delta2bbox`` (stds 0.1, 0.1, 0.2, 0.2), the log-size deltas clamped at
    |log(16 / 1000)| both ways (torchvision's ``BoxCoder`` clamps them from above only)."""
    anchors = torch.tensor([[0.0, 0.0, 64.0, 64.0], [-32.0, 16.0, 96.0, 48.0], [8.0, 8.0, 24.0, 40.0]])
    deltas = torch.tensor([[0.5, -0.3, 1.0, -2.0], [3.0, 1.0, -30.0, 25.0], [-1.0, 0.0, 40.0, -40.0]])
    torch.testing.assert_close(DeltaXYWHCoder().decode_single(deltas, anchors), mm_delta2bbox(anchors, deltas),
                               rtol=1e-6, atol=1e-5)


class _Pyramid(nn.Module):
    """Fixed P3-P7 maps in place of a backbone + FPN (the detector calls it on the padded batch)."""

    def __init__(self, maps):
        super().__init__()
        self.maps, self.out_channels, self.fpn = maps, maps[0].shape[1], nn.Sequential()

    def forward(self, images):
        return OrderedDict((str(i), m) for i, m in enumerate(self.maps))


def padded_batch():
    """A 96x128 image and a 64x80 one (padded to 64x96 alone), 3 and 2 boxes of 2 categories."""
    images = [torch.zeros(3, 96, 128), torch.zeros(3, 64, 80)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 70.0, 80.0], [30.0, 20.0, 90.0, 75.0], [100.0, 5.0, 126.0, 40.0]]),
                "labels": torch.tensor([1, 2, 2])},
               {"boxes": torch.tensor([[4.0, 6.0, 60.0, 58.0], [40.0, 30.0, 78.0, 62.0]]),
                "labels": torch.tensor([2, 1])}]
    return images, targets


@pytest.fixture(scope="module")
def detector_and_batch():
    """A 64-channel ATSS on fixed maps of a 96x128 batch: a 96x128 image and a 64x80 one (padded to 64x96 alone,
    so that the batch's padding holds anchors mmdet leaves out), 3 and 2 boxes of 2 categories."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 64, (96 + s - 1) // s, (128 + s - 1) // s, generator=g) for s in STRIDES]
    generator = PyramidAnchorGenerator([[8 * s] for s in STRIDES], [[1.0]] * 5, STRIDES)
    detector = ATSS(_Pyramid(maps), num_classes=3, anchor_generator=generator, min_size=96, max_size=128,
                    image_mean=[0.0] * 3, image_std=[1.0] * 3, _skip_resize=True)
    torch.manual_seed(0)
    for p in detector.head.parameters():  # away from the initialisation, so that every term is exercised
        nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        detector.head.scales.copy_(torch.tensor([1.0, 0.8, 1.2, 0.9, 1.1]))
        detector.head.cls_logits.bias.fill_(-2.9)  # probabilities on both sides of the test's 0.05
    return detector, *padded_batch(), maps


def test_every_loss_term_and_the_assignment_are_mmdets(detector_and_batch):
    detector, images, targets, maps = detector_and_batch
    detector.train()
    losses = detector(images, targets)
    reference, assigned, _ = mm_atss_loss(detector.head, maps, [t["boxes"] for t in targets],
                                          [t["labels"] - 1 for t in targets], [(96, 128), (64, 80)], num_classes=2)
    assert set(losses) == set(reference) == {"loss_cls", "loss_bbox", "loss_centerness"}
    for name in reference:
        torch.testing.assert_close(losses[name], reference[name], rtol=0, atol=1e-6, msg=name)
    anchors = torch.cat(mm_grid_anchors([m.shape[-2:] for m in maps]))
    valid = torch.stack([detector.anchor_generator.valid_flags(s, [m.shape[-2:] for m in maps], 32)
                         for s in ((96, 128), (64, 80))])
    ours = torch.stack([detector.assign(anchors, v, [m.shape[-2:] for m in maps], t["boxes"])
                        for v, t in zip(valid, targets)])
    assert torch.equal(ours, assigned) and (assigned >= 0).sum() > 5
    assert not valid[1].all()  # the second image's batch padding is left out
    loss = sum(losses.values())
    loss.backward()
    assert all(p.grad is not None for p in detector.head.parameters())


def test_the_losses_of_a_batch_with_an_image_without_boxes_are_mmdets(detector_and_batch):
    """The second image has no box: it counts as one positive in mmdet's normaliser (``max(num_pos, 1)`` per image)
    and all its valid anchors are negatives."""
    detector, images, targets, maps = detector_and_batch
    detector.train()
    targets = [targets[0], {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = detector(images, targets)
    reference, _, _ = mm_atss_loss(detector.head, maps, [t["boxes"] for t in targets],
                                   [t["labels"] - 1 for t in targets], [(96, 128), (64, 80)], num_classes=2)
    for name in reference:
        torch.testing.assert_close(losses[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_the_detections_are_mmdets(detector_and_batch):
    """mmdet's test_cfg on the first image (score_thr 0.05, class-wise NMS 0.6, max 100), with nms_pre 20 per level
    instead of 1000 so that the pre-selection by class probability x centerness binds on these small maps; the
    duplicate-removal part (``task/detector/nms``) applies to ATSS as to the other one-stage detectors."""
    detector, images, _, maps = detector_and_batch
    detector.eval()
    one = [m[:1] for m in maps]
    detector.backbone.maps, detector.topk_candidates = one, 20
    try:
        with torch.no_grad():
            ours = detector(images[:1])[0]
            outs = [mm_forward_single(detector.head, x, level) for level, x in enumerate(one)]
            boxes, scores, labels = mm_get_bboxes(outs, (96, 128), nms_pre=20)
            detector.duplicate_removal = HardNMS(0.6)  # task/detector/nms=nms at ATSS's own threshold: the same
            through_the_part = detector(images[:1])[0]
    finally:
        detector.backbone.maps, detector.topk_candidates, detector.duplicate_removal = maps, 1000, HardNMS()
    for key in ("boxes", "scores", "labels"):
        assert torch.equal(through_the_part[key], ours[key])
    assert 0 < len(scores) <= 100
    torch.testing.assert_close(ours["boxes"], boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["scores"], scores, rtol=0, atol=1e-6)
    assert torch.equal(ours["labels"], labels + 1)


def test_parts_that_do_not_fit_are_one_line():
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from vtrain.config import ConfigError
    from vtrain.tasks.detection.atss import ATSSHead

    with pytest.raises(ConfigError, match=r"^task.detector.neck.out_channels=48: .* use a multiple of 32$"):
        ATSSHead(48, 2)
    with pytest.raises(ConfigError, match=r"^task.detector.model.anchor_generator: .* AnchorGenerator has none: use "):
        ATSS(_Pyramid([torch.zeros(1, 32, 1, 1)]), 3, AnchorGenerator(((64,),), ((1.0,),)))
    with pytest.raises(ConfigError, match=r"strides: 1 strides for 2 levels of sizes: give one stride per level$"):
        PyramidAnchorGenerator([[64], [128]], [[1.0], [1.0]], [8])


@pytest.mark.parametrize("backbone, measured, paper", [("resnet50", 32_295_322, 32), ("swin_t", 35_734_356, 36)])
def test_sizes_are_the_swin_papers(backbone, measured, paper):
    """Swin Table 2(a) (arXiv v2): ATSS with R-50 32M, Swin-T 36M parameters (80 COCO categories); mmdet's
    Swin-T has 192 more (the C2 output norm its out_indices=(0, 1, 2, 3) builds, which start_level=1 never reads)."""
    cfg = compose("task=detection", "task/detector=atss", f"backbone={backbone}")
    with torch.device("meta"):
        task = DetectionTask(cfg.task.backbone, OPTIM, SCHED, num_classes=80, detector=cfg.task.detector)
    assert count_params(task) == measured and round(measured / 1e6) == paper


def test_the_swin_recipe_trains_two_steps_of_a_tiny_atss():
    """swin_t_atss_coco_3x's task and optimiser (AdamW 1e-4 at 16 images, its weight-decay rule) on a tiny Swin and
    a 64-wide head: every parameter gets a gradient; two steps on one batch move the backbone, the pyramid and the
    head, and lower the loss."""
    from vtrain.training.build import build_task
    from vtrain.training.optim import build_optimizer

    cfg = compose("experiment=swin_t_atss_coco_3x", "pretrained=null", "backbone.img_size=64", "backbone.embed_dim=32",
                  "backbone.depths=[1,1,2,1]", "backbone.num_heads=[1,2,4,8]", "backbone.window_size=4",
                  "backbone.drop_path_rate=0.0", "task.detector.neck.out_channels=64", "data.num_classes=2",
                  "task.test_size=64", "task.test_max_size=96")
    torch.manual_seed(0)
    task = build_task(cfg).train()
    optimizer = build_optimizer(task, cfg.optim, total_batch_size=16)
    images = [torch.rand(3, 64, 80), torch.rand(3, 72, 64)]
    targets = [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 36.0], [44.0, 20.0, 76.0, 60.0]]), "labels": torch.tensor([1, 2])},
               {"boxes": torch.tensor([[10.0, 30.0, 50.0, 70.0]]), "labels": torch.tensor([2])}]
    watched = ("backbone.layers.0.blocks.0.attn.qkv.weight", "detector.backbone.fpn.extra_blocks.p7.weight",
               "detector.head.cls_logits.bias", "detector.head.scales")
    before = {n: p.detach().clone() for n, p in task.named_parameters() if n in watched}
    losses = []
    for _ in range(2):
        loss = sum(task(images, targets).values())
        optimizer.zero_grad()
        loss.backward()
        # DDP's condition: every trainable parameter reached (the Swin is built with C3-C5 only)
        assert all(p.grad is not None for p in task.parameters() if p.requires_grad)
        optimizer.step()
        losses.append(loss.item())
    after = dict(task.named_parameters())
    assert len(before) == len(watched) and all(not torch.equal(before[n], after[n]) for n in watched)
    with torch.no_grad():
        final = sum(task(images, targets).values()).item()
    assert final < losses[0]
