"""Deformable RoI pooling (Dai et al., "Deformable Convolutional Networks", ICCV 2017, Sec. 2.2, Eq. 5-6), in plain
PyTorch: the detector head of Deformable ConvNets' ResNet Faster R-CNN, Relation Networks' "DCN" base (Hu et al.,
CVPR 2018, Table 5).

The operator is the official one, MXNet's ``DeformablePSROIPooling`` with ``group_size=1`` (msracver/Deformable-
ConvNets ``rfcn/operator_cxx/deformable_psroi_pooling.cu``, ``DeformablePSROIPoolForwardKernel``), read exactly:

* the RoI's corners are rounded to whole pixels; on the map it spans ``round(x1) * s - 0.5`` to
  ``(round(x2) + 1) * s - 0.5`` (``s`` the spatial scale), at least 0.1 wide and high;
* output bin ``(i, j)`` of ``P x P`` starts at ``start + j * w / P`` and is shifted by ``offset_x * trans_std * w``
  (``w`` the RoI's width on the map; y likewise with the height; Eq. 6's ``gamma * dp * (w, h)``);
* its value is the average of ``k x k`` (``sample_per_part``) bilinear samples at ``bin start + (m / k) * bin size``
  (the bin's corner, not its centre); a sample outside ``[-0.5, W - 0.5] x [-0.5, H - 0.5]`` is skipped (not
  counted in the average), one inside is clamped to ``[0, W - 1] x [0, H - 1]`` and interpolated; a bin without
  samples is 0.

Its gradient to the offsets is the official backward kernel's: the interpolation's slope at each counted sample
(zero where the sample was clamped, as there the official kernel's two neighbours coincide). mmcv's
``DeformRoIPool`` is the same idea with RoIAlign's sampling (samples at sub-bin centres, no rounding, adaptive
count): not this operator, so not the reference here.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops.poolers import _convert_to_roi_format

from vtrain.config import ConfigError


def _round_half_away(x: Tensor) -> Tensor:
    """C's ``round``: halves away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def deformable_roi_pool(features: Tensor, rois: Tensor, offsets: Tensor | None = None, output_size: int = 7,
                        spatial_scale: float = 1 / 16, sample_per_part: int = 4, trans_std: float = 0.1) -> Tensor:
    """The official ``DeformablePSROIPooling`` with ``group_size=1`` and ``part_size=output_size`` (module doc).

    Args:
        features: ``(N, C, H, W)``.
        rois: ``(R, 5)``: image index, then ``x1, y1, x2, y2`` in image pixels (no gradient: they are rounded).
        offsets: ``(R, 2, P, P)`` normalised bin offsets, x then y (the official ``trans``); None: ``no_trans``.
    Returns:
        ``(R, C, P, P)``.
    """
    size, k = int(output_size), int(sample_per_part)
    height, width = features.shape[-2:]
    dtype = features.dtype  # half precision sampled in float32, as torchvision's RoIAlign does under autocast
    features = features.to(torch.promote_types(dtype, torch.float32))
    offsets = None if offsets is None else offsets.to(features.dtype)
    corners = _round_half_away(rois[:, 1:].detach().to(features.dtype))
    start = corners[:, :2] * spatial_scale - 0.5  # (R, 2): x, y
    extent = ((corners[:, 2:] + 1) * spatial_scale - 0.5 - start).clamp(min=0.1)  # (R, 2): the RoI's w, h
    bins = torch.arange(size, device=rois.device, dtype=features.dtype)
    samples = torch.arange(k, device=rois.device, dtype=features.dtype)
    # along each axis: bin b's sample m at start + b * extent / P + m * extent / (P k): (R, 2, P, k)
    along = start[:, :, None, None] + extent[:, :, None, None] * (bins[:, None] / size + samples / (size * k))
    x = along[:, 0, None, :, None, :]  # (R, 1, P_w, 1, k_w)
    y = along[:, 1, :, None, :, None]  # (R, P_h, 1, k_h, 1)
    if offsets is not None:  # bin (i, j) moves by offset * trans_std * the RoI's size (Eq. 6)
        shift = offsets * trans_std * extent[:, :, None, None]  # (R, 2, P_h, P_w)
        x = x + shift[:, 0, :, :, None, None]
        y = y + shift[:, 1, :, :, None, None]
    x, y = torch.broadcast_tensors(x, y)  # (R, P_h, P_w, k_h, k_w)
    counted = ((x >= -0.5) & (x <= width - 0.5) & (y >= -0.5) & (y <= height - 0.5)).to(features.dtype)
    # clamped into the map, a sample is the bilinear interpolation of its four neighbours: grid_sample with
    # align_corners=True (pixel centres at -1 .. 1); "border" keeps the last row's interpolation in the map
    grid = torch.stack((x.clamp(0, width - 1) * 2 / max(width - 1, 1) - 1,
                        y.clamp(0, height - 1) * 2 / max(height - 1, 1) - 1), dim=-1)
    batch = rois[:, 0].long()
    pooled = features.new_zeros(len(rois), features.shape[1], size, size)
    for image in batch.unique().tolist():
        rows = torch.where(batch == image)[0]
        points = grid[rows].reshape(1, len(rows) * size * size, k * k, 2)
        sampled = F.grid_sample(features[image:image + 1], points, mode="bilinear", padding_mode="border",
                                align_corners=True)  # (1, C, R_i P P, k k)
        weights = counted[rows].reshape(len(rows) * size * size, k * k)
        mean = (sampled[0] * weights).sum(-1) / weights.sum(-1).clamp(min=1)  # a bin without samples: 0
        pooled[rows] = mean.reshape(-1, len(rows), size, size).transpose(0, 1)
    return pooled.to(dtype)


