"""A small, learnable dataset in the exact ADE20K layout (``ADEChallengeData2016``).

Each image is a random textured background (annotation 0, ADE20K's "other", which the label reduction
turns into ignore) with one to three shapes drawn over it, later ones covering earlier ones; class k
(1..num_classes in the annotation) is one (shape, colour) pair. Up to six classes have six different
colours and shapes, so a small model learns them in minutes on a CPU; beyond six, pairs share a colour
and only the shape tells them apart. Deterministic by seed.

    python scripts/make_synthetic.py ade20k --out data/synthetic/ade20k [--set num_classes=6 train=160]
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vtrain.data.synthetic import (
    COLORS,
    SHAPES,
    background,
    draw_polygon,
    polygon_mask,
    shape_polygon,
)


def class_pairs(num_classes: int) -> list[tuple[str, str]]:
    """(shape, colour) of each class: the diagonals of the shape x colour table, one after the other."""
    colors = list(COLORS)
    n = min(len(SHAPES), len(colors))
    pairs = [(SHAPES[i % len(SHAPES)], colors[(i + shift) % len(colors)]) for shift in range(n) for i in range(n)]
    if num_classes > len(pairs):
        raise ValueError(f"at most {len(pairs)} synthetic classes")
    return pairs[:num_classes]


def write_sample(rng: np.random.Generator, classes: list[tuple[str, str]], height: int, width: int,
                 max_shapes: int) -> tuple[Image.Image, Image.Image]:
    image = background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(rng.integers(1, max_shapes + 1)):
        k = int(rng.integers(len(classes)))
        shape, color = classes[k]
        r = rng.uniform(0.15, 0.35) * min(height, width)
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        polygon = shape_polygon(shape, cx, cy, r, rng.uniform(0, 2 * np.pi))
        draw_polygon(image, polygon, COLORS[color])
        label[polygon_mask(polygon, height, width)] = k + 1
    return image, Image.fromarray(label)


KIND = "ade20k"  # the layout written: `scripts/make_synthetic.py ade20k`, an experiment's `synthetic` key


def write(root: str | Path, seed: int = 0, num_classes: int = 6, train: int = 160, val: int = 40,
          height: int = 96, width: int = 128, max_shapes: int = 3) -> dict:
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = class_pairs(num_classes)
    for split, count, prefix in (("training", train, "ADE_train"), ("validation", val, "ADE_val")):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(1, count + 1):
            image, label = write_sample(rng, classes, height, width, max_shapes)
            image.save(root / "images" / split / f"{prefix}_{i:08d}.jpg", quality=92)
            label.save(root / "annotations" / split / f"{prefix}_{i:08d}.png")
    (root / "classes.txt").write_text("".join(f"{k + 1} {s}_{c}\n" for k, (s, c) in enumerate(classes)))
    return {"root": str(root), "classes": num_classes, "train": train, "val": val, "size": [height, width]}
