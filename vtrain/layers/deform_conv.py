"""Deformable convolution (Dai et al., "Deformable Convolutional Networks", ICCV 2017; v2: Zhu et al.,
"Deformable ConvNets v2: More Deformable, Better Results", CVPR 2019), as mmcv's ``DeformConv2dPack`` and
``ModulatedDeformConv2dPack``, the layers mmdet's ``dcn=dict(type='DCN' | 'DCNv2')`` puts in a ResNet's 3x3 convs.

A regular convolution samples the input on the fixed grid ``p + p_k``; a deformable one at ``p + p_k + dp_k``, with
the offsets ``dp_k`` predicted per output position by a plain convolution (``conv_offset``) of the same kernel,
stride and dilation, bilinearly interpolated (zero outside the map). v2 also predicts a modulation ``m_k`` in (0, 1)
per sample (Eq. 3 of v2). The product runs in ``torchvision.ops.deform_conv2d`` (CUDA and CPU kernels), whose offset
layout is the original code's and mmcv's: ``(dy, dx)`` per kernel position, per offset group.

Keys are mmcv's: ``weight`` (the regular conv's, so a plain ResNet checkpoint fills it) and ``conv_offset.*`` (zero at
initialisation, as mmcv's ``init_weights``: the layer starts as the regular convolution; v2's modulation then starts
at sigmoid(0) = 0.5, as mmcv's does).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torchvision.ops import deform_conv2d


class DeformableConv2d(nn.Module):
    """A ``k x k`` deformable convolution (``modulated=True``: v2), mmcv's layer and keys.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``'s.
        deform_groups: offset groups: the channels are split in this many groups, each with its own offsets
            (mmcv's ``deform_groups``; mmdet's DCN configs use 1).
        modulated: DCNv2, with a modulation per sample.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = False, deform_groups: int = 1,
                 modulated: bool = False):
        super().__init__()
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.stride, self.padding, self.dilation = (stride, stride), (padding, padding), (dilation, dilation)
        self.modulated = modulated
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        per_position = 3 if modulated else 2
        self.conv_offset = nn.Conv2d(in_channels, deform_groups * per_position * kernel_size * kernel_size,
                                     kernel_size, stride=stride, padding=padding, dilation=dilation, bias=True)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's initialisation
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, deform_groups: int = 1, modulated: bool = False) -> "DeformableConv2d":
        """The deformable twin of ``conv`` (same shape, stride, padding, dilation, groups), its weight copied."""
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size[0], conv.stride[0], conv.padding[0],
                    conv.dilation[0], conv.groups, conv.bias is not None, deform_groups, modulated)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        return layer

    def offsets(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(offsets, modulation or None) at each output position. v2 splits ``conv_offset``'s output in three
        equal chunks, offsets = the first two concatenated, modulation = sigmoid of the third (mmcv's
        ``ModulatedDeformConv2dPack.forward``, which official v2 checkpoints are trained with)."""
        out = self.conv_offset(x)
        if not self.modulated:
            return out, None
        first, second, mask = torch.chunk(out, 3, dim=1)
        return torch.cat((first, second), dim=1), torch.sigmoid(mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offsets(x)
        return deform_conv2d(x, offset, self.weight, self.bias, stride=self.stride, padding=self.padding,
                             dilation=self.dilation, mask=mask)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight.shape[-2:])}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"modulated={self.modulated}")