class DeformableRoIPool(nn.Module):
    """The official DCN head's two poolings (``relation_rcnn/symbols/resnet_v1_101_rcnn_dcn.py``): ``offset_t``, the
    RoI pooled without offsets, feeds an fc layer (``offset``, ``C * P * P -> 2 * P * P``, zero weights and bias:
    ``init_weight``, so training starts from plain pooling) whose output, as ``(R, 2, P, P)``, shifts the bins of
    the second pooling (``deformable_roi_pool``, ``trans_std``). The official fc learns at 0.01 of the base rate
    (``lr_mult=0.01``): the experiments set it (``optim.custom_keys``, key ``box_roi_pool.offset``).

    A torchvision box RoI pool: ``(features, boxes, image_shapes) -> (R, C, P, P)``, on the one map named
    ``featmap_names``, at a fixed ``spatial_scale`` (the official 0.0625 of a stride-16 map).
    """

    def __init__(self, featmap_names: Sequence[str], channels: int, output_size: int = 7,
                 spatial_scale: float = 1 / 16, sample_per_part: int = 4, trans_std: float = 0.1):
        super().__init__()
        if len(featmap_names) != 1:
            raise ConfigError(f"deformable RoI pooling reads one map, not {list(featmap_names)}: use it on a "
                              "single-map neck (task/detector=faster_rcnn_dcn_2fc)")
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))  # torchvision's RoI pools' attribute
        self.spatial_scale, self.sample_per_part, self.trans_std = float(spatial_scale), int(sample_per_part), float(trans_std)
        self.offset = nn.Linear(channels * int(output_size) ** 2, 2 * int(output_size) ** 2)
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)

    def pool(self, feature: Tensor, rois: Tensor, offsets: Tensor | None) -> Tensor:
        return deformable_roi_pool(feature, rois, offsets, self.output_size[0], self.spatial_scale,
                                   self.sample_per_part, self.trans_std)

    def offsets(self, plain: Tensor) -> Tensor:
        """The bins' normalised offsets ``(R, 2, P, P)`` from the RoIs pooled without them ``(R, C, P, P)``."""
        return self.offset(plain.flatten(start_dim=1)).view(-1, 2, *self.output_size)

    def forward(self, features: dict[str, Tensor], boxes: list[Tensor],
                image_shapes: list[tuple[int, int]]) -> Tensor:
        feature = features[self.featmap_names[0]]
        rois = _convert_to_roi_format(boxes)
        return self.pool(feature, rois, self.offsets(self.pool(feature, rois, None)))
