"""Optimizer and learning-rate schedule shared by every task.

The recipes of the seed papers differ in values and in a few rules, all of them data in ``conf/optim`` and
``conf/sched``:

* which parameter gets which lr and weight decay (:func:`param_groups`): timm's rule, which the Swin and DeiT
  code call (1-D tensors and the model's ``no_weight_decay()`` names get no weight decay,
  ``exempt_1d_and_listed``), mmcv's ``paramwise_cfg.custom_keys`` (the mmdet / mmseg / mmaction2 configs: the
  longest key found in a parameter's name sets its lr and decay multipliers, ``custom_keys``), or neither: every
  parameter decayed (torchvision's reference, mmdet / mmseg / mmaction2 SGD configs);
* the linear lr scaling of the Swin and DeiT code (``lr * total_batch / base_batch_size``);
* the schedule, stepped once per optimizer update but computed as its reference computes it (``sched._target_``:
  :func:`cosine` per iteration (Swin), :func:`cosine_epoch` per epoch (timm's scheduler as DeiT steps it),
  :func:`mmcv_cosine` per epoch with mmcv's warm-up (Video Swin), :func:`multistep` (mmdet, mmaction2,
  torchvision), :func:`poly` (mmseg)).
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

from vtrain.config import ConfigError

# keys of conf/optim that vtrain reads itself; the others go to the optimizer's constructor
_OPTIM_ONLY_KEYS = ("_target_", "base_batch_size", "batch_per_step", "fused", "exempt_1d_and_listed", "custom_keys")


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names exempt from weight decay, collected from every submodule's ``no_weight_decay()``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if module is model or not hasattr(module, "no_weight_decay"):
            continue
        for n in module.no_weight_decay():
            names.add(f"{prefix}.{n}" if prefix else n)
    return names


def custom_key_of(name: str, custom_keys: Mapping[str, Any]) -> str | None:
    """The key of mmcv's ``paramwise_cfg.custom_keys`` that applies to parameter ``name``: the longest key
    contained in the name, ties broken alphabetically (mmcv's ``DefaultOptimizerConstructor`` sorts the keys so
    and takes the first match)."""
    for key in sorted(sorted(custom_keys), key=len, reverse=True):
        if key in name:
            return key
    return None


def param_multipliers(model: nn.Module, exempt_1d_and_listed: bool = True,
                      custom_keys: Mapping[str, Mapping[str, float]] | None = None) -> dict[str, tuple[float, float]]:
    """``{parameter name: (lr multiplier, weight-decay multiplier)}`` for every trainable parameter.

    A parameter whose full name contains a key of ``custom_keys`` gets that key's ``lr_mult`` and ``decay_mult``
    (default 1; the longest key wins, :func:`custom_key_of`), as mmcv's ``paramwise_cfg.custom_keys``. Any other
    parameter is decayed, unless ``exempt_1d_and_listed`` and it is a 1-D tensor (norm weights, biases), a bias, or
    named by a submodule's ``no_weight_decay()`` (timm's ``param_groups_weight_decay``, which the Swin and DeiT
    code use). With neither, every parameter is decayed at the base rate.
    """
    custom_keys = dict(custom_keys or {})
    listed = no_weight_decay_names(model) if exempt_1d_and_listed else set()
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = custom_key_of(name, custom_keys)
        if key is not None:
            rule = custom_keys[key] or {}
            out[name] = (float(rule.get("lr_mult", 1.0)), float(rule.get("decay_mult", 1.0)))
        elif exempt_1d_and_listed and (p.ndim <= 1 or name.endswith(".bias") or name in listed):
            out[name] = (1.0, 0.0)
        else:
            out[name] = (1.0, 1.0)
    return out


def param_groups(model: nn.Module, weight_decay: float, lr: float, exempt_1d_and_listed: bool = True,
                 custom_keys: Mapping[str, Mapping[str, float]] | None = None) -> list[dict]:
    """Trainable parameters grouped by their (lr, weight decay) multipliers (:func:`param_multipliers`); each
    group carries its lr multiplier as ``lr_scale``, which timm's schedulers apply to every lr they set."""
    parameters = dict(model.named_parameters())
    groups: dict[tuple[float, float], dict] = {}
    for name, (lr_mult, decay_mult) in param_multipliers(model, exempt_1d_and_listed, custom_keys).items():
        group = groups.setdefault((lr_mult, decay_mult), {
            "params": [], "weight_decay": weight_decay * decay_mult, "lr_scale": lr_mult,
            # timm's schedulers scale every value they set by lr_scale: start from the same point
            "lr": lr * lr_mult, "initial_lr": lr,
        })
        group["params"].append(parameters[name])
    return list(groups.values())


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
    groups = param_groups(model, weight_decay, lr, bool(optim_cfg.get("exempt_1d_and_listed", True)),
                          optim_cfg.get("custom_keys"))
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
    """The schedule ``sched_cfg._target_`` names (one of this module's schedules or any function of the same
    arguments), given what only the run knows: its length and the lr scaling."""
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


