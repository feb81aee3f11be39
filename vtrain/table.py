"""The seed papers' tables, reproduced: the paper's value beside the one measured here.

``python -m vtrain.table table=swin_imagenet`` reads ``conf/table/swin_imagenet.yaml`` (rows: a label, the
experiment and/or backbone config with optional ``overrides``, an optional checkpoint or metrics file, the
paper's values; columns: what each one measures, with a tolerance) and fills every column it can:

* ``params`` / ``macs``: the row's backbone with a ``num_classes`` linear classifier (``vtrain.bench.Classifier``,
  the classification model) through ``vtrain.profiling``, always;
* ``task_params``: the whole task model of the row's experiment (a detector, say), when the experiment exists;
* ``throughput``: inference images/s on the current device (``vtrain.bench.measure``);
* ``metric``: the value in the ``metrics.json`` of ``python -m vtrain.eval experiment=... ckpt_path=...`` when
  the row has a checkpoint (and the dataset is there), or of a finished run given as ``metrics``.

Anything that cannot be measured prints "—" with a footnote saying why; a measured value further from the
paper's than the column's ``abs_tol`` / ``rel_tol`` is marked †.

``python -m vtrain.table runs=<multirun dir>`` aggregates the sweep's ``metrics.json`` files: runs that
differ only by their seed form one row (mean ± sample std), and a PNG plots the metric against GMACs (or
params, or throughput), one point per run, as the papers' figures do.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vtrain import ConfigError
from vtrain.tools.bench.device import device_name, resolve_device
from vtrain.tools.bench.models import Candidate, Settings, build_classifier
from vtrain.tools.bench.timing import measure
from vtrain.tools.configs import compose_config
from vtrain.profiling import count_macs, count_params

log = logging.getLogger("vtrain.table")
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
DASH = "—"
DIFFERS = "†"
UNIT_SCALE = {"params": 1e-6, "task_params": 1e-6, "macs": 1e-9, "throughput": 1.0, "metric": 1.0}


class Unmeasured(Exception):
    """A cell that cannot be measured here; the message becomes the row's footnote."""


