"""Trainer, loggers and callbacks from the config; and the glue that makes Hydra and DDP agree."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator, NamedTuple

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

from vtrain.config.validate import accumulate_grad_batches
from vtrain.training.callbacks.display import ModelSummary
from vtrain.training.callbacks.metrics_json import MetricsJSON
from vtrain.training.callbacks.model_checkpoint import ModelCheckpoint

log = logging.getLogger(__name__)

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Each entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers); a null entry switches one off."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


class BuiltTrainer(NamedTuple):
    trainer: pl.Trainer
    metrics: MetricsJSON | None  # what metrics.json holds, in memory (None: the callback is switched off)


def build_trainer(cfg: DictConfig) -> BuiltTrainer:
    """The configured trainer, its callbacks and loggers; the loggers record the whole resolved config. The
    callbacks that depend on each other are connected here: a new best checkpoint is recorded in ``metrics.json``."""
    callbacks = _instantiate_all(cfg.get("callbacks"))
    metrics = next((c for c in callbacks if isinstance(c, MetricsJSON)), None)
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.on_new_best is None and metrics is not None:
            callback.on_new_best = metrics.record_best_checkpoint
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          accumulate_grad_batches=accumulate_grad_batches(cfg))
    _replace_model_summary(trainer)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    return BuiltTrainer(trainer, metrics)


def _replace_model_summary(trainer: pl.Trainer) -> None:
    """Lightning's default model summary (added when ``trainer.enable_model_summary``) without its FLOPs column."""
    from pytorch_lightning.callbacks import ModelSummary as LightningModelSummary
    from pytorch_lightning.callbacks import RichModelSummary

    trainer.callbacks = [ModelSummary() if type(c) in (LightningModelSummary, RichModelSummary) else c
                         for c in trainer.callbacks]


@contextlib.contextmanager
def hydra_ddp_job() -> Iterator[None]:
    """Run one Hydra job whose trainer may start DDP worker processes.

    Lightning re-executes ``sys.argv`` for ranks > 0 and points them at ``hydra.run.dir``. In a multirun that
    would (a) replay the whole sweep in every worker and (b) send the workers to the run directory pattern
    instead of this job's directory. So, for the duration of the job, the command line is this job's own
    overrides and ``hydra.run.dir`` is this job's output directory: every rank writes into one directory and
    each sweep point runs once. Afterwards the process group and the launcher's environment variables are
    removed, so the next job of the sweep starts its own workers.
    """
    if not HydraConfig.initialized() or "LOCAL_RANK" in os.environ:  # a DDP worker, or launched by torchrun/srun
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_env = list(sys.argv), {k: os.environ.get(k) for k in _LAUNCHER_ENV}
    saved_run_dir = hydra_cfg.run.dir
    sys.argv = [sys.argv[0], *hydra_cfg.overrides.task]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = saved_argv
        with read_write(hydra_cfg):
            hydra_cfg.run.dir = saved_run_dir
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