# Each schedule is stepped once per optimizer update (TaskModule.lr_scheduler_step passes the update count);
# every duration may be given in epochs (``*_epochs``) or in steps (``*_steps``).
def cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, lr_scale: float = 1.0,
           min_lr: float = 0.0, warmup_epochs: float = 0, warmup_steps: int | None = None,
           warmup_lr: float | None = None, warmup_ratio: float = 0.001, warmup_prefix: bool = True) -> Scheduler:
    """Swin (its lr_scheduler.py): cosine per iteration down to ``min_lr`` after a linear warm-up; warm-up and
    minimum lr scale with the batch as the lr does. ``warmup_prefix``: the cosine runs over the steps after the
    warm-up (the repository since October 2022, ``WARMUP_PREFIX=True``); false: over all the steps, the warm-up's
    included (``t_initial=num_steps``: the code of the paper's Table 1 and of the released weights)."""
    warmup = _steps(warmup_epochs, warmup_steps, steps_per_epoch)
    return CosineLRScheduler(optimizer, t_initial=max(total_steps - warmup if warmup_prefix else total_steps, 1),
                             lr_min=float(min_lr) * lr_scale, cycle_limit=1, warmup_prefix=bool(warmup_prefix),
                             **_warmup(optimizer, warmup, warmup_lr, warmup_ratio, lr_scale))