# ----------------------------------------------------------------------------------------------- a row
class Row:
    """One row of a paper table: resolves its configs lazily and measures each kind of cell once."""

    def __init__(self, key: str, spec: Mapping, table: Mapping, settings: DictConfig):
        self.key, self.spec, self.table, self.settings = key, spec, table, settings
        self.label = spec.get("label", key)
        self.notes: list[str] = [spec["note"]] if spec.get("note") else []
        self._cache: dict[str, Any] = {}

    def _once(self, name: str, compute):
        if name not in self._cache:
            try:
                self._cache[name] = compute()
            except Unmeasured as e:
                self._cache[name] = e
                if str(e) not in self.notes:
                    self.notes.append(str(e))
        value = self._cache[name]
        if isinstance(value, Unmeasured):
            raise value
        return value

    # configs
    def experiment_config(self) -> DictConfig:
        def compose() -> DictConfig:
            name = self.spec.get("experiment")
            if not name:
                raise Unmeasured("no vtrain experiment for this row")
            try:
                return compose_config("train", [f"experiment={name}"])
            except hydra.errors.MissingConfigException:
                raise Unmeasured(f"experiment {name} does not exist (yet)") from None
        return self._once("experiment", compose)

    def backbone_config(self) -> DictConfig:
        """The row's ``backbone`` from the table's ``backbone_group`` (``backbone``, or ``video_backbone`` for
        video models), else the experiment's."""
        group = self.table.get("backbone_group", "backbone")

        def resolve() -> DictConfig:
            name = self.spec.get("backbone")
            if name:
                try:
                    overrides = [*self.table.get("compose_overrides", []), f"{group}={name}",
                                 *self.spec.get("overrides", [])]
                    return compose_config("train", overrides)[group]
                except hydra.errors.MissingConfigException:
                    raise Unmeasured(f"{group} {name} does not exist (yet)") from None
            return self.experiment_config()[group]
        return self._once("backbone", resolve)

    def input_shape(self) -> tuple[int, ...]:
        shape = self.spec.get("input_shape") or self.table.get("input_shape")
        if shape:
            return tuple(shape)
        size = self.backbone_config().get("img_size", 224)
        return (3, size, size)

    def num_classes(self) -> int:
        return int(self.spec.get("num_classes") or self.table.get("num_classes") or 1000)

    def _build(self):
        try:
            return build_classifier(self.backbone_config(), self.num_classes())
        except Unmeasured:
            raise
        except Exception as e:  # noqa: BLE001 - a backbone still being written: say so in a footnote
            raise Unmeasured(f"cannot build the model ({type(e).__name__}: {e})") from e

    # measurements
    def size(self) -> tuple[int, int]:
        def compute() -> tuple[int, int]:
            with torch.device("meta"):
                model = self._build()
            return count_params(model), count_macs(model, (1, *self.input_shape()))
        return self._once("size", compute)

    def task_params(self) -> int:
        def compute() -> int:
            cfg = self.experiment_config()
            try:
                with torch.device("meta"):
                    module = instantiate(cfg.task, backbone=cfg.backbone, optim=cfg.optim, sched=cfg.sched,
                                         _recursive_=False)
            except Exception as e:  # noqa: BLE001
                raise Unmeasured(f"cannot build the task model ({type(e).__name__}: {e})") from e
            return count_params(module)
        return self._once("task_params", compute)

    def throughput(self) -> float:
        def compute() -> float:
            options = self.settings.throughput
            if not options.enabled:
                raise Unmeasured("throughput not measured (throughput.enabled=false)")
            device = resolve_device(options.device)
            batch = options.batch_size or (64 if device.type == "cuda" else 1)
            bench = OmegaConf.create({"batch_size": batch, "modes": ["inference"], "warmup": options.warmup,
                                      "iters": options.iters, "repeats": options.repeats})
            candidate = Candidate(self.label, self._build, Settings(precision=options.precision))
            self.size()  # fail early (as a footnote) when the model cannot be built
            result = measure([candidate], bench, {}, device, self.input_shape(), self.num_classes())[0]
            return result["inference_ips"]
        return self._once("throughput", compute)

    def metrics(self) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            if self.spec.get("metrics"):
                path = Path(self.spec["metrics"])
                if not path.is_file():
                    raise Unmeasured(f"metrics file {path} does not exist")
                return json.loads(path.read_text())
            checkpoint = self.spec.get("checkpoint")
            if not checkpoint:
                raise Unmeasured("no checkpoint given (rows.<key>.checkpoint=<path>)")
            self.experiment_config()
            return evaluate_checkpoint(self.spec["experiment"], checkpoint, self.settings.evaluate)
        return self._once("metrics", compute)

    def metric(self, name: str) -> float:
        metrics = self.metrics()
        for group in ("final", "best"):
            if name in metrics.get(group, {}):
                return float(metrics[group][name])
        raise Unmeasured(f"{name} is not in the row's metrics.json")

    def measured(self, column: Mapping) -> float | None:
        """The column's measured value in its display unit, or None (with a footnote) when it cannot be had."""
        kind = column.get("measure")
        try:
            if kind is None:
                return None
            if kind == "params":
                value = self.size()[0]
            elif kind == "macs":
                value = self.size()[1]
            elif kind == "task_params":
                value = self.task_params()
            elif kind == "throughput":
                value = self.throughput()
            elif kind == "metric":
                value = self.metric(column["metric"]) * float(column.get("scale", 1.0))
            else:
                raise ConfigError(
                    f"column measure={kind!r}: use params, macs, task_params, throughput, metric or null")
        except Unmeasured:
            return None
        return value * UNIT_SCALE[kind]


