"""Speed and size of a backbone's classifier, measured against timm's own model in the same process.

``python -m vtrain.bench backbone=swin_t --vs timm`` (``--vs X`` is ``bench.reference=X``) reports, for the
backbone with a ``bench.num_classes`` linear classifier (what ``ClassificationTask`` trains):

* parameters and multiply-accumulates at ``bench.img_size`` (``vtrain.profiling``: torch's flop counter on
  the meta device, attention products included);
* inference images/s (eval, no grad) and training images/s (forward, cross-entropy, backward, the
  framework's optimizer step, ``zero_grad(set_to_none=True)``), at ``bench.batch_size`` with the chosen
  precision (fp32 or bf16 autocast), memory format and ``torch.compile``;
* each model's peak memory for one step: its own weights (and optimizer state) plus the transient peak of
  the step (CUDA: ``max_memory_allocated``; CPU: growth of the peak resident set);
* on CUDA with bf16, the model FLOP utilisation of training: 6 x MACs per image (forward 2, backward 4
  FLOPs per MAC) x images/s over the device's dense bf16 peak.

Timing: warm-up iterations are untimed; the device is synchronised before every timer read; the timed
blocks of the two models alternate (A B, B A, ...) so that drift of a shared machine hits both; images/s
is the median block's, and the speed ratio ours/reference the median (with quartiles) of the ratios of
paired blocks. Ratios from one run are how speed claims are made
here; absolute images/s from different runs are not compared.

``bench.loader=true`` also measures the classification training pipeline (decode, augmentation, Mixup) from
``data.root`` with ``data.num_workers`` and says whether the loader or the model limits training.

Results: a table on stdout, ``bench.json`` in the run directory and one appended row in ``bench.csv``, each
with the device, the torch version and the settings.
"""
from __future__ import annotations

import csv
import datetime
import json
import logging
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vtrain import ConfigError
from vtrain.optim import build_optimizer
from vtrain.profiling import count_macs, count_params, prefers_channels_last

log = logging.getLogger("vtrain.bench")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")

# Dense bf16 tensor-core peaks (vendor datasheets), for the model FLOP utilisation. Matched in order
# against torch.cuda.get_device_name(): the PCIe H100 before the generic H100 (SXM).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))


# ----------------------------------------------------------------------------------------------- models
class Classifier(nn.Module):
    """Backbone -> pooled embedding -> linear classifier: ``ClassificationTask``'s model (keys ``backbone.*``,
    ``head.*``), and with a reference backbone exactly the reference classifier."""

    def __init__(self, backbone: nn.Module, num_classes: int = 1000):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_pooled(x))


def build_classifier(backbone_cfg: Mapping, num_classes: int = 1000) -> Classifier:
    """An image or video backbone built as a classifier's trunk (its default) with a linear classifier."""
    return Classifier(instantiate(backbone_cfg), num_classes)


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """A config of ``conf/`` composed with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def timm_reference(backbone_cfg: Mapping) -> tuple[str, dict] | None:
    """``(timm model name, create_model kwargs)`` of timm's own model of this backbone's architecture, as the
    backbone's class names it (``Backbone.timm_twin``), or None where timm has none."""
    twin = getattr(get_class(backbone_cfg["_target_"]), "timm_twin", None)
    return twin(backbone_cfg) if twin is not None else None