class EpochCosineLRScheduler(CosineLRScheduler):
    """timm's ``CosineLRScheduler`` with ``t_in_epochs=True``, stepped from the update count: the lr changes once
    per epoch, to the value of ``epoch - epoch_lag`` (never before 0)."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epoch_lag: int, **kwargs: Any):
        super().__init__(optimizer, t_in_epochs=True, **kwargs)
        self.steps_per_epoch, self.epoch_lag = max(int(steps_per_epoch), 1), int(epoch_lag)
        self.step_update(0)

    def step_update(self, num_updates: int, metric: float | None = None) -> None:
        self.step(max(num_updates // self.steps_per_epoch - self.epoch_lag, 0), metric)


def cosine_epoch(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, lr_scale: float = 1.0,
                 min_lr: float = 1e-5, warmup_epochs: int = 5, warmup_lr: float = 1e-6,
                 lr_of_previous_epoch: bool = True) -> Scheduler:
    """DeiT (main.py with timm's ``create_scheduler``): timm's cosine with ``t_in_epochs=True``, so the lr changes
    once per epoch; ``warmup_epochs`` linear from ``warmup_lr``, then the cosine over *all* the epochs (no warm-up
    prefix: at epoch t it is at t / epochs), down to ``min_lr``. Only the lr scales with the batch: ``warmup_lr``
    and ``min_lr`` are absolute (DeiT scales ``args.lr`` alone). DeiT's loop calls ``lr_scheduler.step(epoch)``
    after epoch ``epoch``, so epoch e > 0 trains at the schedule's value for e - 1 and epochs 0 and 1 both at
    ``warmup_lr`` (``lr_of_previous_epoch``; false: epoch e at the value for e, as timm's train.py). The defaults
    are DeiT's main.py ones."""
    del lr_scale  # DeiT scales the lr only; it arrives scaled in the optimizer's groups
    epochs = max(int(round(total_steps / max(steps_per_epoch, 1))), 1)
    return EpochCosineLRScheduler(optimizer, steps_per_epoch=steps_per_epoch, epoch_lag=int(lr_of_previous_epoch),
                                  t_initial=epochs, lr_min=float(min_lr), warmup_t=int(warmup_epochs),
                                  warmup_lr_init=float(warmup_lr), cycle_limit=1)


class MMCVCosineScheduler(Scheduler):
    """mmcv's ``CosineAnnealingLrUpdaterHook`` with ``by_epoch=True`` and linear warm-up (lr_updater.py): the
    regular lr is the cosine of the epoch, ``min_lr + (lr - min_lr) * (1 + cos(pi * epoch / epochs)) / 2``, and
    during the first ``warmup_steps`` updates (a float, as mmcv's ``warmup_epochs * epoch_len``) it is multiplied by
    ``1 - (1 - t / warmup_steps) * (1 - warmup_ratio)``."""

    def __init__(self, optimizer: torch.optim.Optimizer, *, steps_per_epoch: int, epochs: int, min_lr: float,
                 warmup_steps: float, warmup_ratio: float):
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=False)
        self.steps_per_epoch, self.epochs = max(int(steps_per_epoch), 1), max(int(epochs), 1)
        self.min_lr, self.warmup_steps, self.warmup_ratio = float(min_lr), float(warmup_steps), float(warmup_ratio)
        self.step_update(0)

    def _get_lr(self, t: int) -> list[float]:
        progress = min(t // self.steps_per_epoch, self.epochs) / self.epochs
        factor = 1.0
        if t < self.warmup_steps:
            factor = 1 - (1 - t / self.warmup_steps) * (1 - self.warmup_ratio)
        return [(self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * progress))) * factor
                for base in self.base_values]


def mmcv_cosine(optimizer: torch.optim.Optimizer, *, total_steps: int, steps_per_epoch: int, lr_scale: float = 1.0,
                min_lr: float = 0.0, warmup_epochs: float = 0, warmup_ratio: float = 0.1) -> Scheduler:
    """Video Swin (mmaction2 0.x, mmcv 1.x: ``lr_config = dict(policy='CosineAnnealing', min_lr=0, warmup='linear',
    warmup_by_epoch=True, warmup_iters=2.5)``): the cosine changes once per epoch, the warm-up per update from
    ``warmup_ratio`` (mmcv's default 0.1) times the regular lr (:class:`MMCVCosineScheduler`). ``min_lr`` is
    absolute, as mmcv's."""
    del lr_scale
    epochs = max(int(round(total_steps / max(steps_per_epoch, 1))), 1)
    return MMCVCosineScheduler(optimizer, steps_per_epoch=steps_per_epoch, epochs=epochs, min_lr=min_lr,
                               warmup_steps=float(warmup_epochs) * steps_per_epoch, warmup_ratio=warmup_ratio)


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
         warmup_lr: float | None = None, warmup_ratio: float = 0.001, warmup_prefix: bool = False) -> Scheduler:
    """mmseg's polynomial decay over the whole run, down to ``min_lr`` (scaled). ``warmup_prefix``: the decay
    runs over the steps after the warm-up, from the full lr at its end (Pix2seq's ``WarmUpAndDecay``, linear with
    ``power: 1``); false: over all the steps (mmseg's)."""
    warmup = _steps(warmup_epochs, warmup_steps, steps_per_epoch)
    return PolyLRScheduler(optimizer, t_initial=max(total_steps - warmup if warmup_prefix else total_steps, 1),
                           power=float(power), lr_min=float(min_lr) * lr_scale, cycle_limit=1,
                           warmup_prefix=bool(warmup_prefix),
                           **_warmup(optimizer, warmup, warmup_lr, warmup_ratio, lr_scale))


def per_step(n_batches: int, accumulate: int) -> int:
    return max(1, math.ceil(n_batches / max(1, accumulate)))
