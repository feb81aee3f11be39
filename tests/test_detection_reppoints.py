"""RepPoints (RepPointsV2's regression core) against the official code (Scalsol/RepPointsV2,
``mmdet/models/dense_heads/reppoints_v2_head.py``, ``mmdet/core/bbox/assigners/point_assigner_v2.py``): the point ->
box transforms on hand cases, the init assignment against a brute-force restatement of its rule, and the deformable
convolutions' sampling layout (the official ``dcn_base_offset``) against plain convolutions."""
from functools import partial
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import compose
from test_detection_atss import OPTIM, SCHED, STRIDES, _Pyramid, mm_atss_assign, mm_bbox_overlaps
from test_detection_atss import mm_py_sigmoid_focal_loss, mm_valid_flags, padded_batch
from torch import nn
from torchvision.ops import batched_nms, deform_conv2d

from vtrain.profiling import count_params
from vtrain.tasks.detection.bifpn import BiFPN
from vtrain.tasks.detection.module import DetectionTask
from vtrain.tasks.detection.one_stage import RepPointsV2
from vtrain.tasks.detection.reppoints import PointAssignerV2, RepPointsHead, dcn_base_offset, points_to_box

pytestmark = pytest.mark.usefixtures("one_thread")
INF = 100000000.0


def test_points_to_box_on_hand_cases():
    # three points as (y, x): (2, 1), (6, 5), (4, 9)
    yx = torch.tensor([[2.0, 1.0, 6.0, 5.0, 4.0, 9.0]])
    xy = torch.tensor([[1.0, 2.0, 5.0, 6.0, 9.0, 4.0]])
    for points, y_first in ((yx, True), (xy, False)):
        # exact_minmax: the first point is the top-left corner, the second the bottom-right
        assert points_to_box(points, "exact_minmax", y_first).tolist() == [[1.0, 2.0, 5.0, 6.0]]
        assert points_to_box(points, "minmax", y_first).tolist() == [[1.0, 2.0, 9.0, 6.0]]
    # moment: mean +- exp(transfer) x unbiased std; x = 1, 5, 9 (mean 5, std 4), y = 2, 6, 4 (mean 4, std 2)
    transfer = torch.tensor([0.0, float(torch.log(torch.tensor(2.0)))], requires_grad=True)
    box = points_to_box(yx, "moment", True, transfer, moment_mul=0.01)
    torch.testing.assert_close(box, torch.tensor([[1.0, 0.0, 9.0, 8.0]]))
    box[0, 3].backward()  # d(y2)/d(transfer_h) = std x exp(t) = 4, scaled by moment_mul
    torch.testing.assert_close(transfer.grad, torch.tensor([0.0, 0.04]))


def brute_force_point_assignment(points, strides, gt_boxes, scale=4.0, pos_num=1):
    """The rule of PointAssignerV2 one box and one point at a time, in Python floats."""
    levels = [int(torch.log2(s)) for s in strides]
    candidates = {}  # point -> [(distance, box)]
    for g, (x1, y1, x2, y2) in enumerate(gt_boxes.tolist()):
        w, h = max(x2 - x1, 1e-6), max(y2 - y1, 1e-6)
        level = min(max(int((torch.log2(torch.tensor(w / scale)) + torch.log2(torch.tensor(h / scale))) / 2),
                        min(levels)), max(levels))
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        ranked = sorted(((((px - cx) / w) ** 2 + ((py - cy) / h) ** 2) ** 0.5, i)
                        for i, ((px, py), lv) in enumerate(zip(points.tolist(), levels)) if lv == level)
        for distance, i in ranked[:pos_num]:
            candidates.setdefault(i, []).append((distance, g))
    matched = [-1] * len(points)
    for i, options in candidates.items():
        matched[i] = min(options, key=lambda o: (o[0], o[1]))[1]
    return matched


def test_the_init_assignment_is_the_official_rule():
    strides, points = [], []
    for stride, size in ((8, 12), (16, 6), (32, 3)):
        ys, xs = torch.meshgrid(torch.arange(size) * stride, torch.arange(size) * stride, indexing="ij")
        points.append(torch.stack([xs.flatten(), ys.flatten()], 1).float())
        strides.append(torch.full((size * size,), float(stride)))
    points, strides = torch.cat(points), torch.cat(strides)
    # boxes on level 3, a tiny one (clamped to level 3), a large one (level 4), two whose nearest point is the same
    # (40, 32); no two distances tie (the official topk breaks ties in no stated order)
    gt = torch.tensor([[10.0, 10.0, 40.0, 42.0], [50.0, 60.0, 52.0, 61.0], [0.0, 0.0, 90.0, 95.0],
                       [21.0, 19.0, 53.0, 52.0], [23.0, 21.0, 50.0, 50.0], [60.0, 20.0, 80.0, 70.0]])
    for pos_num in (1, 3):
        ours = PointAssignerV2(scale=4, pos_num=pos_num)(points, strides, gt)
        assert ours.tolist() == brute_force_point_assignment(points, strides, gt, pos_num=pos_num)
    ours = PointAssignerV2()(points, strides, gt).tolist()
    assert ours.count(3) + ours.count(4) == 1 and len(set(ours)) == 6  # the shared point went to one of the two
    assert PointAssignerV2()(points, strides, gt[:0]).eq(-1).all()


