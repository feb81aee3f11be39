"""Parameter and multiply-accumulate counts, as the papers report them.

MACs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (which counts a
multiply-add as 2 FLOPs, hence the halving) on the ``meta`` device, so even
ViT-L costs no memory or time. The counter sees convolutions, matrix products and
``scaled_dot_product_attention``: attention's QK^T and AV products are included, as
in the Swin and ViT papers' FLOP figures; element-wise work (norms, activations,
softmax) is not, as in every paper's table. A deformable convolution
(``torchvision.ops.deform_conv2d``, which the counter does not know) counts as the
regular convolution of its weight; its bilinear sampling, element-wise, does not count.
"""
from __future__ import annotations

import math

import torch
import torchvision.ops  # noqa: F401 - registers torch.ops.torchvision.deform_conv2d
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def _deform_conv_flops(input_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``deform_conv2d``: its weight's product at every output position (N x H_out x W_out), a
    multiply-add being 2."""
    n, _, height, width = out_shape
    return 2 * n * height * width * math.prod(weight_shape)


_UNKNOWN_TO_THE_COUNTER = {torch.ops.torchvision.deform_conv2d: _deform_conv_flops}


def flop_counter() -> FlopCounterMode:
    """torch's counter, silent, with the operators it does not know (deformable convolution) counted."""
    return FlopCounterMode(display=False, custom_mapping=_UNKNOWN_TO_THE_COUNTER)


def count_params(module: nn.Module) -> int:
    """Number of parameters (trainable or not), shared tensors counted once."""
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def count_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one ``module(x)`` with ``x`` of ``input_shape``.

    The input lives on the module's device (use a module built under
    ``torch.device("meta")`` for big models: only shapes are needed).
    """
    parameter = next(module.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    x = torch.zeros(input_shape, device=device)
    was_training = module.training
    module.eval()
    try:
        with flop_counter() as counter:
            module(x)
    finally:
        module.train(was_training)
    return counter.get_total_flops() // 2


def prefers_channels_last(model: nn.Module) -> bool:
    """A quarter of the weights or more in spatial (k x k, k > 1) convolutions: the models whose time goes to
    cuDNN/oneDNN convolution kernels, which are fastest on channels_last. ResNets qualify (44% in 3x3 convs);
    transformers (a patch embedding) and LR-Net (1x1 convs around local relation layers, whose strided
    window views are 2x slower on NHWC, measured) do not."""
    spatial = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1)
    return spatial >= 0.25 * count_params(model)
