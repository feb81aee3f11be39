"""A small, learnable dataset in the exact ImageNet folder layout.

Each class is one (shape, colour) pair, drawn at a random position, size and rotation on a random
textured background, so a model must find the object rather than read a global colour statistic.
Deterministic by seed: the same call writes byte-identical files.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from vtrain.data.synthetic import (
    COLORS,
    SHAPES,
    background,
    draw_polygon,
    shape_polygon,
)


def class_names(num_classes: int) -> list[tuple[str, str, str]]:
    """(wnid-like folder name, shape, colour): pairs chosen so no two classes share both."""
    pairs = list(itertools.product(SHAPES, COLORS))
    order = np.random.default_rng(1234).permutation(len(pairs))
    if num_classes > len(pairs):
        raise ValueError(f"at most {len(pairs)} synthetic classes")
    return [(f"n{9000000 + i:08d}", *pairs[j]) for i, j in enumerate(order[:num_classes])]


KIND = "imagenet"  # the layout written: `scripts/make_synthetic.py imagenet`, an experiment's `synthetic` key


def write(root: str | Path, seed: int = 0, num_classes: int = 10, train_per_class: int = 200, val_per_class: int = 20,
          size: int = 64) -> dict:
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = class_names(num_classes)
    counts = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for wnid, shape, color in classes:
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                image = background(rng, size, size)
                r = rng.uniform(0.18, 0.32) * size
                cx, cy = rng.uniform(r, size - r, size=2)
                draw_polygon(image, shape_polygon(shape, cx, cy, r, rng.uniform(0, 0.5)), COLORS[color])
                image.save(folder / f"{wnid}_{k:05d}.JPEG", quality=92)
        counts[split] = per_class * num_classes
    (root / "classes.txt").write_text("".join(f"{w} {s}_{c}\n" for w, s, c in classes))
    return {"root": str(root), "classes": num_classes, **counts}
