"""A seed paper's table (``conf/table/<name>.yaml``): each row's configs resolved, each column measured once,
the paper's value beside the measured one, footnotes for what cannot be measured here."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from vtrain.config import ConfigError
from vtrain.config.compose import compose_config
from vtrain.profiling import count_params
from vtrain.tools.bench.models import build_classifier, model_size
from vtrain.tools.bench.timing import inference_throughput, throughput_enabled
from vtrain.tools.table.markdown import DASH, number
from vtrain.tools.table.macs import task_macs
from vtrain.training.build import build_task

log = logging.getLogger("vtrain.tools.table")
DIFFERS = "†"
UNIT_SCALE = {"params": 1e-6, "task_params": 1e-6, "macs": 1e-9, "task_macs": 1e-9, "throughput": 1.0, "metric": 1.0}


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
                raise Unmeasured(self.unbuilt_reason())
            try:
                return compose_config("train", [f"experiment={name}", *self.spec.get("overrides", [])])
            except hydra.errors.MissingConfigException:
                raise Unmeasured(f"experiment {name} does not exist (yet)") from None
        return self._once("experiment", compose)

    def unbuilt_reason(self) -> str:
        """Why the row has no experiment: out of scope, the pieces it misses (``table=coverage``), or nothing said."""
        if self.spec.get("scope") == "out":
            return "out of scope (another group's system, quoted for comparison)"
        missing = self.spec.get("missing")
        if missing:
            return f"not buildable: needs {', '.join([missing] if isinstance(missing, str) else missing)}"
        return "no vtrain experiment for this row"

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
        return row_num_classes(self.spec, self.table)

    def _build(self):
        try:
            return build_classifier(self.backbone_config(), self.num_classes())
        except Unmeasured:
            raise
        except Exception as e:  # noqa: BLE001 - a backbone still being written: say so in a footnote
            raise Unmeasured(f"cannot build the model ({type(e).__name__}: {e})") from e

    # measurements
    def params(self) -> int:
        """The classifier's parameters alone, built on the meta device (``size`` counts its MACs too)."""
        def count() -> int:
            with torch.device("meta"):
                return count_params(self._build())
        return self._once("params", count)

    def size(self) -> tuple[int, int]:
        return self._once("size", lambda: model_size(self._build, self.input_shape()))

    def task_module(self) -> torch.nn.Module:
        """The experiment's whole task model (backbone and heads), built on the meta device."""
        def build() -> torch.nn.Module:
            cfg = self.experiment_config()
            try:
                with torch.device("meta"):
                    return build_task(cfg)
            except Exception as e:  # noqa: BLE001
                raise Unmeasured(f"cannot build the task model ({type(e).__name__}: {e})") from e
        return self._once("task_module", build)

    def task_params(self) -> int:
        return self._once("task_params", lambda: count_params(self.task_module()))

    def task_macs(self) -> int:
        """MACs of the task model's evaluation forward on one input of ``task_input_shape`` (the row's or the
        table's, else ``input_shape``): :func:`vtrain.tools.table.macs.task_macs` (a detector's at a test image
        size as the detection papers count it)."""
        def compute() -> int:
            shape = tuple(self.spec.get("task_input_shape") or self.table.get("task_input_shape") or self.input_shape())
            return task_macs(self.task_module(), shape)
        return self._once("task_macs", compute)

    def throughput(self) -> dict[str, Any]:
        def compute() -> dict[str, Any]:
            options = self.settings.throughput
            if not throughput_enabled(options):
                raise Unmeasured(f"throughput not measured (throughput.enabled={str(options.enabled).lower()}"
                                 + (": on CUDA only" if options.enabled == "auto" else "") + ")")
            self.size()  # fail early (as a footnote) when the model cannot be built
            return inference_throughput(self.label, self._build, self.input_shape(), self.num_classes(), options)
        return self._once("throughput", compute)

    def metrics(self, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
        """The row's evaluation, with a column's ``overrides`` added to the row's (SAN's rotated evaluation:
        ``task.test_rotation=90``); each set of overrides is evaluated once."""
        def compute() -> dict[str, Any]:
            if self.spec.get("metrics") and overrides:
                raise Unmeasured(f"the row's metrics file is not an evaluation with {' '.join(overrides)} "
                                 "(rows.<key>.checkpoint=<path> evaluates it)")
            if self.spec.get("metrics"):
                path = Path(self.spec["metrics"])
                if not path.is_file():
                    raise Unmeasured(f"metrics file {path} does not exist")
                return json.loads(path.read_text())
            checkpoint = self.spec.get("checkpoint")
            if not checkpoint:
                raise Unmeasured("no checkpoint given (rows.<key>.checkpoint=<path>)")
            self.experiment_config()
            return evaluate_checkpoint(self.spec["experiment"], checkpoint, self.settings.evaluate,
                                       [*self.spec.get("overrides", []), *overrides])
        return self._once(" ".join(("metrics", *overrides)), compute)

    def metric(self, name: str, overrides: tuple[str, ...] = ()) -> float:
        metrics = self.metrics(overrides)
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
            elif kind == "task_macs":
                value = self.task_macs()
            elif kind == "throughput":
                value = self.throughput()["ips"]
            elif kind == "metric":
                overrides = tuple(column.get("overrides") or ())
                value = self.metric(column["metric"], overrides) * float(column.get("scale", 1.0))
            else:
                raise ConfigError(
                    f"column measure={kind!r}: use params, macs, task_params, task_macs, throughput, metric or null")
        except Unmeasured:
            return None
        return value * UNIT_SCALE[kind]


def row_num_classes(spec: Mapping, table: Mapping) -> int:
    """The row's classifier width, else the table's, else 1000 (0: the trunk alone, as papers that count the
    backbone without its head)."""
    value = next((v for v in (spec.get("num_classes"), table.get("num_classes")) if v is not None), 1000)
    return int(value)


def evaluate_checkpoint(experiment: str, checkpoint: str, options: Mapping,
                        row_overrides: list[str] = ()) -> dict[str, Any]:
    """``python -m vtrain.eval`` in a subprocess (its own Hydra run), with the row's overrides, then its
    ``metrics.json``."""
    if not Path(checkpoint).is_file():
        raise Unmeasured(f"checkpoint {checkpoint} does not exist")
    with tempfile.TemporaryDirectory(prefix="vtrain-table-") as run_dir:
        command = [sys.executable, "-m", "vtrain.eval", f"experiment={experiment}", f"ckpt_path={checkpoint}",
                   f"hydra.run.dir={run_dir}", "callbacks.progress_bar=null", *row_overrides, *options.get("overrides", [])]
        log.info("evaluating: %s", " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True, timeout=options.get("timeout_s"))
        metrics_file = Path(run_dir) / "metrics.json"
        if result.returncode != 0 or not metrics_file.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines()
            raise Unmeasured(f"evaluation failed: {lines[-1] if lines else f'exit code {result.returncode}'}")
        return json.loads(metrics_file.read_text())


# ----------------------------------------------------------------------------------------------- markdown
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
            if measured is not None and column.get("measure") == "throughput":
                cells[name]["quartiles"] = row.throughput()["quartiles"]
        rows.append({"key": key, "label": row.label, "cells": cells, "notes": row.notes})
    return {"title": table.get("title", ""), "source": table.get("source", ""), "verified": table.get("verified", True),
            "columns": columns, "rows": rows}


_DIGITS = {"params": 2, "task_params": 2, "macs": 2, "task_macs": 2, "throughput": 1, "metric": 2}


def paper_table_markdown(filled: Mapping, context: str) -> str:
    columns = filled["columns"]
    header, align = ["model"], ["---"]
    for column in columns.values():
        header.append(f"{column['label']} {column.get('reference', 'paper')}")  # whose figure the column quotes
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
                text = number(cell["measured"], _DIGITS[column["measure"]])
                if cell.get("quartiles"):  # the spread of the timed blocks, as vtrain.tools.bench gives it
                    text += " [{:.1f}, {:.1f}]".format(*cell["quartiles"])
                cells.append(text + (f" {DIFFERS}" if cell["differs"] else ""))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{DIFFERS} differs from the paper by more than the column's tolerance. {DASH}: not measured here."
                 + (" Throughput: median images/s [quartiles] of the timed blocks." if any(
                     "quartiles" in cell for row in filled["rows"] for cell in row["cells"].values()) else ""))
    if not filled.get("verified", True):
        lines.append("Some paper values were transcribed without access to the paper; check them against it.")
    lines += [f"All rows: {note}." for note in shared]
    lines += [f"[{i}] {note}" for i, note in enumerate(footnotes, start=1)]
    return "\n".join(lines) + "\n"
