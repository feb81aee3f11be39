"""Exact resume: every random draw of training is a function of *where* training is, not of its history.

A run killed at any step and resumed from a checkpoint must end with the weights of a run never
interrupted. Restoring RNG states is fragile (data prefetching and iterator creation draw from them at
points that differ between the two runs), so instead:

* the data order is ``DistributedSampler``'s permutation seeded by ``seed + epoch`` (also on one device),
  and the sampler hands the dataset ``(epoch, index)`` so each sample's augmentation is seeded by
  ``(seed, epoch, index)`` (:func:`seed_sample`); with DeiT's repeated augmentation
  (:class:`RepeatedAugmentationSampler`) it hands ``(epoch, index, repeat)``, each copy of a sample seeded apart;
* before each optimizer step, :class:`ExactResume` seeds the model-side generators (drop path, dropout, Mixup)
  by ``(seed, global_step, rank)``;
* the position inside an epoch is restored by torchdata's ``StatefulDataLoader``, whose state Lightning
  stores in the checkpoint.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, DistributedSampler

from vtrain.config import ConfigError


def derived_seed(*keys: int) -> int:
    return int(np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(1)[0])


def seed_host(seed: int) -> None:
    """Seed the generators a sample's augmentation draws from: python's, numpy's and torch's CPU generator.

    Not ``torch.manual_seed``: it also seeds every accelerator's generators, and for each one not initialised (in a
    loader's worker, or on a machine without it) torch keeps the caller's formatted stack, 0.1 to 0.3 ms a call
    from a loader's stack depth, paid for every sample (32 times a step for the quickstart's batch of 32). The CPU
    generator gets the same seed, so the draws are the same."""
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


def seed_all(seed: int, device: torch.device) -> None:
    """Seed the generators a training batch on ``device`` draws from (drop path, dropout, Mixup): the host's, and
    the device's: on CUDA every GPU's (initialised, as the model is there: no stack kept), on another accelerator
    every accelerator's (``torch.manual_seed``)."""
    seed_host(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def seed_sample(seed: int, epoch: int, index: int, repeat: int = 0) -> None:
    """Seed python, numpy and torch's CPU generator for one sample's augmentation (worker-local inside a DataLoader
    worker); ``repeat`` tells apart the copies of a sample that repeated augmentation draws in one epoch."""
    seed_host(derived_seed(seed, epoch, index, 1) if repeat == 0 else derived_seed(seed, epoch, index, 1, repeat))


class EpochSeededSampler(DistributedSampler):
    """``DistributedSampler`` (seeded permutation per epoch, sharded by rank; works on one process too) that
    yields ``(epoch, index)``; Lightning calls ``set_epoch`` and leaves a ``DistributedSampler`` unwrapped.
    ``num_replicas`` and ``rank`` default to the process group's (one and zero without one)."""

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None):
        if num_replicas is None and not (dist.is_available() and dist.is_initialized()):
            num_replicas, rank = 1, 0  # one process: no process group to ask
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last)

    def indices(self, epoch: int) -> list[int]:
        saved, self.epoch = self.epoch, epoch
        try:
            return list(super().__iter__())
        finally:
            self.epoch = saved

    def draws(self, epoch: int) -> list[tuple[int, ...]]:
        """This rank's samples of ``epoch`` in order, each as the key that follows the epoch: ``(index,)``."""
        return [(index,) for index in self.indices(epoch)]

    def __iter__(self) -> "EpochSeededIterator":
        return EpochSeededIterator(self)


class RepeatedAugmentationSampler(EpochSeededSampler):
    """DeiT's ``RASampler`` (samplers.py; Hoffer et al. 2020, Berman et al. 2019) with vtrain's exact resume.

    Each epoch draws the seeded permutation of the dataset, repeats every index ``repeats`` times in a row, pads
    the list to a multiple of the number of ranks and deals it out rank by rank, so the copies of a sample land on
    consecutive ranks (on one process, in one batch); each rank then keeps its first ``len(dataset) //
    epoch_multiple * epoch_multiple / ranks`` draws (DeiT: multiples of 256), so an epoch shows about as many
    images as the dataset holds, a third of them distinct. The order is a function of ``(seed, epoch)`` like
    :class:`EpochSeededSampler`'s (DeiT seeds it by the epoch alone); each draw is ``(epoch, index, repeat)``, so the
    copies of a sample get different augmentations.
    """

    def __init__(self, dataset: Dataset, seed: int, repeats: int = 3, epoch_multiple: int = 256,
                 num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, seed, shuffle=True, drop_last=False, num_replicas=num_replicas, rank=rank)
        self.repeats = int(repeats)
        self.total_size = int(math.ceil(len(dataset) * self.repeats / self.num_replicas)) * self.num_replicas
        self.num_samples = int(len(dataset) // epoch_multiple * epoch_multiple // self.num_replicas)
        if self.num_samples == 0:
            raise ConfigError(f"repeated augmentation keeps {len(dataset)} // {epoch_multiple} * {epoch_multiple} "
                              f"samples per epoch, none on each of {self.num_replicas} rank(s): use a smaller "
                              "data.repeated_augmentation.epoch_multiple (DeiT: 256)")

    def draws(self, epoch: int) -> list[tuple[int, ...]]:
        order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
        draws = [(index, repeat) for index in order for repeat in range(self.repeats)]
        draws += draws[: self.total_size - len(draws)]
        return draws[self.rank:self.total_size:self.num_replicas][: self.num_samples]

    def indices(self, epoch: int) -> list[int]:
        return [index for index, _ in self.draws(epoch)]


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
        self._rest = iter(self.sampler.draws(epoch)[yielded:])

    def __iter__(self) -> "EpochSeededIterator":
        return self

    def __next__(self) -> tuple[int, ...]:
        draw = next(self._rest)
        self.yielded += 1
        return (self.epoch, *draw)

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


