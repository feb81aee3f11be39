"""Deformable DETR against references: multi-scale deformable attention against a direct bilinear-sampling sum
written here (points outside the maps, levels of different sizes)."""
from __future__ import annotations

import math

import pytest
import torch

from vtrain.layers.ms_deform_attn import MSDeformAttn, multi_scale_deformable_attention

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- the attention
def bilinear(value: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """``value`` ``(H, W, C)`` at continuous (x, y) in [0, 1] of the map (pixel centres at (i + 0.5) / size): the
    four nearest pixels weighted by their distances, pixels outside the map zero."""
    h, w, _ = value.shape
    px, py = x * w - 0.5, y * h - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    total = torch.zeros(value.shape[-1], dtype=value.dtype)
    for xi, wx in ((x0, 1 - (px - x0)), (x0 + 1, px - x0)):
        for yi, wy in ((y0, 1 - (py - y0)), (y0 + 1, py - y0)):
            if 0 <= xi < w and 0 <= yi < h:
                total += wx * wy * value[yi, xi]
    return total


def test_deformable_attention_equals_a_direct_bilinear_sum():
    """Every query's output is sum over levels and points of weight x bilinear(value of its head, location),
    on three levels of different sizes, with locations up to half a map outside on every side."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (3, 4), (1, 2)]
    n, heads, channels, queries, points = 2, 2, 3, 4, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), heads, channels, generator=generator, dtype=torch.float64)
    locations = torch.rand(n, queries, heads, len(shapes), points, 2, generator=generator, dtype=torch.float64) * 2 - 0.5
    weights = torch.rand(n, queries, heads, len(shapes), points, generator=generator, dtype=torch.float64)
    assert (locations < 0).any() and (locations > 1).any()
    out = multi_scale_deformable_attention(value, shapes, locations, weights)
    starts = [0, 35, 47]
    for b in range(n):
        for q in range(queries):
            for m in range(heads):
                expected = torch.zeros(channels, dtype=torch.float64)
                for level, (h, w) in enumerate(shapes):
                    level_value = value[b, starts[level]:starts[level] + h * w, m].view(h, w, channels)
                    for p in range(points):
                        x, y = locations[b, q, m, level, p].tolist()
                        expected += weights[b, q, m, level, p] * bilinear(level_value, x, y)
                torch.testing.assert_close(out[b, q, m * channels:(m + 1) * channels], expected, rtol=1e-10, atol=1e-10)


def test_deformable_attention_module_samples_around_its_reference_points():
    """The module: offsets over each level's (W, H) in pixels (point references) or over n_points times half the
    box (box references), softmax over a head's levels x points, padded values zeroed, then the projections;
    recomputed here from its linear layers and the direct bilinear sum."""
    torch.manual_seed(0)
    shapes = [(4, 6), (2, 3)]
    attn = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=2).double()
    for p in attn.parameters():  # not the initial zero offsets / uniform weights: every term matters
        torch.nn.init.normal_(p, std=0.5)
    query = torch.randn(1, 3, 8, dtype=torch.float64)
    flat = torch.randn(1, 30, 8, dtype=torch.float64)
    padding = torch.zeros(1, 30, dtype=torch.bool)
    padding[0, 5] = padding[0, 29] = True
    for refs in (torch.rand(1, 3, 2, 2, dtype=torch.float64), torch.rand(1, 3, 2, 4, dtype=torch.float64) * 0.5 + 0.2):
        out = attn(query, refs, flat, shapes, padding)
        value = attn.value_proj(flat).masked_fill(padding[..., None], 0).view(1, 30, 2, 4)
        offsets = attn.sampling_offsets(query).view(1, 3, 2, 2, 2, 2)
        weights = attn.attention_weights(query).view(1, 3, 2, 4).softmax(-1).view(1, 3, 2, 2, 2)
        expected = torch.zeros(1, 3, 8, dtype=torch.float64)
        for q in range(3):
            for m in range(2):
                for level, ((h, w), start) in enumerate(zip(shapes, (0, 24))):
                    level_value = value[0, start:start + h * w, m].view(h, w, 4)
                    for p in range(2):
                        ref = refs[0, q, level]
                        if refs.shape[-1] == 2:
                            x = ref[0] + offsets[0, q, m, level, p, 0] / w
                            y = ref[1] + offsets[0, q, m, level, p, 1] / h
                        else:
                            x = ref[0] + offsets[0, q, m, level, p, 0] / 2 * ref[2] * 0.5
                            y = ref[1] + offsets[0, q, m, level, p, 1] / 2 * ref[3] * 0.5
                        expected[0, q, m * 4:(m + 1) * 4] += weights[0, q, m, level, p] * bilinear(
                            level_value, x.item(), y.item())
        torch.testing.assert_close(out, attn.output_proj(expected), rtol=1e-10, atol=1e-10)


def test_deformable_attention_initialisation_is_the_official():
    """_reset_parameters: zero offset weights; offset biases a ring of 8 directions scaled to the unit square's
    border, k-th point k times it; uniform attention; zero projection biases."""
    attn = MSDeformAttn(d_model=16, n_levels=2, n_heads=8, n_points=3)
    assert not attn.sampling_offsets.weight.any() and not attn.attention_weights.weight.any()
    bias = attn.sampling_offsets.bias.view(8, 2, 3, 2)
    torch.testing.assert_close(bias[:, 0, 0], torch.tensor([[1.0, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1],
                                                            [0, -1], [1, -1]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(bias[:, 1, 2], 3 * bias[:, 0, 0])
    assert not attn.value_proj.bias.any() and not attn.output_proj.bias.any()
