"""What every task's data builds the same way: the data module's loaders, and datasets of labelled files.

Training loaders resume exactly (see :mod:`vtrain.reproducibility`): a ``StatefulDataLoader`` over an
:class:`~vtrain.data.samplers.EpochSeededSampler` (or DeiT's repeated augmentation,
:class:`~vtrain.data.samplers.RepeatedAugmentationSampler`), with each sample's random augmentation seeded by
``(seed, epoch, index)`` through :class:`SeededDataset`, whatever the task's dataset is.

Class folders (``root/<split>/<class>/<files>``: ImageNet, Kinetics) are listed, checked and read here once.

Unreadable files, one policy for every task (``data.skip_corrupt``, ``data.max_skipped_fraction``):

* ``skip_corrupt=true`` (default): a file that cannot be read is named in a warning and skipped
  (:func:`read_or_skip`). In training the sample is replaced by another one drawn from its seed
  (:class:`SeededDataset`, mmengine's ``BaseDataset`` refetch), so batches keep their size and DDP processes
  their step; in evaluation it is left out (a batch with none left is None, which the task's validation step
  passes over). Each loader's batch comes with how many samples it had and how many were skipped
  (:class:`ReadableCollate`); the data module counts them (:meth:`DataModule.on_before_batch_transfer`), and
  :class:`vtrain.training.callbacks.skipped_samples.SkippedSamples` logs them (``train/skipped_samples``, ``val/skipped_samples``: the
  progress bar, ``metrics.csv``, ``metrics.json``).
* More than ``max_skipped_fraction`` of a training epoch's or a validation's samples skipped stops the run with
  one line, and so does a validation none of whose samples could be read.
* ``skip_corrupt=false``: the first unreadable file stops the run with one line naming it.
"""
from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate
from torchdata.stateful_dataloader import StatefulDataLoader
from torchvision.datasets.folder import IMG_EXTENSIONS

from vtrain.config import ConfigError
from vtrain.data.samplers import (
    EpochSeededSampler,
    RepeatedAugmentationSampler,
    seed_sample,
)

log = logging.getLogger(__name__)
Samples = list[tuple[str, int]]  # (file path, label)


class Read(NamedTuple):
    """A training sample as :class:`SeededDataset` hands it to the collate: the sample (None if none could be read)
    and how many unreadable samples were passed over to get it."""

    sample: Any
    skipped: int


class SeededDataset(Dataset):
    """``dataset[index]`` for a key ``(epoch, index)`` or ``(epoch, index, repeat)`` (or a plain ``index``, as epoch
    0), with python/numpy/torch seeded for that draw of the sample first.

    A sample the dataset skipped (None: an unreadable file) is replaced by another index drawn from the same seeded
    generator, up to ``max_refetch`` times (mmengine's ``BaseDataset.__getitem__``): a training batch keeps its
    size, and every DDP process a batch to step on. The result is a :class:`Read`.
    """

    max_refetch = 10

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, ...] | int) -> Read:
        # a plain index comes from a sampler Lightning put in place (``trainer.overfit_batches``): epoch 0's draw
        epoch, index, *repeat = key if isinstance(key, tuple) else (0, key)
        seed_sample(self.seed, epoch, index, *repeat)
        sample, skipped = self.dataset[index], 0
        while sample is None and skipped < self.max_refetch:
            skipped += 1
            sample = self.dataset[random.randrange(len(self.dataset))]
        return Read(sample, skipped + (sample is None))


class CountedBatch(NamedTuple):
    """What a loader of :func:`build_loader` yields: the task's batch of the samples that could be read (None if
    none could), how many samples the batch was drawn for, and how many unreadable ones were skipped."""

    batch: Any
    samples: int
    skipped: int


