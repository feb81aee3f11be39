"""Lightning's ModelCheckpoint with checkpoints written whole and ``metrics.json`` naming a file that exists."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytorch_lightning as pl
import torch

from vtrain.training.lightning_internals import validation_follows_this_batch


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with ``last.ckpt`` always the newest state.

    Lightning 2.6 rewrites ``last.ckpt`` after a validation (or at a training epoch's end) only when a top-k
    checkpoint was written at the same step (``_last_global_step_saved == trainer.global_step`` in
    ``on_validation_end`` / ``on_train_epoch_end``), and at the end of training only when nothing was ever saved.
    With ``save_top_k=1`` a validation that is not the best so far leaves ``last.ckpt`` at the best epoch, and a
    run resumed with ``ckpt_path=auto`` after a crash would redo everything since. Here each of those moments, and
    the end of training, rewrites ``last.ckpt`` unless it already holds the current step. And a run resumed from
    another file than ``last.ckpt`` (it was truncated, or refused) overwrites ``last.ckpt``, where Lightning
    would leave it and write ``last-v1.ckpt`` beside it.

    No ``every_n_train_steps`` checkpoint is written at a batch that a validation follows (an epoch's last batch,
    a ``val_check_interval``): Lightning resumes such a checkpoint past that validation, never run (its metrics,
    best and log rows missing), and, when it ended an epoch, with the epochs counted one short, so that resuming the
    finished run again trained one more epoch. The checkpoint written after the validation takes its place; a kill
    in between resumes from the one before and redoes those steps, exactly.

    ``on_new_best`` is called with a new best checkpoint's path once the file is whole and before the previous best
    is removed (:func:`vtrain.training.trainer.build_trainer` passes
    :meth:`~vtrain.training.callbacks.metrics_json.MetricsJSON.record_best_checkpoint`, so ``metrics.json`` names a
    file that exists at every moment).
    """

    def __init__(self, *args: Any, on_new_best: Callable[[str], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.on_new_best = on_new_best
        self._last_written_step: int | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        resumed = trainer.ckpt_path
        if resumed and self.dirpath and Path(resumed).resolve() == (Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}"
                                                                      f"{self.FILE_EXTENSION}").resolve():
            self._last_written_step = trainer.global_step  # last.ckpt holds this step: a finished run stays as it is

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any) -> None:
        if validation_follows_this_batch(trainer):
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        log_step_values = getattr(trainer.lightning_module, "log_step_values", None)
        if trainer.training and log_step_values is not None:
            log_step_values()  # a save mid-epoch: this step's loss and terms, which the module logs at the batch's end
        return super()._monitor_candidates(trainer)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.save_last is True:  # the directory is this run's: its last.ckpt is this run's to replace
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.on_new_best is not None:  # before _remove_checkpoint deletes the previous best
            self.on_new_best(self.best_model_path)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last is True and trainer.global_step > 0 and self._last_written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if due:
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if due:
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.fast_dev_run and not trainer.interrupted:  # steps after the last validation, if any
            self._refresh_last(trainer)
