"""Two augmented views of each ImageNet image (labels unused): MoBY's pre-training data, as the official
``data/build.py`` of SwinTransformer/Transformer-SSL makes it (``AUG.SSL_AUG_TYPE='byol'``)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageFilter, ImageOps
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from vtrain.data.datamodule import (
    DataModule,
    LabelledFileDataset,
    check_class_folders,
    class_folder_samples,
    list_classes,
    read_rgb,
)

LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG (the ImageNet layout; labels are not read)"


class GaussianBlur:
    """The official ``GaussianBlur``: PIL's blur with a radius drawn uniformly from [0.1, 2.0]."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(*self.sigma)))


def byol_view(img_size: int, crop_scale: float, blur: float, solarize: float,
              mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """One view of BYOL's augmentation (Grill et al. 2020, Table 6) as the official ``build_transform``: random
    resized crop (scale ``crop_scale``-1), flip, colour jitter (0.4, 0.4, 0.2, 0.1) at 0.8, grey at 0.2, then
    blur and solarize at the view's own probabilities (view 1: 1.0 and 0; view 2: 0.1 and 0.2)."""
    steps = [T.RandomResizedCrop(img_size, scale=(crop_scale, 1.0)), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
             T.RandomApply([GaussianBlur()], p=blur)]
    if solarize > 0:
        steps.append(T.RandomApply([ImageOps.solarize], p=solarize))
    return T.Compose(steps + [T.ToTensor(), T.Normalize(mean, std)])


class TwoViewDataset(LabelledFileDataset):
    """Each image as ``[view1(image), view2(image)]``; unreadable files are skipped as None or named in an error
    (:mod:`vtrain.data.datamodule`)."""

    kind = "image"

    def __init__(self, samples: list[tuple[str, int]], views: Sequence[T.Compose], skip_corrupt: bool = True):
        super().__init__(samples, skip_corrupt)
        self.views = list(views)

    def load(self, path: str) -> Image.Image:
        return read_rgb(path)

    def __getitem__(self, i: int) -> list[Any] | None:
        image = self.read(self.samples[i][0])
        return None if image is None else [view(image) for view in self.views]


class TwoViewDataModule(DataModule):
    """ImageNet's class folders read as unlabelled images, each given as two views (:func:`byol_view`).

    Args:
        img_size: the crop of both views (the official ``DATA.IMG_SIZE``).
        crop_scale: the random resized crop's smallest area fraction (``AUG.SSL_AUG_CROP``, 0.08).
        blur, solarize: each view's probabilities (``[view1, view2]``), BYOL's asymmetric ones by default.
        mean, std: normalisation (the official code: ImageNet's).
        **loading: the other :class:`vtrain.data.datamodule.DataModule` arguments.
    The validation split gives the same two views (a held-out contrastive loss; the official code has none).
    """

    def __init__(self, root: str, num_classes: int, img_size: int = 224, batch_size: int = 64, num_workers: int = 8,
                 crop_scale: float = 0.08, blur: Sequence[float] = (1.0, 0.1), solarize: Sequence[float] = (0.0, 0.2),
                 mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
                 **loading: Any):
        super().__init__(root, num_classes, batch_size=batch_size, num_workers=num_workers, **loading)
        self.img_size, self.crop_scale = img_size, crop_scale
        self.blur, self.solarize = tuple(blur), tuple(solarize)
        self.mean, self.std = tuple(mean), tuple(std)

    def check(self) -> None:
        check_class_folders(self.root, self.num_classes, IMG_EXTENSIONS, "image", f"the layout {LAYOUT}")

    def views(self) -> list[T.Compose]:
        return [byol_view(self.img_size, self.crop_scale, blur, solarize, self.mean, self.std)
                for blur, solarize in zip(self.blur, self.solarize)]

    def build_sets(self, stage: str) -> None:
        classes = list_classes(self.root / "train")
        for split in ("train", "val") if stage == "fit" else ("val",):
            samples = class_folder_samples(self.root / split, classes, IMG_EXTENSIONS)
            setattr(self, f"{split}_set", TwoViewDataset(samples, self.views(), self.skip_corrupt))
