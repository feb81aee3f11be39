"""What vtrain costs on top of the model: its training path against a bare PyTorch loop, in one process.

``python -m vtrain.tools.bench experiment=<name> [overrides] --vs bare`` builds the experiment's data module and
task once, then times training steps driven two ways, in alternating blocks (A B, B A, ...) so that drift of a
shared machine hits both:

* **vtrain**: the run's own ``Trainer`` from :func:`vtrain.training.trainer.build_trainer` (its callbacks, loggers,
  progress bar, checkpointing, precision, clipping, accumulation), fitting the task on the data module's loader with
  its exact-resume sampler, as ``python -m vtrain`` does; a new ``Trainer`` per block, as each run starts one;
* **bare**: a plain loop over the same data module's loader: ``training_step`` (the task's loss; its ``self.log``
  calls return at once outside a ``Trainer``), ``backward``, the gradient clipping the trainer is configured with,
  ``optimizer.step``, ``zero_grad(set_to_none=True)`` and the timm schedule's ``step_update``, with the optimizer and
  schedule of the task's own ``configure_optimizers`` and the trainer's precision as ``torch.autocast``.

A step is timed from one batch's start to the next's (loading and moving the batch, the step, and for vtrain its
hooks, logging and callbacks), the last one to the end of its batch's hooks: what a fit does once at its end (the
checkpoint of the end of training, Lightning's teardown) is not a step's cost, and each vtrain block is a fit of its
own; ``bench.warmup`` steps of each block are left out (the loader's workers start there).
Validation is switched off (``trainer.limit_val_batches=0``): the comparison is of training steps. Reported: steps/s
of each path (the median block's), the ratio vtrain/bare as the median of the paired blocks' ratios with its
quartiles (and, where an epoch ends within the timed steps, the same ratio with the two steps at each epoch's end
left out on both sides, :func:`epoch_end_steps`: the quickstarts' small datasets end an epoch every 3-62 steps,
each with its ``last.ckpt`` written, where a real dataset's epoch is thousands of steps), vtrain's time a step beyond
the bare loop's in milliseconds from the steps paired one by one (:func:`extra_milliseconds`), and each path's peak
memory (:class:`vtrain.tools.bench.device.PeakMemory`), from one more block of each path after the timed ones,
warm as they are: on a CPU the measurement gives every tensor above 256 KiB pages of its own, a page fault per
4 KiB touched, which in a timed block would cost each path in proportion to what it allocates rather than to what
it computes (Swin-T at 224², batch 8: a 2.2 s step against 1.4 s, most of it in the kernel).

The two paths train alike: from the same weights, seed and batches, a vtrain block and a bare block end with the same
weights (``tests/test_bench.py``).
"""
from __future__ import annotations

import copy
import itertools
import math
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from lightning_fabric.utilities.apply_func import move_data_to_device
from omegaconf import DictConfig, open_dict

from vtrain.config import ConfigError
from vtrain.config.validate import accumulate_grad_batches, check_values, validate
from vtrain.data.datamodule import CountedBatch
from vtrain.tools.bench.device import PeakMemory, synchronize
from vtrain.tools.bench.report import quartiles
from vtrain.training.build import build_task
from vtrain.training.steps import training_steps
from vtrain.training.trainer import build_trainer

AUTOCAST = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
PLAIN = ("32-true", "32", 32, None)
PROFILE_ROWS = 15


class StepClock(pl.Callback):
    """The time each optimizer step's first batch starts (the device synchronised first), and the end of the last
    step: after its batch's hooks (this callback is the trainer's last), before what a fit does once at its end
    (the checkpoint of the end of training, Lightning's teardown), which a step does not cost."""

    def __init__(self, device: torch.device, accumulate: int):
        self.device, self.accumulate, self.starts = device, accumulate, []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
                             ) -> None:
        if batch_idx % self.accumulate == 0:
            synchronize(self.device)
            self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step >= trainer.max_steps:  # the last optimizer step has run
            synchronize(self.device)
            self.starts.append(time.perf_counter())


def step_seconds(starts: list[float], warmup: int) -> list[float]:
    """The durations of the steps after ``warmup``: from each batch's start to the next's."""
    return [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]


def prepared(cfg: DictConfig, output_dir: str) -> DictConfig:
    """The experiment's config for timing: its run files in ``output_dir``, no validation, no sanity check."""
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.output_dir = output_dir
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.max_epochs = -1
    if cfg.trainer.get("precision") not in (*PLAIN, *AUTOCAST):
        raise ConfigError(f"trainer.precision={cfg.trainer.precision}: the bare loop runs fp32, bf16-mixed or "
                          "16-mixed; pick one of those to compare")
    if cfg.trainer.get("precision") == "16-mixed":
        raise ConfigError("trainer.precision=16-mixed needs a gradient scaler the bare loop does not have: compare "
                          "with bf16-mixed or 32-true")
    return cfg


