"""A sweep as a table (``runs=<multirun dir>``): runs that differ only in their seed form one row (mean ± sample
std of the metric, the model's params and GMACs from the run's config), and a plot of the metric against the key
the sweep varies (or the model's cost), one point per run. The runs are read by ``vtrain.training.sweep``."""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from torch import nn

from vtrain.config import ConfigError
from vtrain.config.stored import read_config_file
from vtrain.tools.bench.models import build_classifier, model_size
from vtrain.tools.bench.timing import inference_throughput
from vtrain.tools.table.markdown import mean_std, number
from vtrain.training.sweep import SweepPoint, finished_points, override_key, override_value, varying_keys

log = logging.getLogger("vtrain.tools.table")


def aggregate_runs(root: Path, options: Mapping, throughput: DictConfig | None = None) -> dict[str, Any]:
    """Groups of runs differing only in ignored keys (the seed), each with its values and model size."""
    points = finished_points(root)
    if not points:
        raise ConfigError(f"runs={root}: no metrics.json below it; pass the directory of a finished sweep")
    metric = options.get("metric")
    ignore = list(options.get("ignore", []))
    varying, fixed = varying_keys(points, ignore)
    groups: dict[str, dict[str, Any]] = {}
    for point in points:
        name = metric or point.metrics.get("monitor")
        values = {**point.metrics.get("final", {}), **point.metrics.get("best", {})}
        if name is None or name not in values:
            log.warning("skipped %s: no %s in its metrics.json", point.path, name or "monitored metric")
            continue
        label = _label(point, varying)
        group = groups.setdefault(label, {"label": label, "metric": name, "values": [], "runs": [],
                                          "overrides": _varied_values(point, varying)})
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
    return {"root": str(root), "metric": name, "scale": scale, "fixed": fixed, "varying": varying,
            "groups": list(groups.values())}


def _label(point: SweepPoint, varying: list[str]) -> str:
    """The run's overrides of the keys that vary; a run without ``.hydra`` is named by its directory."""
    if point.overrides is None:
        return point.path.name
    return " ".join(o for o in point.overrides if override_key(o) in varying) or "(all runs)"


def _varied_values(point: SweepPoint, varying: list[str]) -> dict[str, str] | None:
    """{key: value as written} of the run's overrides of the keys that vary; None without ``.hydra``."""
    if point.overrides is None:
        return None
    return {override_key(o): override_value(o) for o in point.overrides if override_key(o) in varying}


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
        measured = inference_throughput("run", *model, throughput)
        figures["throughput"], figures["throughput_quartiles"] = measured["ips"], measured["quartiles"]
    return figures


def _run_model(run_dir: Path) -> tuple[Callable[[], nn.Module], tuple[int, int, int], int] | None:
    """How to build the run's classifier, its input shape and class count (as ``ClassificationTask`` did)."""
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return None
    cfg = read_config_file(config_file)  # data: it does not choose what is built
    num_classes = int(OmegaConf.select(cfg, "task.num_classes", default=None) or 1000)
    size = int(OmegaConf.select(cfg, "data.img_size", default=None) or cfg.backbone.get("img_size", 224))
    return (lambda: build_classifier(cfg.backbone, num_classes)), (3, size, size), num_classes


def runs_markdown(summary: Mapping) -> str:
    unit = " (%)" if summary["scale"] == 100.0 else ""
    has_throughput = any("throughput" in g for g in summary["groups"])
    header = ["run", "seeds", "params (M)", "GMACs"] + (["img/s"] if has_throughput else []) + [
        f"{summary['metric']}{unit}"]
    lines = [f"### {summary['root']}", ""]
    if summary.get("fixed"):
        lines += [f"All runs: {' '.join(summary['fixed'])}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "|".join("--:" for _ in header[1:]) + "|"]
    for group in summary["groups"]:
        values = [v * summary["scale"] for v in group["values"]]
        params = None if group["params"] is None else group["params"] * 1e-6
        macs = None if group["macs"] is None else group["macs"] * 1e-9
        cells = [group["label"], str(len(values)), number(params, 2), number(macs, 2)]
        if has_throughput:
            quartiles = group.get("throughput_quartiles")
            cells.append(number(group.get("throughput"), 1)
                         + (" [{:.1f}, {:.1f}]".format(*quartiles) if quartiles else ""))
        cells.append(mean_std(values, 2))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mean ± sample standard deviation over the runs that differ only in their seed."
              + (" img/s: median [quartiles] of the timed blocks." if has_throughput else "")]
    return "\n".join(lines) + "\n"


# runs_table.plot_x of the model's cost: (the group's figure, axis label, unit)
COST_AXES = {
    "gmacs": ("macs", "GMACs", 1e-9),
    "params": ("params", "params (M)", 1e-6),
    "throughput": ("throughput", "inference images/s", 1.0),
}
SWEPT = "swept"  # runs_table.plot_x: the first key the sweep varies


