"""ImageNet in class folders: ImageNet-1K's ``root/train/<wnid>/*.JPEG`` and ``root/val/<wnid>/*.JPEG``, or
ImageNet-22K's list files (``lists``) as the official Swin code reads them."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision.datasets.folder import IMG_EXTENSIONS

from vtrain.config import ConfigError
from vtrain.data.datamodule import (
    DataModule,
    LabelledFileDataset,
    PredictionInputs,
    check_class_folders,
    class_folder_samples,
    list_classes,
    read_names_file,
    read_rgb,
)

LAYOUT = "root/train/<class>/*.JPEG and root/val/<class>/*.JPEG"
LIST_LAYOUT = "a JSON array of [image path relative to data.root, label] pairs per split"
EVAL_CROP_MODES = ("center", "squash")  # timm's crop_mode values whose reference evaluations vtrain's recipes use


class ImageFolderDataset(LabelledFileDataset):
    """``(path, label)`` samples (a split's class folders, labelled by the training split's, or a list file's),
    unreadable files either named in an error or skipped (returned as ``None``: :mod:`vtrain.data.datamodule`)."""

    kind = "image"

    def __init__(self, samples: list[tuple[str, int]], transform=None, skip_corrupt: bool = True):
        super().__init__(samples, skip_corrupt)
        self.transform = transform

    def load(self, path: str) -> Image.Image:
        return read_rgb(path)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        image = self.read(path)
        if image is None:
            return None
        return (self.transform(image) if self.transform else image), target


def read_sample_list(path: Path, root: Path, num_classes: int) -> list[tuple[str, int]]:
    """The samples of a list file: a JSON array of ``[path relative to root, label]`` pairs, as the official Swin
    code reads ImageNet-22K (``data/imagenet22k_dataset.py``: ``json.load``, then ``root + '/' + path`` and
    ``int(label)``). A pair that is not one, or a label outside ``0..num_classes-1``, is one line naming it."""
    try:
        entries = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSON ({e.msg} at line {e.lineno}, column {e.colno}): "
                          f"expected {LIST_LAYOUT}") from e
    if not isinstance(entries, list):
        raise ConfigError(f"{path} holds a JSON {type(entries).__name__}: expected {LIST_LAYOUT}")
    samples = []
    for index, entry in enumerate(entries):
        ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
              and isinstance(entry[1], int) and not isinstance(entry[1], bool))
        if not ok or not 0 <= entry[1] < num_classes:
            why = "is not [path, label]" if not ok else f"has a label outside 0..{num_classes - 1} (data.num_classes)"
            raise ConfigError(f"{path}: entry {index} {json.dumps(entry)[:80]} {why}: fix the list file")
        samples.append((str(root / entry[0]), entry[1]))
    return samples


class ImageFolderDataModule(DataModule):
    """ImageNet-1K in class folders, with timm's transforms.

    Args:
        img_size: the training crop and evaluation size.
        batch_size: training images per device (validation's too, unless ``val_batch_size``).
        augment: the training augmentation, as ``timm.data.create_transform`` takes it.
        mean, std: normalisation, on 0-1 pixels (training and evaluation).
        eval_crop_pct, eval_crop_mode, eval_interpolation: evaluation's resize and crop (timm's ``crop_pct``,
            ``crop_mode``): ``center`` resizes the short side to ``img_size / eval_crop_pct`` and crops the centre,
            ``squash`` resizes both sides to it (``img_size`` at 1.0: no crop).
        The configs take mean, std and the evaluation rule from ``conf/preprocessing/`` (what the weights expect).
        lists: ``{"train": file, "val": file}`` in ``root``: the samples and labels come from these list files
            (:func:`read_sample_list`; ImageNet-22K's official layout, ``conf/data/imagenet22k.yaml``) instead of
            ``train/`` and ``val/`` class folders; a class's id is the folder of its images.
        **loading: the other :class:`vtrain.data.datamodule.DataModule` arguments (``val_batch_size``, ``seed``,
            ``skip_corrupt``, ...).
    """

    def __init__(
        self,
        root: str,
        num_classes: int,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        augment: Mapping[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        eval_crop_pct: float = 0.875,
        eval_crop_mode: str = "center",
        eval_interpolation: str = "bicubic",
        lists: Mapping[str, str] | None = None,
        **loading: Any,
    ):
        super().__init__(root, num_classes, batch_size=batch_size, num_workers=num_workers, **loading)
        self.img_size = img_size
        self.augment = dict(augment or {})
        self.mean, self.std = tuple(mean), tuple(std)
        if eval_crop_mode not in EVAL_CROP_MODES:
            raise ConfigError(f"data.eval_crop_mode={eval_crop_mode!r}: use one of {', '.join(EVAL_CROP_MODES)}")
        self.eval_crop_pct, self.eval_crop_mode, self.eval_interpolation = eval_crop_pct, eval_crop_mode, eval_interpolation
        self.lists = {split: self.root / name for split, name in (lists or {}).items()}
        if self.lists and set(self.lists) != {"train", "val"}:
            raise ConfigError(f"data.lists names {', '.join(sorted(self.lists))}: give exactly train and val list files")
        self.classes: list[str] = []

    # ------------------------------------------------------------------ checks before anything starts
    def check(self) -> None:
        """Fail in one line when ``root`` is missing or not laid out as ImageNet."""
        if self.lists:
            for split, path in self.lists.items():
                if not path.is_file():
                    raise ConfigError(f"data.root={self.root}: no {split} list file {path.name}; expected {LIST_LAYOUT}")
            return
        check_class_folders(self.root, self.num_classes, IMG_EXTENSIONS, "image", f"the ImageNet layout {LAYOUT}")

    # ------------------------------------------------------------------ datasets
    def train_transform(self):
        return create_transform(self.img_size, is_training=True, mean=self.mean, std=self.std, **self.augment)

    def eval_transform(self):
        return create_transform(
            self.img_size, is_training=False, interpolation=self.eval_interpolation, crop_pct=self.eval_crop_pct,
            crop_mode=self.eval_crop_mode, mean=self.mean, std=self.std,
        )

    # ------------------------------------------------------------------ classes and predictions
    @property
    def class_ids(self) -> list[str]:
        """The class folders (ImageNet wnids), in label order; without the dataset at hand, ImageNet-1K's 1000
        wnids in their sorted order (official and timm weights for ``experiment=..._imagenet``)."""
        if self.classes:
            return self.classes
        if self.lists and self.lists["train"].is_file():
            return self._list_classes(read_sample_list(self.lists["train"], self.root, self.num_classes))
        if not self.lists and (self.root / "train").is_dir():
            return list_classes(self.root / "train")
        from timm.data import ImageNetInfo

        wnids = list(ImageNetInfo().label_names())
        return wnids if len(wnids) == self.num_classes else [f"class_{i}" for i in range(self.num_classes)]

    @property
    def class_names(self) -> list[str]:
        """Each wnid's readable name (its first synonym): from ``classes.txt`` (the synthetic data's),
        ``LOC_synset_mapping.txt`` or ``synset_words.txt`` in ``root``, else timm's ImageNet table, else the wnid."""
        from timm.data import ImageNetInfo

        names: dict[str, str] = {}
        for file in ("synset_words.txt", "LOC_synset_mapping.txt", "classes.txt"):
            names.update(read_names_file(self.root / file))
        imagenet = ImageNetInfo()
        known = set(imagenet.label_names())
        return [(names.get(w) or (imagenet.label_name_to_description(w) if w in known else w)).split(",")[0]
                for w in self.class_ids]

    def preprocessing(self) -> dict[str, Any]:
        """timm's ``pretrained_cfg`` keys, with the values :meth:`eval_transform` uses."""
        return {"mean": list(self.mean), "std": list(self.std), "input_size": [3, self.img_size, self.img_size],
                "interpolation": self.eval_interpolation, "crop_pct": self.eval_crop_pct,
                "crop_mode": self.eval_crop_mode}

    def predict_set(self, paths: list[str]) -> PredictionInputs:
        return PredictionInputs(paths, read_rgb, self.eval_transform(), from_array=Image.fromarray)

    def example_files(self, count: int) -> list[str]:
        return [path for path, _ in self.validation_set().samples[:count]]

    def example_truths(self, count: int) -> list[int]:
        return [label for _, label in self.validation_set().samples[:count]]

    def _list_classes(self, train_samples: list[tuple[str, int]]) -> list[str]:
        """Each label's class id (the folder of its training images); every label must have training images."""
        folders = {label: Path(path).parent.name for path, label in train_samples}
        if len(folders) != self.num_classes:
            raise ConfigError(f"{self.lists['train']} has {len(folders)} classes but data.num_classes={self.num_classes}: "
                              f"set data.num_classes={len(folders)}")
        return [folders[label] for label in range(self.num_classes)]

    def build_sets(self, stage: str) -> None:
        transforms = {"train": self.train_transform, "val": self.eval_transform}
        if self.lists:
            samples = {split: read_sample_list(path, self.root, self.num_classes) for split, path in self.lists.items()
                       if split == "val" or stage == "fit"}
            self.classes = self._list_classes(samples.get("train") or read_sample_list(
                self.lists["train"], self.root, self.num_classes))
            sets = {split: ImageFolderDataset(s, transforms[split](), self.skip_corrupt)
                    for split, s in samples.items()}
        else:
            self.classes = list_classes(self.root / "train")
            sets = {split: ImageFolderDataset(class_folder_samples(self.root / split, self.classes, IMG_EXTENSIONS),
                                              transforms[split](), self.skip_corrupt)
                    for split in ("train", "val") if split == "val" or stage == "fit"}
        if stage == "fit":
            self.train_set = sets["train"]
        self.val_set = sets["val"]