def vtrain_block(cfg: DictConfig, module: pl.LightningModule, datamodule: Any, steps: int, device: torch.device
                 ) -> list[float]:
    """The start of each of ``steps`` optimizer steps of a fit with the run's own trainer (a new one), and the end of
    the last one."""
    clock = StepClock(device, accumulate_grad_batches(cfg))
    with open_dict(cfg):
        cfg.trainer.max_steps = steps
    trainer = build_trainer(cfg).trainer
    trainer.callbacks.append(clock)
    module.training_steps = training_steps(trainer, datamodule)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice on workers and logging intervals, every block
        trainer.fit(module, datamodule=datamodule)
    module.trainer = None
    return clock.starts


def bare_block(cfg: DictConfig, module: pl.LightningModule, datamodule: Any, steps: int, device: torch.device
               ) -> list[float]:
    """The start of each of ``steps`` batches of a plain loop, and the end of the last one."""
    accumulate = accumulate_grad_batches(cfg)
    configured = module.configure_optimizers()
    optimizer, scheduler = configured["optimizer"], configured["lr_scheduler"]["scheduler"]
    dtype = AUTOCAST.get(cfg.trainer.get("precision"))
    clip = cfg.trainer.get("gradient_clip_val")
    module.train()
    batches, starts = epochs(datamodule.train_dataloader()), []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer says so once per call site
        for index in range(steps * accumulate):
            if index % accumulate == 0:
                synchronize(device)
                starts.append(time.perf_counter())
            batch = next(batches)
            if isinstance(batch, CountedBatch):  # the loader's skip count, which vtrain's data module reads
                batch = batch.batch
            batch = move_data_to_device(batch, device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out = module.training_step(batch, index)
            loss = out["loss"] if isinstance(out, dict) else out
            (loss / accumulate).backward()
            if (index + 1) % accumulate:
                continue
            if clip:
                torch.nn.utils.clip_grad_norm_(module.parameters(), float(clip))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step_update(num_updates=(index + 1) // accumulate)
    synchronize(device)
    starts.append(time.perf_counter())
    return starts


def epochs(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (its sampler told each epoch, as Lightning tells it), as a plain
    loop over epochs draws them: a block may run past an epoch of a small dataset."""
    for epoch in itertools.count():
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ConfigError("the training loader gave no batch: the bare loop has nothing to time")


def epoch_end_steps(per_epoch: int, warmup: int, steps: int) -> set[int]:
    """The timed steps (0: the first after the warm-up) at an epoch's end: its last step, which holds vtrain's
    epoch-end work (Lightning's epoch hooks, writing ``last.ckpt``, the next epoch's first batch fetched ahead), and
    the step after it, where a plain loop starts the next epoch's loader. Each block starts at epoch 0, step 0."""
    around = set()
    for index in range(warmup, warmup + steps):
        if (index + 1) % per_epoch == 0:
            around |= {index - warmup, index + 1 - warmup}
    return {step for step in around if step < steps}


def extra_milliseconds(seconds: dict[str, list[list[float]]], around_ends: set[int]) -> dict[str, Any]:
    """vtrain's time a step beyond the bare loop's, in milliseconds, from the steps paired one by one (the same
    block pair, the same batch): the median and quartiles of the differences within epochs, and the median at
    the steps around an epoch's end (None where none was timed). In milliseconds a step, unlike the ratio, it
    reads the same for a 50 ms and a 5 s step, and separates a cost per step from a cost per epoch."""
    pairs = [(j, ours - bare) for ours_block, bare_block_ in zip(seconds["vtrain"], seconds["bare"])
             for j, (ours, bare) in enumerate(zip(ours_block, bare_block_))]
    within = [1e3 * d for j, d in pairs if j not in around_ends]
    at_ends = [1e3 * d for j, d in pairs if j in around_ends]
    return {"within_epochs": statistics.median(within) if within else None,
            "within_epochs_quartiles": quartiles(within) if within else None,
            "epoch_end": statistics.median(at_ends) if at_ends else None}


def run_overhead(cfg: DictConfig, bench: DictConfig, experiment: str | None = None) -> dict[str, Any]:
    """Time the experiment ``cfg`` (a composed ``train`` config) both ways; ``bench``: warmup, steps, repeats. The
    first block is vtrain's: its trainer gives the task its training steps, which the bare loop's schedule reads."""
    warmup, steps, repeats = int(bench.warmup), int(bench.steps), int(bench.repeats)
    if min(steps, repeats) < 1 or warmup < 0:
        raise ConfigError(f"bench.steps={steps}, bench.repeats={repeats}, bench.warmup={warmup}: use steps and "
                          "repeats >= 1, warmup >= 0")
    check_values(cfg)
    with tempfile.TemporaryDirectory(prefix="vtrain-bench-") as output_dir:
        cfg = prepared(cfg, output_dir)
        datamodule = instantiate(cfg.data)
        validate(cfg, datamodule)
        pl.seed_everything(cfg.seed, workers=True, verbose=False)
        module = build_task(cfg)
        module.use_dataset(datamodule.info())
        device = torch.device("cuda" if cfg.trainer.get("accelerator") in ("gpu", "cuda") else "cpu")
        module.to(device)
        datamodule.setup("fit")
        per_epoch = math.ceil(len(datamodule.train_dataloader()) / accumulate_grad_batches(cfg))
        paths = {"vtrain": vtrain_block, "bare": bare_block}
        seconds: dict[str, list[list[float]]] = {name: [] for name in paths}
        peak: dict[str, float | None] = {}
        for r in range(repeats):
            for name in (("vtrain", "bare") if r % 2 == 0 else ("bare", "vtrain")):
                starts = paths[name](cfg, module, datamodule, warmup + steps, device)
                seconds[name].append(step_seconds(starts, warmup))
        for name, block in paths.items():  # untimed: on a CPU, PeakMemory changes how the allocator works
            with PeakMemory(device) as memory:
                block(cfg, module, datamodule, warmup + steps, device)
            peak[name] = None if memory.transient is None else memory.transient / 2**20
        profile = _profile(cfg, module, datamodule, warmup + steps, device) if bench.get("profile") else None
    blocks = {name: [sum(s) for s in per_block] for name, per_block in seconds.items()}
    ratios = [bare / ours for ours, bare in zip(blocks["vtrain"], blocks["bare"])]  # vtrain's speed / bare's
    around_ends = epoch_end_steps(per_epoch, warmup, steps)
    within = None
    if around_ends and len(around_ends) < steps:
        inner = {name: [sum(t for j, t in enumerate(s) if j not in around_ends) for s in per_block]
                 for name, per_block in seconds.items()}
        inner_ratios = [bare / ours for ours, bare in zip(inner["vtrain"], inner["bare"])]
        within = {"ratio": statistics.median(inner_ratios), "ratio_quartiles": quartiles(inner_ratios),
                  "steps_left_out": sorted(around_ends)}
    return {
        "experiment": experiment,
        "device": str(device),
        "settings": {"warmup": warmup, "steps": steps, "repeats": repeats,
                     "batch_size": int(cfg.data.batch_size), "accumulate": accumulate_grad_batches(cfg),
                     "precision": str(cfg.trainer.get("precision"))},
        "steps_per_s": {name: steps / statistics.median(b) for name, b in blocks.items()},
        "step_seconds": seconds,
        "ratio": statistics.median(ratios),
        "ratio_quartiles": quartiles(ratios),
        "steps_per_epoch": per_epoch,
        "within_epochs": within,
        "extra_ms": extra_milliseconds(seconds, around_ends),
        "peak_mb": {name: peak.get(name) for name in paths},
        "profile": profile,
    }


def _profile(cfg: DictConfig, module: pl.LightningModule, datamodule: Any, steps: int, device: torch.device
             ) -> dict[str, str]:
    """One more block of each path under ``torch.profiler``: the operators and Python-level functions with the
    most self time (CPU), the first ``PROFILE_ROWS`` of each, to name where vtrain's extra time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    tables = {}
    for name, block in (("vtrain", vtrain_block), ("bare", bare_block)):
        with profile(activities=activities, with_stack=False) as prof:
            block(cfg, module, datamodule, steps, device)
        tables[name] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=PROFILE_ROWS)
    return tables


def format_overhead(report: dict[str, Any]) -> str:
    rate, peak = report["steps_per_s"], report["peak_mb"]
    q1, q3 = report["ratio_quartiles"]
    settings = report["settings"]
    lines = [f"training steps, {settings['steps']} per block x {settings['repeats']} blocks after "
             f"{settings['warmup']} warm-up, batch {settings['batch_size']}, {settings['precision']}, "
             f"on {report['device']}",
             f"  vtrain  {rate['vtrain']:8.3f} steps/s   peak {_mb(peak['vtrain'])}",
             f"  bare    {rate['bare']:8.3f} steps/s   peak {_mb(peak['bare'])}",
             f"  vtrain / bare: {report['ratio']:.3f} (quartiles {q1:.3f}-{q3:.3f})"]
    if within := report.get("within_epochs"):
        q1, q3 = within["ratio_quartiles"]
        lines.append(f"  within epochs: {within['ratio']:.3f} (quartiles {q1:.3f}-{q3:.3f}), the "
                     f"{len(within['steps_left_out'])} steps at the ends of {report['steps_per_epoch']}-step epochs "
                     "left out on both sides")
    extra = report.get("extra_ms") or {}
    if extra.get("within_epochs") is not None:
        q1, q3 = extra["within_epochs_quartiles"]
        line = (f"  vtrain's time a step beyond the bare loop's, steps paired: {extra['within_epochs']:+.2f} ms "
                f"(quartiles {q1:+.2f} to {q3:+.2f})")
        if extra.get("epoch_end") is not None:
            line += f", at an epoch's end {extra['epoch_end']:+.2f} ms"
        lines.append(line)
    for name, table in (report.get("profile") or {}).items():
        lines += ["", f"{name}: the {PROFILE_ROWS} entries with the most self CPU time (one block)", table]
    return "\n".join(lines)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} MiB"
