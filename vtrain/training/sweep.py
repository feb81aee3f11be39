"""What a sweep (``-m``) leaves behind, read in one place: each point's overrides, its ``metrics.json`` or the
reason it failed. The summary at a sweep's end (:class:`SweepSummary`) and the sweep table
(``vtrain.tools.table.runs``) both read points through :func:`read_point`."""
from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger("vtrain")
FAILED_FILE = "failed.txt"


def record_failure(output_dir: str | Path, error: BaseException) -> None:
    """Leave the reason a sweep point failed in its directory, for the summary."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    (Path(output_dir) / FAILED_FILE).write_text(f"{type(error).__name__}: {first}\n")


@dataclass
class SweepPoint:
    """One run directory of a sweep."""

    path: Path
    overrides: list[str] | None  # the command-line overrides (.hydra/overrides.yaml); None without that file
    metrics: dict[str, Any] | None  # its metrics.json, once the run wrote one
    error: str | None  # the line record_failure left, if the run failed


def read_point(path: Path) -> SweepPoint:
    overrides, metrics, failed = path / ".hydra" / "overrides.yaml", path / "metrics.json", path / FAILED_FILE
    return SweepPoint(
        path=path,
        overrides=[str(o) for o in yaml.safe_load(overrides.read_text()) or []] if overrides.is_file() else None,
        metrics=json.loads(metrics.read_text()) if metrics.is_file() else None,
        error=failed.read_text().strip() if failed.is_file() else None,
    )


def _job_order(root: Path):
    """Sort key of directories below ``root``: numbered ones (Hydra's ``${hydra.job.num}``) by number."""
    def key(path: Path) -> tuple:
        return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.relative_to(root).parts)
    return key


def job_points(sweep_dir: str | Path) -> list[SweepPoint]:
    """Every job of one sweep (its numbered directories), finished or not, in job order."""
    root = Path(sweep_dir)
    return [read_point(p) for p in sorted((p for p in root.iterdir() if p.is_dir() and p.name.isdigit()),
                                           key=_job_order(root))]


def finished_points(root: str | Path) -> list[SweepPoint]:
    """Every run with a ``metrics.json`` below ``root`` (a sweep, or a folder of sweeps), in job order."""
    root = Path(root)
    return [read_point(p) for p in sorted({m.parent for m in root.rglob("metrics.json")}, key=_job_order(root))]


def override_key(override: str) -> str:
    """``optim.lr`` of ``optim.lr=1e-3`` (and of ``+optim.lr=1e-3``, ``~optim.lr``)."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    """``1e-3`` of ``optim.lr=1e-3``, as the command line wrote it (empty for a deletion, ``~optim.lr``)."""
    return override.split("=", 1)[1] if "=" in override else ""


def varying_keys(points: list[SweepPoint], ignore: Collection[str] = ()) -> tuple[list[str], list[str]]:
    """The override keys whose value differs between points (or that some points lack), in the order the command
    line wrote them, and the overrides every point shares (``experiment=quickstart``); points without
    ``.hydra/overrides.yaml`` count for neither."""
    described = [{override_key(o): o for o in p.overrides if override_key(o) not in ignore}
                 for p in points if p.overrides is not None]
    keys = list(dict.fromkeys(k for overrides in described for k in overrides))
    varying = [k for k in keys if len({overrides.get(k) for overrides in described}) > 1]
    shared = [o for o in (described[0].values() if described else []) if override_key(o) not in varying]
    return varying, shared


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    rows = []
    for point in job_points(sweep_dir):
        row: dict[str, Any] = {"point": int(point.path.name), "overrides": " ".join(point.overrides or []),
                               "status": "failed"}
        if point.error is not None:
            row["error"] = point.error
        elif point.metrics is not None:
            monitor = point.metrics.get("monitor")
            row.update(status="ok", monitor=monitor, best=point.metrics.get("best", {}).get(monitor),
                       final=point.metrics.get("final", {}).get(monitor))
        else:
            row["error"] = "no metrics.json (the process died?)"
        rows.append(row)
    return rows


def summary_lines(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> list[str]:
    """The terminal's account of a sweep: how many points ended well, the overrides every point shares once, then
    one line per point (:func:`summarize`'s row) with its result and only the overrides that differ between
    points."""
    points = job_points(sweep_dir)
    varying, shared = varying_keys(points)
    lines = [f"sweep {sweep_dir}: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} points ok"]
    if shared and len(points) > 1:
        lines.append(f"  every point: {' '.join(shared)}")
    for point, r in zip(points, rows):
        result = f"{r['monitor']} best {r['best']:.4f}" if r["status"] == "ok" and r.get("best") is not None else r.get("error", "")
        differing = " ".join(o for o in point.overrides or [] if override_key(o) in varying)
        lines.append(f"  [{r['point']}] {r['status']:6s} {result}" + (f"  ({differing})" if differing else ""))
    return lines


class SweepSummary(Callback):
    """At the end of a multirun: a table on the terminal and ``summary.json`` in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize(sweep_dir)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        # once: Hydra's log of the sweep would print it a second time on the terminal
        print("\n".join(summary_lines(sweep_dir, rows)))
