"""Deformable RoI pooling (Deformable ConvNets' ``DeformablePSROIPooling`` with ``group_size=1``) against the official
kernel's loop written out by hand, plain pooling when the offsets are zero, and its gradient to the offsets by
finite differences; the DCN C4 base detector (Relation Networks' "DCN" rows) built, trained a step, and sized."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import compose
from test_detection_c4_dc5 import FEW_ROIS, _task
from test_detection_models import _batch
from vtrain.profiling import count_params
from vtrain.tasks.detection.deformable_roi_pool import DeformableRoIPool, deformable_roi_pool
from vtrain.training.build import build_task
from vtrain.training.optim import param_multipliers

pytestmark = pytest.mark.usefixtures("one_thread")


def official_kernel(features, rois, offsets, size, scale, k, trans_std):
    """``DeformablePSROIPoolForwardKernel`` (rfcn/operator_cxx/deformable_psroi_pooling.cu), one output at a time."""
    _, channels, height, width = features.shape
    out = torch.zeros(len(rois), channels, size, size, dtype=torch.float64)
    for n, (b, x1, y1, x2, y2) in enumerate(rois.tolist()):
        c_round = lambda v: math.floor(abs(v) + 0.5) * (1 if v >= 0 else -1)  # noqa: E731
        start_w, start_h = c_round(x1) * scale - 0.5, c_round(y1) * scale - 0.5
        roi_w = max((c_round(x2) + 1.0) * scale - 0.5 - start_w, 0.1)
        roi_h = max((c_round(y2) + 1.0) * scale - 0.5 - start_h, 0.1)
        bin_w, bin_h = roi_w / size, roi_h / size
        for ph in range(size):
            for pw in range(size):
                tx = 0.0 if offsets is None else offsets[n, 0, ph, pw].item() * trans_std
                ty = 0.0 if offsets is None else offsets[n, 1, ph, pw].item() * trans_std
                wstart = pw * bin_w + start_w + tx * roi_w
                hstart = ph * bin_h + start_h + ty * roi_h
                for c in range(channels):
                    data = features[int(b), c].double()
                    total, count = 0.0, 0
                    for ih in range(k):
                        for iw in range(k):
                            w, h = wstart + iw * bin_w / k, hstart + ih * bin_h / k
                            if w < -0.5 or w > width - 0.5 or h < -0.5 or h > height - 0.5:
                                continue
                            w, h = min(max(w, 0.0), width - 1.0), min(max(h, 0.0), height - 1.0)
                            xa, xb, ya, yb = math.floor(w), math.ceil(w), math.floor(h), math.ceil(h)
                            dx, dy = w - xa, h - ya
                            total += ((1 - dx) * (1 - dy) * data[ya, xa] + (1 - dx) * dy * data[yb, xa]
                                      + dx * (1 - dy) * data[ya, xb] + dx * dy * data[yb, xb]).item()
                            count += 1
                    out[n, c, ph, pw] = 0.0 if count == 0 else total / count
    return out


def test_deformable_roi_pooling_is_the_official_kernel():
    """Two images, four RoIs (one reaching past the map's corner, one rounding at .5, one thinner than a pixel of the
    map) and offsets large enough to push samples and whole bins off the map: every output equals the kernel's loop
    (samples outside [-0.5, W - 0.5] skipped, the others clamped and interpolated, empty bins 0); with no offsets,
    and with zero ones, the pooling is the plain one."""
    g = torch.Generator().manual_seed(0)
    features = torch.randn(2, 3, 5, 6, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 2.0, 3.0, 40.0, 30.0], [1, 8.5, 4.5, 95.0, 79.0], [0, -20.0, -10.0, 30.0, 20.0],
                         [1, 50.0, 10.0, 50.2, 60.0]], dtype=torch.float64)
    offsets = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64) * 4
    args = dict(output_size=3, spatial_scale=1 / 16, sample_per_part=2, trans_std=0.1)
    got = deformable_roi_pool(features, rois, offsets, **args)
    expected = official_kernel(features, rois, offsets, 3, 1 / 16, 2, 0.1)
    assert (expected == 0).any()  # some bin has all its samples off the map
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    plain = deformable_roi_pool(features, rois, None, **args)
    torch.testing.assert_close(plain, official_kernel(features, rois, None, 3, 1 / 16, 2, 0.1), rtol=0, atol=1e-12)
    torch.testing.assert_close(deformable_roi_pool(features, rois, torch.zeros_like(offsets), **args), plain,
                               rtol=0, atol=0)


def test_gradients_to_the_offsets_are_finite_differences():
    """On one RoI inside the map (no sample clamped, none at a pixel's edge for steps of 1e-6), the analytic
    gradient of a weighted sum of the pooled values to every offset equals central differences."""
    g = torch.Generator().manual_seed(1)
    features = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)
    rois = torch.tensor([[0, 33.0, 30.0, 81.0, 75.0]], dtype=torch.float64)
    offsets = (torch.rand(1, 2, 2, 2, generator=g, dtype=torch.float64) - 0.5).requires_grad_()
    weights = torch.randn(1, 2, 2, 2, generator=g, dtype=torch.float64)
    args = dict(output_size=2, spatial_scale=1 / 16, sample_per_part=3, trans_std=0.1)

    def loss(o):
        return (deformable_roi_pool(features, rois, o, **args) * weights).sum()

    loss(offsets).backward()
    step, numeric = 1e-6, torch.zeros_like(offsets)
    for index in range(offsets.numel()):
        delta = torch.zeros(offsets.numel(), dtype=torch.float64)
        delta[index] = step
        delta = delta.view_as(offsets)
        with torch.no_grad():
            numeric.view(-1)[index] = (loss(offsets + delta) - loss(offsets - delta)) / (2 * step)
    assert offsets.grad.abs().min() > 1e-3
    torch.testing.assert_close(offsets.grad, numeric, rtol=1e-6, atol=1e-8)


def test_the_offset_layer_starts_at_zero_so_the_module_starts_as_plain_pooling():
    """The official ``offset`` fc (7 x 7 x C -> 2 x 7 x 7) is initialised to zero: the module's first output is the
    pooling without offsets, and the loss reaches the fc (it learns the offsets). Under bf16 autocast it pools the
    same values (sampled in float32, as torchvision's RoIAlign) and returns bf16."""
    g = torch.Generator().manual_seed(2)
    pool = DeformableRoIPool(["3"], channels=4)
    feature = torch.randn(1, 4, 10, 12, generator=g)
    boxes = [torch.tensor([[10.0, 20.0, 100.0, 140.0], [0.0, 0.0, 190.0, 150.0]])]
    out = pool({"3": feature}, boxes, [(160, 192)])
    rois = torch.cat([torch.zeros(2, 1), boxes[0]], 1)
    torch.testing.assert_close(out, deformable_roi_pool(feature, rois), rtol=0, atol=0)
    assert pool.offset.weight.shape == (2 * 49, 4 * 49)
    (out * torch.randn(out.shape, generator=g)).sum().backward()
    assert pool.offset.weight.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: sampled in float32, given back in bf16
        half = pool({"3": feature.bfloat16()}, boxes, [(160, 192)])
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), deformable_roi_pool(feature.bfloat16().float(), rois), rtol=0.01, atol=0.01)