class ReadableCollate:
    """The task's collate function (``collate``; torch's default if None) over the samples that could be read: a
    dataset returns None for one it skipped, :class:`SeededDataset` a :class:`Read`. Returns a
    :class:`CountedBatch`; the task's collate never sees an empty list."""

    def __init__(self, collate: Callable | None = None):
        self.collate = collate or default_collate

    def __call__(self, samples: list[Any]) -> CountedBatch:
        reads = [s if isinstance(s, Read) else Read(s, int(s is None)) for s in samples]
        kept = [r.sample for r in reads if r.sample is not None]
        return CountedBatch(self.collate(kept) if kept else None, len(reads), sum(r.skipped for r in reads))


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
    """Training: seeded order and augmentation, resumable mid-epoch: ``sampler`` (an
    :class:`~vtrain.data.samplers.EpochSeededSampler`: :meth:`DataModule.train_sampler`), else the seeded order.
    Evaluation: the dataset in order, or ``sampler`` (otherwise Lightning adds a distributed sampler under DDP).
    Either yields :class:`CountedBatch` es of ``collate_fn``'s batches (:class:`ReadableCollate`)."""
    common = dict(
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory and torch.cuda.is_available(),
        persistent_workers=persistent_workers and num_workers > 0,
        collate_fn=ReadableCollate(collate_fn),
        drop_last=train if drop_last is None else drop_last,
    )
    if not train:
        return DataLoader(dataset, shuffle=False, sampler=sampler, **common)
    seeded = SeededDataset(dataset, seed)
    return StatefulDataLoader(seeded, sampler=sampler or EpochSeededSampler(seeded, seed), **common)


