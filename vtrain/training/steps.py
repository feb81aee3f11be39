"""How long a run trains, in optimiser steps: counted by the command line from the data module once it is set up,
and given to the task before ``fit`` (its schedule needs it), so the task never builds the training loader to ask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl

from vtrain.config import ConfigError
from vtrain.training.optim import per_step


@dataclass(frozen=True)
class TrainingSteps:
    """A run's length as its schedule and its lr scaling need it.

    Args:
        per_epoch: optimiser steps per epoch (on each process).
        total: optimiser steps of the whole run (``trainer.max_steps`` where it stops the run first).
        batch_size: samples per optimiser step, over every process and accumulated batch.
    """

    per_epoch: int
    total: int
    batch_size: int


def limited(batches: int, limit: int | float | None) -> int:
    """Lightning's ``limit_train_batches`` / ``overfit_batches``: a count caps the batches, a fraction scales them."""
    if limit is None or (isinstance(limit, float) and limit == 1.0):
        return batches
    return min(batches, limit) if isinstance(limit, int) else int(batches * limit)


def training_steps(trainer: pl.Trainer, datamodule: Any) -> TrainingSteps:
    """The run's :class:`TrainingSteps` under ``trainer``'s devices, limits and accumulation, from ``datamodule``'s
    training set (set up here: Lightning's own ``setup`` then finds it built). Equal to Lightning's
    ``trainer.estimated_stepping_batches`` (tested), without building the loader Lightning trains from."""
    world_size = trainer.num_nodes * trainer.num_devices
    accumulate = trainer.accumulate_grad_batches
    batch_size = int(datamodule.batch_size) * world_size * accumulate
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if max_epochs == -1:  # iteration-based: the steps are the run's length; epochs are counted for the schedule
        if max_steps == -1:
            raise ConfigError("trainer.max_epochs=-1 and trainer.max_steps=-1 train forever; the schedule needs a "
                              "length: set one of them")
    datamodule.setup("fit")
    limit = trainer.overfit_batches or trainer.limit_train_batches
    steps_per_epoch = per_step(limited(datamodule.train_batches_per_epoch(world_size), limit), accumulate)
    total = max_steps if max_epochs == -1 else steps_per_epoch * max(max_epochs, 1)
    if max_steps != -1:
        total = min(total, max_steps)
    return TrainingSteps(per_epoch=steps_per_epoch, total=total, batch_size=batch_size)
