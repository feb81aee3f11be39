"""Timing: warm-up, then timed blocks of the candidates interleaved (A B, B A, ...) so that drift of a shared
machine hits all of them; the device is synchronised before every timer read; images/s is the median block's."""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vtrain.config import ConfigError
from vtrain.tools.bench.device import (
    PeakMemory,
    peak_bf16_flops,
    resolve_device,
    synchronize,
    tensor_bytes,
)
from vtrain.tools.bench.models import Candidate, Settings, model_size
from vtrain.training.optim import build_optimizer


def prepare(model: nn.Module, settings: Settings, device: torch.device) -> nn.Module:
    model = model.to(device)
    if settings.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def make_step(compiled: nn.Module, mode: str, x: torch.Tensor, target: torch.Tensor | None, settings: Settings,
              optimizer: torch.optim.Optimizer | None) -> Callable[[], None]:
    """One inference or training iteration; nothing in it reads a value back to the host."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=settings.precision == "bf16")
    if mode == "inference":
        def step() -> None:
            with torch.no_grad(), autocast:
                compiled(x)
        return step

    def train_step() -> None:
        with autocast:
            out = compiled(x)
        loss = F.cross_entropy(out.float(), target) if target is not None else out.float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return train_step


def time_block(step: Callable[[], None], iters: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        step()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_blocks(steps: list[Callable[[], None]], iters: int, repeats: int, device: torch.device
                       ) -> list[list[float]]:
    """Seconds of ``repeats`` blocks of ``iters`` calls of each step, the steps' blocks alternating (A B, B A, ...)
    so that drift of a shared machine hits all of them: one list of block times per step."""
    seconds: list[list[float]] = [[] for _ in steps]
    for r in range(repeats):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            seconds[i].append(time_block(steps[i], iters, device))
    return seconds


def _warm_step(candidate: Candidate, model: nn.Module, compiled: nn.Module, mode: str, x: torch.Tensor,
               target: torch.Tensor, optim_cfg: Mapping, device: torch.device, warmup: int
               ) -> tuple[Callable[[], None], float | None]:
    """The candidate's step for ``mode`` after its untimed warm-up (and compilation), and its peak MiB: its
    weights and optimizer state plus the transient peak of one step."""
    model.train(mode == "train")
    if candidate.settings.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, optim_cfg, x.shape[0]) if mode == "train" else None
    step = make_step(compiled, mode, x, target if candidate.classifier else None, candidate.settings, optimizer)
    for _ in range(max(warmup, 1)):
        step()
    with PeakMemory(device) as peak:
        step()
    if peak.transient is None:
        return step, None
    static = tensor_bytes(model.parameters())
    if optimizer is not None:
        static += tensor_bytes(v for state in optimizer.state.values() for v in state.values())
    return step, (static + peak.transient) / 2**20


def measure(candidates: list[Candidate], cfg: DictConfig, optim_cfg: Mapping, device: torch.device,
            sample_shape: tuple[int, ...], num_classes: int) -> list[dict[str, Any]]:
    """Size, images/s and peak memory of each candidate (``cfg`` is the ``bench`` node), the timed blocks of
    all of them interleaved."""
    b = cfg.batch_size
    seed = int(torch.initial_seed()) % 2**31  # every candidate starts from the same initialisation seed
    results: list[dict[str, Any]] = []
    models: list[tuple[nn.Module, nn.Module]] = []
    for candidate in candidates:
        params, macs = model_size(candidate.build, sample_shape)
        torch.manual_seed(seed)
        with torch.device(device):
            model = candidate.build()
        model = prepare(model, candidate.settings, device)
        compiled = torch.compile(model) if candidate.settings.compile else model
        models.append((model, compiled))
        results.append({"name": candidate.name, "params": params, "macs": macs, "settings": asdict(candidate.settings)})

    torch.manual_seed(seed)
    x = torch.randn(b, *sample_shape, device=device)
    target = torch.randint(0, num_classes, (b,), device=device)
    for mode in cfg.modes:
        if mode not in ("inference", "train"):
            raise ConfigError(f"bench.modes has {mode!r}: use inference and/or train")
        steps = []
        for candidate, (model, compiled), result in zip(candidates, models, results):
            step, result[f"{mode}_peak_mb"] = _warm_step(candidate, model, compiled, mode, x, target, optim_cfg,
                                                          device, cfg.warmup)
            steps.append(step)
        seconds = interleaved_blocks(steps, cfg.iters, cfg.repeats, device)
        for result, blocks in zip(results, seconds):
            result[f"{mode}_ips"] = b * cfg.iters / statistics.median(blocks)
            result[f"{mode}_blocks_s"] = blocks
        for model, _ in models:
            model.zero_grad(set_to_none=True)
    peak = peak_bf16_flops(device)
    for result, candidate in zip(results, candidates):
        train_ips = result.get("train_ips")
        usable = peak is not None and train_ips is not None and candidate.settings.precision == "bf16"
        result["train_mfu"] = 6 * result["macs"] * train_ips / peak if usable else None
    return results


def inference_throughput(name: str, build: Callable[[], nn.Module], sample_shape: tuple[int, ...],
                         num_classes: int, options: Mapping) -> dict[str, Any]:
    """Inference images/s of one model alone (a table's throughput column; ``options``: ``conf/table_main.yaml``'s
    ``throughput``: device, precision, batch_size (null: 64 on CUDA, 1 on CPU), warmup, iters, repeats): the median
    block's (``ips``) and the quartiles over the blocks (``quartiles``), as ``vtrain.tools.bench`` reports."""
    device = resolve_device(options["device"])
    timing = OmegaConf.create({"batch_size": options["batch_size"] or (64 if device.type == "cuda" else 1),
                               "modes": ["inference"], "warmup": options["warmup"], "iters": options["iters"],
                               "repeats": options["repeats"]})
    candidate = Candidate(name, build, Settings(precision=options["precision"]))
    result = measure([candidate], timing, {}, device, sample_shape, num_classes)[0]
    per_block = sorted(timing.batch_size * timing.iters / seconds for seconds in result["inference_blocks_s"])
    if len(per_block) < 2:
        quartiles = [per_block[0], per_block[0]]
    else:
        q1, _, q3 = statistics.quantiles(per_block, n=4, method="inclusive")
        quartiles = [q1, q3]
    return {"ips": result["inference_ips"], "quartiles": quartiles}


def throughput_enabled(options: Mapping) -> bool:
    """``throughput.enabled``: true, false, or ``auto``, on CUDA only (the papers' throughputs are GPU figures; a CPU's
    says nothing beside them)."""
    enabled = options.get("enabled", "auto")
    if enabled == "auto":
        return resolve_device(options.get("device", "auto")).type == "cuda"
    return bool(enabled)
