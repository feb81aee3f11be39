"""A bench's results: the ratios ours/reference, the table on stdout, ``bench.json`` and a row of ``bench.csv``."""
from __future__ import annotations

import csv
import json
import logging
import statistics
from pathlib import Path
from typing import Any

log = logging.getLogger("vtrain.tools.bench")

# figure key -> (label, scale, format)
FIGURES = {
    "params": ("params (M)", 1e-6, "{:.2f}"),
    "macs": ("GMACs", 1e-9, "{:.2f}"),
    "inference_ips": ("inference img/s", 1.0, "{:.1f}"),
    "train_ips": ("training img/s", 1.0, "{:.1f}"),
    "inference_peak_mb": ("inference peak MiB", 1.0, "{:.0f}"),
    "train_peak_mb": ("training peak MiB", 1.0, "{:.0f}"),
    "train_mfu": ("training MFU (%)", 100.0, "{:.1f}"),
}


def compare(ours: dict[str, Any], ref: dict[str, Any], modes: list[str]) -> tuple[dict, dict]:
    """Each figure's ratio ours/reference, and for images/s the quartiles of the paired blocks' ratios."""
    ratio = {k: _ratio(ours.get(k), ref.get(k)) for k in FIGURES}
    spread = {}
    for mode in modes:
        # Paired blocks (timed back to back): the median of the per-pair ratios cancels the drift of a
        # shared machine better than a ratio of medians; the quartiles say how noisy the pairs were.
        pairs = [t_ref / t_ours for t_ours, t_ref in zip(ours[f"{mode}_blocks_s"], ref[f"{mode}_blocks_s"])]
        ratio[f"{mode}_ips"] = statistics.median(pairs)
        spread[f"{mode}_ips"] = quartiles(pairs)
    return ratio, spread


def quartiles(values: list[float]) -> list[float]:
    """The first and third quartiles (inclusive method); a single value is both."""
    if len(values) < 2:
        return [values[0], values[0]]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q3]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _fmt(value: float | None, scale: float, fmt: str) -> str:
    return "—" if value is None else fmt.format(value * scale)


def format_report(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"bench {report['model']} on {report['device']}, torch {report['torch']}, timm {report['timm']}",
        f"batch {s['batch_size']} x {tuple(s['input_shape'])}, {s['precision']}, channels_last={s['channels_last']}, "
        f"compile={s['compile']}, median of {s['repeats']} blocks of {s['iters']} iterations after {s['warmup']} "
        "warm-up (ratios: median and quartiles of the paired blocks)",
    ]
    ours, ref = report["ours"], report["reference"]
    header = ["figure", ours["name"]] + ([ref["name"], "ours/ref"] if ref else [])
    rows = []
    for key, (label, scale, fmt) in FIGURES.items():
        if ours.get(key) is None and (ref is None or ref.get(key) is None):
            continue
        row = [label, _fmt(ours.get(key), scale, fmt)]
        if ref:
            ratio = _fmt(report["ratio"].get(key), 1.0, "{:.3f}")
            if key in report.get("ratio_quartiles", {}):
                ratio += " [{:.3f}, {:.3f}]".format(*report["ratio_quartiles"][key])
            row += [_fmt(ref.get(key), scale, fmt), ratio]
        rows.append(row)
    if "loader" in report:
        loader = report["loader"]
        blank = ["", ""] if ref else []
        rows.append([f"loader img/s ({loader['num_workers']} workers)", f"{loader['ips']:.1f}"] + blank)
        if "bottleneck" in loader:
            rows.append(["bottleneck", loader["bottleneck"]] + blank)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if ref and ref["settings"] != ours["settings"]:
        lines.append(f"reference settings: {ref['settings']}")
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    return "\n".join(lines)


def csv_row(report: dict[str, Any]) -> dict[str, Any]:
    s = report["settings"]
    row: dict[str, Any] = {
        "date": report["date"], "model": report["model"], "device": report["device"], "torch": report["torch"],
        "timm": report["timm"], "batch_size": s["batch_size"], "input_shape": "x".join(map(str, s["input_shape"])),
        "precision": s["precision"], "channels_last": s["channels_last"], "compile": s["compile"],
        "reference": report["reference"]["name"] if report["reference"] else "",
        "reference_settings": s["reference_settings"],
    }
    for prefix, result in (("", report["ours"]), ("ref_", report["reference"] or {})):
        for key in FIGURES:
            row[prefix + key] = result.get(key, "")
    for key in FIGURES:
        row["ratio_" + key] = (report.get("ratio") or {}).get(key, "")
    loader = report.get("loader") or {}
    row["loader_ips"], row["bottleneck"] = loader.get("ips", ""), loader.get("bottleneck", "")
    return {k: ("" if v is None else v) for k, v in row.items()}


def append_csv(path: Path, row: dict[str, Any]) -> None:
    """Append one row; if the file has other columns (an older version), rewrite it with their union."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.stat().st_size > 0:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields, rows = list(reader.fieldnames or []), list(reader)
        if fields == list(row):
            with path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=fields).writerow(row)
            return
        fields += [k for k in row if k not in fields]
        rows.append(row)
    else:
        fields, rows = list(row), [row]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)


def write_outputs(report: dict[str, Any], json_path: str, csv_path: str) -> None:
    json_file = Path(json_path)
    json_file.parent.mkdir(parents=True, exist_ok=True)
    json_file.write_text(json.dumps(report, indent=2))
    append_csv(Path(csv_path), csv_row(report))
    log.info("wrote %s and a row of %s", json_file, csv_path)