@dataclass(frozen=True)
class DatasetInfo:
    """What a task is told about its dataset when it is built (:meth:`DataModule.info`), rather than asking the
    trainer's data module for it.

    Args:
        class_names: a readable name per label (what checkpoints store and predictions show).
        class_ids: the dataset's own identifier per label where it has one (ImageNet wnids, COCO category ids).
        annotation_file: the validation split's annotations, where the metric reads them (COCO's evaluation).
        masks: whether the training annotations are read with their instance masks (detection).
        ignore_index: the label of pixels that count nowhere (segmentation).
    """

    class_names: tuple[str, ...]
    class_ids: tuple | None = None
    annotation_file: Path | None = None
    masks: bool | None = None
    ignore_index: int | None = None


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
        repeated_augmentation: DeiT's repeated augmentation, the arguments of
            :class:`~vtrain.data.samplers.RepeatedAugmentationSampler` (``{repeats: 3}``); None: each sample once
            per epoch.
        skip_corrupt: skip (and count) an unreadable file instead of stopping at it (the module doc).
        max_skipped_fraction: stop when more than this fraction of a training epoch's or a validation's samples
            were skipped.
    """

    collate_fn: Callable | None = None  # a task's batch layout (a staticmethod); None: torch's default
    # the files predictions read from a folder (vtrain.predict): images, unless the task reads videos
    input_extensions: tuple[str, ...] = IMG_EXTENSIONS

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
        repeated_augmentation: Mapping[str, Any] | None = None,
        skip_corrupt: bool = True,
        max_skipped_fraction: float = 0.01,
    ):
        super().__init__()
        self.root, self.num_classes = Path(root), num_classes
        self.batch_size = batch_size
        self.val_batch_size = batch_size if val_batch_size is None else val_batch_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.persistent_workers = persistent_workers and num_workers > 0
        self.seed = seed
        self.repeated_augmentation = dict(repeated_augmentation) if repeated_augmentation else None
        self.skip_corrupt, self.max_skipped_fraction = skip_corrupt, max_skipped_fraction
        self.skipped_in_training = 0  # over the whole run (in checkpoints)
        # per stage: (which epoch or validation, samples drawn, samples skipped)
        self.read_counts: dict[str, tuple[Any, int, int]] = {}

        self._built: set[str] = set()  # the stages whose sets are built

    # ------------------------------------------------------------------ sets and loaders
    def setup(self, stage: str | None = None) -> None:
        """Lightning's hook: the stage's sets, built once (the command line sets the data up before ``fit``, to
        count the training steps: :func:`vtrain.training.steps.training_steps`)."""
        stage = stage or "fit"
        if stage not in self._built:
            self.build_sets(stage)
            self._built.add(stage)

    def build_sets(self, stage: str) -> None:
        """Build ``train_set`` (stage ``fit``) and ``val_set`` (every stage): a task's data module."""
        raise NotImplementedError(f"{type(self).__name__} builds no datasets")

    def _loader(self, dataset: Dataset, train: bool, sampler: Sampler | None = None) -> DataLoader:
        return build_loader(
            dataset, batch_size=self.batch_size if train else self.val_batch_size, train=train, seed=self.seed,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.persistent_workers,
            collate_fn=self.collate_fn, sampler=sampler,
        )

    def train_sampler(self, num_replicas: int | None = None, rank: int | None = None) -> EpochSeededSampler:
        """The training order: this process's share of ``num_replicas`` (default: the process group's), DeiT's
        repeated copies when ``repeated_augmentation`` is set, else each sample once per epoch."""
        if self.repeated_augmentation:
            return RepeatedAugmentationSampler(self.train_set, self.seed, **self.repeated_augmentation,
                                               num_replicas=num_replicas, rank=rank)
        return EpochSeededSampler(self.train_set, self.seed, num_replicas=num_replicas, rank=rank)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True, sampler=self.train_sampler())

    def train_batches_per_epoch(self, world_size: int) -> int:
        """Training batches each of ``world_size`` processes draws per epoch (the sets set up), counted on the
        loader Lightning will build, before any process group exists."""
        return len(self._loader(self.train_set, train=True, sampler=self.train_sampler(world_size, rank=0)))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    # ------------------------------------------------------------------ unreadable samples
    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Count a :class:`CountedBatch`'s skipped samples, stop when there are too many, hand the task its batch."""
        if not isinstance(batch, CountedBatch):
            return batch
        trainer = self.trainer
        if trainer is not None:
            if trainer.training:
                stage, moment, dataset = "train", trainer.current_epoch, self.train_set
                self.skipped_in_training += batch.skipped
            else:  # a validation: the step it is at, sanity check or not, in fit or alone
                stage, moment, dataset = "val", (trainer.global_step, trainer.sanity_checking, trainer.state.fn), self.val_set
            previous, samples, skipped = self.read_counts.get(stage, (None, 0, 0))
            if previous != moment:
                samples, skipped = 0, 0
            samples, skipped = samples + batch.samples, skipped + batch.skipped
            self.read_counts[stage] = (moment, samples, skipped)
            share = len(dataset) / max(trainer.world_size, 1)  # what this process reads of it
            if skipped > self.max_skipped_fraction * share:
                what = "training epoch" if stage == "train" else "validation"
                of = (f"of {len(dataset)}" if trainer.world_size == 1
                      else f"of the {round(share)} of {len(dataset)} that this process reads")
                raise CorruptFileError(
                    f"{skipped} samples of this {what} could not be read ({of} in {self.root}), more than "
                    f"data.max_skipped_fraction={self.max_skipped_fraction} allows; the log names each file: fix or "
                    "remove them, or raise data.max_skipped_fraction"
                )
            if stage == "train" and batch.batch is None:  # every draw of every sample failed: nothing to step on
                raise CorruptFileError(f"no sample of a training batch could be read in {self.root}, even after "
                                       f"{SeededDataset.max_refetch} other draws each; the log names each file: fix or "
                                       "remove them")
        return batch.batch

    def skipped(self, stage: str) -> tuple[int, int]:
        """(samples drawn, samples skipped) in the current training epoch (``train``) or the last validation
        (``val``) of this process."""
        _, samples, skipped = self.read_counts.get(stage, (None, 0, 0))
        return samples, skipped

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_in_training": self.skipped_in_training}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_in_training = int(state_dict.get("skipped_in_training", 0))

    # ------------------------------------------------------------------ what a task and a prediction need
    def info(self) -> DatasetInfo:
        """What the task is told about this dataset (a task's data module adds its own fields)."""
        ids = self.class_ids
        return DatasetInfo(tuple(str(n) for n in self.class_names), None if ids is None else tuple(ids))

    @property
    def class_names(self) -> list[str]:
        """A readable name per label (what checkpoints store and predictions show); a task's data module gives the
        dataset's own names where it has them."""
        return [f"class_{i}" for i in range(self.num_classes)]

    @property
    def class_ids(self) -> list | None:
        """The dataset's own identifier per label where it has one (ImageNet wnids, COCO category ids)."""
        return None

    def preprocessing(self) -> dict[str, Any]:
        """What evaluation does to an image before the model, as timm's ``pretrained_cfg`` says it (``mean``,
        ``std`` on 0-1 pixels, ``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``; a task's data module
        names what its rule needs): what an exported model's ``model.json`` carries."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its preprocessing")

    def predict_set(self, paths: Sequence[str]) -> "PredictionInputs":
        """The files ``paths`` read and transformed as validation reads its own samples (a task's data module)."""
        raise NotImplementedError(f"{type(self).__name__} does not read files for predictions")

    def example_files(self, count: int) -> list[str]:
        """The first ``count`` validation files (pictures of predictions during training)."""
        raise NotImplementedError(f"{type(self).__name__} does not list its validation files")

    def example_truths(self, count: int) -> list[Any] | None:
        """The ground truth of :meth:`example_files`, in the order of the files, as the task's ``truth_record``
        takes it (a label, boxes and labels, a label map at the image's size; None for a file that cannot be read);
        None where the data module gives none."""
        return None

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
class DataFileError(ConfigError):
    """A dataset file that cannot be used; the message (one line) names it and says what to do.

    Raised in a loader worker, it comes back to the main process as the same type built from a message that holds
    the worker's traceback (``torch.utils.data._utils.ExceptionWrapper``); the message keeps its own last line.
    """

    def __init__(self, message: str):
        if "Original Traceback" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if last.startswith(f"{type(self).__module__}.") else last
        super().__init__(message)


class CorruptFileError(DataFileError):
    """A dataset file that cannot be read or decoded."""


def read_or_skip(kind: str, path: str | Path, load: Callable[[], Any], skip: bool) -> Any | None:
    """``load()``, the reading of file ``path`` (a ``kind``: image, video, ...). If it fails: with ``skip``, a warning
    naming the file and None; otherwise a :class:`CorruptFileError` naming it."""
    try:
        return load()
    except DataFileError:
        raise  # already says what is wrong with the file
    except Exception as e:  # noqa: BLE001 - decoders report a broken file in many ways
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        if not skip:
            raise CorruptFileError(
                f"cannot read {kind} {path} ({reason}): fix or remove it, or set data.skip_corrupt=true to skip "
                "(and count) unreadable files"
            ) from e
        log.warning("skipped unreadable %s %s (%s)", kind, path, reason)
        return None


def read_rgb(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB. A 16-bit greyscale PNG is scaled to 8 bits (its high byte, as OpenCV's
    ``IMREAD_COLOR`` reads it for mmcv), where PIL's ``convert("RGB")`` would clip every value above 255 to white;
    32-bit integer and floating-point images are refused."""
    with Image.open(path) as im:
        if im.mode.startswith("I;16"):
            return Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8), "L").convert("RGB")
        if im.mode in ("I", "F"):
            raise CorruptFileError(f"image {path} is a {'32-bit integer' if im.mode == 'I' else 'floating-point'} "
                                   "image (PIL mode " + im.mode + "): save it as an 8-bit (or 16-bit) RGB or greyscale file")
        return im.convert("RGB")


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
    """``samples`` of ``(path, label)``, one file each, read by a subclass's ``load(path)`` through :meth:`read`:
    a file that cannot be read is named in a :class:`CorruptFileError`, or, with ``skip_corrupt``, in a warning,
    and read as None (:func:`read_or_skip`)."""

    kind = "file"  # what a file holds, in messages

    def __init__(self, samples: Samples, skip_corrupt: bool = True):
        self.samples, self.skip_corrupt = samples, skip_corrupt

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Any:
        raise NotImplementedError

    def read(self, path: str) -> Any | None:
        return read_or_skip(self.kind, path, lambda: self.load(path), self.skip_corrupt)
