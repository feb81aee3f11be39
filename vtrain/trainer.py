"""Trainer, loggers and callbacks from the config; and the glue that makes Hydra and DDP agree."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Any, Iterator

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, read_write

from vtrain import ConfigError
from vtrain.optim import accumulation_for

log = logging.getLogger(__name__)

_LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _instantiate_all(group: DictConfig | None) -> list[Any]:
    """Each entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers); a null entry switches one off."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if c is not None and "_target_" in c]


def device_count(trainer_cfg: DictConfig) -> int:
    """The processes a trainer config trains on: ``devices`` (a number, a list, or auto/-1 for every visible GPU,
    one CPU process) times ``num_nodes``, as Lightning counts them."""
    devices = trainer_cfg.get("devices", "auto")
    if isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, (list, tuple)) or OmegaConf.is_list(devices):
        count = len(devices)
    elif devices in ("auto", -1):
        count = torch.cuda.device_count() if trainer_cfg.get("accelerator", "auto") in ("gpu", "cuda", "auto") else 1
    else:
        count = int(devices)
    return max(count, 1) * int(trainer_cfg.get("num_nodes", 1) or 1)


def accumulate_grad_batches(cfg: DictConfig) -> int:
    """Batches per optimizer update: ``trainer.accumulate_grad_batches``, or, when the recipe fixes the samples per
    update (``optim.batch_per_step``, e.g. Video Swin's 8 clips x 8 GPUs x update_interval 4 = 256), what makes
    that batch on this run's devices (:func:`vtrain.optim.accumulation_for`)."""
    configured = int(cfg.trainer.get("accumulate_grad_batches", 1) or 1)
    batch_per_step = OmegaConf.select(cfg, "optim.batch_per_step", default=None)
    if not batch_per_step:
        return configured
    needed = accumulation_for(int(batch_per_step), int(cfg.data.batch_size), device_count(cfg.trainer))
    if configured not in (1, needed):
        raise ConfigError(f"trainer.accumulate_grad_batches={configured} but optim.batch_per_step={batch_per_step} "
                          f"needs {needed} here: leave trainer.accumulate_grad_batches at 1, or set "
                          "optim.batch_per_step=null to choose it yourself")
    return needed


def build_trainer(cfg: DictConfig) -> pl.Trainer:
    """The configured trainer, its callbacks and loggers; the loggers record the whole resolved config."""
    callbacks = _instantiate_all(cfg.get("callbacks"))
    loggers = _instantiate_all(cfg.get("logger"))
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                          accumulate_grad_batches=accumulate_grad_batches(cfg))
    _replace_model_summary(trainer)
    config = OmegaConf.to_container(cfg, resolve=True)
    for logger in loggers:
        logger.log_hyperparams(config)
    return trainer


def _replace_model_summary(trainer: pl.Trainer) -> None:
    """Lightning's default model summary (added when ``trainer.enable_model_summary``) without its FLOPs column."""
    from pytorch_lightning.callbacks import ModelSummary as LightningModelSummary
    from pytorch_lightning.callbacks import RichModelSummary

    from vtrain.callbacks import ModelSummary

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
