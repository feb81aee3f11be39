"""Checks of a composed config that must fail before any worker or DDP process starts.

Each failure is a :class:`vtrain.ConfigError` whose message is one line: what is wrong and how to fix it.
"""
from __future__ import annotations

import inspect
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from hydra.utils import get_class, get_method
from omegaconf import DictConfig, OmegaConf

from vtrain.config import ConfigError

# Downloads a published file (url, path): None once it is at path, else why not, a clause of one line.
Download = Callable[[str, Path], "str | None"]

# What Lightning 2.6's Trainer takes as ``precision`` (``_PRECISION_INPUT`` in
# lightning_fabric/plugins/precision/precision.py); tests/test_configs.py checks that the two agree.
PRECISIONS = (
    "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true",
    "transformer-engine", "transformer-engine-float16", "32", "bf16", "16", "64", 32, 16, 64,
)


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# (key, accepted, what it must be, an example): a key that the config does not have is not checked. Hydra hands a
# value it cannot parse as a number to the config as a string (``optim.lr=abc`` is 'abc'), hence the type checks.
VALUE_RULES = (
    ("optim.lr", lambda v: _number(v) and v > 0, "a number > 0", "1e-3"),
    ("optim.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0", "0.05"),
    ("data.batch_size", lambda v: _int(v) and v > 0, "a whole number > 0 (samples per device)", "32"),
    ("data.val_batch_size", lambda v: v is None or _int(v) and v > 0,
     "a whole number > 0 (samples per device), or null (as data.batch_size)", "32"),
    ("data.max_skipped_fraction", lambda v: _number(v) and 0 <= v <= 1,
     "a fraction from 0 to 1 (of an epoch's or a validation's samples that may be skipped as unreadable)", "0.01"),
    ("data.num_workers", lambda v: _int(v) and v >= 0,
     "a whole number >= 0 (loader processes per device; 0 loads in the main process)", "4"),
    # Lightning: max_epochs None is 1000 epochs (-1 with max_steps set); -1 is no limit for either
    ("trainer.max_epochs", lambda v: v is None or _int(v) and v >= -1, "a whole number >= 0, or -1 for no limit",
     "100"),
    ("trainer.max_steps", lambda v: _int(v) and v >= -1, "a whole number >= 0, or -1 for no limit", "80000"),
    ("paths.download_weights", lambda v: isinstance(v, bool),
     "true or false (whether a recipe's missing reference checkpoint is downloaded; env VTRAIN_DOWNLOAD_WEIGHTS)",
     "false"),
    ("trainer.precision", lambda v: v is None or isinstance(v, (str, int)) and v in PRECISIONS,
     "a precision Lightning knows (32-true, bf16-mixed, 16-mixed, bf16-true, 16-true, 64-true, ...)", "bf16-mixed"),
)


def validate(cfg: DictConfig, datamodule, download: Download | None = None) -> None:
    if cfg.mode not in ("train", "eval"):
        raise ConfigError(f"mode={cfg.mode!r} is not a mode: use mode=train or mode=eval")
    check_values(cfg)
    _check_devices(cfg.trainer)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path} does not exist: pass the path of a checkpoint file")
    if cfg.mode == "eval" and not cfg.get("ckpt_path"):  # ckpt_path=auto that found none arrives here as null
        raise ConfigError("nothing to evaluate: give the weights as ckpt_path=<checkpoint file>, or ckpt_path=auto in a "
                          f"run directory that has a checkpoint ({cfg.get('output_dir')}/checkpoints has none)")
    if cfg.mode == "train":
        check_pretrained(cfg, download)
        accumulate_grad_batches(cfg)  # optim.batch_per_step must be made of whole passes on these devices
    _check_input_size(cfg)
    if hasattr(datamodule, "check"):
        try:
            datamodule.check()
        except ConfigError as e:
            root = Path(str(cfg.data.get("root", "")))
            if cfg.get("synthetic") and not root.exists():  # a quickstart before its data was written
                raise ConfigError(f"{e}; this experiment trains on synthetic data: write it with python "
                                  f"scripts/make_synthetic.py {cfg.synthetic} --out {root}") from None
            raise


