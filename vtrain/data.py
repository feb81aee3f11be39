"""Data loaders every task builds the same way.

Training loaders resume exactly (see :mod:`vtrain.reproducibility`): a ``StatefulDataLoader`` over an
:class:`~vtrain.reproducibility.EpochSeededSampler`, with each sample's random augmentation seeded by
``(seed, epoch, index)`` through :class:`SeededDataset`, whatever the task's dataset is.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from vtrain.reproducibility import EpochSeededSampler, seed_sample


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
