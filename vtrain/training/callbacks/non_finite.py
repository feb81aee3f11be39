"""Optimizer steps with a non-finite loss or gradient skipped and counted."""
from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn


GRAD_NORM = "vtrain_grad_norm"  # the optimizer's attribute that hands the checked norm to the clipping


def checked_grad_norm(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The total gradient 2-norm :class:`NonFiniteGuard` computed for this optimizer's coming step (as
    ``torch.nn.utils.clip_grad_norm_`` computes it), taken from the optimizer; None where it computed none."""
    return optimizer.__dict__.pop(GRAD_NORM, None)


def any_non_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Whether any of ``tensors`` (on one device) holds an inf or a NaN, as a 0-dim bool tensor on that device, with
    no host synchronisation.

    On a CPU: the grad scaler's own check, ``torch._amp_foreach_non_finite_check_and_unscale_``, with a scale of 1,
    which leaves every value as it is (multiplying by 1 is exact), in one pass over values of any floating dtype:
    0.35-0.5 ms for ``quickstart_seg``'s 2.1 M gradients, against 0.7-1.25 ms for a norm over them
    (``torch._foreach_norm`` goes tensor by tensor on a CPU). Elsewhere: their total 2-norm not finite, one fused
    read on CUDA (where the scaler's kernel has no bfloat16 and writes what it reads), which also counts finite
    values whose 2-norm overflows (above about 1e19 in float32)."""
    device = tensors[0].device
    if device.type != "cpu":
        return ~torch.isfinite(torch.nn.utils.get_total_norm(tensors))
    found = torch.zeros((), device=device)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, torch.ones((), device=device))
    return found > 0


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` can skip a step on the device: the fused Adam, AdamW and SGD kernels leave
    parameters and state untouched where ``optimizer.found_inf`` is 1 (the mechanism of torch's grad scaler),
    so no value has to come back to the host. Fused SGD leaves a momentum buffer uninitialised when it skips
    the step that creates it, so SGD with momentum qualifies once every buffer exists."""
    if not optimizer.param_groups or not all(group.get("fused") for group in optimizer.param_groups):
        return False
    if isinstance(optimizer, torch.optim.Adam):  # AdamW included
        return True
    if isinstance(optimizer, torch.optim.SGD):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        momentum = any(group["momentum"] for group in optimizer.param_groups)
        return not momentum or all("momentum_buffer" in optimizer.state.get(p, {}) for p in params)
    return False


class NonFiniteGuard(pl.Callback):
    """Skip an optimizer step whose gradients are not finite, count it, and stop after ``max_skipped``.

    With a fused optimizer (the default on CUDA, :func:`vtrain.training.optim.build_optimizer`) the skip is decided on
    the device (:func:`skips_on_device`) and the count is read back every ``trainer.log_every_n_steps`` steps
    and at the end: no host synchronisation per step, and a run with too many bad steps stops at the next
    read, naming the last bad step. Otherwise the check reads one value per step and clears the gradients of
    a bad step. With ``16-mixed`` precision the grad scaler already skips such steps, so this stands aside.
    ``skip_on_device=False`` forces the per-step check.

    Where the trainer clips gradients by norm, the check is that norm being finite, and the clipping takes it
    (:func:`checked_grad_norm`); otherwise it is :func:`any_non_finite`, the grad scaler's cheaper pass.
    """

    def __init__(self, max_skipped: int = 20, skip_on_device: bool = True):
        self.max_skipped = max_skipped
        self.skip_on_device = skip_on_device
        self.skipped = 0
        self._pending: torch.Tensor | None = None  # device path: bad steps not read yet, and the last one
        self._last_bad: torch.Tensor | None = None
        self._on_device: set[int] = set()  # optimizers found to skip on the device (it stays true once it is)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        optimizer.__dict__.pop(GRAD_NORM, None)  # a norm is this step's or none
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        if trainer.gradient_clip_val and trainer.gradient_clip_algorithm in (None, "norm"):
            # the norm the gradient clipping computes next: it is handed over (checked_grad_norm), one pass over
            # the gradients instead of two
            norm = torch.nn.utils.get_total_norm(grads)
            setattr(optimizer, GRAD_NORM, norm)
            bad = ~torch.isfinite(norm)
        else:
            bad = any_non_finite(grads)
        if self.skip_on_device and (id(optimizer) in self._on_device or skips_on_device(optimizer)):
            self._on_device.add(id(optimizer))
            optimizer.found_inf = bad.float()
            if self._pending is None:
                self._pending = torch.zeros((), dtype=torch.long, device=bad.device)
                self._last_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
            self._pending += bad
            self._last_bad = torch.where(bad, trainer.global_step, self._last_bad)
            return
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        if not bad:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers leave parameters without a gradient untouched
        self._record(trainer, pl_module, 1, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._pending is not None and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._read(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer, None)  # nothing can be logged any more

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
        """Bring the device counters to the host (the device path's only synchronisation)."""
        if self._pending is None:
            return
        new, last = int(self._pending), int(self._last_bad)
        self._pending.zero_()
        if new:
            self._record(trainer, pl_module, new, last)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None, new: int, last: int) -> None:
        self.skipped += new
        if pl_module is not None:
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        rank_zero_warn(f"non-finite loss or gradient at step {last}: step skipped ({self.skipped} so far)")
        if self.skipped > self.max_skipped:
            checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise FloatingPointError(
                f"{self.skipped} steps with non-finite loss or gradient, the last at step {last} "
                f"(limit callbacks.nonfinite_guard.max_skipped={self.max_skipped}); last good checkpoint: {checkpoint}"
            )

    def state_dict(self) -> dict[str, Any]:
        pending = int(self._pending) if self._pending is not None else 0
        return {"skipped": self.skipped + pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