def check_values(cfg: DictConfig) -> None:
    """Each key of :data:`VALUE_RULES` has a value of the right type and range; needs nothing on disk."""
    absent = object()
    for key, accepted, what, example in VALUE_RULES:
        value = OmegaConf.select(cfg, key, default=absent)
        if value is not absent and not accepted(value):
            shown = "null" if value is None else repr(value)  # as it is written on the command line
            raise ConfigError(f"{key}={shown} is not {what}: use e.g. {key}={example}")


def check_pretrained(cfg: DictConfig, download: Download | None = None) -> None:
    """The weights a training run starts from exist (a resumed run takes its weights from ``ckpt_path``). A recipe's
    reference checkpoint that is missing is downloaded from where it is published (``pretrained_url``) by
    ``download`` (:func:`vtrain.training.pretrained.download_weights`, handed in by the command line) unless
    ``paths.download_weights`` is false; when it is not there after that: one line naming the file, where it is
    published, why its download failed, and that ``pretrained=null`` trains from scratch on purpose."""
    path = cfg.get("pretrained")
    if not path and not cfg.get("ckpt_path") and OmegaConf.select(cfg, "task.linear_probe", default=False):
        # a linear evaluation of a random backbone would train and report as if nothing were wrong
        raise ConfigError("task.linear_probe=true trains only a classifier on a frozen backbone, and pretrained is "
                          "null: give the pre-trained weights, e.g. pretrained=<a moby_*_imagenet run>/checkpoints/last.ckpt")
    if not path or cfg.get("ckpt_path") or Path(path).is_file():
        return
    url = cfg.get("pretrained_url")
    published = bool(url) and Path(url).name == Path(path).name
    why = ""
    if published and download is not None and OmegaConf.select(cfg, "paths.download_weights", default=False):
        failure = download(url, Path(path))
        if failure is None:
            return
        why = f" ({failure})"
    where = (f"download it from {url} into paths.weights_dir="
             f"{OmegaConf.select(cfg, 'paths.weights_dir')} (or set VTRAIN_WEIGHTS)"
             if published else "pass the path of a weights file")
    raise ConfigError(f"pretrained={path} does not exist{why}: {where}, or pass pretrained=null to train from "
                      "scratch on purpose")


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
    if accelerator == "cpu" and devices != "auto":
        # Lightning starts one process per device on the CPU. The machine's count, not this process's affinity:
        # under SLURM or torchrun each launched process may be pinned to fewer cores than the node has.
        cores = os.cpu_count() or 1
        if isinstance(devices, str) and devices.strip().isdigit():  # Lightning reads "4" as 4
            devices = int(devices)
        if not _int(devices) or devices < 1:
            raise ConfigError(f"trainer.devices={devices!r} is not a number of processes on the CPU: "
                              f"use trainer.devices=1 (up to {cores}, this machine's cores)")
        if devices > cores:
            raise ConfigError(
                f"trainer.devices={devices} would start {devices} processes on the CPU but this machine has "
                f"{cores} core(s): use trainer.devices={cores} or fewer"
            )


def accumulation_for(batch_per_step: int, batch_size: int, world_size: int) -> int:
    """The gradient accumulation that makes ``batch_per_step`` samples per optimizer update out of ``batch_size``
    per device on ``world_size`` devices (mmcv's ``update_interval`` in the Video Swin configs), or one line
    saying which per-device batch would."""
    per_pass = batch_size * world_size
    if batch_per_step % per_pass:
        fits = [b for b in range(batch_size, 0, -1) if batch_per_step % (b * world_size) == 0]
        fix = f"data.batch_size={fits[0]}" if fits else f"a device count that divides {batch_per_step}"
        raise ConfigError(f"optim.batch_per_step={batch_per_step} is not a whole number of passes of "
                          f"data.batch_size={batch_size} on {world_size} device(s) ({per_pass} samples): use {fix}")
    return batch_per_step // per_pass


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
    that batch on this run's devices (:func:`vtrain.config.validate.accumulation_for`)."""
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


def keys_not_taken(node: Any) -> list[str]:
    """The keys of a ``_target_`` config that its callable does not take (none when it takes ``**kwargs``): what a
    key an experiment set for one choice of a group leaves behind when the choice changes."""
    if not isinstance(node, Mapping) or "_target_" not in node:
        return []
    parameters = inspect.signature(get_method(node["_target_"])).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return []
    return [str(k) for k in node if not str(k).startswith("_") and k not in parameters]
