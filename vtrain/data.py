"""What every task's data builds the same way: the data module's loaders, and datasets of labelled files.

Training loaders resume exactly (see :mod:`vtrain.reproducibility`): a ``StatefulDataLoader`` over an
:class:`~vtrain.reproducibility.EpochSeededSampler`, with each sample's random augmentation seeded by
``(seed, epoch, index)`` through :class:`SeededDataset`, whatever the task's dataset is.

Class folders (``root/<split>/<class>/<files>``: ImageNet, Kinetics) are listed, checked and read here once;
a file that cannot be read is a :class:`CorruptFileError` naming it, or is skipped and counted.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from vtrain import ConfigError
from vtrain.reproducibility import EpochSeededSampler, seed_sample

log = logging.getLogger(__name__)
Samples = list[tuple[str, int]]  # (file path, label)


class SeededDataset(Dataset):
    """``dataset[index]`` for a key ``(epoch, index)`` (or a plain ``index``, as epoch 0), with python/numpy/torch
    seeded for that sample first."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int] | int) -> Any:
        # a plain index comes from a sampler Lightning put in place (``trainer.overfit_batches``): epoch 0's draw
        epoch, index = key if isinstance(key, tuple) else (0, key)
        seed_sample(self.seed, epoch, index)
        return self.dataset[index]


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    pin_memory: bool = True,
    persistent_workers: bool = False,
    collate_fn: Callable | None = None,
    drop_last: bool | None = None,
    sampler: Sampler | None = None,
) -> DataLoader:
    """Training: seeded order and augmentation, resumable mid-epoch. Evaluation: the dataset in order, or
    ``sampler`` (otherwise Lightning adds a distributed sampler under DDP)."""
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=collate_fn,
        drop_last=train if drop_last is None else drop_last,
    )
    if not train:
        return DataLoader(dataset, shuffle=False, sampler=sampler, **common)
    seeded = SeededDataset(dataset, seed)
    return StatefulDataLoader(seeded, sampler=EpochSeededSampler(seeded, seed), **common)


