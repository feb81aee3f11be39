"""A sweep as a table (``runs=<multirun dir>``): runs that differ only in their seed form one row (mean ± sample
std of the metric, the model's params and GMACs from the run's config), and a plot of the metric against the
model's cost, one point per run, as the papers' figures do. The runs are read by ``vtrain.sweep``."""
from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from vtrain import ConfigError
from vtrain.sweep import SweepPoint, finished_points
from vtrain.tools.bench.models import build_classifier, model_size
from vtrain.tools.bench.timing import inference_throughput
from vtrain.tools.table.markdown import mean_std, number

log = logging.getLogger("vtrain.tools.table")


def aggregate_runs(root: Path, options: Mapping, throughput: DictConfig | None = None) -> dict[str, Any]:
    """Groups of runs differing only in ignored keys (the seed), each with its values and model size."""
    points = finished_points(root)
    if not points:
        raise ConfigError(f"runs={root}: no metrics.json below it; pass the directory of a finished sweep")
    metric = options.get("metric")
    groups: dict[str, dict[str, Any]] = {}
    for point in points:
        name = metric or point.metrics.get("monitor")
        values = {**point.metrics.get("final", {}), **point.metrics.get("best", {})}
        if name is None or name not in values:
            log.warning("skipped %s: no %s in its metrics.json", point.path, name or "monitored metric")
            continue
        label = _label(point, list(options.get("ignore", [])))
        group = groups.setdefault(label, {"label": label, "metric": name, "values": [], "runs": []})
        if group["metric"] != name:
            raise ConfigError(f"runs={root}: runs monitor different metrics ({group['metric']}, {name}): "
                              "pick one with runs_table.metric=<name>")
        group["values"].append(float(values[name]))
        group["runs"].append(str(point.path))
        if "params" not in group:
            group.update(_model_figures(point, throughput))
    if not groups:
        raise ConfigError(f"runs={root}: no run has the metric {metric or '(monitored)'}")
    names = {g["metric"] for g in groups.values()}
    if len(names) > 1:
        raise ConfigError(f"runs={root}: runs monitor different metrics ({', '.join(sorted(names))}): "
                          "pick one with runs_table.metric=<name>")
    name = names.pop()
    all_values = [v for g in groups.values() for v in g["values"]]
    # Accuracies, AP and IoU are logged as fractions; shown in % as the papers do (losses as they are).
    scale = 100.0 if "loss" not in name and all(0.0 <= v <= 1.0 for v in all_values) else 1.0
    return {"root": str(root), "metric": name, "scale": scale, "groups": list(groups.values())}


def _label(point: SweepPoint, ignore: list[str]) -> str:
    """The run's overrides without the ignored keys; a run without ``.hydra`` is named by its directory."""
    if point.overrides is None:
        return point.path.name
    kept = [o for o in point.overrides if o.split("=", 1)[0].lstrip("+~") not in ignore]
    return " ".join(kept) or "(defaults)"


def _model_figures(point: SweepPoint, throughput: DictConfig | None) -> dict[str, Any]:
    """Params and MACs of the run's classifier (from its ``.hydra/config.yaml``), and its inference images/s when
    the plot wants them; None where there is no config or its backbone cannot be built."""
    figures: dict[str, Any] = {"params": None, "macs": None}
    try:
        model = _run_model(point.path)
        if model is not None:
            figures["params"], figures["macs"] = model_size(model[0], model[1])
    except Exception as e:  # noqa: BLE001 - a config whose backbone cannot be built: no size columns
        log.warning("no model size for %s (%s: %s)", point.path, type(e).__name__, e)
        return figures
    if throughput is not None and model is not None:
        figures["throughput"] = inference_throughput("run", *model, throughput)
    return figures


def _run_model(run_dir: Path) -> tuple[Callable[[], nn.Module], tuple[int, int, int], int] | None:
    """How to build the run's classifier, its input shape and class count (as ``ClassificationTask`` did)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return None
    cfg = OmegaConf.load(config_file)
    num_classes = int(OmegaConf.select(cfg, "task.num_classes", default=None) or 1000)
    size = int(OmegaConf.select(cfg, "data.img_size", default=None) or cfg.backbone.get("img_size", 224))
    return (lambda: build_classifier(cfg.backbone, num_classes)), (3, size, size), num_classes


def runs_markdown(summary: Mapping) -> str:
    unit = " (%)" if summary["scale"] == 100.0 else ""
    has_throughput = any("throughput" in g for g in summary["groups"])
    header = ["run", "seeds", "params (M)", "GMACs"] + (["img/s"] if has_throughput else []) + [
        f"{summary['metric']}{unit}"]
    lines = [f"### {summary['root']}", "", "| " + " | ".join(header) + " |",
             "|---|" + "|".join("--:" for _ in header[1:]) + "|"]
    for group in summary["groups"]:
        values = [v * summary["scale"] for v in group["values"]]
        params = None if group["params"] is None else group["params"] * 1e-6
        macs = None if group["macs"] is None else group["macs"] * 1e-9
        cells = [group["label"], str(len(values)), number(params, 2), number(macs, 2)]
        if has_throughput:
            cells.append(number(group.get("throughput"), 1))
        cells.append(mean_std(values, 2))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mean ± sample standard deviation over the runs that differ only in their seed."]
    return "\n".join(lines) + "\n"


def plot_runs(summary: Mapping, x_axis: str, path: Path) -> None:
    """The metric against model cost, one point per run, one colour per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, x_label, x_scale = {
        "gmacs": ("macs", "GMACs", 1e-9),
        "params": ("params", "params (M)", 1e-6),
        "throughput": ("throughput", "images/s", 1.0),
    }[x_axis]
    unit = " (%)" if summary["scale"] == 100.0 else ""
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for index, group in enumerate(summary["groups"]):
        x = group.get(x_key)
        # Without a model size (hand-made or unknown config), runs are placed by their configuration index.
        x_value = index if x is None else x * x_scale
        ys = [v * summary["scale"] for v in group["values"]]
        ax.scatter([x_value] * len(ys), ys, label=group["label"], s=28)
        ax.annotate(group["label"], (x_value, statistics.fmean(ys)), textcoords="offset points", xytext=(5, 5),
                    fontsize=7)
    ax.set_xlabel(x_label if any(g.get(x_key) is not None for g in summary["groups"]) else "configuration")
    ax.set_ylabel(summary["metric"] + unit)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
