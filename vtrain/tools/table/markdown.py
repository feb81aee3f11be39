"""What every table writes: numbers as cells ("—" where there is none), and ``<name>.md`` with the data behind
it as ``<name>.json``."""
from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

DASH = "—"


def number(value: float | None, digits: int) -> str:
    return DASH if value is None else f"{value:.{digits}f}"


def mean_std(values: list[float], digits: int) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def write_table(out_dir: Path, name: str, markdown: str, data: Mapping) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.md").write_text(markdown)
    (out_dir / f"{name}.json").write_text(json.dumps(data, indent=2, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)
