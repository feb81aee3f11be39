"""A sweep as a table (``runs=<multirun dir>``): runs that differ only in their seed form one row (mean ± sample
std of the metric, the model's params and GMACs from the run's config), and a plot of the metric against the
model's cost, one point per run, as the papers' figures do. The runs are read by ``vtrain.training.sweep``."""
from __future__ import annotations

import logging
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
from vtrain.training.sweep import SweepPoint, finished_points

log = logging.getLogger("vtrain.tools.table")


def aggregate_runs(root: Path, options: Mapping, throughput: DictConfig | None = None) -> dict[str, Any]:
    """Groups of runs differing only in ignored keys (the seed), each with its values and model size."""
    points = finished_points(root)
    if not points:
        raise ConfigError(f"runs={root}: no metrics.json below it; pass the directory of a finished sweep")
    metric = options.get("metric")
    ignore = list(options.get("ignore", []))
    varying, fixed = _varying_keys(points, ignore)
    groups: dict[str, dict[str, Any]] = {}
    for point in points:
        name = metric or point.metrics.get("monitor")
        values = {**point.metrics.get("final", {}), **point.metrics.get("best", {})}
        if name is None or name not in values:
            log.warning("skipped %s: no %s in its metrics.json", point.path, name or "monitored metric")
            continue
        label = _label(point, varying)
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
    return {"root": str(root), "metric": name, "scale": scale, "fixed": fixed, "groups": list(groups.values())}


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def _varying_keys(points: list[SweepPoint], ignore: list[str]) -> tuple[set[str], list[str]]:
    """The override keys whose value differs between runs (or that some runs lack), and the overrides every run
    shares (``experiment=quickstart``): labels name the first, the title the second."""
    described = [dict((_override_key(o), o) for o in p.overrides if _override_key(o) not in ignore)
                 for p in points if p.overrides is not None]
    keys = {k for overrides in described for k in overrides}
    varying = {k for k in keys if len({overrides.get(k) for overrides in described}) > 1}
    fixed = [o for o in (described[0].values() if described else []) if _override_key(o) not in varying]
    return varying, fixed


def _label(point: SweepPoint, varying: set[str]) -> str:
    """The run's overrides of the keys that vary; a run without ``.hydra`` is named by its directory."""
    if point.overrides is None:
        return point.path.name
    return " ".join(o for o in point.overrides if _override_key(o) in varying) or "(all runs)"


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


def plot_runs(summary: Mapping, x_axis: str, path: Path) -> None:
    """The metric against model cost, one point per run, one colour per configuration (named in the legend by the
    keys that vary); the title names the metric, the sweep and what every run shares."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key, x_label, x_scale = {
        "gmacs": ("macs", "GMACs", 1e-9),
        "params": ("params", "params (M)", 1e-6),
        "throughput": ("throughput", "inference images/s", 1.0),
    }[x_axis]
    unit = " (%)" if summary["scale"] == 100.0 else ""
    fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=120)
    measured = any(g.get(x_key) is not None for g in summary["groups"])
    for index, group in enumerate(summary["groups"]):
        x = group.get(x_key)
        if measured and x is None:
            continue  # no model size (a hand-made config): in the table, not on a cost axis
        # Without any model size, runs are placed by their configuration index.
        x_value = index if x is None else x * x_scale
        ys = [v * summary["scale"] for v in group["values"]]
        ax.scatter([x_value] * len(ys), ys, label=textwrap.shorten(group["label"], 60), s=28)
    ax.set_xlabel(x_label if measured else "configuration")
    ax.set_ylabel(summary["metric"] + unit)
    title = f"{summary['metric']} against {x_label if measured else 'configuration'}\n{Path(summary['root']).name}"
    if summary.get("fixed"):
        title += "\n" + textwrap.shorten("all runs: " + " ".join(summary["fixed"]), 80)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    columns = 1 if len(summary["groups"]) < 4 else 2
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=columns, fontsize=7, frameon=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # the legend below the axes stays in the picture
    plt.close(fig)
