"""The LightningModule every task subclasses: optimizer, schedule and pretrained weights, written once."""
from __future__ import annotations

import logging
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from timm.scheduler.scheduler import Scheduler

from vtrain import ConfigError
from vtrain.lightning_internals import setup_train_data
from vtrain.optim import build_optimizer, build_scheduler, lr_scale_factor, per_step

log = logging.getLogger(__name__)


class TaskModule(pl.LightningModule):
    """Base of every task's LightningModule.

    A subclass builds ``self.backbone`` (a :class:`vtrain.backbones.base.Backbone`) and its head(s), and
    implements ``training_step`` / ``validation_step``. It passes ``monitor`` / ``monitor_mode`` (the metric that
    picks the best checkpoint) and may fill ``summary_metrics`` (e.g. per-class IoU) which ``metrics.json`` records.
    """

    def __init__(self, optim: Mapping[str, Any], sched: Mapping[str, Any], monitor: str = "val/loss",
                 monitor_mode: str = "min"):
        super().__init__()
        if monitor_mode not in ("min", "max"):
            raise ConfigError(f"task.monitor_mode={monitor_mode!r}: use min or max")
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.optim_cfg = dict(optim)
        self.sched_cfg = dict(sched)
        self.summary_metrics: dict[str, Any] = {}

    # ----------------------------------------------------------------- model
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone (:meth:`vtrain.backbones.base.Backbone.set_grad_checkpointing`)."""
        setter = getattr(self.backbone, "set_grad_checkpointing", None)
        if setter is None:
            raise ConfigError(f"grad_checkpointing: {type(self.backbone).__name__} does not support it; "
                              "the 2D backbones (ResNet, LR-Net, Swin, ViT) do")
        setter(enable)

    def compile_backbone(self, **kwargs: Any) -> None:
        """``torch.compile`` the backbone's entry points in place (``forward``, which dense heads call, and
        ``forward_pooled``, which classifiers call): parameter names, hence checkpoints, do not change."""
        compiled = []
        for name in ("forward", "forward_pooled"):
            method = getattr(self.backbone, name, None)
            if method is not None:
                setattr(self.backbone, name, torch.compile(method, **kwargs))
                compiled.append(name)
        log.info("torch.compile(%s) of the backbone's %s", kwargs or "", ", ".join(compiled))

    # ----------------------------------------------------------------- optimisation
    def total_batch_size(self) -> int:
        trainer = self.trainer
        per_device = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
        per_device = per_device or 1
        return int(per_device * trainer.world_size * trainer.accumulate_grad_batches)

    def configure_optimizers(self):
        total_batch = self.total_batch_size()
        optimizer = build_optimizer(self, self.optim_cfg, total_batch)
        total_steps = int(self.trainer.estimated_stepping_batches)
        if self.trainer.train_dataloader is None:
            # Iteration-based runs (max_epochs=-1): estimated_stepping_batches is max_steps without loading the
            # data, but durations given in epochs need the batches per epoch. (A loader state from a checkpoint
            # is handed over later by vtrain.reproducibility.ExactResume.)
            setup_train_data(self.trainer)
        steps_per_epoch = per_step(int(self.trainer.num_training_batches), self.trainer.accumulate_grad_batches)
        scheduler = build_scheduler(
            optimizer,
            self.sched_cfg,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
            lr_scale=lr_scale_factor(self.optim_cfg, total_batch),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any) -> None:
        # timm schedulers are stepped by update count: resuming at global_step N gives the lr of step N exactly.
        scheduler.step_update(num_updates=self.global_step)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- weights
    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Load reference weights (official/timm/torchvision/this framework) into the backbone; ``strict``: every
        backbone tensor must come from the file (:func:`vtrain.checkpoint.load_matching`)."""
        from vtrain.checkpoint import load_backbone_weights

        load_backbone_weights(self.backbone, path, strict=strict)


def build_task(cfg: DictConfig) -> TaskModule:
    """The task module of a composed config: ``cfg.task`` with the run's optimiser and schedule (a task config
    names its other inputs itself, the backbone among them: ``backbone: ${backbone}``)."""
    return instantiate(cfg.task, optim=cfg.optim, sched=cfg.sched, _recursive_=False)
