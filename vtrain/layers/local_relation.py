"""Local relation layer (Hu, Zhang, Xie, Lin, "Local Relation Networks for Image
Recognition", ICCV 2019), Sec. 3 and Fig. 2.

For an output position p with k x k window Omega(p) (zero padding, stride s,
dilation d, as a k x k convolution), each of the G = C/m aggregation groups computes

    w_g(p, p') = softmax_{p' in Omega(p)} ( Phi(q_g(p), k_g(p')) + geo_g(p' - p) )   (Eq. 2-4)
    y_c(p)     = sum_{p'} w_{g(c)}(p, p') x_c(p')                                    (Eq. 1)

and the layer returns ``proj(y)``, a 1x1 conv:

* key and query are 1x1 convs to C/m channels: one scalar per group, and m channels
  (default 8) share one set of aggregation weights (channel sharing, Sec. 3.3). LR-Net's
  100-channel stage is not a multiple of 8: groups = ceil(C/m), consecutive channels,
  the last group smaller (100 = 12 * 8 + 4);
* appearance composability Phi = -(q - k)^2 (the paper's default), or q * k;
* the geometric prior geo is a two-layer MLP (2 -> hidden -> C/m, ReLU between) on
  the relative offset of p' (in [-1, 1]); hidden is C/(2m), as the public
  re-implementations (the paper only gives the two-layer structure);
* window positions outside the image are masked out of the softmax (the official
  CUDA kernel gives them a -100 logit), not given logit 0;
* the closing 1x1 conv (no bias: a BatchNorm follows in LR-Net) is what makes the
  paper's LR-Net sizes add up (each layer holds C^2 + 2C^2/m weights: 23.3M for
  LR-Net-50 and 14.7M for LR-Net-26 need the C^2 term).

Two implementations of the same function:

* ``reference``: ``F.unfold`` the values into (N, G, m, k*k, L) and reduce with an
  einsum. Plain, but it materialises k*k copies of the input.
* ``fast`` (default): loops over the k*k offsets with strided views of the padded
  input, so nothing of size k*k*C*L is ever stored (the autograd graph keeps views).
  The logits use -(q - k)^2 = 2qk - k^2 - q^2, where -q^2 is constant over the
  window and cancels in the softmax.

On the ``meta`` device (shape-only runs such as ``vtrain.profiling.count_macs``) the
reference path runs, so that the counter sees the aggregation as a matrix product
(C*k*k MACs per output position).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LocalRelation2d(nn.Module):
    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        stride: int = 1,
        dilation: int = 1,
        m: int = 8,
        composability: str = "squared_difference",
        implementation: str = "fast",
    ):
        super().__init__()
        if composability not in ("squared_difference", "dot"):
            raise ValueError(f"composability must be 'squared_difference' or 'dot', got {composability!r}")
        if implementation not in ("fast", "reference"):
            raise ValueError(f"implementation must be 'fast' or 'reference', got {implementation!r}")
        self.channels, self.kernel_size, self.stride, self.dilation, self.m = channels, kernel_size, stride, dilation, m
        self.groups = -(-channels // m)  # the last group is smaller when m does not divide C
        self.composability, self.implementation = composability, implementation
        self.key = nn.Conv2d(channels, self.groups, kernel_size=1)
        self.query = nn.Conv2d(channels, self.groups, kernel_size=1)
        hidden = max(self.groups // 2, 1)
        self.geometry_prior = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, self.groups))
        self.proj = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        half = kernel_size // 2
        offsets = torch.arange(kernel_size, dtype=torch.float32) - half
        grid = torch.stack(torch.meshgrid(offsets, offsets, indexing="ij"), dim=-1).reshape(-1, 2)
        self.register_buffer("relative_positions", grid / max(half, 1), persistent=False)  # (k*k, 2) as (dy, dx)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, dilation={self.dilation}, "
                f"m={self.m}, composability={self.composability}, implementation={self.implementation}")

    def _output_size(self, h: int, w: int) -> tuple[int, int]:
        return (h - 1) // self.stride + 1, (w - 1) // self.stride + 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.implementation == "reference" or x.device.type == "meta":
            y = self.aggregate_reference(x)
        else:
            y = self.aggregate_fast(x)
        return self.proj(y)

    def _prior(self) -> torch.Tensor:
        return self.geometry_prior(self.relative_positions).t()  # (G, k*k)

    def aggregate_reference(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, s, d, g = self.kernel_size, self.stride, self.dilation, self.groups
        ho, wo = self._output_size(h, w)
        unfold = dict(kernel_size=k, dilation=d, padding=d * (k // 2), stride=s)
        keys = F.unfold(self.key(x), **unfold).view(n, g, k * k, ho * wo)
        queries = self.query(x)[:, :, ::s, ::s].reshape(n, g, 1, ho * wo)
        inside = F.unfold(x.new_ones(1, 1, h, w), **unfold).view(1, 1, k * k, ho * wo) > 0
        if self.composability == "squared_difference":
            logits = -(queries - keys) ** 2
        else:
            logits = queries * keys
        logits = logits + self._prior().view(1, g, k * k, 1)
        weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
        values = F.unfold(self._pad_channels(x), **unfold).view(n, g, self.m, k * k, ho * wo)
        y = torch.einsum("ngpl,ngmpl->ngml", weights, values)
        return y.reshape(n, g * self.m, ho, wo)[:, :c]

    def _pad_channels(self, x: torch.Tensor, spatial: int = 0) -> torch.Tensor:
        """Zero channels up to groups * m (and ``spatial`` zeros around H and W)."""
        extra = self.groups * self.m - x.shape[1]
        if extra == 0 and spatial == 0:
            return x
        return F.pad(x, (spatial, spatial, spatial, spatial, 0, extra))

    def aggregate_fast(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k, s, d, g = self.kernel_size, self.stride, self.dilation, self.groups
        ho, wo = self._output_size(h, w)
        unfold = dict(kernel_size=k, dilation=d, padding=d * (k // 2), stride=s)
        # The key has only C/m channels: unfolding it is cheap, unlike the values.
        keys = F.unfold(self.key(x), **unfold).view(n, g, k * k, ho, wo)
        queries = self.query(x)[:, :, ::s, ::s].unsqueeze(2)  # (N, G, 1, Ho, Wo)
        inside = F.unfold(x.new_ones(1, 1, h, w), **unfold).view(1, 1, k * k, ho, wo) > 0
        if self.composability == "squared_difference":
            logits = keys * (2 * queries - keys)  # -(q - k)^2 + q^2, and q^2 cancels in the softmax
        else:
            logits = queries * keys
        logits = logits + self._prior().view(1, g, k * k, 1, 1)
        weights = logits.masked_fill(~inside, float("-inf")).softmax(dim=2)
        weights = weights.permute(2, 0, 1, 3, 4).unsqueeze(3)  # (k*k, N, G, 1, Ho, Wo)
        pad = d * (k // 2)
        values = self._pad_channels(x, spatial=pad).view(n, g, self.m, h + 2 * pad, w + 2 * pad)
        y = _WindowAggregation.apply(weights.contiguous(), values, k, s, d)
        return y.reshape(n, g * self.m, ho, wo)[:, :c]


def _window(padded: torch.Tensor, offset: int, kernel_size: int, stride: int, dilation: int, size: tuple[int, int]):
    """Strided view of a padded map at one window offset (row-major over the k x k window)."""
    i, j = divmod(offset, kernel_size)
    ho, wo = size
    return padded[..., i * dilation: i * dilation + stride * (ho - 1) + 1: stride,
                  j * dilation: j * dilation + stride * (wo - 1) + 1: stride]


class _WindowAggregation(torch.autograd.Function):
    """y = sum_p weights[p] * window_p(values), one in-place multiply-add per window offset.

    Autograd through k*k slices would allocate a zero tensor of the padded input's
    size for every slice's backward; here the value gradient is accumulated in one
    buffer, in place, and the weight gradient one offset at a time, one channel of
    each group at a time (a reduction over the shared-channel axis is slow on CPU).
    """

    @staticmethod
    def forward(ctx, weights, values, kernel_size, stride, dilation):
        # weights (P, N, G, 1, Ho, Wo); values (N, G, m, Hp, Wp), zero padded
        size = weights.shape[-2:]
        y = values.new_zeros(values.shape[:3] + size)
        for offset in range(weights.shape[0]):
            y.addcmul_(weights[offset], _window(values, offset, kernel_size, stride, dilation, size))
        ctx.save_for_backward(weights, values)
        ctx.geometry = (kernel_size, stride, dilation)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        weights, values = ctx.saved_tensors
        geometry = ctx.geometry
        size = weights.shape[-2:]
        grad_y = grad_y.contiguous()
        grad_weights = torch.empty_like(weights) if ctx.needs_input_grad[0] else None
        grad_values = torch.zeros_like(values) if ctx.needs_input_grad[1] else None
        for offset in range(weights.shape[0]):
            window = _window(values, offset, *geometry, size)
            if grad_weights is not None:
                grad_weight = grad_weights[offset]  # (N, G, 1, Ho, Wo)
                torch.mul(grad_y[:, :, :1], window[:, :, :1], out=grad_weight)
                for channel in range(1, values.shape[2]):
                    grad_weight.addcmul_(grad_y[:, :, channel: channel + 1], window[:, :, channel: channel + 1])
            if grad_values is not None:
                _window(grad_values, offset, *geometry, size).addcmul_(weights[offset], grad_y)
        return grad_weights, grad_values, None, None, None
