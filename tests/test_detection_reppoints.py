"""RepPoints (RepPointsV2's regression core) against the official code (Scalsol/RepPointsV2,
``mmdet/models/dense_heads/reppoints_v2_head.py``, ``mmdet/core/bbox/assigners/point_assigner_v2.py``): the point ->
box transforms on hand cases, the init assignment against a brute-force restatement of its rule, and the deformable
convolutions' sampling layout (the official ``dcn_base_offset``) against plain convolutions."""
import pytest
import torch
import torch.nn.functional as F

from vtrain.tasks.detection.reppoints import PointAssignerV2, RepPointsHead, dcn_base_offset, points_to_box

pytestmark = pytest.mark.usefixtures("one_thread")


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
