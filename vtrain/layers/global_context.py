"""Global context block and simplified non-local block (Cao et al., "GCNet: Non-local Networks Meet
Squeeze-Excitation Networks and Beyond", ICCV-W 2019 / TPAMI 2020, arXiv:1904.11492)."""
from __future__ import annotations

import torch
from torch import nn


class _QueryIndependentContext(nn.Module):
    """What GCNet's simplified NL block and GC block share (Sec. 3.2 and 4.1): one attention map for all query
    positions, ``softmax_j(W_k x_j)`` from a 1x1 conv to one channel, pools ``x`` to one C-vector per sample, which
    ``transform`` maps and which is added at every position. The transform's last conv (weight and bias) starts at
    zero, so the block is the identity at initialisation and a pretrained ResNet loads unchanged (Sec. 4.1, as
    mmcv's ``ContextBlock`` ``last_zero_init``). ``dim=3`` works on (N, C, T, H, W) clips."""

    transform: nn.Module

    def __init__(self, channels: int, dim: int = 2):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        self.conv = nn.Conv2d if dim == 2 else nn.Conv3d
        self.context_mask = self.conv(channels, 1, kernel_size=1)  # W_k
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)

    def _zero_last(self, transform: nn.Module) -> nn.Module:
        last = transform[-1] if isinstance(transform, nn.Sequential) else transform
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        return transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        weights = self.context_mask(x).flatten(2).softmax(dim=-1)  # (N, 1, L)
        context = torch.einsum("ncl,nol->nc", x.flatten(2), weights)  # (N, C)
        context = context.view(n, c, *([1] * (x.dim() - 2)))
        return x + self.transform(context)


class GlobalContextBlock(_QueryIndependentContext):
    """GC block, paper Fig. 4(d) / Eq. 4:

        z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k x_j) x_j))

    * context modelling: the query-independent attention pooling of Sec. 3.2;
    * transform: bottleneck 1x1 conv to ``C*ratio`` -> LayerNorm([C*ratio, 1, 1]) ->
      ReLU -> 1x1 conv back to C (Sec. 4.1: the LN eases optimisation of the
      two-layer bottleneck);
    * fusion: broadcast channel-wise add.
    """

    def __init__(self, channels: int, ratio: float = 1 / 16, dim: int = 2):
        super().__init__(channels, dim)
        hidden = int(channels * ratio)
        self.transform = self._zero_last(nn.Sequential(
            self.conv(channels, hidden, kernel_size=1),  # W_v1
            nn.LayerNorm([hidden] + [1] * dim),
            nn.ReLU(inplace=True),
            self.conv(hidden, channels, kernel_size=1),  # W_v2
        ))


class SimplifiedNonLocalBlock(_QueryIndependentContext):
    """Simplified NL block, paper Sec. 3.2, Eq. 3 / Fig. 4(b):

        z_i = x_i + W_v sum_j softmax_j(W_k x_j) x_j

    the NL block with its attention made query-independent and ``W_v`` (one C x C 1x1 conv, no bottleneck) moved
    after the pooling: C^2 + 2C + 1 parameters (1.05M at C = 1024, the paper's 1.0M for the block in c4).
    """

    def __init__(self, channels: int, dim: int = 2):
        super().__init__(channels, dim)
        self.transform = self._zero_last(self.conv(channels, channels, kernel_size=1))  # W_v
