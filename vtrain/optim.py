"""Optimizer and learning-rate schedule shared by every task.

The recipes of the seed papers differ only in values, so one function builds all of them:
parameter groups without weight decay (1-D tensors, biases, norms, and what the model lists in
``no_weight_decay()``: position tables, class tokens), the linear lr scaling of the Swin code
(``lr * total_batch / base_batch_size``, applied to warm-up and minimum lr too), an optional lr
multiplier for the backbone (Video Swin uses 0.1), and timm's per-iteration schedulers.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from hydra.utils import get_class
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler
from timm.scheduler.scheduler import Scheduler
from torch import nn

from vtrain import ConfigError

_OPTIM_ONLY_KEYS = ("_target_", "base_batch_size", "backbone_lr_mult", "fused", "filter_bias_and_bn")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names exempt from weight decay, collected from every submodule's ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if module is model or not hasattr(module, "no_weight_decay"):
            continue
        for n in module.no_weight_decay():
            names.add(f"{prefix}.{n}" if prefix else n)
    return names


def param_groups(
    model: nn.Module, weight_decay: float, lr: float, backbone_lr_mult: float = 1.0, filter_bias_and_bn: bool = True
) -> list[dict]:
    """Split trainable parameters into (backbone?, decay?) groups; each group carries its own lr.

    ``filter_bias_and_bn=False`` decays every parameter, as mmdet/mmseg's SGD recipes do (no paramwise config).
    """
    skip = no_weight_decay_names(model) if filter_bias_and_bn else set()
    groups: dict[tuple[bool, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        in_backbone = name.startswith("backbone.")
        decay = not filter_bias_and_bn or not (p.ndim <= 1 or name.endswith(".bias") or name in skip)
        key = (in_backbone and backbone_lr_mult != 1.0, decay)
        group = groups.setdefault(
            key,
            {
                "params": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": backbone_lr_mult if key[0] else 1.0,
            },
        )
        group["params"].append(p)
    out = list(groups.values())
    for g in out:
        # timm's schedulers multiply every value they set by ``lr_scale``; start from the same point.
        g["lr"] = lr * g["lr_scale"]
        g["initial_lr"] = lr
    return out


def lr_scale_factor(optim_cfg: Mapping[str, Any], total_batch_size: int) -> float:
    base = optim_cfg.get("base_batch_size")
    return 1.0 if not base else total_batch_size / float(base)


def build_optimizer(model: nn.Module, optim_cfg: Mapping[str, Any], total_batch_size: int) -> torch.optim.Optimizer:
    kwargs = {k: v for k, v in dict(optim_cfg).items() if k not in _OPTIM_ONLY_KEYS}
    cls = get_class(optim_cfg["_target_"])
    lr = float(kwargs.pop("lr")) * lr_scale_factor(optim_cfg, total_batch_size)
    weight_decay = float(kwargs.pop("weight_decay", 0.0))
    if "betas" in kwargs:
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = param_groups(model, weight_decay, lr, float(optim_cfg.get("backbone_lr_mult", 1.0)),
                          bool(optim_cfg.get("filter_bias_and_bn", True)))
    if not groups:
        raise ConfigError("the model has no trainable parameter: check backbone.frozen_stages and the task's freezing options")
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    fused = optim_cfg.get("fused", "auto")
    if fused == "auto":
        fused = on_cuda and cls in (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)
    if fused:
        kwargs["fused"] = True
    return cls(groups, lr=lr, weight_decay=weight_decay, **kwargs)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    sched_cfg: Mapping[str, Any],
    *,
    total_steps: int,
    steps_per_epoch: int,
    lr_scale: float = 1.0,
) -> Scheduler:
    """A timm scheduler stepped once per optimizer update (``t_in_epochs=False``).

    Every duration in the config may be given in epochs (``*_epochs``) or in steps (``*_steps``);
    epochs are converted with ``steps_per_epoch``, as the Swin code does.
    """
    def steps(key: str, default: float = 0) -> int:
        if sched_cfg.get(f"{key}_steps") is not None:
            return int(sched_cfg[f"{key}_steps"])
        return int(round(float(sched_cfg.get(f"{key}_epochs") or default) * steps_per_epoch))

    name = sched_cfg["name"]
    warmup = steps("warmup")
    base_lr = optimizer.param_groups[0]["initial_lr"]
    if sched_cfg.get("warmup_lr") is not None:
        warmup_lr = float(sched_cfg["warmup_lr"]) * lr_scale
    else:  # mmcv style: a ratio of the base lr
        warmup_lr = base_lr * float(sched_cfg.get("warmup_ratio", 0.001))
    min_lr = float(sched_cfg.get("min_lr", 0.0)) * lr_scale
    common = dict(warmup_t=warmup, warmup_lr_init=warmup_lr, t_in_epochs=False)
    if name == "cosine":
        # Swin: cosine over the steps after warm-up (warmup_prefix), down to min_lr.
        return CosineLRScheduler(
            optimizer, t_initial=max(total_steps - warmup, 1), lr_min=min_lr, cycle_limit=1,
            warmup_prefix=True, **common,
        )
    if name == "multistep":
        if sched_cfg.get("milestones_steps") is not None:
            milestones = [int(m) for m in sched_cfg["milestones_steps"]]
        else:
            milestones = [int(m * steps_per_epoch) for m in sched_cfg["milestones_epochs"]]
        # mmdet's milestones count from step 0, warm-up included, and apply from the milestone step on; timm
        # counts them after the warm-up (warmup_prefix) and applies each one step early (bisect on t + 1).
        return MultiStepLRScheduler(
            optimizer, decay_t=[m + 1 for m in milestones], decay_rate=float(sched_cfg.get("gamma", 0.1)),
            warmup_prefix=False, **common,
        )
    if name == "poly":
        return PolyLRScheduler(
            optimizer, t_initial=max(total_steps, 1), power=float(sched_cfg.get("power", 0.9)), lr_min=min_lr,
            cycle_limit=1, **common,
        )
    raise ConfigError(f"unknown sched.name={name!r}: use one of cosine, multistep, poly")


def per_step(n_batches: int, accumulate: int) -> int:
    return max(1, math.ceil(n_batches / max(1, accumulate)))
