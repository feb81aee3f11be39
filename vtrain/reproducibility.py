"""Exact resume: every random draw of training is a function of *where* training is, not of its history.

A run killed at any step and resumed from a checkpoint must end with the weights of a run never
interrupted. Restoring RNG states is fragile (data prefetching and iterator creation draw from them at
points that differ between the two runs), so instead:

* the data order is ``DistributedSampler``'s permutation seeded by ``seed + epoch`` (also on one device),
  and the sampler hands the dataset ``(epoch, index)`` so each sample's augmentation is seeded by
  ``(seed, epoch, index)`` (:func:`seed_sample`);
* before each optimizer step, :class:`ExactResume` seeds the model-side generators (drop path, dropout, Mixup)
  by ``(seed, global_step, rank)``;
* the position inside an epoch is restored by torchdata's ``StatefulDataLoader``, whose state Lightning
  stores in the checkpoint.
"""
from __future__ import annotations

import random
import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from vtrain.lightning_internals import hand_over_train_loader_state


def _derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed python, numpy and torch for one sample's augmentation (worker-local inside a DataLoader worker)."""
    seed_all(_derived_seed(seed, epoch, index, 1))


class EpochSeededSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, sharded by rank; works on one process too) that
    yields ``(epoch, index)``; Lightning calls ``set_epoch`` and leaves a ``DistributedSampler`` unwrapped."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, drop_last: bool = False):
        if dist.is_available() and dist.is_initialized():
            super().__init__(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        else:
            super().__init__(dataset, num_replicas=1, rank=0, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def indices(self, epoch: int) -> list[int]:
        saved, self.epoch = self.epoch, epoch
        try:
            return list(super().__iter__())
        finally:
            self.epoch = saved

    def __iter__(self) -> "EpochSeededIterator":
        return EpochSeededIterator(self)


class EpochSeededIterator:
    """One epoch of an :class:`EpochSeededSampler`, with its position as state.

    A resumed ``StatefulDataLoader`` builds its iterator before Lightning calls ``set_epoch``; restoring the
    epoch and position from this state (rather than fast-forwarding a fresh iterator) gives the exact order.
    """

    def __init__(self, sampler: EpochSeededSampler):
        self.sampler = sampler
        self._start(sampler.epoch, 0)

    def _start(self, epoch: int, yielded: int) -> None:
        self.epoch, self.yielded = epoch, yielded
        self._rest = iter(self.sampler.indices(epoch)[yielded:])

    def __iter__(self) -> "EpochSeededIterator":
        return self

    def __next__(self) -> tuple[int, int]:
        index = next(self._rest)
        self.yielded += 1
        return self.epoch, index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        if yielded >= len(self.sampler):
            # A checkpoint written after the last batch of an epoch but before the loader noticed the end (Lightning
            # knows the length, so it never draws the StopIteration): Lightning resumes into the next epoch with
            # this very iterator, so what comes next is that epoch's first sample, not an empty remainder.
            epoch, yielded = epoch + 1, 0
        self._start(epoch, yielded)


class ExactResume(pl.Callback):
    """Seeds the model-side random generators by ``(seed, global_step, rank)`` before every training batch, and
    makes sure a resumed run's training loader continues from the checkpoint's position.

    The second part works around an ordering in Lightning that gives a resumed loader no saved state
    (:func:`vtrain.lightning_internals.hand_over_train_loader_state`).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hand_over_train_loader_state(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed_all(_derived_seed(self.seed, trainer.global_step, trainer.global_rank, 2))