def test_the_regular_grid_of_points_is_a_plain_convolution():
    """Points on the official ``dcn_base_offset`` grid sample as a plain 3x3 conv; the same points one row lower
    sample the map one row lower: the offsets are (dy, dx) per kernel position, row by row."""
    assert dcn_base_offset(3).view(-1, 2).tolist() == [[-1, -1], [-1, 0], [-1, 1], [0, -1], [0, 0], [0, 1],
                                                      [1, -1], [1, 0], [1, 1]]
    torch.manual_seed(0)
    head = RepPointsHead(8, 3, feat_channels=32, point_feat_channels=16, stacked_convs=1, num_groups=8)
    x = torch.randn(1, 8, 7, 9)
    feat = head.cls_convs[0](x)
    conv = head.reppoints_cls_conv
    grid = dcn_base_offset(3).view(1, -1, 1, 1).expand(1, 18, 7, 9)
    torch.testing.assert_close(head.deform(conv, feat, grid - head.dcn_base_offset), F.conv2d(feat, conv.weight,
                                                                                             padding=1))
    lower = grid + torch.tensor([1.0, 0.0]).repeat(9).view(1, -1, 1, 1)
    shifted = F.conv2d(F.pad(feat, (1, 1, 0, 2)), conv.weight)  # output row r reads rows r .. r + 2, zero below
    torch.testing.assert_close(head.deform(conv, feat, lower - head.dcn_base_offset), shifted)
    # through the head: init points forced onto the grid make the classifier a plain conv on the tower
    with torch.no_grad():
        head.reppoints_pts_init_out.weight.zero_()
        head.reppoints_pts_init_out.bias.copy_(dcn_base_offset(3))
    cls_out, pts_init, _ = head.forward_single(x)
    torch.testing.assert_close(pts_init, grid)
    torch.testing.assert_close(cls_out, head.reppoints_cls_out(F.relu(F.conv2d(feat, conv.weight, padding=1))))


# ------------------------------------------------------- the official RepPointsV2Head, re-stated in its own layout
def official_forward_single(head, x):
    """RepPointsV2Head.forward_single (center_init, no grid points), on the head's modules."""
    dcn_base_offset = head.dcn_base_offset.type_as(x)
    cls_feat, pts_feat = x, x
    for cls_conv in head.cls_convs:
        cls_feat = cls_conv(cls_feat)
    for reg_conv in head.reg_convs:
        pts_feat = reg_conv(pts_feat)
    shared_feat = pts_feat
    for shared_conv in head.shared_convs:
        shared_feat = shared_conv(shared_feat)
    sem_feat, hem_feat = shared_feat, shared_feat
    sem_scores_out = head.reppoints_sem_out(sem_feat)
    sem_feat = head.reppoints_sem_embedding(sem_feat)
    cls_feat, pts_feat, hem_feat = cls_feat + sem_feat, pts_feat + sem_feat, hem_feat + sem_feat
    hem_tl_feat, hem_br_feat = official_corner_pool_pack(head.hem_tl, hem_feat, "top", "left"), \
        official_corner_pool_pack(head.hem_br, hem_feat, "bottom", "right")
    hem_score_out = torch.cat([head.reppoints_hem_tl_score_out(hem_tl_feat),
                               head.reppoints_hem_br_score_out(hem_br_feat)], dim=1)
    hem_offset_out = torch.cat([head.reppoints_hem_tl_offset_out(hem_tl_feat),
                                head.reppoints_hem_br_offset_out(hem_br_feat)], dim=1)
    pts_out_init = head.reppoints_pts_init_out(F.relu(head.reppoints_pts_init_conv(pts_feat)))
    pts_out_init_grad_mul = (1 - head.gradient_mul) * pts_out_init.detach() + head.gradient_mul * pts_out_init
    dcn_offset = pts_out_init_grad_mul - dcn_base_offset
    hem_feat = torch.cat([hem_score_out, hem_offset_out], dim=1)
    cls_feat, pts_feat = torch.cat([cls_feat, hem_feat], dim=1), torch.cat([pts_feat, hem_feat], dim=1)
    dcn = partial(deform_conv2d, offset=dcn_offset, padding=(1, 1))  # mmcv's DeformConv(k=3, pad=1), no bias
    cls_out = head.reppoints_cls_out(F.relu(dcn(cls_feat, weight=head.reppoints_cls_conv.weight)))
    pts_out_refine = head.reppoints_pts_refine_out(F.relu(dcn(pts_feat, weight=head.reppoints_pts_refine_conv.weight)))
    return cls_out, pts_out_init, pts_out_refine + pts_out_init.detach(), hem_score_out, hem_offset_out, sem_scores_out


