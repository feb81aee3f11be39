"""Checks of a composed config that must fail before any worker or DDP process starts.

Each failure is a :class:`vtrain.ConfigError` whose message is one line: what is wrong and how to fix it.
"""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from vtrain import ConfigError


def validate(cfg: DictConfig, datamodule) -> None:
    if cfg.mode not in ("train", "eval"):
        raise ConfigError(f"mode={cfg.mode!r} is not a mode: use mode=train or mode=eval")
    _check_devices(cfg.trainer)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist: pass the path of a checkpoint file")
    if cfg.get("pretrained") and not Path(cfg.pretrained).is_file():
        raise ConfigError(f"pretrained={cfg.pretrained} does not exist: pass the path of a weights file")
    _check_input_size(cfg)
    if hasattr(datamodule, "check"):
        datamodule.check()


def _check_input_size(cfg: DictConfig) -> None:
    """A data module that feeds one size (``data.img_size``: classification) feeds a classifier's trunk; the
    backbone's class says whether its configuration takes that size (Swin: whole windows at every stage)."""
    size = cfg.data.get("img_size")
    if size is None or "_target_" not in cfg.backbone:
        return
    backbone = get_class(cfg.backbone._target_)
    if hasattr(backbone, "check_input_size"):
        backbone.check_input_size(cfg.backbone, int(size))


def _check_devices(trainer: DictConfig) -> None:
    accelerator, devices = trainer.get("accelerator", "auto"), trainer.get("devices", "auto")
    if accelerator in ("gpu", "cuda"):
        available = torch.cuda.device_count()
        if available == 0:
            raise ConfigError(f"trainer.accelerator={accelerator} but no CUDA device is visible: use trainer=cpu")
        if isinstance(devices, int) and devices > available:
            raise ConfigError(
                f"trainer.devices={devices} but only {available} CUDA device(s) are visible: "
                f"use trainer.devices={available} or more trainer.num_nodes"
            )
