"""Callbacks every task shares."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only


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
    validation, atomically, so a run stopped at any point leaves a complete file.
    """

    def __init__(self, dirpath: str, filename: str = "metrics.json"):
        self.path = Path(dirpath) / filename
        self.final: dict[str, Any] = {}
        self.best: dict[str, Any] = {}
        self.best_epoch: dict[str, int] = {}

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
            if name.startswith("lr-") or name.endswith("_step"):
                continue  # a learning rate or a single step's value has no "best"
            better = max if self._direction(name, pl_module) == "max" else min
            if name not in self.best or better(value, self.best[name]) != self.best[name]:
                self.best[name] = value
                self.best_epoch[name] = trainer.current_epoch

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._collect(trainer, pl_module)
        payload = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "monitor": getattr(pl_module, "monitor", None),
            "final": self.final,
            "best": self.best,
            "best_epoch": self.best_epoch,
            **{k: _plain(v) for k, v in getattr(pl_module, "summary_metrics", {}).items()},
        }
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "best_model_path", ""):
            payload["best_checkpoint"] = ckpt.best_model_path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True))
        os.replace(tmp, self.path)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._write(trainer, pl_module, "validate" if trainer.state.fn == "validate" else "fit")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = dict(state_dict.get("best", {}))
        self.best_epoch = dict(state_dict.get("best_epoch", {}))
