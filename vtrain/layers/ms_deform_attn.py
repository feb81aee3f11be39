"""Multi-scale deformable attention (Zhu et al., "Deformable DETR", ICLR 2021, Sec. 4.1, Eq. 3).

Each query attends to a few sampled points per head and per feature level: ``n_points`` offsets around its
reference point and their attention weights are linear functions of the query; the values at those points are
read by bilinear interpolation, weighted (a softmax over all the levels' points of a head) and summed.

The official module (fundamentalvision/Deformable-DETR ``models/ops/modules/ms_deform_attn.py``), with its
parameter names and initialisation, so that an official checkpoint loads key for key, computed in pure PyTorch
as the official ``ms_deform_attn_core_pytorch`` does (``functions/ms_deform_attn_func.py``: ``F.grid_sample``,
bilinear, zero padding, ``align_corners=False``): a point outside a map reads zeros. The official CUDA kernel
computes the same sum; it is not needed here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def multi_scale_deformable_attention(value: torch.Tensor, spatial_shapes: list[tuple[int, int]],
                                     sampling_locations: torch.Tensor, attention_weights: torch.Tensor) -> torch.Tensor:
    """The weighted sum of bilinearly sampled values (``ms_deform_attn_core_pytorch``).

    Args:
        value: ``(N, sum(H*W), heads, channels per head)``, the levels' maps flattened one after another.
        spatial_shapes: ``(H, W)`` of each level.
        sampling_locations: ``(N, queries, heads, levels, points, 2)``, (x, y) in [0, 1] over each level's map
            (0 and 1 are its outer edges, pixel centres at (i + 0.5) / W).
        attention_weights: ``(N, queries, heads, levels, points)``.
    Returns ``(N, queries, heads * channels per head)``.
    """
    n, _, heads, channels = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    per_level = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample's [-1, 1]
    sampled = []
    for level, (h, w) in enumerate(spatial_shapes):
        level_value = per_level[level].flatten(2).transpose(1, 2).reshape(n * heads, channels, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (N * heads, queries, points, 2)
        sampled.append(F.grid_sample(level_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False))
    weights = attention_weights.transpose(1, 2).reshape(n * heads, 1, queries, levels * points)
    output = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, heads * channels, queries)
    return output.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (the official ``MSDeformAttn``).

    Args:
        d_model: channels of queries and values (256).
        n_levels: feature levels (4).
        n_heads: attention heads (8).
        n_points: sampled points per head and level (4).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """The official initialisation: offsets start as a ring of directions, one per head (k-th point at k times
        the unit step along it, on every level), attention uniform; projections Xavier-uniform, biases zero."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor, input_flatten: torch.Tensor,
                spatial_shapes: list[tuple[int, int]], padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``query`` ``(N, Q, C)``; ``reference_points`` ``(N, Q, levels, 2)`` (x, y) in [0, 1] over each level, or
        ``(N, Q, levels, 4)`` boxes (cx, cy, w, h), whose offsets are then relative to the box (the offset over
        ``n_points`` times half the box); ``input_flatten`` ``(N, sum(H*W), C)``; ``padding_mask``
        ``(N, sum(H*W))`` True on padding, whose values are zeroed. Returns ``(N, Q, C)``."""
        n, queries, _ = query.shape
        value = self.value_proj(input_flatten)
        if padding_mask is not None:
            value = value.masked_fill(padding_mask[..., None], 0.0)
        value = value.view(n, value.shape[1], self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, queries, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, queries, self.n_heads, self.n_levels * self.n_points)
        weights = weights.softmax(-1).view(n, queries, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            # offsets are in pixels of each level: over its (W, H)
            normalizer = torch.tensor([[w, h] for h, w in spatial_shapes], dtype=query.dtype, device=query.device)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: reference points end in 2 (points) or 4 (boxes), not "
                             f"{reference_points.shape[-1]}")
        return self.output_proj(multi_scale_deformable_attention(value, spatial_shapes, locations, weights))
