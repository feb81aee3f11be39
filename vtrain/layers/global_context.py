"""Global context block (Cao et al., "GCNet: Non-local Networks Meet Squeeze-Excitation
Networks and Beyond", ICCV-W 2019 / TPAMI 2020)."""
from __future__ import annotations

import torch
from torch import nn


class GlobalContextBlock(nn.Module):
    """GC block, paper Fig. 4(d) / Eq. 4:

        z_i = x_i + W_v2 ReLU(LN(W_v1 sum_j softmax_j(W_k x_j) x_j))

    * context modelling: a 1x1 conv ``W_k`` to one channel, softmax over all
      positions, weighted sum of ``x`` -> one C-vector per sample (shared by all
      query positions, the simplification of Sec. 3.2);
    * transform: bottleneck 1x1 conv to ``C*ratio`` -> LayerNorm([C*ratio, 1, 1]) ->
      ReLU -> 1x1 conv back to C (Sec. 4.1: the LN eases optimisation of the
      two-layer bottleneck);
    * fusion: broadcast channel-wise add.

    The last conv's weight and bias start at zero, so the block is the identity at
    initialisation and a pretrained ResNet loads unchanged (Sec. 4.1, as mmcv's
    ``ContextBlock`` ``last_zero_init``). ``dim=3`` works on (N, C, T, H, W) clips.
    """

    def __init__(self, channels: int, ratio: float = 1 / 16, dim: int = 2):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        hidden = int(channels * ratio)
        self.context_mask = conv(channels, 1, kernel_size=1)  # W_k
        self.transform = nn.Sequential(
            conv(channels, hidden, kernel_size=1),  # W_v1
            nn.LayerNorm([hidden] + [1] * dim),
            nn.ReLU(inplace=True),
            conv(hidden, channels, kernel_size=1),  # W_v2
        )
        nn.init.kaiming_normal_(self.context_mask.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.context_mask.bias)
        nn.init.zeros_(self.transform[-1].weight)
        nn.init.zeros_(self.transform[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        weights = self.context_mask(x).flatten(2).softmax(dim=-1)  # (N, 1, L)
        context = torch.einsum("ncl,nol->nc", x.flatten(2), weights)  # (N, C)
        context = context.view(n, c, *([1] * (x.dim() - 2)))
        return x + self.transform(context)
