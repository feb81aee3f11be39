"""What a run shows on the terminal: the summary it ends with, and less of what third parties print.

Long reports (pycocotools' evaluation tables) go to the run's log file only: a record logged with
``extra=FILE_ONLY`` is kept out of the console by :class:`ConsoleFilter` (``conf/hydra/default.yaml`` puts it on
Hydra's console handler).
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

FILE_ONLY = {"file_only": True}
MAX_OTHER_METRICS = 6  # the summary's "also" row: the first validation metrics besides the monitored one (by name)


class ConsoleFilter(logging.Filter):
    """Keeps records logged with ``extra=FILE_ONLY`` off the console."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "file_only", False)


class _DropLightningTip(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def quiet_third_parties() -> None:
    """Messages of libraries that say nothing about this run: Lightning's advertisement for its cloud logger, the
    deprecations torchdata and Lightning trigger inside themselves (nothing a user of vtrain can change)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTip) for f in logger.filters):
            logger.addFilter(_DropLightningTip())
    # torchdata's StatefulDataLoader calls torch.set_vital, deprecated in torch 2.10
    warnings.filterwarnings("ignore", message=".*'set_vital' is deprecated")
    # Lightning 2.6's utilities/_pytree.py tests isinstance(treespec, LeafSpec), deprecated in torch 2.10
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def duration(seconds: float) -> str:
    """``12.3 s``, ``4 min 05 s``, ``2 h 07 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min {int(seconds % 60):02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _throughput(training: Mapping[str, Any]) -> str | None:
    """The summary's throughput row, from ``metrics.json``'s ``training``
    (:class:`~vtrain.training.callbacks.metrics_json.MetricsJSON`)."""
    if not training.get("samples_per_second"):
        return None
    name = training.get("sample_name", "samples")
    return (f"{training['samples_per_second']:.1f} {name}/s  ({training['samples']} {name} in {training['steps']} "
            f"training steps, {duration(training['seconds'])}; validation not counted)")


def summary_table(metrics: Mapping[str, Any], output_dir: str | Path, evaluated: str | None = None,
                  wall_seconds: float | None = None) -> str:
    """The run's ending as a small table, from what its ``metrics.json`` holds: the run directory, the monitored
    metric's final and best value with their epochs (counted from 0, as the progress bar and the checkpoint names
    count them), the other validation metrics' final values, the run's wall time (``wall_seconds``) and training
    throughput (samples drawn by the training steps / their time), and the best checkpoint (or the evaluated
    one)."""
    monitor = metrics.get("monitor")
    final, best = metrics.get("final", {}).get(monitor), metrics.get("best", {}).get(monitor)
    rows = [("run directory", str(output_dir))]
    if monitor is not None and final is not None:
        rows.append(("monitored", f"{monitor} ({'lower' if 'loss' in monitor else 'higher'} is better)"))
        epoch = metrics.get("final_epoch")
        rows.append(("final", _value(final) + (f"  (epoch {epoch}, counted from 0)" if epoch is not None else "")))
        if best is not None and evaluated is None:
            rows.append(("best", _value(best) + f"  (epoch {metrics.get('best_epoch', {}).get(monitor, '?')})"))
    others = [f"{name} {_value(value)}" for name, value in sorted(metrics.get("final", {}).items())
              if name.startswith("val/") and name != monitor and not name.endswith("skipped_samples")
              and isinstance(value, (int, float))]
    if others:
        rows.append(("also", "  ".join(others[:MAX_OTHER_METRICS]) + ("  ..." if len(others) > MAX_OTHER_METRICS else "")))
    if wall_seconds is not None:
        rows.append(("wall time", duration(wall_seconds)))
    throughput = _throughput(metrics.get("training", {}))
    if throughput and evaluated is None:
        rows.append(("throughput", throughput))
    if evaluated is not None:
        rows.append(("evaluated", str(evaluated)))
    elif metrics.get("best_checkpoint"):
        rows.append(("best checkpoint", metrics["best_checkpoint"]))
    width = max(len(name) for name, _ in rows)
    title = "evaluation" if evaluated is not None else "training"
    return "\n".join([f"── {title} summary " + "─" * 40] + [f"  {name.ljust(width)}  {value}" for name, value in rows])