def official_corner_pool_pack(pack, x, mode1, mode2):
    """CornerPoolPack.forward with CornerPool's cummax (torch >= 1.5)."""
    def pool(t, mode):
        dim, flip = {"bottom": (2, False), "left": (3, True), "right": (3, False), "top": (2, True)}[mode]
        t = t.flip(dim) if flip else t
        out, _ = torch.cummax(t, dim=dim)
        return out.flip(dim) if flip else out
    p_conv1 = pack.p_conv1(pool(pack.p1_conv1(x), mode1) + pool(pack.p2_conv1(x), mode2))
    return pack.conv2(F.relu(pack.p_gn1(p_conv1) + pack.gn1(pack.conv1(x))))


def official_points(featmap_sizes):
    """PointGenerator.grid_points per level: (x, y, stride)."""
    points = []
    for (feat_h, feat_w), stride in zip(featmap_sizes, STRIDES):
        shift_xx = (torch.arange(0, feat_w) * stride).repeat(feat_h)
        shift_yy = (torch.arange(0, feat_h) * stride).view(-1, 1).repeat(1, feat_w).view(-1)
        points.append(torch.stack([shift_xx, shift_yy, torch.full_like(shift_xx, stride)], -1).float())
    return points


def official_point_assigner_v2(points, gt_bboxes, scale=4, pos_num=1):
    """PointAssignerV2.assign: 0 negative, i + 1 the i-th gt."""
    points_xy, points_lvl = points[:, :2], torch.log2(points[:, 2]).int()
    gt_bboxes_xy = (gt_bboxes[:, :2] + gt_bboxes[:, 2:]) / 2
    gt_bboxes_wh = (gt_bboxes[:, 2:] - gt_bboxes[:, :2]).clamp(min=1e-6)
    gt_bboxes_lvl = ((torch.log2(gt_bboxes_wh[:, 0] / scale) + torch.log2(gt_bboxes_wh[:, 1] / scale)) / 2).int()
    gt_bboxes_lvl = torch.clamp(gt_bboxes_lvl, min=points_lvl.min(), max=points_lvl.max())
    distances = ((points_xy[:, None, :] - gt_bboxes_xy[None, :, :]) / gt_bboxes_wh[None, :, :]).norm(dim=2)
    distances[points_lvl[:, None] != gt_bboxes_lvl[None, :]] = INF
    assigned_gt_inds = points.new_zeros((points.shape[0],), dtype=torch.long)
    min_dist, min_dist_index = torch.topk(distances, pos_num, dim=0, largest=False)
    distances_inf = torch.full_like(distances, INF)
    distances_inf[min_dist_index, torch.arange(len(gt_bboxes))] = min_dist
    min_dist, min_dist_index = distances_inf.min(dim=1)
    assigned_gt_inds[min_dist != INF] = min_dist_index[min_dist != INF] + 1
    return assigned_gt_inds


def official_gaussian_radius(det_size, min_overlap):
    height, width = det_size
    b1, c1 = (height + width), width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2, c2 = 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 - torch.sqrt(b2 ** 2 - 4 * 4 * c2)) / (2 * 4)
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / (2 * a3)
    return torch.min(torch.stack([r1, r2, r3], dim=1), dim=1)[0]


def official_point_hm_assign(points, gt_bboxes, gaussian_iou=0.7):
    """PointHMAssigner.assign (gaussian_bump=True): (hm, offset) of the top-left, then of the bottom-right."""
    points_range, points_xy = torch.arange(points.shape[0]), points[:, :2]
    points_lvl = torch.log2(points[:, 2]).int()
    radius = official_gaussian_radius((gt_bboxes[:, 3] - gt_bboxes[:, 1], gt_bboxes[:, 2] - gt_bboxes[:, 0]),
                                      gaussian_iou)
    sigma = (2 * radius + 1) / 6
    out = []
    for corner in (gt_bboxes[:, :2], gt_bboxes[:, 2:]):
        distances = (points_xy[:, None, :] - corner[None, :, :]).norm(dim=2)
        hm, offset = points.new_zeros(len(points)), points.new_zeros((len(points), 2))
        for gt_lvl in torch.arange(points_lvl.min(), points_lvl.max() + 1, dtype=points_lvl.dtype):
            lvl_idx = gt_lvl == points_lvl
            points_index, lvl_points, lvl_distances = points_range[lvl_idx], points_xy[lvl_idx], distances[lvl_idx]
            _, min_dist_index = lvl_distances.min(dim=0)
            offset[points_index[min_dist_index], :] = (corner - lvl_points[min_dist_index, :]) / torch.pow(2, gt_lvl)
            gaussian = torch.exp(-torch.pow(lvl_distances, 2) / (2 * sigma * sigma)[None, :])
            gaussian[lvl_distances >= radius[None, :]] = -INF
            max_gaussian, _ = gaussian.max(dim=1)
            hm[points_index[max_gaussian != -INF]] = max_gaussian[max_gaussian != -INF]
            hm[points_index[min_dist_index]] = 1
        out += [hm, offset]
    return out


