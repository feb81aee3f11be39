"""Exact resume, the model's side: seeded model-side generators and the training loader's saved position
(the data's side is :mod:`vtrain.data.samplers`)."""
from __future__ import annotations

import pytorch_lightning as pl

from vtrain.data.samplers import derived_seed, seed_all
from vtrain.training.lightning_internals import hand_over_train_loader_state


class ExactResume(pl.Callback):
    """Seeds the model-side random generators by ``(seed, global_step, rank)`` before every training batch, and
    makes sure a resumed run's training loader continues from the checkpoint's position.

    The second part works around an ordering in Lightning that gives a resumed loader no saved state
    (:func:`vtrain.training.lightning_internals.hand_over_train_loader_state`).
    """

    def __init__(self, seed: int):
        self.seed = int(seed)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        hand_over_train_loader_state(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        seed_all(derived_seed(self.seed, trainer.global_step, trainer.global_rank, 2), pl_module.device)
