"""Optimizer and learning-rate schedule shared by every task.

The recipes of the seed papers differ only in values, so one function builds all of them:
parameter groups without weight decay (1-D tensors, biases, norms, and what the model lists in
``no_weight_decay()``: position tables, class tokens), the linear lr scaling of the Swin code
(``lr * total_batch / base_batch_size``, applied to warm-up and minimum lr too), an optional lr
multiplier for the backbone (Video Swin uses 0.1), and timm's per-iteration schedulers (``sched._target_``:
:func:`cosine`, :func:`multistep`, :func:`poly`).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from typing import Any, Mapping

import torch
from hydra.utils import get_class, get_method
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

    The decay rule is timm's ``param_groups_weight_decay`` (1-D tensors, biases and ``no_weight_decay()`` names
    exempt); it is written here because the recipes also need a backbone lr multiplier (Video Swin's 0.1)
    in the same split, which timm's function does not make. ``filter_bias_and_bn=False`` decays every
    parameter, as mmdet/mmseg's SGD recipes do (no paramwise config).
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
    """The schedule ``sched_cfg._target_`` names (:func:`cosine`, :func:`multistep`, :func:`poly` or any
    function of the same arguments), given what only the run knows: its length and the lr scaling."""
    options = {k: v for k, v in dict(sched_cfg).items() if k != "_target_"}
    factory = get_method(sched_cfg["_target_"])
    unknown = sorted(set(options) - set(inspect.signature(factory).parameters))
    if unknown:
        raise ConfigError(f"sched has no option {', '.join(unknown)} for {sched_cfg['_target_']}")
    return factory(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch, lr_scale=lr_scale, **options)


def _steps(epochs: float | None, steps: int | None, steps_per_epoch: int) -> int:
    """A duration given in steps (wins when set) or in epochs (converted, as the Swin code does)."""
    return int(steps) if steps is not None else int(round(float(epochs or 0) * steps_per_epoch))


def _warmup(optimizer: torch.optim.Optimizer, steps: int, warmup_lr: float | None, warmup_ratio: float,
            lr_scale: float) -> dict[str, Any]:
    """timm's warm-up arguments: from ``warmup_lr`` (scaled like the lr), or else mmcv's ratio of the base lr."""
    start = float(warmup_lr) * lr_scale if warmup_lr is not None else (
        optimizer.param_groups[0]["initial_lr"] * float(warmup_ratio))
    return dict(warmup_t=steps, warmup_lr_init=start, t_in_epochs=False)


# Each schedule is stepped once per optimizer update (``t_in_epochs=False``); every duration may be given in
# epochs (``*_epochs``) or in steps (``*_steps``).
def cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, lr_scale: float = 1.0,
           min_lr: float = 0.0, warmup_epochs: float = 0, warmup_steps: int | None = None,
           warmup_lr: float | None = None, warmup_ratio: float = 0.001) -> Scheduler:
    """Swin: cosine over the steps after the warm-up (``warmup_prefix``), down to ``min_lr`` (scaled)."""
    warmup = _steps(warmup_epochs, warmup_steps, steps_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup, 1), lr_min=float(min_lr) * lr_scale,
                             cycle_limit=1, warmup_prefix=True,
                             **_warmup(optimizer, warmup, warmup_lr, warmup_ratio, lr_scale))


def multistep(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, lr_scale: float = 1.0,
              milestones_epochs: Sequence[float] = (), milestones_steps: Sequence[int] | None = None,
              gamma: float = 0.1, warmup_epochs: float = 0, warmup_steps: int | None = None,
              warmup_lr: float | None = None, warmup_ratio: float = 0.001) -> Scheduler:
    """mmdet's step decay (the 1x / 3x schedules): times ``gamma`` at each milestone."""
    if milestones_steps is not None:
        milestones = [int(m) for m in milestones_steps]
    else:
        milestones = [int(m * steps_per_epoch) for m in milestones_epochs]
    warmup = _steps(warmup_epochs, warmup_steps, steps_per_epoch)
    # mmdet's milestones count from step 0, warm-up included, and apply from the milestone step on; timm
    # counts them after the warm-up (warmup_prefix) and applies each one step early (bisect on t + 1).
    return MultiStepLRScheduler(optimizer, decay_t=[m + 1 for m in milestones], decay_rate=float(gamma),
                                warmup_prefix=False, **_warmup(optimizer, warmup, warmup_lr, warmup_ratio, lr_scale))


def poly(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, lr_scale: float = 1.0,
         power: float = 0.9, min_lr: float = 0.0, warmup_epochs: float = 0, warmup_steps: int | None = None,
         warmup_lr: float | None = None, warmup_ratio: float = 0.001) -> Scheduler:
    """mmseg's polynomial decay over the whole run, down to ``min_lr`` (scaled)."""
    warmup = _steps(warmup_epochs, warmup_steps, steps_per_epoch)
    return PolyLRScheduler(optimizer, t_initial=max(total_steps, 1), power=float(power),
                           lr_min=float(min_lr) * lr_scale, cycle_limit=1,
                           **_warmup(optimizer, warmup, warmup_lr, warmup_ratio, lr_scale))


def per_step(n_batches: int, accumulate: int) -> int:
    return max(1, math.ceil(n_batches / max(1, accumulate)))
