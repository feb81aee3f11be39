"""An exponential moving average of the weights (Polyak averaging), kept beside the trained ones and validated in
their place: DeiT's ``--model-ema`` (decay 0.99996, timm's ``ModelEma``) and its ablation (DeiT Table 8, "Exp.
Moving Avg.")."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from vtrain.config import ConfigError
from vtrain.training.checkpoint import WEIGHT_EMA_KEY


class WeightEMA(pl.Callback):
    """After every optimizer step, ``ema = decay * ema + (1 - decay) * weights`` for each floating-point entry of
    the module's state dict (parameters and buffers), as timm's ``ModelEmaV2`` (and DeiT's ``ModelEma``, the same
    update) does; an integer buffer (a BatchNorm's batch count) is copied, as ``ModelEmaV3`` does. The average
    starts as a copy of the weights the run starts from (its pretrained start, or a resumed checkpoint's average).

    ``evaluate``: every validation of the fit runs on the average (the trained weights are put back afterwards), so
    the logged metrics, the best checkpoint and ``metrics.json`` are the average's, and an evaluation of a checkpoint
    (``vtrain.training.checkpoint.load_task_weights``) loads it. DeiT keeps the average without evaluating it
    (``evaluate: false``).

    The average is in every checkpoint (``checkpoint["weight_ema"]``), so a resumed run continues it exactly.
    ``decay=None`` keeps none (the default config's entry: ``callbacks.weight_ema.decay=0.99996`` switches it on).
    """

    def __init__(self, decay: float | None = None, evaluate: bool = True):
        if decay is not None and not 0.0 <= decay < 1.0:
            raise ConfigError(f"callbacks.weight_ema.decay={decay} is not an average's decay: give one in [0, 1) "
                              "(DeiT: 0.99996), or null for no average")
        self.decay = None if decay is None else float(decay)
        self.evaluate = bool(evaluate)
        self.average: dict[str, torch.Tensor] | None = None  # the module's state dict keys -> averaged tensors
        self._updated_at = -1      # the global step of the last update: one update per optimizer step
        self._trained: dict[str, torch.Tensor] | None = None  # the trained weights while the average is validated

    def _ready(self, pl_module: pl.LightningModule) -> dict[str, torch.Tensor]:
        """The average on the module's devices: a copy of its weights unless a checkpoint gave one. Called once the
        checkpoint is restored and the module placed (never in ``on_fit_start``, which Lightning calls before a
        checkpoint is restored)."""
        state = pl_module.state_dict()
        if self.average is None:
            self.average = {k: v.detach().clone() for k, v in state.items()}
        elif any(self.average[k].device != v.device for k, v in state.items()):
            self.average = {k: self.average[k].to(v.device) for k, v in state.items()}
        return self.average

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is None:
            return
        self._ready(pl_module)
        self._updated_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.decay is None or trainer.global_step == self._updated_at:  # accumulating (or skipped): no new weights
            return
        self._updated_at = trainer.global_step
        self.update(pl_module)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        """One step of the average towards ``module``'s current weights."""
        average = self._ready(module)
        state = module.state_dict()
        floats = [k for k, v in average.items() if v.is_floating_point()]
        if floats:
            ema, current = [average[k] for k in floats], [state[k].detach() for k in floats]
            torch._foreach_mul_(ema, self.decay)
            torch._foreach_add_(ema, current, alpha=1.0 - self.decay)
        for key, value in average.items():
            if not value.is_floating_point():
                value.copy_(state[key])

    @torch.no_grad()
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.decay is None or not self.evaluate or trainer.state.fn != "fit":  # an evaluation loads the average
            return
        average, state = self._ready(pl_module), pl_module.state_dict()
        self._trained = {k: v.detach().clone() for k, v in state.items()}
        for key, value in state.items():
            value.copy_(average[key])

    @torch.no_grad()
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # before the checkpoint callbacks save (Lightning runs them last): checkpoints hold the trained weights
        if self._trained is None:
            return
        for key, value in pl_module.state_dict().items():
            value.copy_(self._trained[key])
        self._trained = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if self.average is not None:
            checkpoint[WEIGHT_EMA_KEY] = {"state_dict": self.average, "decay": self.decay, "evaluated": self.evaluate}
        if self._trained is not None:  # saved during a validation (a preemption): the trained weights, not the average
            checkpoint["state_dict"] = {k: self._trained[k].clone() for k in checkpoint["state_dict"]}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        saved = checkpoint.get(WEIGHT_EMA_KEY)
        if self.decay is not None and saved is not None:  # else the average starts from the resumed weights
            self.average = dict(saved["state_dict"])