def test_a_training_step_of_the_dcn_base_reaches_the_offsets():
    """The DCN C4 base (task/detector=faster_rcnn_dcn_2fc) on a ResNet-26 with deformable res5 convs, a training
    step on a synthetic image: finite losses; the RoI offset fc and the res5 offset convs, both starting at zero, get
    gradients."""
    torch.manual_seed(0)
    dcn = {"stages": [False, False, False, True], "modulated": False, "deform_groups": 4}
    task = _task("faster_rcnn_dcn_2fc", *FEW_ROIS, "task.detector.box_head_dim=32", output_stride=16, dcn=dcn)
    for block in task.backbone.layer4:  # timm starts each residual branch at zero (its last BN's scale), ImageNet
        nn.init.ones_(block.bn3.weight)  # weights do not: as those, so the branch passes a gradient at once
    pool = task.detector.roi_heads.box_roi_pool
    assert isinstance(pool, DeformableRoIPool) and pool.featmap_names == ["3"]
    assert (pool.sample_per_part, pool.trans_std, pool.spatial_scale) == (4, 0.1, 0.0625)
    watched = {"detector.roi_heads.box_roi_pool.offset.weight", "backbone.layer4.1.conv2.conv_offset.weight"}
    images, targets = _batch()
    task.train()
    losses = task.detector(images[:1], [{k: v for k, v in targets[0].items() if k != "masks"}])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    parameters = dict(task.named_parameters())
    assert all(parameters[name].grad.abs().sum() > 0 for name in watched)


def test_size_of_the_dcn_experiment_is_the_official_symbols():
    """dcn_r101_c4_2fc_softnms_coco_1x on the meta device (80 categories) is the C4 base's 62,085,393 parameters
    (tests/test_detection_c4_dc5.py rebuilds it from the official symbol's layers) plus what
    resnet_v1_101_rcnn_dcn.py adds: three res5 offset convs (512 -> 72 = 4 groups x 2 x 3 x 3, with bias) and the
    offset fc (256 x 7 x 7 -> 2 x 7 x 7); the paper's 60.5M is 2.2M over its C4 58.3M, as here. The relation
    modules and the learned NMS add what they add on the C4 base."""
    with torch.device("meta"):
        task = build_task(compose("experiment=dcn_r101_c4_2fc_softnms_coco_1x"))
        added = 3 * count_params(nn.Conv2d(512, 72, 3)) + count_params(nn.Linear(256 * 49, 98))
    assert added == 2_224_954
    assert count_params(task) == 62_085_393 + added == 64_310_347
    slow = {name for name, (lr, _) in param_multipliers(task, False, task.optim_cfg["custom_keys"]).items() if lr != 1}
    assert all(param_multipliers(task, False, task.optim_cfg["custom_keys"])[name][0] == 0.01 for name in slow)
    assert slow == {"detector.roi_heads.box_roi_pool.offset.weight", "detector.roi_heads.box_roi_pool.offset.bias"}
