"""Checks of a composed config that must fail before any worker or DDP process starts.

Each failure is a :class:`vtrain.ConfigError` whose message is one line: what is wrong and how to fix it.
"""
from __future__ import annotations

from pathlib import Path

import torch
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
    _check_resolution(cfg)
    if hasattr(datamodule, "check"):
        datamodule.check()


def _check_resolution(cfg: DictConfig) -> None:
    """Swin classifies at a fixed size: every stage (strides 4..32) must hold whole windows (or fit in one)."""
    backbone = cfg.backbone
    if "window_size" not in backbone or "img_size" not in backbone or not str(cfg.task._target_).endswith("ClassificationTask"):
        return
    size, window = int(backbone.img_size), int(backbone.window_size)
    for stride in (4, 8, 16, 32):
        side = size / stride
        if side != int(side) or (side > window and side % window):
            good = 32 * window
            raise ConfigError(
                f"backbone.img_size={size} does not tile into Swin windows of {window} at stride {stride}: "
                f"use a multiple of {good} (e.g. {good * max(1, round(size / good))}) or change backbone.window_size"
            )


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