class DataModule(pl.LightningDataModule):
    """What every task's data module shares: where the dataset is, how many classes it has, and its loaders.

    A task's data module passes the arguments it does not take itself (``**loading`` in its signature) on to
    this one, sets ``collate_fn``, and builds ``train_set`` and ``val_set`` in ``setup``.

    Args:
        root: the dataset's folder, in the task's layout (its ``LAYOUT``).
        num_classes: classes of the dataset.
        batch_size: training samples per device.
        val_batch_size: validation samples per device; None: ``batch_size``.
        num_workers: loader processes per device.
        pin_memory: page-locked batches, for faster copies to a CUDA device (ignored without one).
        persistent_workers: keep the loader processes from one epoch to the next (ignored without workers).
        seed: the training order and each sample's augmentation (:func:`build_loader`, exact resume).
    """

    collate_fn: Callable | None = None  # a task's batch layout (a staticmethod); None: torch's default
    # the files predictions read from a folder (vtrain.predict): images, unless the task reads videos
    input_extensions: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

    def __init__(
        self,
        root: str,
        num_classes: int,
        batch_size: int,
        val_batch_size: int | None = None,
        num_workers: int = 4,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.root, self.num_classes = Path(root), num_classes
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed

    def _loader(self, dataset: Dataset, train: bool, sampler: Sampler | None = None) -> DataLoader:
        return build_loader(
            dataset, batch_size=self.batch_size if train else self.val_batch_size, train=train, seed=self.seed,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            collate_fn=self.collate_fn, sampler=sampler,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    # ------------------------------------------------------------------ what a prediction needs
    @property
    def class_names(self) -> list[str]:
        """A readable name per label (what checkpoints store and predictions show); a task's data module gives the
        dataset's own names where it has them."""
        return [f"class_{i}" for i in range(self.num_classes)]

    @property
    def class_ids(self) -> list | None:
        """The dataset's own identifier per label where it has one (ImageNet wnids, COCO category ids)."""
        return None

    def predict_set(self, paths: Sequence[str]) -> "PredictionInputs":
        """The files ``paths`` read and transformed as validation reads its own samples (a task's data module)."""
        raise NotImplementedError(f"{type(self).__name__} does not read files for predictions")

    def example_files(self, count: int) -> list[str]:
        """The first ``count`` validation files (pictures of predictions during training)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its validation files")

    def validation_set(self) -> Dataset:
        """``val_set``, set up first if it is not yet."""
        if getattr(self, "val_set", None) is None:
            self.setup("validate")
        return self.val_set


class PredictionInputs(Dataset):
    """Inputs to predict on: each item is ``{"path", "original", "input"}``, the decoded input and the model's input
    made from it by the validation transform. A path is decoded by ``read(path)``, an RGB uint8 (H, W, 3) array by
    ``from_array(array)`` (None: files only); ``transform(original)`` makes the model's input."""

    def __init__(self, items: Sequence[Any], read: Callable[[str], Any], transform: Callable[[Any], Any],
                 from_array: Callable[[Any], Any] | None = None):
        self.items, self.read, self.transform, self.from_array = list(items), read, transform, from_array

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.items[i]
        if not isinstance(item, (str, Path)):
            if self.from_array is None:
                raise ConfigError("this task predicts on files only: give paths")
            return {"path": None, "original": self.from_array(item), "input": self.transform(self.from_array(item))}
        try:
            original = self.read(str(item))
        except Exception as e:  # noqa: BLE001 - decoders report a broken file in many ways
            raise CorruptFileError(f"cannot read {item} ({type(e).__name__}: {e}): is it an image (or video)?") from e
        return {"path": str(item), "original": original, "input": self.transform(original)}


def read_names_file(path: Path) -> dict[str, str]:
    """``<id> <name>`` lines (ImageNet's ``LOC_synset_mapping.txt`` / ``synset_words.txt``, the synthetic datasets'
    ``classes.txt``) as {id: name}; an absent file is an empty mapping."""
    if not path.is_file():
        return {}
    pairs = (line.strip().split(maxsplit=1) for line in path.read_text().splitlines() if line.strip())
    return {p[0]: (p[1] if len(p) > 1 else p[0]) for p in pairs}


# ----------------------------------------------------------------------------- files, one class per folder
class CorruptFileError(RuntimeError):
    """A dataset file that cannot be read or decoded; the message names it."""


def list_classes(split_dir: Path) -> list[str]:
    """The class folders of ``split_dir``, sorted: a class's label is its index."""
    return sorted(e.name for e in os.scandir(split_dir) if e.is_dir())


def class_folder_samples(split_dir: Path, classes: Sequence[str], extensions: tuple[str, ...]) -> Samples:
    """The files of ``split_dir/<class>/`` whose names end in one of ``extensions`` (any case), by label then
    name; a class without a folder in this split has no sample."""
    samples: Samples = []
    for label, name in enumerate(classes):
        if (split_dir / name).is_dir():
            entries = sorted(os.scandir(split_dir / name), key=lambda e: e.name)
            samples += [(e.path, label) for e in entries if e.is_file() and e.name.lower().endswith(extensions)]
    return samples


def check_class_folders(root: Path, num_classes: int, extensions: tuple[str, ...], kind: str, layout: str) -> None:
    """Fail in one line unless ``root/train/`` and ``root/val/`` hold class folders, the first of each holds a
    ``kind`` file (one of ``extensions``), train/ has ``num_classes`` classes and val/ none that train/ lacks.
    ``layout`` says what was expected."""
    for split in ("train", "val"):
        split_dir = root / split
        if not split_dir.is_dir():
            raise ConfigError(f"data.root={root}: no {split}/ folder; expected {layout}")
        classes = list_classes(split_dir)
        if not classes:
            raise ConfigError(f"data.root={root}: {split}/ has no class folders; expected {layout}")
        first = split_dir / classes[0]
        if not any(e.name.lower().endswith(extensions) for e in os.scandir(first)):
            raise ConfigError(f"data.root={root}: {first} holds no {kind}; expected {layout}")
    train, val = list_classes(root / "train"), list_classes(root / "val")
    if len(train) != num_classes:
        raise ConfigError(
            f"data.root={root} has {len(train)} classes but data.num_classes={num_classes}: set data.num_classes={len(train)}"
        )
    unknown = sorted(set(val) - set(train))
    if unknown:
        raise ConfigError(f"data.root={root}: val/ has classes missing from train/ ({', '.join(unknown[:3])}): fix the layout")


class LabelledFileDataset(Dataset):
    """``samples`` of ``(path, label)``, one file each, read by a subclass's ``load(path)`` through :meth:`read`.

    A file that cannot be read is named in a :class:`CorruptFileError`, or, with ``skip_corrupt``, named in a
    warning, counted (``skipped``, per worker) and read as None, for the task's collate function to leave out.
    Real downloads hold broken files; a long run should not die on one of them when asked not to.
    """

    kind = "file"  # what a file holds, in messages

    def __init__(self, samples: Samples, skip_corrupt: bool = False):
        self.samples, self.skip_corrupt = samples, skip_corrupt
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Any:
        raise NotImplementedError

    def read(self, path: str) -> Any | None:
        try:
            return self.load(path)
        except Exception as e:  # noqa: BLE001 - decoders report a broken file in many ways
            if not self.skip_corrupt:
                raise CorruptFileError(
                    f"cannot read {self.kind} {path} ({e}): fix or remove it, or set data.skip_corrupt=true"
                ) from e
            self.skipped += 1
            log.warning("skipped unreadable %s %s (%s: %s); %d skipped by this worker", self.kind, path,
                        type(e).__name__, e, self.skipped)
            return None
