#!/usr/bin/env python
"""Write a small synthetic dataset in a real dataset's on-disk layout.

    python scripts/make_synthetic.py imagenet --out data/synthetic/imagenet [--seed 0]

Each kind's writer lives with its task (``tasks/<task>/synthetic.py``, a ``write(root, seed, **kw)``).
"""
from __future__ import annotations

import argparse
import importlib
import json

WRITERS = {
    "imagenet": "vtrain.tasks.classification.synthetic",
    "coco": "vtrain.tasks.detection.synthetic",
    "ade20k": "vtrain.tasks.segmentation.synthetic",
    "kinetics": "vtrain.tasks.video.synthetic",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=sorted(WRITERS))
    parser.add_argument("--out", required=True, help="dataset root to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=INT", help="writer options, e.g. num_classes=5")
    args = parser.parse_args()
    options = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    summary = importlib.import_module(WRITERS[args.kind]).write(args.out, seed=args.seed, **options)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
