#!/usr/bin/env python
"""Sort the official flat ImageNet validation folder into ``val/<wnid>/`` class folders.

    python scripts/imagenet_val_to_folders.py VAL_DIR LABELS [--copy]

LABELS is either Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString`` whose first word is the wnid)
or a text file of ``<file name> <wnid>`` lines. Files are moved (``--copy`` copies); a file named in the
labels but missing from VAL_DIR is an error naming it.
"""
from __future__ import annotations

import argparse
import csv
import shutil
import sys
from pathlib import Path


def read_labels(path: Path) -> dict[str, str]:
    """image stem -> wnid."""
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
    labels = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            if len(parts) != 2:
                raise SystemExit(f"error: {path}:{number}: expected '<file> <wnid>', got {line!r}")
            labels[Path(parts[0]).stem] = parts[1]
    return labels


def sort_into_folders(val_dir: Path, labels: dict[str, str], copy: bool = False) -> int:
    files = {p.stem: p for p in val_dir.iterdir() if p.is_file()}
    missing = sorted(set(labels) - set(files))
    if missing:
        raise SystemExit(f"error: {len(missing)} labelled images are not in {val_dir} (first: {missing[0]}): check VAL_DIR")
    for stem, wnid in labels.items():
        (val_dir / wnid).mkdir(exist_ok=True)
        (shutil.copy2 if copy else shutil.move)(str(files[stem]), str(val_dir / wnid / files[stem].name))
    return len(labels)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("val_dir", type=Path)
    parser.add_argument("labels", type=Path)
    parser.add_argument("--copy", action="store_true")
    args = parser.parse_args(argv)
    count = sort_into_folders(args.val_dir, read_labels(args.labels), args.copy)
    print(f"sorted {count} images into class folders under {args.val_dir}", file=sys.stderr)


if __name__ == "__main__":
    main()
