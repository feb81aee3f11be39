"""Deformable RoI pooling (Deformable ConvNets' ``DeformablePSROIPooling`` with ``group_size=1``) against the official
kernel's loop written out by hand, plain pooling when the offsets are zero, and its gradient to the offsets by
finite differences; the DCN C4 base detector (Relation Networks' "DCN" rows) built, trained a step, and sized."""
from __future__ import annotations

import math

import pytest
import torch

from vtrain.tasks.detection.deformable_roi_pool import DeformableRoIPool, deformable_roi_pool

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
    pooling without offsets, and the loss reaches the fc (it learns the offsets)."""
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
