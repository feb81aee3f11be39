"""Non-local blocks on (N, C, H, W) images (``dim=2``) and (N, C, T, H, W) clips (``dim=3``).

* ``NonLocalBlock``: embedded Gaussian non-local block of Wang et al., "Non-local
  Neural Networks", CVPR 2018, Eq. 1-3 and Fig. 2.
* ``DisentangledNonLocalBlock``: Yin et al., "Disentangled Non-Local Neural
  Networks", ECCV 2020, Eq. 7 (whitened pairwise term + unary term).
* ``GatedNonLocalBlock``: the block of the DNL paper's official segmentation code (a learned scalar on the
  pairwise term), with which its HRNetV2-W48 NL / DNL rows were trained.

The first two follow mmcv's ``NonLocal2d`` / mmseg's ``DisentangledNonLocal2d`` in layout:
theta, phi, g are 1x1 convs with bias to ``C' = C // reduction`` channels; the output
is a 1x1 conv (no bias) followed by a BatchNorm whose weight starts at zero, so the
block is the identity at initialisation (NL paper Sec. 4.1) and can be inserted into
a pretrained network or used on its own inside a segmentation head.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vtrain.config import ConfigError


class _PairwiseBlock(nn.Module):
    def __init__(self, channels: int, reduction: int = 2, dim: int = 2, sub_sample: bool = False):
        super().__init__()
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm3d
        # NL paper Sec. 3.3: a 2x2 spatial max pool after phi and g (keys and values), 1/4 of the pairs
        pool = (2, 2) if dim == 2 else (1, 2, 2)
        self.sub_sample = (nn.MaxPool2d if dim == 2 else nn.MaxPool3d)(pool, stride=pool) if sub_sample else None
        self.inter_channels = max(channels // reduction, 1)
        self.theta = conv(channels, self.inter_channels, kernel_size=1)
        self.phi = conv(channels, self.inter_channels, kernel_size=1)
        self.g = conv(channels, self.inter_channels, kernel_size=1)
        self.out_conv = conv(self.inter_channels, channels, kernel_size=1, bias=False)  # W_z
        self.out_norm = norm(channels)
        for layer in (self.theta, self.phi, self.g, self.out_conv):
            nn.init.normal_(layer.weight, std=0.01)  # as mmcv NonLocal2d
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.out_norm.weight)
        nn.init.zeros_(self.out_norm.bias)

    def _embeddings(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """theta (N, 1, L, C'), phi and g (N, 1, L', C') token sequences for scaled_dot_product_attention
        (L' = L / 4 with ``sub_sample``)."""
        theta, phi, g = self.theta(x), self.phi(x), self.g(x)
        if self.sub_sample is not None:
            phi, g = self.sub_sample(phi), self.sub_sample(g)
        return tuple(t.flatten(2).transpose(1, 2).unsqueeze(1) for t in (theta, phi, g))

    def _output(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x + BN(W_z y), with y given as (N, L, C')."""
        y = y.transpose(1, 2).reshape(x.shape[0], self.inter_channels, *x.shape[2:])
        return x + self.out_norm(self.out_conv(y))


class NonLocalBlock(_PairwiseBlock):
    """Embedded Gaussian non-local block (NL paper Eq. 1-3, Fig. 2):

        y_i = sum_j softmax_j(theta(x_i)^T phi(x_j) / sqrt(C')) g(x_j)
        z_i = x_i + BN(W_z y_i)

    The 1/sqrt(C') scale is mmcv's ``use_scale=True`` default and the NL paper's video
    code's; ``use_scale=False`` drops it (mmaction2's I3D-NL configs). ``sub_sample``
    max-pools phi and g by 2x2 in space (NL paper Sec. 3.3; its video models and
    mmaction2's I3D-NL use it). The softmax-weighted sum is exactly attention with one
    head, so it runs as fused ``scaled_dot_product_attention`` and never materialises
    the L x L matrix on GPU.
    """

    def __init__(self, channels: int, reduction: int = 2, dim: int = 2, sub_sample: bool = False,
                 use_scale: bool = True):
        super().__init__(channels, reduction, dim, sub_sample)
        self.scale = 1.0 / math.sqrt(self.inter_channels) if use_scale else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta, phi, g = self._embeddings(x)
        y = F.scaled_dot_product_attention(theta, phi, g, scale=self.scale).squeeze(1)
        return self._output(x, y)


class DisentangledNonLocalBlock(_PairwiseBlock):
    """Disentangled non-local block (DNL paper Eq. 7):

        w_ij = softmax_j((theta_i - mu_theta)^T (phi_j - mu_phi) / (sqrt(C') * T))   whitened pairwise
        u_j  = softmax_j(W_m x_j)                                                    unary
        z_i  = x_i + BN(W_z (sum_j w_ij g(x_j) + sum_j u_j g(x_j)))

    mu are spatial means (the whitening of Sec. 4.1); T is the temperature (mmseg's
    ``DNLHead`` default 0.05); W_m is a 1x1 conv to one channel with bias (mmseg
    ``conv_mask``). The unary term is one C'-vector per sample, added at every
    position before the shared output conv.

    The paper's Cityscapes ablations (Sec. 5.1; the official DNL-Semantic-Segmentation code's
    ``NonLocal2d_bn`` ``with_unary`` / ``with_gc`` and ``Unary2d``) are options of this block:

    * ``unary=None``: the whitened pairwise term alone ("pairwise alone");
    * ``pairwise=False``: the unary term alone ("unary alone"; no theta / phi convs);
    * ``unary="shared"``: the unary term from the pairwise term's key, ``u_j = softmax_j(mu_theta^T phi_j)``
      ("Add (shared key)": the factor exp(q_i^T k_j) leaves after whitening, Eq. 6; unscaled, as the official
      ``with_unary`` branch);
    * ``unary="disentangled"`` (default): its own key W_m, the DNL block ("Add (disentangled key)").
    """

    UNARY_KEYS = ("disentangled", "shared", None)

    def __init__(self, channels: int, reduction: int = 2, temperature: float = 0.05, dim: int = 2,
                 pairwise: bool = True, unary: str | None = "disentangled"):
        if unary not in self.UNARY_KEYS:
            raise ConfigError(f"dnl unary={unary!r}: use disentangled (DNL), shared (the pairwise term's key) or "
                              "null (the pairwise term alone)")
        if not pairwise and unary != "disentangled":
            raise ConfigError(f"dnl pairwise=false with unary={unary!r} leaves no term: the unary term alone is "
                              "unary=disentangled")
        super().__init__(channels, reduction, dim)
        self.temperature = temperature
        self.pairwise, self.unary = pairwise, unary
        if not pairwise:  # nothing reads the query and key: not built, so every parameter gets a gradient
            del self.theta, self.phi
        conv = nn.Conv2d if dim == 2 else nn.Conv3d
        if unary == "disentangled":
            self.unary_mask = conv(channels, 1, kernel_size=1)  # W_m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pairwise:
            theta, phi, g = self._embeddings(x)
            theta_mean = theta.mean(dim=2, keepdim=True)
            theta, phi = theta - theta_mean, phi - phi.mean(dim=2, keepdim=True)
            scale = 1.0 / (math.sqrt(self.inter_channels) * self.temperature)
            y = F.scaled_dot_product_attention(theta, phi, g, scale=scale).squeeze(1)  # (N, L, C')
        else:
            g = self.g(x).flatten(2).transpose(1, 2).unsqueeze(1)
        if self.unary is None:
            return self._output(x, y)
        if self.unary == "disentangled":
            logits = self.unary_mask(x).flatten(2)  # (N, 1, L)
        else:  # shared: mu_theta^T (phi_j - mu_phi), the same softmax as mu_theta^T phi_j (a shift constant in j)
            logits = theta_mean.squeeze(1) @ phi.squeeze(1).transpose(1, 2)  # (N, 1, L)
        unary = logits.softmax(dim=-1) @ g.squeeze(1)  # (N, 1, C'): the same at every position
        return self._output(x, y + unary if self.pairwise else unary.expand(-1, g.shape[2], -1))


class GatedNonLocalBlock(nn.Module):
    """The non-local block of the DNL paper's official segmentation code (DNL-Semantic-Segmentation,
    ``model/seg/ops/nonlocal_block.py``, ``NonLocal2d_bn``), which its HRNetV2-W48 rows use:

        w_ij = softmax_j((q_i - [mu_q])^T (k_j - [mu_k]) / (sqrt(C') * T))      pairwise ([ ]: ``whiten``)
        u_j  = softmax_j(W_m x_j)                                               unary (``unary``)
        y_i  = gamma * sum_j w_ij v_j + [sum_j u_j v_j]
        z_i  = x_i + [BN(W_out y_i)]                                            (``out_conv``)

    It is neither :class:`NonLocalBlock` nor :class:`DisentangledNonLocalBlock`: a learned scalar ``gamma``
    (zero at start, which makes the block the identity) scales the pairwise term alone; without ``out_conv`` the
    value is a C -> C conv without bias and nothing follows the sum (the official DNL setting, ``use_out=False``);
    with it the value is C -> C' with bias, then a 1x1 conv without bias and a BatchNorm of weight 1 (the official NL
    setting, ``use_out=out_bn=True``). mu are spatial means per channel (the official "in_nostd" / "channel"
    whitening); C' = C // ``reduction``; every conv starts N(0, 0.01) with zero bias, as the official
    ``reset_parameters``. The parameter names are the official ones, so its state dicts load as they are.
    """

    def __init__(self, channels: int, reduction: int = 2, temperature: float = 1.0, whiten: bool = False,
                 unary: bool = False, out_conv: bool = False):
        super().__init__()
        planes = max(channels // reduction, 1)
        self.conv_query = nn.Conv2d(channels, planes, kernel_size=1)
        self.conv_key = nn.Conv2d(channels, planes, kernel_size=1)
        self.conv_value = nn.Conv2d(channels, planes if out_conv else channels, kernel_size=1, bias=out_conv)
        self.conv_out = nn.Conv2d(planes, channels, kernel_size=1, bias=False) if out_conv else None
        self.out_bn = nn.BatchNorm2d(channels) if out_conv else None
        self.conv_mask = nn.Conv2d(channels, 1, kernel_size=1) if unary else None
        self.gamma = nn.Parameter(torch.zeros(1))
        self.scale = 1.0 / (math.sqrt(planes) * temperature)
        self.whiten = whiten
        for layer in self.modules():
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query, key = self.conv_query(x).flatten(2), self.conv_key(x).flatten(2)  # (N, C', L)
        value = self.conv_value(x).flatten(2)  # (N, C_v, L)
        if self.whiten:
            query, key = query - query.mean(dim=2, keepdim=True), key - key.mean(dim=2, keepdim=True)
        y = F.scaled_dot_product_attention(*(t.transpose(1, 2).unsqueeze(1) for t in (query, key, value)),
                                           scale=self.scale).squeeze(1).transpose(1, 2)  # (N, C_v, L)
        y = self.gamma * y
        if self.conv_mask is not None:
            y = y + value @ self.conv_mask(x).flatten(2).softmax(dim=-1).transpose(1, 2)  # (N, C_v, 1): every i
        y = y.reshape(x.shape[0], -1, *x.shape[2:])
        if self.conv_out is not None:
            y = self.out_bn(self.conv_out(y))
        return x + y
