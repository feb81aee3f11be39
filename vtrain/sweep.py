"""What a sweep (``-m``) reports at its end: each point's status, monitored metric and overrides."""
from __future__ import annotations

import json
import logging
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


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    rows = []
    points = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and p.name.isdigit()]
    for point in sorted(points, key=lambda p: int(p.name)):
        overrides_file = point / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
        row: dict[str, Any] = {"point": int(point.name), "overrides": " ".join(overrides), "status": "failed"}
        metrics_file = point / "metrics.json"
        if (point / FAILED_FILE).is_file():
            row["error"] = (point / FAILED_FILE).read_text().strip()
        elif metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            monitor = metrics.get("monitor")
            row.update(status="ok", monitor=monitor, best=metrics.get("best", {}).get(monitor),
                       final=metrics.get("final", {}).get(monitor))
        else:
            row["error"] = "no metrics.json (the process died?)"
        rows.append(row)
    return rows


class SweepSummary(Callback):
    """At the end of a multirun: a table in the log and ``summary.json`` in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = summarize(sweep_dir)
        (sweep_dir / "summary.json").write_text(json.dumps(rows, indent=2))
        lines = [f"sweep {sweep_dir}: {sum(r['status'] == 'ok' for r in rows)}/{len(rows)} points ok"]
        for r in rows:
            result = f"{r['monitor']} best {r['best']:.4f}" if r["status"] == "ok" and r.get("best") is not None else r.get("error", "")
            lines.append(f"  [{r['point']}] {r['status']:6s} {result}  ({r['overrides']})")
        log.info("\n".join(lines))
        print("\n".join(lines))
