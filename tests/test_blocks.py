"""vtrain.layers: each block against its paper's formula written out directly."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vtrain.config import ConfigError
from vtrain.layers import (DisentangledNonLocalBlock, GlobalContextBlock, LocalRelation2d, NonLocalBlock,
                           SimplifiedNonLocalBlock)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise(block: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values in every parameter and BN statistic, so no zero-init hides a term."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return block.eval()


def _bn(block, z):
    """Eval-mode BatchNorm of (N, C, ...) written out."""
    norm = block.out_norm
    shape = (1, -1) + (1,) * (z.dim() - 2)
    return ((z - norm.running_mean.view(shape)) / torch.sqrt(norm.running_var.view(shape) + norm.eps)
            * norm.weight.view(shape) + norm.bias.view(shape))


def _conv1x1(conv, x):
    weight = conv.weight.flatten(1)
    out = torch.einsum("oc,nc...->no...", weight, x)
    if conv.bias is not None:
        out = out + conv.bias.view((1, -1) + (1,) * (x.dim() - 2))
    return out


# ---------------------------------------------------------------- GC block


@pytest.mark.parametrize("shape", [(2, 32, 5, 7), (2, 32, 3, 4, 5)])
def test_gc_block_is_identity_at_init_and_not_after(shape):
    block = GlobalContextBlock(32, ratio=1 / 4, dim=len(shape) - 2)
    x = torch.randn(shape)
    assert torch.equal(block(x), x)
    with torch.no_grad():
        block.transform[-1].weight.normal_()
    assert not torch.allclose(block(x), x)


def test_gc_block_formula_and_size():
    torch.manual_seed(0)
    block = _randomise(GlobalContextBlock(16, ratio=1 / 4))
    x = torch.randn(2, 16, 5, 6)
    weights = torch.softmax(_conv1x1(block.context_mask, x).flatten(2), dim=-1)  # (N, 1, L)
    context = (x.flatten(2) * weights).sum(-1)[..., None, None]  # (N, C, 1, 1)
    hidden = _conv1x1(block.transform[0], context)
    mean, var = hidden.mean(dim=1, keepdim=True), hidden.var(dim=1, unbiased=False, keepdim=True)
    ln = block.transform[1]
    hidden = (hidden - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias
    expected = x + _conv1x1(block.transform[3], hidden.relu())
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # W_k (C + 1) + W_v1 (C*C/r + C/r) + LN (2 C/r) + W_v2 (C/r*C + C)
    c, h = 16, 4
    assert sum(p.numel() for p in block.parameters()) == (c + 1) + (c * h + h) + 2 * h + (h * c + c)


def test_simplified_non_local_formula_size_and_identity_start():
    """GCNet Eq. 3: z_i = x_i + W_v sum_j softmax_j(W_k x_j) x_j, W_v one C x C 1x1 conv."""
    x = torch.randn(2, 16, 5, 6)
    assert torch.equal(SimplifiedNonLocalBlock(16)(x), x)
    block = _randomise(SimplifiedNonLocalBlock(16))
    weights = torch.softmax(_conv1x1(block.context_mask, x).flatten(2), dim=-1)  # (N, 1, L)
    context = (x.flatten(2) * weights).sum(-1)[..., None, None]
    torch.testing.assert_close(block(x), x + _conv1x1(block.transform, context), rtol=1e-5, atol=1e-5)
    c = 16  # W_k (C + 1) + W_v (C*C + C)
    assert sum(p.numel() for p in block.parameters()) == (c + 1) + (c * c + c)


# ---------------------------------------------------------------- NL / DNL


@pytest.mark.parametrize("dim", [2, 3])
def test_non_local_matches_embedded_gaussian_formula(dim):
    torch.manual_seed(0)
    block = _randomise(NonLocalBlock(8, reduction=2, dim=dim))
    x = torch.randn((2, 8, 3, 4) if dim == 2 else (2, 8, 2, 3, 4))
    theta, phi, g = (_conv1x1(conv, x).flatten(2) for conv in (block.theta, block.phi, block.g))  # (N, C', L)
    attention = torch.softmax(torch.einsum("nci,ncj->nij", theta, phi) / math.sqrt(4), dim=-1)
    y = torch.einsum("nij,ncj->nci", attention, g).reshape(2, 4, *x.shape[2:])
    expected = x + _bn(block, _conv1x1(block.out_conv, y))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_non_local_sub_sampled_without_scale_matches_formula(dim):
    """The NL paper's video variant / mmaction2's I3D-NL: phi and g max-pooled 2x2 in space, no 1/sqrt(C')."""
    torch.manual_seed(0)
    block = _randomise(NonLocalBlock(8, reduction=2, dim=dim, sub_sample=True, use_scale=False))
    x = torch.randn((2, 8, 4, 6) if dim == 2 else (2, 8, 2, 4, 6))
    pool = (lambda t: F.max_pool2d(t, 2)) if dim == 2 else (lambda t: F.max_pool3d(t, (1, 2, 2)))
    theta = _conv1x1(block.theta, x).flatten(2)
    phi, g = (pool(_conv1x1(conv, x)).flatten(2) for conv in (block.phi, block.g))  # (N, C', L/4)
    assert phi.shape[-1] * 4 == theta.shape[-1]
    attention = torch.softmax(torch.einsum("nci,ncj->nij", theta, phi), dim=-1)
    y = torch.einsum("nij,ncj->nci", attention, g).reshape(2, 4, *x.shape[2:])
    expected = x + _bn(block, _conv1x1(block.out_conv, y))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_disentangled_non_local_matches_formula(dim):
    torch.manual_seed(0)
    block = _randomise(DisentangledNonLocalBlock(8, reduction=2, temperature=0.5, dim=dim))
    x = torch.randn((2, 8, 3, 4) if dim == 2 else (2, 8, 2, 3, 4))
    theta, phi, g = (_conv1x1(conv, x).flatten(2) for conv in (block.theta, block.phi, block.g))
    theta = theta - theta.mean(dim=-1, keepdim=True)  # whitening: subtract the spatial means
    phi = phi - phi.mean(dim=-1, keepdim=True)
    pairwise = torch.softmax(torch.einsum("nci,ncj->nij", theta, phi) / (math.sqrt(4) * 0.5), dim=-1)
    unary = torch.softmax(_conv1x1(block.unary_mask, x).flatten(2), dim=-1)  # (N, 1, L)
    y = torch.einsum("nij,ncj->nci", pairwise, g) + torch.einsum("noj,ncj->nc", unary, g)[..., None]
    expected = x + _bn(block, _conv1x1(block.out_conv, y.reshape(2, 4, *x.shape[2:])))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pairwise,unary", [(True, None), (False, "disentangled"), (True, "shared")])
def test_dnl_ablation_variants_match_their_terms(pairwise, unary):
    """DNL Sec. 5.1 ablations, each term written out: the whitened pairwise term alone, the unary term
    softmax_j(W_m x_j) alone, and pairwise + the shared-key unary term softmax_j(mu_theta^T phi_j) (unscaled)."""
    torch.manual_seed(0)
    block = _randomise(DisentangledNonLocalBlock(8, reduction=2, temperature=0.5, pairwise=pairwise, unary=unary))
    x = torch.randn(2, 8, 3, 4)
    g = _conv1x1(block.g, x).flatten(2)  # (N, C', L)
    y = torch.zeros_like(g)
    if pairwise:
        theta, phi = (_conv1x1(conv, x).flatten(2) for conv in (block.theta, block.phi))
        mu_theta = theta.mean(dim=-1)  # (N, C')
        theta, phi = theta - mu_theta[..., None], phi - phi.mean(dim=-1, keepdim=True)
        weights = torch.softmax(torch.einsum("nci,ncj->nij", theta, phi) / (math.sqrt(4) * 0.5), dim=-1)
        y = y + torch.einsum("nij,ncj->nci", weights, g)
    if unary == "disentangled":
        y = y + torch.einsum("nj,ncj->nc", torch.softmax(_conv1x1(block.unary_mask, x).flatten(1), -1), g)[..., None]
    if unary == "shared":
        raw_phi = _conv1x1(block.phi, x).flatten(2)
        u = torch.softmax(torch.einsum("nc,ncj->nj", mu_theta, raw_phi), dim=-1)
        y = y + torch.einsum("nj,ncj->nc", u, g)[..., None]
    expected = x + _bn(block, _conv1x1(block.out_conv, y.reshape(2, 4, 3, 4)))
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # what each variant builds: theta/phi only with the pairwise term, W_m only with the disentangled key
    names = {name.split(".")[0] for name, _ in block.named_parameters()}
    assert ("theta" in names) == pairwise and ("unary_mask" in names) == (unary == "disentangled")


def test_dnl_variant_options_are_checked():
    with pytest.raises(ConfigError, match="^dnl unary='own': use disentangled"):
        DisentangledNonLocalBlock(8, unary="own")
    with pytest.raises(ConfigError, match="leaves no term"):
        DisentangledNonLocalBlock(8, pairwise=False, unary=None)


@pytest.mark.parametrize("block_type", [NonLocalBlock, DisentangledNonLocalBlock])
def test_non_local_blocks_are_identity_at_init(block_type):
    x = torch.randn(2, 16, 4, 5)
    assert torch.equal(block_type(16).eval()(x), x)


# ---------------------------------------------------------------- local relation


def test_local_relation_reference_matches_loops_with_masking():
    """Eq. 1-4 with explicit loops: out-of-image window positions are left out of the softmax."""
    torch.manual_seed(0)
    layer = LocalRelation2d(4, kernel_size=3, m=2)  # G = 2 groups of 2 channels
    x = torch.randn(1, 4, 3, 4)
    q, k = layer.query(x)[0], layer.key(x)[0]
    prior = layer.geometry_prior(layer.relative_positions).t()  # (G, 9)
    expected = torch.zeros(4, 3, 4)
    for i in range(3):
        for j in range(4):
            for group in range(2):
                logits, values = [], []
                for p, (di, dj) in enumerate([(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]):
                    if 0 <= i + di < 3 and 0 <= j + dj < 4:
                        logits.append(-(q[group, i, j] - k[group, i + di, j + dj]) ** 2 + prior[group, p])
                        values.append(x[0, 2 * group: 2 * group + 2, i + di, j + dj])
                weights = torch.softmax(torch.stack(logits), dim=0)
                expected[2 * group: 2 * group + 2, i, j] = (weights[:, None] * torch.stack(values)).sum(0)
    torch.testing.assert_close(layer.aggregate_reference(x)[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.aggregate_fast(x)[0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "channels, m, stride, dilation, composability",
    [(16, 8, 1, 1, "squared_difference"), (20, 8, 2, 1, "squared_difference"), (12, 4, 1, 2, "dot"), (8, 8, 2, 1, "dot")],
)
def test_local_relation_fast_equals_reference_with_gradients(channels, m, stride, dilation, composability):
    torch.manual_seed(0)
    layer = LocalRelation2d(channels, kernel_size=5, stride=stride, dilation=dilation, m=m, composability=composability)
    x = torch.randn(2, channels, 9, 11, requires_grad=True)
    outputs, grads = [], []
    for path in (layer.aggregate_reference, layer.aggregate_fast):
        y = layer.proj(path(x))
        upstream = torch.linspace(-1, 1, y.numel()).view_as(y)
        grads.append(torch.autograd.grad((y * upstream).sum(), [x, *layer.parameters()]))
        outputs.append(y)
    assert outputs[0].shape == (2, channels, (9 - 1) // stride + 1, (11 - 1) // stride + 1)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)
    for fast, reference in zip(grads[1], grads[0]):
        torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_local_relation_geometry_prior_and_sizes():
    layer = LocalRelation2d(64, kernel_size=7, m=8)
    # key + query (C * C/m + C/m each), prior MLP (2 -> 4 -> 8), closing 1x1 (C^2)
    assert sum(p.numel() for p in layer.parameters()) == 2 * (64 * 8 + 8) + (2 * 4 + 4) + (4 * 8 + 8) + 64 * 64
    assert layer.relative_positions.shape == (49, 2) and layer.relative_positions.abs().max() == 1
    # aggregating a constant map gives the sum of the weights: one everywhere, borders included,
    # only if out-of-image positions are left out of the softmax (a zero-padded logit would leak weight)
    ones = torch.ones(1, 64, 9, 9)
    for path in (layer.aggregate_reference, layer.aggregate_fast):
        torch.testing.assert_close(path(ones), ones)
    x = torch.randn(1, 64, 9, 9)
    assert layer(x).shape == x.shape


# ---------------------------------------------------------------- deformable convolution
def _bilinear(x: torch.Tensor, y: float, xx: float) -> torch.Tensor:
    """x (C, H, W) sampled at (y, xx), bilinearly, zero outside the map (the DCN papers' G(q, p))."""
    height, width = x.shape[-2:]
    y0, x0 = math.floor(y), math.floor(xx)
    value = torch.zeros(x.shape[0], dtype=x.dtype)
    for yy in (y0, y0 + 1):
        for xi in (x0, x0 + 1):
            if 0 <= yy < height and 0 <= xi < width:
                value += max(0.0, 1 - abs(y - yy)) * max(0.0, 1 - abs(xx - xi)) * x[:, yy, xi]
    return value


def _deformable_by_hand(layer, x: torch.Tensor) -> torch.Tensor:
    """DCN v1 Eq. 2 / v2 Eq. 3 with loops: y(p) = sum_k w_k * m_k * x(p0 + p_k + dp_k), per offset group and
    convolution group, from the layer's own offsets (dy, dx per kernel position, the original code's layout)."""
    offset, mask = layer.offsets(x)
    weight = layer.weight
    out_channels, per_group, k, _ = weight.shape
    groups, deform_groups = x.shape[1] // per_group, offset.shape[1] // (2 * k * k)
    stride, pad, dil = layer.stride[0], layer.padding[0], layer.dilation[0]
    n, channels, height, width = x.shape
    out_h, out_w = offset.shape[-2:]
    result = torch.zeros(n, out_channels, out_h, out_w, dtype=x.dtype)
    for b in range(n):
        for i in range(out_h):
            for j in range(out_w):
                samples = torch.zeros(channels, k * k, dtype=x.dtype)
                for dg in range(deform_groups):
                    chans = slice(dg * channels // deform_groups, (dg + 1) * channels // deform_groups)
                    for kk in range(k * k):
                        dy = offset[b, dg * 2 * k * k + 2 * kk, i, j]
                        dx = offset[b, dg * 2 * k * k + 2 * kk + 1, i, j]
                        y = i * stride - pad + (kk // k) * dil + float(dy)
                        xx = j * stride - pad + (kk % k) * dil + float(dx)
                        value = _bilinear(x[b, chans], y, xx)
                        if mask is not None:
                            value = value * mask[b, dg * k * k + kk, i, j]
                        samples[chans, kk] = value
                for g in range(groups):
                    outs = slice(g * out_channels // groups, (g + 1) * out_channels // groups)
                    ins = samples[g * per_group:(g + 1) * per_group]  # (per_group, k*k)
                    result[b, outs, i, j] = torch.einsum("ock,ck->o", weight[outs].flatten(2), ins)
    return result


@pytest.mark.parametrize("modulated, groups, deform_groups, stride, dilation", [
    (False, 1, 1, 1, 1), (True, 1, 1, 2, 1), (False, 2, 2, 1, 2), (True, 2, 1, 2, 1)])
def test_deformable_conv_equals_bilinear_sampling_by_hand(modulated, groups, deform_groups, stride, dilation):
    """torchvision's kernel under vtrain's layer = the papers' sum over bilinearly sampled, shifted (and, in v2,
    modulated) positions, with offsets of several pixels and fractions, some landing outside the map."""
    from vtrain.layers.deform_conv import DeformableConv2d

    torch.manual_seed(0)
    layer = DeformableConv2d(4, 6, 3, stride=stride, padding=dilation, dilation=dilation, groups=groups,
                             deform_groups=deform_groups, modulated=modulated).double()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.5)
        layer.conv_offset.bias.normal_(0, 1.5)
    x = torch.randn(2, 4, 6, 7, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _deformable_by_hand(layer, x))


@pytest.mark.parametrize("modulated, scale", [(False, 1.0), (True, 0.5)])
def test_deformable_conv_starts_as_the_regular_conv(modulated, scale):
    """Offsets start at zero (mmcv's init): v1 is the regular conv it replaced, v2 half of it (sigmoid(0))."""
    from vtrain.layers.deform_conv import DeformableConv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2, bias=False)
    layer = DeformableConv2d.from_conv(conv, modulated=modulated)
    x = torch.randn(1, 8, 9, 9)
    torch.testing.assert_close(layer(x), scale * conv(x), rtol=1e-5, atol=1e-5)
    assert layer.conv_offset.out_channels == (27 if modulated else 18)


def test_a_deformable_conv_counts_as_its_conv_and_its_offset_conv():
    """vtrain.profiling counts torchvision's deform_conv2d (unknown to torch's counter) as its weight's convolution."""
    from vtrain.layers.deform_conv import DeformableConv2d
    from vtrain.profiling import count_macs

    conv = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2, bias=False)
    layer = DeformableConv2d.from_conv(conv, modulated=True)
    assert count_macs(conv, (1, 8, 10, 10)) == 25 * 16 * 4 * 9 == 14_400
    assert count_macs(layer, (1, 8, 10, 10)) == 14_400 + count_macs(layer.conv_offset, (1, 8, 10, 10))
