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


def overhead(argv: list[str]) -> dict[str, Any]:
    """``--vs bare``: the ``bench.*`` arguments set the bench, the others compose the experiment (``train``)."""
    from vtrain.config.compose import compose_config
    from vtrain.tools.bench.overhead import format_overhead, run_overhead

    bench_args = [a for a in argv if a.lstrip("+~").startswith("bench.")]
    train_args = [a for a in argv if a not in bench_args]
    settings = compose_config("bench", bench_args)
    experiment = next((a.split("=", 1)[1] for a in train_args if a.startswith("experiment=")), None)
    report = run_overhead(compose_config("train", train_args), settings.bench.overhead, experiment)
    report["date"] = datetime.datetime.now().isoformat(timespec="seconds")
    report["overrides"] = train_args
    print(format_overhead(report))
    path = Path(settings.bench.overhead.jsonl)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(report) + "\n")
    return report


def main() -> None:
    argv = vs_to_override(sys.argv[1:])
    if "bench.reference=bare" in argv:
        from vtrain.config import ConfigError
        from vtrain.config.command import fail

        try:
            overhead([a for a in argv if a != "bench.reference=bare"])
        except ConfigError as e:
            fail(e)
        return
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()
