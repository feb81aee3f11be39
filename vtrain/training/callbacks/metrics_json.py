"""``metrics.json``: a run's final and best metrics, its best checkpoint, written whole at every validation."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from vtrain.training.atomic import atomic_write_text


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsJSON(pl.Callback):
    """Writes ``metrics.json`` in the run directory: the last and the best value of every logged metric.

    "Best" follows each metric's direction: the module's ``monitor_mode`` for its monitored metric, ``min``
    for names containing ``loss``, ``max`` otherwise (accuracies, AP, IoU). The file is rewritten after each
    validation, atomically, so a run stopped at any point leaves a complete file. ``final_epoch`` is the epoch of
    the last validation, ``best_epoch`` each metric's best one (0-based, as checkpoint names count). Its
    ``best_checkpoint`` names a file that exists at every moment: :class:`ModelCheckpoint` rewrites it after
    writing a new best and before removing the old one. ``training`` is this process's training, once it ends:
    its optimiser ``steps`` and ``seconds`` (from the first training batch to the end of training, the validations
    left out), and the ``samples`` those steps drew (steps x the task's ``training_steps.batch_size``, over every
    process and accumulated batch) with ``samples_per_second``.
    """

    def __init__(self, dirpath: str, filename: str = "metrics.json"):
        self.path = Path(dirpath) / filename
        self.final: dict[str, Any] = {}
        self.best: dict[str, Any] = {}
        self.best_epoch: dict[str, int] = {}
        self.validated_step: int | None = None  # global step of the last validation
        self.validated_epoch: int | None = None
        self.best_checkpoint: str | None = None
        self.payload: dict[str, Any] | None = None  # the file's content
        self._training_started: float | None = None  # time.monotonic() at the start of training
        self._validation_started: float | None = None
        self._validation_seconds = 0.0  # of the validations during training
        self._first_step = 0  # the global step training started from (a resumed run's)
        self.training: dict[str, Any] | None = None

    def _direction(self, name: str, pl_module: pl.LightningModule) -> str:
        if name == getattr(pl_module, "monitor", None):
            return getattr(pl_module, "monitor_mode", "max")
        return "min" if "loss" in name else "max"

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, value in trainer.callback_metrics.items():
            value = _plain(value)
            if not isinstance(value, (int, float)) or math.isnan(value):
                continue
            self.final[name] = value
            if name.startswith("lr-") or name.endswith(("_step", "skipped_samples")):
                continue  # a learning rate, a single step's value or a count has no "best"
            better = max if self._direction(name, pl_module) == "max" else min
            if name not in self.best or better(value, self.best[name]) != self.best[name]:
                self.best[name] = value
                self.best_epoch[name] = trainer.current_epoch

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._collect(trainer, pl_module)
        self.payload = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "final_epoch": self.validated_epoch,
            "global_step": trainer.global_step,
            "monitor": getattr(pl_module, "monitor", None),
            "final": self.final,
            "best": self.best,
            "best_epoch": self.best_epoch,
            **{k: _plain(v) for k, v in getattr(pl_module, "summary_metrics", {}).items()},
            **({"training": self.training} if self.training else {}),
        }
        ckpt = trainer.checkpoint_callback
        self.record_best_checkpoint(getattr(ckpt, "best_model_path", "") if ckpt is not None else "")

    @rank_zero_only
    def record_best_checkpoint(self, path: str) -> None:
        """(Re)write the file with ``path`` as the best checkpoint when that file exists, else the last one that did."""
        if path and Path(path).is_file():
            self.best_checkpoint = path
        if self.payload is None:
            return
        if self.best_checkpoint:
            self.payload["best_checkpoint"] = self.best_checkpoint
        atomic_write_text(self.path, json.dumps(self.payload, indent=2, sort_keys=True))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training_started, self._validation_seconds = time.monotonic(), 0.0
        self._first_step, self.training = trainer.global_step, None

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._validation_started = time.monotonic()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._validation_started is not None and self._training_started is not None:
            self._validation_seconds += time.monotonic() - self._validation_started
        self._validation_started = None
        if not trainer.sanity_checking:
            self.validated_step, self.validated_epoch = trainer.global_step, trainer.current_epoch
            self._write(trainer, pl_module, "validate" if trainer.state.fn == "validate" else "fit")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._training_started is not None:
            seconds = time.monotonic() - self._training_started - self._validation_seconds
            self.training = training_record(trainer.global_step - self._first_step, seconds,
                                            getattr(getattr(pl_module, "training_steps", None), "batch_size", None),
                                            getattr(pl_module, "SAMPLES", "samples"))
            self._training_started = None
        self._write(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        # "final" too: a run resumed after its last validation still reports it
        return {"final": self.final, "best": self.best, "best_epoch": self.best_epoch,
                "validated_step": self.validated_step, "validated_epoch": self.validated_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.final = dict(state_dict.get("final", {}))
        self.best = dict(state_dict.get("best", {}))
        self.best_epoch = dict(state_dict.get("best_epoch", {}))
        self.validated_step = state_dict.get("validated_step")
        self.validated_epoch = state_dict.get("validated_epoch")


def training_record(steps: int, seconds: float, samples_per_step: int | None, sample_name: str = "samples"
                    ) -> dict[str, Any]:
    """``metrics.json``'s ``training``: the steps and seconds of a training, with the samples they drew and the
    samples per second where the samples per optimiser step are known (``sample_name``: what a sample is)."""
    record: dict[str, Any] = {"steps": steps, "seconds": round(seconds, 3)}
    if samples_per_step:
        record["samples"], record["sample_name"] = steps * samples_per_step, sample_name
        record["samples_per_second"] = record["samples"] / seconds if seconds > 0 else None
    return record