def official_points2bbox(pts, y_first=True):
    """points2bbox, transform_method='exact_minmax'."""
    pts_reshape = pts.view(pts.shape[0], -1, 2, *pts.shape[2:])[:, :2, ...]
    pts_y = pts_reshape[:, :, 0, ...] if y_first else pts_reshape[:, :, 1, ...]
    pts_x = pts_reshape[:, :, 1, ...] if y_first else pts_reshape[:, :, 0, ...]
    return torch.cat([pts_x[:, 0:1, ...], pts_y[:, 0:1, ...], pts_x[:, 1:2, ...], pts_y[:, 1:2, ...]], dim=1)


def official_sem_map(gt_bboxes, gt_labels, pad_shape, num_classes):
    """LoadRPDV2Annotations._load_semantic_map_from_box, in numpy."""
    gt_bboxes, gt_labels = gt_bboxes.numpy(), gt_labels.numpy()
    gt_areas = (gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])
    shape = (num_classes, int(pad_shape[0] / 8), int(pad_shape[1] / 8))
    gt_sem_map, gt_sem_weights = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
    for ind in np.argsort(gt_areas)[::-1]:
        box = gt_bboxes[ind]
        box_mask = np.zeros(shape[1:], dtype=np.int64)
        box_mask[int(box[1] / 8):int(box[3] / 8) + 1, int(box[0] / 8):int(box[2] / 8) + 1] = 1
        gt_sem_map[gt_labels[ind]][box_mask > 0] = 1
        gt_sem_weights[gt_labels[ind]][box_mask > 0] = 1 / gt_areas[ind]
    return torch.from_numpy(gt_sem_map), torch.from_numpy(gt_sem_weights)


def official_quality_focal_loss(pred, label, score, weight, background_label, beta=2.0):
    """The Swin repository's quality_focal_loss (RPDQualityFocalLoss), weighted per row, summed."""
    pred_sigmoid = pred.sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, pred.new_zeros(pred.shape), reduction="none") \
        * pred_sigmoid.pow(beta)
    pos = (label != background_label).nonzero().squeeze(1)
    pos_label = label[pos].long()
    if len(pos):
        scale_factor = score[pos] - pred_sigmoid[pos, pos_label]
        loss[pos, pos_label] = F.binary_cross_entropy_with_logits(pred[pos, pos_label], score[pos], reduction="none") \
            * scale_factor.abs().pow(beta)
    return (loss.sum(dim=1) * weight).sum()


def official_giou_loss_oldver(pred, target, eps=1e-6):
    """The Swin repository's giou_loss_oldver (RPDGIoULoss, eps 1e-6), per box."""
    lt, rb = torch.max(pred[:, :2], target[:, :2]), torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt + 1).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    ap = (pred[:, 2] - pred[:, 0] + 1) * (pred[:, 3] - pred[:, 1] + 1)
    ag = (target[:, 2] - target[:, 0] + 1) * (target[:, 3] - target[:, 1] + 1)
    union = ap + ag - overlap + eps
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2]) + 1).clamp(min=0)
    enclose_area = enclose_wh[:, 0] * enclose_wh[:, 1] + eps
    return 1 - (overlap / union - (enclose_area - union) / enclose_area)


