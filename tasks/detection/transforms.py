"""Training augmentation on images, boxes and masks together (torchvision transforms v2).

All training-time resizing happens here; the detector's own resize (``GeneralizedRCNNTransform``) is
switched off in training and resizes only at test time, so that its detections come back in the
original image's coordinates. Padding to a multiple of 32 is the detector's (``size_divisible=32``).

The two recipes:

* 1x (FPN / Mask R-CNN papers, mmdet ``mask_rcnn_r50_fpn_1x``): short side 800, long side <= 1333,
  horizontal flip.
* Swin (``mask_rcnn_swin_*_mstrain_480-800_adamw_*`` of the Swin detection code): with probability 1/2,
  short side one of 480, 512, ..., 800 (long <= 1333); otherwise short side one of 400/500/600, a
  random crop whose sides are each uniform in [384, 600], then the multi-scale resize. Flip.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class RandomSizeCrop(v2.Transform):
    """Crop a window whose height and width are each drawn uniformly in ``[min_size, max_size]`` (clamped to
    the image), at a uniform position: mmdet's ``RandomCrop(crop_type="absolute_range",
    allow_negative_crop=True)`` of the Swin recipe. Boxes are clipped to the window; boxes left empty are
    removed by the ``SanitizeBoundingBoxes`` that follows, and a crop with no box left is kept."""

    def __init__(self, min_size: int, max_size: int):
        super().__init__()
        if not 0 < min_size <= max_size:
            raise ValueError(f"RandomSizeCrop needs 0 < min_size <= max_size, got {min_size}, {max_size}")
        self.min_size, self.max_size = min_size, max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)

        def draw(upper: int) -> int:
            return int(torch.randint(min(upper, self.min_size), min(upper, self.max_size) + 1, ()))

        crop_h, crop_w = draw(height), draw(width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return {"top": top, "left": left, "height": crop_h, "width": crop_w}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def train_transform(
    sizes: Sequence[int],
    max_size: int,
    hflip: float = 0.5,
    crop: Mapping[str, Any] | None = None,
) -> v2.Compose:
    """The training pipeline on ``(tv_tensors.Image, {"boxes": BoundingBoxes, "labels", "masks": Mask})``.

    Args:
        sizes: short side, one drawn per image (``[800]`` for 1x; 480..800 step 32 for Swin).
        max_size: longest side after resizing (1333).
        hflip: probability of a horizontal flip.
        crop: the Swin crop branch, ``{prob, sizes, min_size, max_size}``: with probability ``prob``,
            resize the short side to one of ``sizes`` and crop a window of sides in
            ``[min_size, max_size]`` before the multi-scale resize; None switches it off.
    """
    steps: list[v2.Transform] = []
    if crop:
        steps.append(
            v2.RandomApply(
                [
                    v2.Compose([
                        v2.RandomShortestSize(list(crop["sizes"]), max_size),
                        RandomSizeCrop(int(crop["min_size"]), int(crop["max_size"])),
                    ])
                ],
                p=float(crop["prob"]),
            )
        )
    steps += [
        v2.RandomShortestSize(list(sizes), max_size),
        v2.RandomHorizontalFlip(hflip),
        v2.SanitizeBoundingBoxes(min_size=1),  # boxes a crop left thinner than a pixel go, with labels and masks
        v2.ToDtype(torch.float32, scale=True),  # images only; normalisation is the detector's
    ]
    return v2.Compose(steps)


def eval_transform() -> v2.Compose:
    """Full-size images: the detector resizes (test size) and maps its detections back."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])