def plot_layout(summary: Mapping, plot_x: str) -> dict[str, Any]:
    """What the plot shows: the x axis (``label``; ``scale`` linear, log or category, with its ``categories``) and
    the ``series`` (legend, xs, ys: one y per run). Against a swept key (``plot_x=swept``: the first the command line
    varies, or the key named), runs that share the other varied keys form one series; a numeric key whose values
    span a factor of 10 or more is on a log axis (learning rates, weight decays), other values are categories in
    sweep order. A run without the key (or without a model size, against a cost) is in the table, not on the plot."""
    ys_of = [[v * summary["scale"] for v in group["values"]] for group in summary["groups"]]
    if plot_x in COST_AXES:
        return _cost_layout(summary, ys_of, *COST_AXES[plot_x])
    varying = list(summary.get("varying", []))
    key = varying[0] if plot_x == SWEPT and varying else plot_x
    if plot_x == SWEPT and not varying:  # one configuration (seeds only), or runs without .hydra
        return _by_configuration(summary["groups"], ys_of)
    if key not in varying:
        raise ConfigError(f"runs_table.plot_x={plot_x}: use {SWEPT}, a key the sweep varies "
                          f"({', '.join(varying) or 'none'}), or {', '.join(COST_AXES)}")
    placed = [(g, ys) for g, ys in zip(summary["groups"], ys_of) if key in (g.get("overrides") or {})]
    written = [g["overrides"][key] for g, _ in placed]
    numbers = [_finite_number(v) for v in written]
    numeric = all(n is not None for n in numbers)
    categories = [] if numeric else list(dict.fromkeys(written))
    series: dict[str, tuple[list[float], list[float]]] = {}
    for (group, ys), value, as_number in zip(placed, written, numbers):
        others = " ".join(f"{k}={v}" for k, v in group["overrides"].items() if k != key) or "all runs"
        xs_ys = series.setdefault(others, ([], []))
        xs_ys[0].extend([as_number if numeric else categories.index(value)] * len(ys))
        xs_ys[1].extend(ys)
    spread = numeric and min(numbers) > 0 and max(numbers) / min(numbers) >= 10
    return {"label": key, "scale": "log" if spread else "linear" if numeric else "category",
            "categories": categories, "series": [(name, xs, ys) for name, (xs, ys) in series.items()]}


def _cost_layout(summary: Mapping, ys_of: list[list[float]], figure: str, label: str, unit: float) -> dict[str, Any]:
    """One series per configuration at its model's cost; without any model size, runs are placed by configuration."""
    groups = summary["groups"]
    if not any(g.get(figure) is not None for g in groups):
        return _by_configuration(groups, ys_of)
    return {"label": label, "scale": "linear", "categories": [],
            "series": [(g["label"], [g[figure] * unit] * len(ys), ys) for g, ys in zip(groups, ys_of)
                       if g.get(figure) is not None]}


def _by_configuration(groups: list[Mapping], ys_of: list[list[float]]) -> dict[str, Any]:
    """Each configuration a category of its own, named by its label."""
    return {"label": "configuration", "scale": "category", "categories": [g["label"] for g in groups],
            "series": [(g["label"], [i] * len(ys), ys) for i, (g, ys) in enumerate(zip(groups, ys_of))]}


def _finite_number(written: str) -> float | None:
    try:
        value = float(written)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def plot_runs(summary: Mapping, plot_x: str, path: Path) -> None:
    """The metric against the swept key or the model's cost (:func:`plot_layout`), one point per run, one colour
    per series, the legend below the axes; the title names the metric, the sweep and what every run shares."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layout = plot_layout(summary, plot_x)
    unit = " (%)" if summary["scale"] == 100.0 else ""
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    for name, xs, ys in layout["series"]:
        points = ax.scatter(xs, ys, label=textwrap.shorten(name, 60), s=28)
        if layout["scale"] != "category" and len(set(xs)) > 1:  # the series' mean at each value, joined
            means = sorted((x, sum(y for xx, y in zip(xs, ys) if xx == x) / xs.count(x)) for x in set(xs))
            ax.plot(*zip(*means), color=points.get_facecolor()[0], linewidth=1, alpha=0.6)
    if layout["scale"] == "log":
        ax.set_xscale("log")
    if layout["scale"] == "category":
        ax.set_xticks(range(len(layout["categories"])),
                      [textwrap.shorten(c, 30) for c in layout["categories"]], rotation=20, fontsize=7)
    ax.set_xlabel(layout["label"])
    ax.set_ylabel(summary["metric"] + unit)
    title = f"{summary['metric']} against {layout['label']}\n{Path(summary['root']).name}"
    if summary.get("fixed"):
        title += "\n" + textwrap.shorten("all runs: " + " ".join(summary["fixed"]), 80)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    columns = 1 if len(layout["series"]) < 4 else 2
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=columns, fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # the legend below the axes stays in the picture
    plt.close(fig)