def official_loss(head, maps, gt_bboxes, gt_labels, pad_shapes, num_classes, swin=False):
    """RepPointsV2Head.loss with the giou config's losses, summed over levels as mmdet's parse_losses does; with
    ``swin``, the Swin repository's RPDQualityFocalLoss and RPDGIoULoss."""
    outs = [official_forward_single(head, x) for x in maps]
    sizes = [m.shape[-2:] for m in maps]
    points = torch.cat(official_points(sizes))
    counts = [h * w for h, w in sizes]
    strides = points[:, 2]
    flags = [torch.cat(mm_valid_flags(sizes, pad)) for pad in pad_shapes]

    def flat(level_maps, image):  # (N, C, H, W) per level -> (A, C) of one image
        return torch.cat([m[image].permute(1, 2, 0).reshape(-1, m.shape[1]) for m in level_maps])

    cls_scores, pts_init, pts_refine, hm_scores, hm_offsets, sem_scores = (list(o) for o in zip(*outs))
    sums = dict(init=0.0, refine=0.0, cls=0.0, hm_tl=0.0, hm_br=0.0, off_tl=0.0, off_br=0.0)
    num = dict(init=0, refine=0, tl=0, br=0)
    terms = []
    for image, (boxes, labels, valid) in enumerate(zip(gt_bboxes, gt_labels, flags)):
        # offset_to_pts: (y, x) pairs in strides -> (x, y) pixels
        def to_pts(pred):
            yx = flat(pred, image)
            xy = torch.stack([yx[..., 1::2], yx[..., 0::2]], -1).view(len(yx), -1)
            return xy * strides[:, None] + points[:, :2].repeat(1, head.num_points)
        init_assigned = torch.zeros(len(points), dtype=torch.long)
        init_assigned[valid] = official_point_assigner_v2(points[valid], boxes)
        init_boxes = official_points2bbox(flat(pts_init, image).detach()) * strides[:, None] \
            + points[:, :2].repeat(1, 2)
        refine_assigned = torch.zeros(len(points), dtype=torch.long)
        level_valid = [int(v.sum()) for v in valid.split(counts)]
        refine_assigned[valid] = mm_atss_assign(init_boxes[valid], level_valid, boxes)[0]
        hm = [torch.zeros(len(points)), torch.zeros(len(points), 2)] * 2
        hm = [t.clone() for t in hm]
        for full, part in zip(hm, official_point_hm_assign(points[valid], boxes)):
            full[valid] = part
        terms.append((to_pts, init_assigned, refine_assigned, hm, valid, boxes, labels))
        num["init"] += max(int((init_assigned > 0).sum()), 1)
        num["refine"] += max(int((refine_assigned > 0).sum()), 1)
        num["tl"] += max(int((hm[0][valid] == 1).sum()), 1)
        num["br"] += max(int((hm[2][valid] == 1).sum()), 1)
    for image, (to_pts, init_assigned, refine_assigned, hm, valid, boxes, labels) in enumerate(terms):
        target = torch.zeros(len(points), num_classes)
        pos = refine_assigned > 0
        target[pos, labels[refine_assigned[pos] - 1]] = 1
        if swin:  # labels: the class, background (num_classes) on the valid negatives, 0 on the padding (unmap)
            label = torch.where(valid, torch.full_like(refine_assigned, num_classes), 0)
            label[pos] = labels[refine_assigned[pos] - 1]
            bbox_pred = official_points2bbox(to_pts(pts_refine), y_first=False)
            bbox_gt = torch.zeros(len(points), 4)
            bbox_gt[pos] = boxes[refine_assigned[pos] - 1]
            score = torch.zeros(len(points))
            iou_pos = (label != num_classes).nonzero().squeeze(1)
            score[iou_pos] = mm_bbox_overlaps(bbox_pred[iou_pos], bbox_gt[iou_pos], is_aligned=True).detach()
            sums["cls"] += official_quality_focal_loss(flat(cls_scores, image), label, score, valid.float(),
                                                       num_classes) / num["refine"]
        else:
            sums["cls"] += mm_py_sigmoid_focal_loss(flat(cls_scores, image), target, valid.float(),
                                                    avg_factor=num["refine"])
        for stage, assigned, pred in (("init", init_assigned, pts_init), ("refine", refine_assigned, pts_refine)):
            pos = assigned > 0
            normalize_term = 4 * strides[pos, None]  # point_base_scale x stride
            bbox_pred = official_points2bbox(to_pts(pred)[pos], y_first=False)
            if swin:
                losses = official_giou_loss_oldver(bbox_pred / normalize_term,
                                                   boxes[assigned[pos] - 1] / normalize_term)
            else:
                losses = 1 - mm_bbox_overlaps(bbox_pred / normalize_term, boxes[assigned[pos] - 1] / normalize_term,
                                              mode="giou", is_aligned=True)
            sums[stage] += losses.sum() / num[stage]
        scores, offsets = flat(hm_scores, image).sigmoid(), flat(hm_offsets, image)
        for corner, (target_hm, target_offset) in enumerate(((hm[0], hm[1]), (hm[2], hm[3]))):
            name = ("tl", "br")[corner]
            pred = scores[:, corner]
            eps = 1e-12
            gfl = -(pred + eps).log() * (1 - pred).pow(2) * target_hm.eq(1) \
                - (1 - pred + eps).log() * pred.pow(2) * (1 - target_hm).pow(4)
            sums["hm_" + name] += (gfl * valid).sum() / num[name]
            pos = (target_hm == 1) & valid
            sums["off_" + name] += F.smooth_l1_loss(offsets[pos, 2 * corner:2 * corner + 2], target_offset[pos],
                                                    beta=1.0 / 9, reduction="sum") / num[name]
    batch = (max(p[0] for p in pad_shapes), max(p[1] for p in pad_shapes))
    sem = [official_sem_map(b, lab, pad, num_classes) for b, lab, pad in zip(gt_bboxes, gt_labels, pad_shapes)]
    sem_map, sem_weights = (torch.stack([F.pad(s[k], (0, batch[1] // 8 - s[k].shape[-1], 0, batch[0] // 8 -
                                                      s[k].shape[-2])) for s in sem]) for k in (0, 1))
    score = torch.cat([s.reshape(-1) for s in sem_scores])
    gt_map = torch.cat([F.interpolate(sem_map, s.shape[-2:]).reshape(-1) for s in sem_scores])
    gt_weight = torch.cat([F.interpolate(sem_weights, s.shape[-2:]).reshape(-1) for s in sem_scores])
    prob = score.sigmoid()
    pos, neg = gt_map.eq(1), gt_map.lt(1)
    pos_loss = -torch.log(prob[pos]) * torch.pow(1 - prob[pos], 2) * gt_weight[pos] * 0.25
    neg_loss = -torch.log(1 - prob[neg]) * torch.pow(prob[neg], 2) * 0.75
    loss_sem = pos_loss.sum() / gt_weight[pos].sum() + neg_loss.sum() / (gt_map > 0).sum()
    return {"loss_cls": sums["cls"], "loss_pts_init": 1.0 * sums["init"], "loss_pts_refine": 2.0 * sums["refine"],
            "loss_heatmap": 0.25 * (sums["hm_tl"] + sums["hm_br"]) / 2,
            "loss_offset": 1.0 * (sums["off_tl"] + sums["off_br"]) / 2, "loss_sem": 0.1 * loss_sem}, outs


