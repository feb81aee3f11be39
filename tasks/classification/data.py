"""ImageNet-1K folder layout: ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
from PIL import Image
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.datasets.folder import IMG_EXTENSIONS

from vtrain import ConfigError
from vtrain.data import build_loader

log = logging.getLogger(__name__)
LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG"


class CorruptImageError(RuntimeError):
    pass


def list_classes(split_dir: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


class ImageFolderDataset(Dataset):
    """``torchvision.datasets.ImageFolder`` semantics with a class index fixed by the training split, and
    unreadable files either named in an error or skipped (returned as ``None``, dropped by the collate)."""

    def __init__(self, split_dir: Path, classes: list[str], transform=None, skip_corrupt: bool = False):
        self.transform, self.skip_corrupt = transform, skip_corrupt
        self.samples: list[tuple[str, int]] = []
        for index, name in enumerate(classes):
            class_dir = split_dir / name
            if not class_dir.is_dir():
                continue
            for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
                if entry.is_file() and _is_image(entry.name):
                    self.samples.append((entry.path, index))
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            if not self.skip_corrupt:
                raise CorruptImageError(f"cannot read image {path} ({e}): fix or remove it, or set data.skip_corrupt=true") from e
            self.skipped += 1
            log.warning("skipped unreadable image %s (%d skipped by this worker)", path, self.skipped)
            return None
        return (self.transform(image) if self.transform else image), target


def collate_skipping_none(batch: list[Any]):
    return default_collate([b for b in batch if b is not None])


class ImageFolderDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        num_classes: int,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        skip_corrupt: bool = False,
        augment: Mapping[str, Any] | None = None,
        eval_crop_pct: float = 0.875,
        eval_interpolation: str = "bicubic",
        seed: int = 0,
    ):
        super().__init__()
        self.root = Path(root)
        self.num_classes, self.img_size, self.batch_size = num_classes, img_size, batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.skip_corrupt = skip_corrupt
        self.augment = dict(augment or {})
        self.eval_crop_pct, self.eval_interpolation = eval_crop_pct, eval_interpolation
        self.seed = seed
        self.classes: list[str] = []

    # ------------------------------------------------------------------ checks before anything starts
    def check(self) -> None:
        """Fail in one line when ``root`` is missing or not laid out as ImageNet."""
        for split in ("train", "val"):
            split_dir = self.root / split
            if not split_dir.is_dir():
                raise ConfigError(f"data.root={self.root}: no {split}/ folder; expected the ImageNet layout {LAYOUT}")
            classes = list_classes(split_dir)
            if not classes:
                raise ConfigError(f"data.root={self.root}: {split}/ has no class folders; expected {LAYOUT}")
            first = split_dir / classes[0]
            if not any(_is_image(e.name) for e in os.scandir(first)):
                raise ConfigError(f"data.root={self.root}: {first} holds no image; expected {LAYOUT}")
        train, val = list_classes(self.root / "train"), list_classes(self.root / "val")
        if len(train) != self.num_classes:
            raise ConfigError(
                f"data.root={self.root} has {len(train)} classes but data.num_classes={self.num_classes}: "
                f"set data.num_classes={len(train)}"
            )
        unknown = sorted(set(val) - set(train))
        if unknown:
            raise ConfigError(f"data.root={self.root}: val/ has classes missing from train/ ({', '.join(unknown[:3])}): fix the layout")

    # ------------------------------------------------------------------ datasets
    def train_transform(self):
        return create_transform(self.img_size, is_training=True, **self.augment)

    def eval_transform(self):
        return create_transform(
            self.img_size, is_training=False, interpolation=self.eval_interpolation, crop_pct=self.eval_crop_pct
        )

    def setup(self, stage: str | None = None) -> None:
        self.classes = list_classes(self.root / "train")
        if stage in (None, "fit"):
            self.train_set = ImageFolderDataset(self.root / "train", self.classes, self.train_transform(), self.skip_corrupt)
        self.val_set = ImageFolderDataset(self.root / "val", self.classes, self.eval_transform(), self.skip_corrupt)

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        return build_loader(
            dataset, batch_size=self.batch_size, train=train, seed=self.seed, num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=self.persistent_workers, collate_fn=collate_skipping_none,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)
