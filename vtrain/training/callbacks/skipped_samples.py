"""Skipped (unreadable) samples counted where users see them, and a run stopped past the allowed fraction."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from vtrain.data.datamodule import CorruptFileError


class SkippedSamples(pl.Callback):
    """Shows how many samples the data module skipped as unreadable (``data.skip_corrupt``; :mod:`vtrain.data`):
    ``train/skipped_samples`` (over the run, in the progress bar once above 0) and ``val/skipped_samples`` (in
    each validation, summed over the processes); both land in ``metrics.csv`` and ``metrics.json``. A validation
    none of whose samples could be read stops the run with one line, before a missing metric would.

    The training count is logged at an epoch's first step and whenever it changes: Lightning keeps a step value
    logged earlier in the epoch, so each row of ``metrics.csv`` and each read of the bar still has the current
    count, and the steps in between skip a ``self.log`` call (about half a millisecond each on a CPU)."""

    def __init__(self) -> None:
        self._logged: int | None = None  # the training count logged last in this epoch

    @staticmethod
    def _datamodule(trainer: pl.Trainer):
        datamodule = trainer.datamodule
        return datamodule if datamodule is not None and hasattr(datamodule, "skipped") else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logged = None  # Lightning forgets the epoch's step values at its end

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        datamodule = self._datamodule(trainer)
        if datamodule is not None and datamodule.skipped_in_training != self._logged:
            self._logged = datamodule.skipped_in_training
            pl_module.log("train/skipped_samples", float(self._logged), on_step=True, on_epoch=False, prog_bar=True,
                          batch_size=1)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = self._datamodule(trainer)
        if datamodule is None or trainer.sanity_checking:
            return
        samples, skipped = datamodule.skipped("val")
        if samples and skipped == samples:
            raise CorruptFileError(f"none of the {samples} validation samples of {datamodule.root} could be read "
                                   "(the log names each file): fix the validation set")
        pl_module.log("val/skipped_samples", float(skipped), prog_bar=True, reduce_fx="sum", sync_dist=True,
                      batch_size=1)