@pytest.fixture(scope="module")
def detector_and_batch():
    """A 32-channel RepPointsV2 on fixed maps of a 96x128 batch: a 96x128 image and a 64x80 one (padded to 64x96
    alone, so that the batch's padding holds locations the official code leaves out), 3 and 2 boxes of 2 categories;
    the head's weights drawn away from its initialisation so that every term is exercised."""
    g = torch.Generator().manual_seed(0)
    maps = [torch.randn(2, 32, (96 + s - 1) // s, (128 + s - 1) // s, generator=g) for s in STRIDES]
    detector = RepPointsV2(_Pyramid(maps), num_classes=3, min_size=96, max_size=128, image_mean=[0.0] * 3,
                           image_std=[1.0] * 3, _skip_resize=True,
                           head_options=dict(feat_channels=32, point_feat_channels=16, corner_dim=32))
    torch.manual_seed(0)
    for name, p in detector.head.named_parameters():
        nn.init.normal_(p, mean=1.0 if "gn" in name or name.endswith(".1.weight") else 0.0, std=0.1)
    return detector, *padded_batch(), maps


def test_every_loss_term_is_the_official_heads(detector_and_batch):
    detector, images, targets, maps = detector_and_batch
    detector.train()
    losses = detector(images, targets)
    reference, outs = official_loss(detector.head, maps, [t["boxes"] for t in targets],
                                    [t["labels"] - 1 for t in targets], [(96, 128), (64, 96)], num_classes=2)
    ours = [detector.head.forward_single(x) for x in maps]
    for level_ours, level_reference in zip(ours, outs):
        for a, b in zip(level_ours, level_reference):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert set(losses) == set(reference)
    for name in reference:
        torch.testing.assert_close(losses[name], reference[name], rtol=0, atol=1e-5, msg=name)
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in detector.head.parameters())


def test_the_swin_repositorys_class_and_box_losses(detector_and_batch):
    """RPDQualityFocalLoss (beta 2) and RPDGIoULoss (+1) of the Swin repository's RepPointsV2 config, in place of the
    focal loss and GIoU: its three terms against the head re-stated with them; the other three do not change."""
    detector, images, targets, maps = detector_and_batch
    detector.train()
    with mock.patch.multiple(detector, quality_focal_beta=2.0, giou_plus_one=True):
        losses = detector(images, targets)
    reference, _ = official_loss(detector.head, maps, [t["boxes"] for t in targets],
                                 [t["labels"] - 1 for t in targets], [(96, 128), (64, 96)], num_classes=2, swin=True)
    plain, _ = official_loss(detector.head, maps, [t["boxes"] for t in targets],
                             [t["labels"] - 1 for t in targets], [(96, 128), (64, 96)], num_classes=2)
    for name in reference:
        torch.testing.assert_close(losses[name], reference[name], rtol=0, atol=1e-5, msg=name)
    assert all(not torch.allclose(reference[n], plain[n]) for n in ("loss_cls", "loss_pts_init", "loss_pts_refine"))


def official_get_bboxes_single(head, outs, img_shape, nms_pre=1000, score_thr=0.05, iou_threshold=0.6,
                               max_per_img=100):
    """RepPointsV2Head.get_bboxes / _get_bboxes_single (one image) and mmdet v2.0's multiclass_nms."""
    cls_scores = [o[0][0] for o in outs]
    bbox_preds = [official_points2bbox(o[2])[0] for o in outs]
    hm_scores, hm_offsets = [o[3][0] for o in outs], [o[4][0] for o in outs]
    mlvl_points = official_points([c.shape[-2:] for c in cls_scores])

    def select(score_map, x, y, ks=2, i=0):
        W = score_map.shape[-1]
        score_map = score_map.sigmoid()
        score_map, indices = F.max_pool2d_with_indices(score_map.unsqueeze(0), kernel_size=ks, stride=1,
                                                       padding=(ks - 1) // 2)
        indices = indices.squeeze(0).squeeze(0)
        round_func = torch.floor if ks % 2 == 0 else torch.round
        x_round = round_func((x / STRIDES[i]).clamp(min=0, max=score_map.shape[-1] - 1))
        y_round = round_func((y / STRIDES[i]).clamp(min=0, max=score_map.shape[-2] - 1))
        select_indices = indices[y_round.to(torch.long), x_round.to(torch.long)]
        return (select_indices % W).to(torch.float), (select_indices // W).to(torch.float)

    mlvl_bboxes, mlvl_scores = [], []
    for i_lvl, (cls_score, bbox_pred, points) in enumerate(zip(cls_scores, bbox_preds, mlvl_points)):
        scores = cls_score.permute(1, 2, 0).reshape(-1, cls_score.shape[0]).sigmoid()
        bbox_pred = bbox_pred.permute(1, 2, 0).reshape(-1, 4)
        if 0 < nms_pre < scores.shape[0]:
            _, topk_inds = scores.max(dim=1)[0].topk(nms_pre)
            points, bbox_pred, scores = points[topk_inds, :], bbox_pred[topk_inds, :], scores[topk_inds, :]
        bboxes = bbox_pred * STRIDES[i_lvl] + torch.cat([points[:, :2], points[:, :2]], dim=1)
        x1 = bboxes[:, 0].clamp(min=0, max=img_shape[1])
        y1 = bboxes[:, 1].clamp(min=0, max=img_shape[0])
        x2 = bboxes[:, 2].clamp(min=0, max=img_shape[1])
        y2 = bboxes[:, 3].clamp(min=0, max=img_shape[0])
        if i_lvl > 0:
            i = 0 if i_lvl in (1, 2) else 1
            x1_new, y1_new = select(hm_scores[i][0, ...], x1, y1, 2, i)
            x2_new, y2_new = select(hm_scores[i][1, ...], x2, y2, 2, i)
            hm_offset, point_stride = hm_offsets[i].permute(1, 2, 0), STRIDES[i]
            x1 = ((x1_new + hm_offset[y1_new.long(), x1_new.long(), 0]) * point_stride).clamp(min=0, max=img_shape[1])
            y1 = ((y1_new + hm_offset[y1_new.long(), x1_new.long(), 1]) * point_stride).clamp(min=0, max=img_shape[0])
            x2 = ((x2_new + hm_offset[y2_new.long(), x2_new.long(), 2]) * point_stride).clamp(min=0, max=img_shape[1])
            y2 = ((y2_new + hm_offset[y2_new.long(), x2_new.long(), 3]) * point_stride).clamp(min=0, max=img_shape[0])
        mlvl_bboxes.append(torch.stack([x1, y1, x2, y2], dim=-1))
        mlvl_scores.append(scores)
    bboxes, scores = torch.cat(mlvl_bboxes), torch.cat(mlvl_scores)
    box_index, labels = (scores > score_thr).nonzero(as_tuple=True)
    scores, bboxes = scores[box_index, labels], bboxes[box_index]
    keep = batched_nms(bboxes, scores, labels, iou_threshold)[:max_per_img]
    return bboxes[keep], scores[keep], labels[keep]


def test_the_corner_verified_detections_are_the_official_heads(detector_and_batch):
    """test_cfg on the first image (score_thr 0.05, NMS 0.6, max 100) with nms_pre 20 per level instead of 1000, so
    that the pre-selection binds on these small maps; P4-P7's boxes move to verified corners."""
    detector, images, _, maps = detector_and_batch
    detector.eval()
    detector.topk_candidates = 20
    try:
        with torch.no_grad():
            ours = detector(images)[0]  # the batch (P7 is 1x1: GN needs two images), the first image's detections
            outs = [[o[:1] for o in official_forward_single(detector.head, x)] for x in maps]
            boxes, scores, labels = official_get_bboxes_single(detector.head, outs, (96, 128), nms_pre=20)
            with mock.patch.object(detector, "level_boxes", lambda level, level_boxes, *args: level_boxes):
                unverified = detector(images)[0]  # without the verification: other boxes
    finally:
        detector.topk_candidates = 1000
    assert 5 < len(scores) <= 100
    torch.testing.assert_close(ours["boxes"], boxes, rtol=0, atol=1e-4)
    torch.testing.assert_close(ours["scores"], scores, rtol=0, atol=1e-6)
    assert torch.equal(ours["labels"], labels + 1)
    assert not torch.allclose(unverified["boxes"].sum(0), ours["boxes"].sum(0))


def official_head_params(c=256, p=256, k=80, points=9, corner=64):
    """RepPointsV2Head._init_layers of the official config (GN convs without bias: 2 x channels of affine)."""
    conv_gn = c * c * 9 + 2 * c
    corner_pack = 2 * (c * corner * 9 + 2 * corner) + corner * c * 9 + 2 * c + c * c + 2 * c + c * c + 2 * c
    return (7 * conv_gn + 2 * corner_pack  # cls_convs 3, reg_convs 3, shared_convs 1; hem_tl, hem_br
            + (c + 6) * p * 9 + p * k + k  # reppoints_cls_conv (DeformConv, no bias), reppoints_cls_out
            + c * p * 9 + p + p * 2 * points + 2 * points  # reppoints_pts_init_conv / _out
            + (c + 6) * p * 9 + p * 2 * points + 2 * points  # reppoints_pts_refine_conv / _out
            + 2 * (c * 9 + 1) + 2 * (c * 2 * 9 + 2)  # reppoints_hem_{tl,br}_score_out / _offset_out
            + c * k + k + c * c + 2 * c)  # reppoints_sem_out, reppoints_sem_embedding


@pytest.mark.parametrize("backbone, c3_c5, measured, paper", [("resnet50", (512, 1024, 2048), 38_715_914, 42),
                                                               ("swin_t", (192, 384, 768), 39_205_828, 45)])
def test_sizes_beside_the_swin_papers(backbone, c3_c5, measured, paper):
    """The whole detector (80 categories) is its backbone, the FPN (C3-C5 laterals and 3x3 convs, P6 on C5, P7 on P6,
    with biases) and the official head. The Swin paper's Table 2(a) prints 42M / 45M for the Swin repository's
    RepPointsV2, whose BiFPN neck is about 3.4M / 5.8M larger than this FPN: docs/detection.md, "RepPointsV2"."""
    cfg = compose("task=detection", "task/detector=reppoints_v2", f"backbone={backbone}")
    with torch.device("meta"):
        task = DetectionTask(cfg.task.backbone, OPTIM, SCHED, num_classes=80, detector=cfg.task.detector)
    fpn = sum(c * 256 + 256 for c in c3_c5) + 3 * (256 * 256 * 9 + 256) + c3_c5[-1] * 256 * 9 + 256 \
        + 256 * 256 * 9 + 256
    assert count_params(task.detector.head) == official_head_params()
    assert count_params(task) == count_params(task.backbone) + fpn + official_head_params() == measured
    assert round(measured / 1e6) < paper


# ------------------------------------------------- the Swin repository's BiFPN (mmdet/models/necks/bifpn.py)
def official_bifpn(bifpn, inputs, num_outs=5):
    """BiFPN.forward (add_extra_convs=False) and SingleBiFPN.forward / LayerCombineModule, on vtrain's modules."""
    def combine(module, xs):
        weights = module.weights.relu()
        out = (weights / (weights.sum() + 0.0001) * torch.stack(xs, dim=-1)).sum(dim=-1)
        return out * out.sigmoid()

    outs = list(inputs)
    for _ in range(num_outs - len(inputs)):
        outs.append(F.max_pool2d(outs[-1], 3, stride=2, padding=1))
    for single in bifpn.bi_fpn:
        laterals = [lateral_conv(outs[i]) for i, lateral_conv in enumerate(single.lateral_convs)]
        outs = [laterals[i] for i in range(len(laterals))]
        for i in range(len(laterals) - 1, 0, -1):
            up_feat = F.interpolate(outs[i], size=outs[i - 1].shape[2:], mode="nearest")
            fused = combine(single.lateral_combine[i - 1], [outs[i - 1], up_feat])
            outs[i - 1] = single.lateral_combine_conv[i - 1](fused)
        for i in range(len(outs) - 1):
            down_feat = F.max_pool2d(outs[i], 3, stride=2, padding=1)
            if i != len(laterals) - 2:
                outs[i + 1] = combine(single.out_combine[i], [down_feat, outs[i + 1], laterals[i + 1]])
            else:
                outs[i + 1] = combine(single.out_combine[i], [down_feat, outs[i + 1]])
            outs[i + 1] = single.out_combine_conv[i](outs[i + 1])
    return outs


class _Maps(nn.Module):
    """Fixed C3-C5 maps in place of a backbone (the BiFPN only reads its feature_info and out_indices)."""

    def __init__(self, maps):
        super().__init__()
        self.maps, self.out_indices = maps, (1, 2, 3)
        self.feature_info = mock.Mock(channels=lambda: [m.shape[1] for m in maps])

    def forward(self, images):
        return self.maps


def test_the_bifpn_is_the_swin_repositorys_and_gives_table_2a_sizes():
    """Maps of a 64x96 input (C5 3 wide, P6 2 wide: upsampling to the lower map's size), fusion weights away from 1;
    and the Swin paper's 42M / 45M (Table 2(a)) with it in place of the RepPointsV2 repository's FPN."""
    torch.manual_seed(0)
    maps = [torch.randn(1, c, 64 // s, 96 // s) for c, s in ((8, 8), (16, 16), (32, 32))]
    bifpn = BiFPN(_Maps(maps), out_channels=32, num_groups=8)
    for name, p in bifpn.named_parameters():
        if name.endswith("weights"):
            nn.init.uniform_(p, -0.2, 2.0)  # some negative: ReLU'd
    ours = bifpn(torch.zeros(1))
    assert list(ours) == ["1", "2", "3", "pool0", "pool1"]
    for a, b in zip(ours.values(), official_bifpn(bifpn, maps)):  # swish as F.silu: float rounding, through GN
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for backbone, paper in (("resnet50", 42), ("swin_t", 45)):
        cfg = compose("task=detection", "task/detector=reppoints_v2_gfocal_bifpn", f"backbone={backbone}")
        with torch.device("meta"):
            task = DetectionTask(cfg.task.backbone, OPTIM, SCHED, num_classes=80, detector=cfg.task.detector)
        assert round(count_params(task) / 1e6) == paper