def _create_timm(name: str, kwargs: dict, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


@dataclass(frozen=True)
class Settings:
    precision: str = "fp32"       # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False


@dataclass
class Candidate:
    """One model to measure: a name, how to build it (on the current default device) and its settings."""

    name: str
    build: Callable[[], nn.Module]
    settings: Settings
    classifier: bool = True  # classification loss on logits; otherwise the mean square of the output


# ----------------------------------------------------------------------------------------------- devices
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("bench.device=cuda but no CUDA device is visible: use bench.device=cpu")
    if name not in ("cpu", "cuda"):
        raise ConfigError(f"bench.device={name!r} is not a device: use auto, cpu or cuda")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({torch.get_num_threads()} threads)"


def peak_bf16_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for key, tflops in PEAK_BF16_TFLOPS if key in name), None)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Transient peak of the bytes a block allocates.

    CUDA: the caching allocator's statistics. CPU (Linux, glibc): the growth of the peak resident set, with
    ``/proc/self/clear_refs`` resetting the high-water mark. glibc keeps freed heap memory resident and, after
    the first large free, serves even big tensors from that heap, so a warm step would show no growth: for
    the measured block the mmap threshold is pinned low, every tensor above 256 KiB gets pages of its own,
    and they count. Elsewhere (or if any of this fails) the CPU figure is None.
    """

    _M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)

    def __init__(self, device: torch.device):
        self.device, self.transient, self._start = device, None, None

    @staticmethod
    def _status_kb(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise OSError(key)

    @classmethod
    def _mmap_threshold(cls, size: int) -> bool:
        try:
            import ctypes

            return bool(ctypes.CDLL("libc.so.6").mallopt(cls._M_MMAP_THRESHOLD, size))
        except (OSError, AttributeError):
            return False

    def __enter__(self) -> "PeakMemory":
        synchronize(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self._mmap_threshold(256 * 1024):
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._start = self._status_kb("VmRSS") * 1024
            except OSError:
                self._start = None
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        if self.device.type == "cuda":
            self.transient = torch.cuda.max_memory_allocated(self.device) - self._start
            return
        if self._start is not None:
            self.transient = max(self._status_kb("VmHWM") * 1024 - self._start, 0)
        self._mmap_threshold(32 * 2**20)  # glibc's own ceiling for its dynamic threshold (64-bit)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# ----------------------------------------------------------------------------------------------- steps
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
    static = _tensor_bytes(model.parameters())
    if optimizer is not None:
        static += _tensor_bytes(v for state in optimizer.state.values() for v in state.values())
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
        with torch.device("meta"):
            meta = candidate.build()
        params = count_params(meta)
        macs = count_macs(meta, (1, *sample_shape))
        del meta
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
        seconds: list[list[float]] = [[] for _ in candidates]
        for r in range(cfg.repeats):
            order = range(len(candidates)) if r % 2 == 0 else reversed(range(len(candidates)))
            for i in order:
                seconds[i].append(time_block(steps[i], cfg.iters, device))
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


# ----------------------------------------------------------------------------------------------- loader
def measure_loader(cfg: DictConfig, device: torch.device, batch_size: int, img_size: int) -> dict[str, Any]:
    """Images/s of the classification training pipeline: worker decode + augmentation, host-to-device copy,
    Mixup/CutMix on the batch (where the training step applies it)."""
    from timm.data import Mixup

    data_cfg = OmegaConf.merge(cfg.data, {"batch_size": batch_size, "img_size": img_size})
    datamodule = instantiate(data_cfg)
    if hasattr(datamodule, "check"):
        datamodule.check()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if len(loader) == 0:
        raise ConfigError(f"data.root={data_cfg.root}: fewer training images than bench.batch_size={batch_size}")
    task = cfg.get("task") or {}
    mixup = None
    if task.get("mixup"):
        mixup = Mixup(**OmegaConf.to_container(task.mixup), label_smoothing=task.get("label_smoothing", 0.0),
                      num_classes=data_cfg.num_classes)
    batches = iter(loader)

    def next_batch() -> int:
        nonlocal batches
        try:
            images, targets = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, targets = next(batches)
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            n = images.shape[0] - images.shape[0] % 2
            images, targets = mixup(images[:n], targets[:n])
        return images.shape[0]

    for _ in range(cfg.bench.loader_warmup):
        next_batch()
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(cfg.bench.loader_batches):
        images += next_batch()
    synchronize(device)
    return {"ips": images / (time.perf_counter() - start), "num_workers": data_cfg.num_workers,
            "augment": OmegaConf.to_container(data_cfg.augment), "mixup": mixup is not None}


# ----------------------------------------------------------------------------------------------- run
def _candidates(cfg: DictConfig, device: torch.device) -> tuple[list[Candidate], tuple[int, ...], str | None]:
    """Ours first, then the reference (if any); the per-sample input shape; a note when no reference exists."""
    bench = cfg.bench
    if bench.precision not in ("fp32", "bf16"):
        raise ConfigError(f"bench.precision={bench.precision!r}: use fp32 or bf16")
    if bench.reference_settings not in ("same", "timm_defaults"):
        raise ConfigError(f"bench.reference_settings={bench.reference_settings!r}: use same or timm_defaults")
    num_classes = bench.num_classes
    if bench.module is not None:
        if bench.input_shape is None:
            raise ConfigError("bench.module needs bench.input_shape=[C,H,W] (per sample)")
        shape = tuple(bench.input_shape)
        ours = Candidate(_module_name(bench.module), lambda: instantiate(bench.module), Settings(), classifier=False)
    else:
        shape = tuple(bench.input_shape) if bench.input_shape is not None else (3, bench.img_size, bench.img_size)
        ours = Candidate(f"vtrain:{_backbone_choice()}", lambda: build_classifier(cfg.backbone, num_classes),
                         Settings())
    with torch.device("meta"):
        cnn = prefers_channels_last(ours.build())
    channels_last = cnn if bench.channels_last == "auto" else bool(bench.channels_last)
    ours.settings = Settings(bench.precision, channels_last, bool(bench.compile))
    candidates, note = [ours], None

    reference = bench.reference
    if reference is None:
        return candidates, shape, note
    if isinstance(reference, (Mapping, DictConfig)) and "_target_" in reference:
        ref = Candidate(_module_name(reference), lambda: instantiate(reference), ours.settings, ours.classifier)
    elif reference == "timm":
        if bench.module is not None:
            raise ConfigError("bench.reference=timm compares backbones; for bench.module give a module config")
        found = timm_reference(cfg.backbone)
        if found is None:
            return candidates, shape, f"timm has no model of the architecture of backbone={_backbone_choice()}"
        name, kwargs = found
        ref = Candidate(f"timm:{name}", lambda: _create_timm(name, kwargs, num_classes), ours.settings)
    else:
        try:
            other = compose_config("bench", [f"backbone={reference}"]).backbone
        except hydra.errors.MissingConfigException:
            raise ConfigError(f"bench.reference={reference}: use timm, a conf/backbone/ name or a module config "
                              "({_target_: ...})") from None
        ref = Candidate(f"vtrain:{reference}", lambda: build_classifier(other, num_classes), ours.settings)
        with torch.device("meta"):
            ref_cnn = prefers_channels_last(ref.build())
        ref.settings = replace(ours.settings, channels_last=ref_cnn if bench.channels_last == "auto" else channels_last)
    if bench.reference_settings == "timm_defaults":
        ref.settings = Settings()
    candidates.append(ref)
    return candidates, shape, note


def _module_name(module_cfg: Mapping) -> str:
    args = ",".join(f"{k}={v}" for k, v in module_cfg.items() if k != "_target_")
    return f"{str(module_cfg['_target_']).rsplit('.', 1)[-1]}({args})"


def _backbone_choice() -> str:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("backbone", "backbone")
    return "backbone"


def run(cfg: DictConfig) -> dict[str, Any]:
    bench = cfg.bench
    device = resolve_device(bench.device)
    if bench.threads:
        torch.set_num_threads(int(bench.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm's benchmark script and conf/trainer/gpu.yaml
    candidates, shape, note = _candidates(cfg, device)
    torch.manual_seed(cfg.get("seed", 0))
    results = measure(candidates, bench, cfg.optim, device, shape, bench.num_classes)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": _module_name(bench.module) if bench.module is not None else _backbone_choice(),
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": _timm_version(),
        "settings": {
            "batch_size": bench.batch_size, "input_shape": list(shape), "precision": bench.precision,
            "channels_last": candidates[0].settings.channels_last, "compile": bool(bench.compile),
            "warmup": bench.warmup, "iters": bench.iters, "repeats": bench.repeats,
            "reference": OmegaConf.to_container(bench.reference) if isinstance(bench.reference, DictConfig)
            else bench.reference,
            "reference_settings": bench.reference_settings,
            "threads": torch.get_num_threads(),
        },
        "ours": results[0],
        "reference": results[1] if len(results) > 1 else None,
        "note": note,
    }
    if report["reference"] is not None:
        report["ratio"] = {k: _ratio(results[0].get(k), results[1].get(k)) for k in _FIGURES}
        report["ratio_quartiles"] = {}
        for mode in bench.modes:
            # Paired blocks (timed back to back): the median of the per-pair ratios cancels the drift of a
            # shared machine better than a ratio of medians; the quartiles say how noisy the pairs were.
            pairs = [t_ref / t_ours for t_ours, t_ref in zip(results[0][f"{mode}_blocks_s"],
                                                             results[1][f"{mode}_blocks_s"])]
            report["ratio"][f"{mode}_ips"] = statistics.median(pairs)
            report["ratio_quartiles"][f"{mode}_ips"] = _quartiles(pairs)
    if bench.loader:
        loader = measure_loader(cfg, device, bench.batch_size, bench.img_size)
        train_ips = results[0].get("train_ips")
        if train_ips is not None:
            loader["bottleneck"] = "loader" if loader["ips"] < train_ips else "model"
        report["loader"] = loader
    print(format_report(report))
    write_outputs(report, bench.json, bench.csv)
    return report


def _timm_version() -> str:
    import timm

    return timm.__version__


def _quartiles(values: list[float]) -> list[float]:
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


# figure key -> (label, scale, format)
_FIGURES = {
    "params": ("params (M)", 1e-6, "{:.2f}"),
    "macs": ("GMACs", 1e-9, "{:.2f}"),
    "inference_ips": ("inference img/s", 1.0, "{:.1f}"),
    "train_ips": ("training img/s", 1.0, "{:.1f}"),
    "inference_peak_mb": ("inference peak MiB", 1.0, "{:.0f}"),
    "train_peak_mb": ("training peak MiB", 1.0, "{:.0f}"),
    "train_mfu": ("training MFU (%)", 100.0, "{:.1f}"),
}


def _fmt(value: float | None, scale: float, fmt: str) -> str:
    return "—" if value is None else fmt.format(value * scale)


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"bench {report['model']} on {report['device']}, torch {report['torch']}, timm {report['timm']}",
        f"batch {s['batch_size']} x {tuple(s['input_shape'])}, {s['precision']}, channels_last={s['channels_last']}, "
        f"compile={s['compile']}, median of {s['repeats']} blocks of {s['iters']} iterations after {s['warmup']} "
        "warm-up (ratios: median and quartiles of the paired blocks)",
    ]
    ours, ref = report["ours"], report["reference"]
    header = ["figure", ours["name"]] + ([ref["name"], "ours/ref"] if ref else [])
    rows = []
    for key, (label, scale, fmt) in _FIGURES.items():
        if ours.get(key) is None and (ref is None or ref.get(key) is None):
            continue
        row = [label, _fmt(ours.get(key), scale, fmt)]
        if ref:
            ratio = _fmt(report["ratio"].get(key), 1.0, "{:.3f}")
            if key in report.get("ratio_quartiles", {}):
                ratio += " [{:.3f}, {:.3f}]".format(*report["ratio_quartiles"][key])
            row += [_fmt(ref.get(key), scale, fmt), ratio]
        rows.append(row)
    if "loader" in report:
        loader = report["loader"]
        blank = ["", ""] if ref else []
        rows.append([f"loader img/s ({loader['num_workers']} workers)", f"{loader['ips']:.1f}"] + blank)
        if "bottleneck" in loader:
            rows.append(["bottleneck", loader["bottleneck"]] + blank)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if ref and ref["settings"] != ours["settings"]:
        lines.append(f"reference settings: {ref['settings']}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)


def csv_row(report: dict[str, Any]) -> dict[str, Any]:
    s = report["settings"]
    row: dict[str, Any] = {
        "date": report["date"], "model": report["model"], "device": report["device"], "torch": report["torch"],
        "timm": report["timm"], "batch_size": s["batch_size"], "input_shape": "x".join(map(str, s["input_shape"])),
        "precision": s["precision"], "channels_last": s["channels_last"], "compile": s["compile"],
        "reference": report["reference"]["name"] if report["reference"] else "",
        "reference_settings": s["reference_settings"],
    }
    for prefix, result in (("", report["ours"]), ("ref_", report["reference"] or {})):
        for key in _FIGURES:
            row[prefix + key] = result.get(key, "")
    for key in _FIGURES:
        row["ratio_" + key] = (report.get("ratio") or {}).get(key, "")
    loader = report.get("loader") or {}
    row["loader_ips"], row["bottleneck"] = loader.get("ips", ""), loader.get("bottleneck", "")
    return {k: ("" if v is None else v) for k, v in row.items()}


def append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append one row; if the file has other columns (an older version), rewrite it with their union."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
        if fields == list(row):
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(row)
            return
        fields += [k for k in row if k not in fields]
        rows.append(row)
    else:
        fields, rows = list(row), [row]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(report: dict[str, Any], json_path: str, csv_path: str) -> None:
    json_file = Path(json_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(report, indent=2))
    append_csv(Path(csv_path), csv_row(report))
    log.info("wrote %s and a row of %s", json_file, csv_path)


def _vs_to_override(argv: list[str]) -> list[str]:
    """``--vs X`` / ``--vs=X`` -> ``bench.reference=X`` (Hydra's own parser knows no such flag)."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--vs" and i + 1 < len(argv):
            out.append(f"bench.reference={argv[i + 1]}")
            i += 2
            continue
        out.append(f"bench.reference={arg[len('--vs='):]}" if arg.startswith("--vs=") else arg)
        i += 1
    return out


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="bench")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    sys.argv = [sys.argv[0], *_vs_to_override(sys.argv[1:])]
    _hydra_main()


if __name__ == "__main__":
    main()
