"""The flow of one bench: settings -> candidates -> timed measurement (-> loader) -> report."""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from vtrain.config.command import run_or_exit
from vtrain.config.compose import CONFIG_DIR
from vtrain.tools.bench.device import device_name, resolve_device
from vtrain.tools.bench.loader import measure_loader
from vtrain.tools.bench.models import backbone_choice, candidates, module_name
from vtrain.tools.bench.report import compare, format_report, write_outputs
from vtrain.tools.bench.timing import measure


def run(cfg: DictConfig) -> dict[str, Any]:
    bench = cfg.bench
    device = resolve_device(bench.device)
    if bench.threads:
        torch.set_num_threads(int(bench.threads))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as timm's benchmark script and conf/trainer/gpu.yaml
    models, shape, note = candidates(cfg)
    torch.manual_seed(cfg.get("seed", 0))
    results = measure(models, bench, cfg.optim, device, shape, bench.num_classes)
    report: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": module_name(bench.module) if bench.module is not None else backbone_choice(),
        "device": device_name(device),
        "torch": torch.__version__,
        "timm": _timm_version(),
        "settings": {
            "batch_size": bench.batch_size, "input_shape": list(shape), "precision": bench.precision,
            "channels_last": models[0].settings.channels_last, "compile": bool(bench.compile),
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
        report["ratio"], report["ratio_quartiles"] = compare(results[0], results[1], list(bench.modes))
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


def vs_to_override(argv: list[str]) -> list[str]:
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
    run_or_exit(run, cfg)


def experiment_and_bench(argv: list[str]) -> tuple[DictConfig, DictConfig, str | None, list[str]]:
    """An experiment's bench (``--vs bare``, ``bench.pipeline=true``): the ``bench.*`` arguments set the bench, the
    others compose the experiment (``train``; a mistyped name is one line). Returns the bench config, the experiment's
    config, its name and its overrides."""
    from vtrain.config.compose import compose_config
    from vtrain.config.names import check_command_line

    bench_args = [a for a in argv if a.lstrip("+~").startswith("bench.")]
    train_args = [a for a in argv if a not in bench_args]
    check_command_line("train", train_args)
    experiment = next((a.split("=", 1)[1] for a in train_args if a.startswith("experiment=")), None)
    return compose_config("bench", bench_args), compose_config("train", train_args), experiment, train_args


def append_jsonl(path: str, report: dict[str, Any], overrides: list[str]) -> None:
    """The report, dated and with the experiment's overrides, as one line appended to ``path``."""
    report["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    report["overrides"] = overrides
    file = Path(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "a") as f:
        f.write(json.dumps(report) + "\n")


def overhead(argv: list[str]) -> dict[str, Any]:
    """``--vs bare``: vtrain's training path against a bare loop (:mod:`vtrain.tools.bench.overhead`)."""
    from vtrain.tools.bench.overhead import format_overhead, run_overhead

    settings, cfg, experiment, overrides = experiment_and_bench(argv)
    report = run_overhead(cfg, settings.bench.overhead, experiment)
    append_jsonl(settings.bench.overhead.jsonl, report, overrides)
    print(format_overhead(report))
    return report


def pipeline(argv: list[str]) -> dict[str, Any]:
    """``bench.pipeline=true``: the experiment's training pipeline against its reference
    (:mod:`vtrain.tools.bench.pipeline`)."""
    from vtrain.tools.bench.pipeline import format_pipeline, run_pipeline

    settings, cfg, experiment, overrides = experiment_and_bench(argv)
    report = run_pipeline(cfg, settings.bench, experiment)
    append_jsonl(settings.bench.pipeline_jsonl, report, overrides)
    print(format_pipeline(report))
    return report


def main() -> None:
    argv = vs_to_override(sys.argv[1:])
    command = overhead if "bench.reference=bare" in argv else pipeline if "bench.pipeline=true" in argv else None
    if command is not None:
        from vtrain.config import ConfigError
        from vtrain.config.command import fail

        try:
            command([a for a in argv if a != "bench.reference=bare"])
        except ConfigError as e:
            fail(e)
        return
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()