def evaluate_checkpoint(experiment: str, checkpoint: str, options: Mapping) -> dict[str, Any]:
    """``python -m vtrain.eval`` in a subprocess (its own Hydra run), then its ``metrics.json``."""
    if not Path(checkpoint).is_file():
        raise Unmeasured(f"checkpoint {checkpoint} does not exist")
    with tempfile.TemporaryDirectory(prefix="vtrain-table-") as run_dir:
        command = [sys.executable, "-m", "vtrain.eval", f"experiment={experiment}", f"ckpt_path={checkpoint}",
                   f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", *options.get("overrides", [])]
        log.info("evaluating: %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, timeout=options.get("timeout_s"))
        metrics_file = Path(run_dir) / "metrics.json"
        if result.returncode != 0 or not metrics_file.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise Unmeasured(f"evaluation failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
        return json.loads(metrics_file.read_text())


# ----------------------------------------------------------------------------------------------- paper tables
def _number(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def _paper(value: Any) -> str:
    return DASH if value is None else str(value)


def _differs(measured: float, paper: Any, column: Mapping) -> bool:
    try:  # paper values may be quoted to keep their printed digits ("91.90")
        paper = float(paper)
    except (TypeError, ValueError):
        return False
    difference = abs(measured - paper)
    if column.get("abs_tol") is not None and difference > float(column["abs_tol"]):
        return True
    return column.get("rel_tol") is not None and difference > float(column["rel_tol"]) * abs(paper)


def fill_table(table: Mapping, settings: DictConfig) -> dict[str, Any]:
    """Every row's paper and measured value per column, plus footnotes: the data behind the Markdown."""
    columns = dict(table["columns"])
    rows = []
    for key, spec in table["rows"].items():
        row = Row(key, spec, table, settings)
        paper = dict(spec.get("paper") or {})
        cells = {}
        for name, column in columns.items():
            measured = row.measured(column)
            cells[name] = {
                "paper": paper.get(name),
                "measured": measured,
                "differs": measured is not None and _differs(measured, paper.get(name), column),
            }
        rows.append({"key": key, "label": row.label, "cells": cells, "notes": row.notes})
    return {"title": table.get("title", ""), "source": table.get("source", ""), "verified": table.get("verified", True),
            "columns": columns, "rows": rows}


_DIGITS = {"params": 2, "task_params": 2, "macs": 2, "throughput": 1, "metric": 2}


def paper_table_markdown(filled: Mapping, context: str) -> str:
    columns = filled["columns"]
    header, align = ["model"], ["---"]
    for column in columns.values():
        header.append(f"{column['label']} paper")
        align.append("--:")
        if column.get("measure"):
            header.append(f"{column['label']} vtrain")
            align.append("--:")
    lines = [f"### {filled['title']}", "", f"Paper: {filled['source']}. Measured: {context}.", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    # A note every row carries (no checkpoints given, throughput off) is said once, without a mark.
    shared = [n for n in filled["rows"][0]["notes"] if all(n in r["notes"] for r in filled["rows"])] \
        if len(filled["rows"]) > 1 else []
    footnotes: list[str] = []
    for row in filled["rows"]:
        marks = []
        for note in row["notes"]:
            if note in shared:
                continue
            if note not in footnotes:
                footnotes.append(note)
            marks.append(str(footnotes.index(note) + 1))
        label = row["label"] + (f" [{','.join(marks)}]" if marks else "")
        cells = [label]
        for name, column in columns.items():
            cell = row["cells"][name]
            cells.append(_paper(cell["paper"]))
            if column.get("measure"):
                text = _number(cell["measured"], _DIGITS[column["measure"]])
                cells.append(text + (f" {DIFFERS}" if cell["differs"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{DIFFERS} differs from the paper by more than the column's tolerance. {DASH}: not measured here.")
    if not filled.get("verified", True):
        lines.append("Some paper values were transcribed without access to the paper; check them against it.")
    lines += [f"All rows: {note}." for note in shared]
    lines += [f"[{i}] {note}" for i, note in enumerate(footnotes, start=1)]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- sweeps
def find_runs(root: Path) -> list[Path]:
    """Run directories (holding a metrics.json) under a multirun directory, in job order."""
    def order(path: Path) -> tuple:
        parts = path.relative_to(root).parts
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts)
    return sorted((p.parent for p in root.rglob("metrics.json")), key=order)


def _run_overrides(run_dir: Path, ignore: list[str]) -> str:
    overrides_file = run_dir / ".hydra" / "overrides.yaml"
    if not overrides_file.is_file():
        return run_dir.name
    overrides = [str(o) for o in OmegaConf.load(overrides_file)]
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ignore]
    return " ".join(kept) or "(defaults)"


def _run_size(run_dir: Path) -> tuple[int, int, DictConfig] | None:
    config_file = run_dir / ".hydra" / "config.yaml"
    if not config_file.is_file():
        return None
    cfg = OmegaConf.load(config_file)
    num_classes = OmegaConf.select(cfg, "task.num_classes", default=None) or 1000
    size = OmegaConf.select(cfg, "data.img_size", default=None) or cfg.backbone.get("img_size", 224)
    shape = (3, int(size), int(size))
    with torch.device("meta"):
        model = build_classifier(cfg.backbone, int(num_classes))
    return count_params(model), count_macs(model, (1, *shape)), cfg


def _mean_std(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def aggregate_runs(root: Path, options: Mapping, throughput: DictConfig | None = None) -> dict[str, Any]:
    """Groups of runs differing only in ignored keys (the seed), each with its values and model size."""
    runs = find_runs(root)
    if not runs:
        raise ConfigError(f"runs={root}: no metrics.json below it; pass the directory of a finished sweep")
    metric = options.get("metric")
    groups: dict[str, dict[str, Any]] = {}
    for run_dir in runs:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        name = metric or metrics.get("monitor")
        values = {**metrics.get("final", {}), **metrics.get("best", {})}
        if name is None or name not in values:
            log.warning("skipped %s: no %s in its metrics.json", run_dir, name or "monitored metric")
            continue
        label = _run_overrides(run_dir, list(options.get("ignore", [])))
        group = groups.setdefault(label, {"label": label, "metric": name, "values": [], "runs": []})
        if group["metric"] != name:
            raise ConfigError(f"runs={root}: runs monitor different metrics ({group['metric']}, {name}): "
                              "pick one with runs_table.metric=<name>")
        group["values"].append(float(values[name]))
        group["runs"].append(str(run_dir))
        if "params" not in group:
            try:
                size = _run_size(run_dir)
            except Exception as e:  # noqa: BLE001 - a config whose backbone cannot be built: no size columns
                log.warning("no model size for %s (%s: %s)", run_dir, type(e).__name__, e)
                size = None
            group["params"], group["macs"] = (size[0], size[1]) if size else (None, None)
            if throughput is not None and size is not None:
                group["throughput"] = _run_throughput(size[2], throughput)
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


def _run_throughput(cfg: DictConfig, options: DictConfig) -> float:
    device = resolve_device(options.device)
    batch = options.batch_size or (64 if device.type == "cuda" else 1)
    size = OmegaConf.select(cfg, "data.img_size", default=None) or cfg.backbone.get("img_size", 224)
    num_classes = int(OmegaConf.select(cfg, "task.num_classes", default=None) or 1000)
    bench = OmegaConf.create({"batch_size": batch, "modes": ["inference"], "warmup": options.warmup,
                              "iters": options.iters, "repeats": options.repeats})
    candidate = Candidate("run", lambda: build_classifier(cfg.backbone, num_classes), Settings(precision=options.precision))
    return measure([candidate], bench, {}, device, (3, int(size), int(size)), num_classes)[0]["inference_ips"]


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
        cells = [group["label"], str(len(values)), _number(params, 2), _number(macs, 2)]
        if has_throughput:
            cells.append(_number(group.get("throughput"), 1))
        cells.append(_mean_std(values, 2))
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


# ----------------------------------------------------------------------------------------------- run
def run(cfg: DictConfig) -> str:
    if cfg.get("runs"):
        root = Path(cfg.runs)
        if not root.is_dir():
            raise ConfigError(f"runs={root} is not a directory: pass the directory of a finished sweep")
        options = cfg.runs_table
        if options.plot_x not in ("gmacs", "params", "throughput"):
            raise ConfigError(f"runs_table.plot_x={options.plot_x!r}: use gmacs, params or throughput")
        summary = aggregate_runs(root, options, cfg.throughput if options.plot_x == "throughput" else None)
        markdown = runs_markdown(summary)
        out_dir = Path(cfg.out_dir or root)
        plot_runs(summary, options.plot_x, out_dir / "table.png")
        _write(out_dir, "table", markdown, summary)
        print(markdown)
        print(f"wrote {out_dir / 'table.md'} and {out_dir / 'table.png'}")
        return markdown
    if not cfg.get("table"):
        tables = sorted(p.stem for p in (Path(CONFIG_DIR) / "table").glob("*.yaml"))
        raise ConfigError(f"give table=<name> (one of {', '.join(tables)}) or runs=<multirun dir>")
    table = OmegaConf.to_container(cfg.table, resolve=True)
    filled = fill_table(table, cfg)
    device = resolve_device(cfg.throughput.device) if cfg.throughput.enabled else None
    context = f"vtrain {datetime.date.today().isoformat()}, torch {torch.__version__}" + (
        f", throughput on {device_name(device)} ({cfg.throughput.precision})" if device is not None else "")
    markdown = paper_table_markdown(filled, context)
    name = HydraConfig.get().runtime.choices.get("table", "table") if HydraConfig.initialized() else "table"
    out_dir = Path(cfg.out_dir or (HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."))
    _write(out_dir, name, markdown, filled)
    print(markdown)
    print(f"wrote {out_dir / (name + '.md')}")
    return markdown


def _write(out_dir: Path, name: str, markdown: str, data: Mapping) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="table_main")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
