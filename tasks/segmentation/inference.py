"""Test-time inference of a segmenter on one image, as mmsegmentation's ``EncoderDecoder`` does it.

``encode(images)`` is the model: (N, 3, h, w) -> logits (N, C, h, w) at its input's size. On top of it:

* ``whole``: the image at once;
* ``slide``: overlapping ``crop_size`` windows every ``stride`` pixels (the last window of a row or
  column flush with the border), logits summed and divided by the number of windows covering each pixel
  (mmseg ``slide_inference``);
* ``predict``: resize the image keeping its aspect ratio so that its long / short sides fit ``scale``
  (ADE20K: (2048, 512), i.e. short side 512), run whole or slide, resize the logits back to the original
  size and take the softmax. With several ``ratios`` (multi-scale: 0.5 ... 1.75) and / or ``flip``, the
  softmax outputs of every scale and flip are averaged (mmseg ``aug_test``; Swin Table 3 "ms+flip").
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Encoder = Callable[[torch.Tensor], torch.Tensor]


def rescale_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0) -> tuple[int, int]:
    """mmcv ``rescale_size`` with ``keep_ratio``: the largest size with long side <= max(scale) * ratio and
    short side <= min(scale) * ratio (each bound truncated to an int first, as mmseg's image scales)."""
    long_edge, short_edge = int(max(scale) * ratio), int(min(scale) * ratio)
    factor = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize_bilinear(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def whole(encode: Encoder, image: torch.Tensor) -> torch.Tensor:
    return encode(image)


def slide(encode: Encoder, image: torch.Tensor, crop_size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Logits of overlapping windows, averaged where they overlap."""
    h_crop, w_crop = crop_size
    h_stride, w_stride = stride
    n, _, h, w = image.shape
    h_grids = max(h - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(w - w_crop + w_stride - 1, 0) // w_stride + 1
    logits, count = None, image.new_zeros(1, 1, h, w)
    for i in range(h_grids):
        for j in range(w_grids):
            y2, x2 = min(i * h_stride + h_crop, h), min(j * w_stride + w_crop, w)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            crop_logits = encode(image[:, :, y1:y2, x1:x2])
            if logits is None:
                logits = image.new_zeros(n, crop_logits.shape[1], h, w)
            logits[:, :, y1:y2, x1:x2] += crop_logits
            count[:, :, y1:y2, x1:x2] += 1
    return logits / count


def predict(
    encode: Encoder,
    image: torch.Tensor,
    *,
    scale: Sequence[int] | None,
    mode: str = "whole",
    ratios: Sequence[float] = (1.0,),
    flip: bool = False,
    crop_size: Sequence[int] = (512, 512),
    stride: Sequence[int] = (341, 341),
) -> torch.Tensor:
    """Class probabilities (N, C, H, W) at the size of ``image`` (its original size)."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"inference mode {mode!r}: use whole or slide")
    height, width = image.shape[-2:]
    probs = None
    for ratio in ratios:
        size = rescale_size(height, width, scale, ratio) if scale else (height, width)
        scaled = resize_bilinear(image, size)
        for flipped in (False, True) if flip else (False,):
            x = scaled.flip(-1) if flipped else scaled
            logits = whole(encode, x) if mode == "whole" else slide(encode, x, crop_size, stride)
            if flipped:
                logits = logits.flip(-1)
            p = resize_bilinear(logits, (height, width)).softmax(dim=1)
            probs = p if probs is None else probs + p
    return probs / (len(ratios) * (2 if flip else 1))
