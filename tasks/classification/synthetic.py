"""A small, learnable dataset in the exact ImageNet folder layout, or in ImageNet-22K's (``list_files``).

Each class is one (shape, colour) pair, drawn at a random position, size and rotation on a random
textured background, so a model must find the object rather than read a global colour statistic.
Deterministic by seed: the same call writes byte-identical files.
"""
from __future__ import annotations

import itertools
import json
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
# ImageNet-22K as the official Swin code reads it (get_started.md, data/build.py): every image in
# fall11_whole/<wnid>/, the splits and labels in two list files beside that folder (conf/data/imagenet22k.yaml)
IMAGENET22K_FOLDER = "fall11_whole"
IMAGENET22K_LISTS = {"train": "ILSVRC2011fall_whole_map_train.txt", "val": "ILSVRC2011fall_whole_map_val.txt"}


def write(root: str | Path, seed: int = 0, num_classes: int = 10, train_per_class: int = 200, val_per_class: int = 20,
          size: int = 64, list_files: bool = False) -> dict:
    """``list_files``: the ImageNet-22K layout, labelled in the reverse of the sorted folders' order (a reader that
    took the folders' order would mislabel them), instead of ``train/`` and ``val/`` class folders."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = class_names(num_classes)
    labels = range(num_classes)[::-1] if list_files else range(num_classes)  # the folders sort as `classes`
    counts, lists = {}, {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        lists[split] = []
        for (wnid, shape, color), label in zip(classes, labels):
            folder = root / (IMAGENET22K_FOLDER if list_files else split) / wnid
            folder.mkdir(parents=True, exist_ok=True)
            first = train_per_class if list_files and split == "val" else 0  # one folder holds both splits
            for k in range(first, first + per_class):
                image = background(rng, size, size)
                r = rng.uniform(0.18, 0.32) * size
                cx, cy = rng.uniform(r, size - r, size=2)
                draw_polygon(image, shape_polygon(shape, cx, cy, r, rng.uniform(0, 0.5)), COLORS[color])
                image.save(folder / f"{wnid}_{k:05d}.JPEG", quality=92)
                lists[split].append([f"{folder.relative_to(root).as_posix()}/{wnid}_{k:05d}.JPEG", int(label)])
        counts[split] = per_class * num_classes
    if list_files:
        for split, name in IMAGENET22K_LISTS.items():
            (root / name).write_text("[\n" + ",\n".join(json.dumps(e) for e in lists[split]) + "\n]\n")
    (root / "classes.txt").write_text("".join(f"{w} {s}_{c}\n" for w, s, c in classes))
    return {"root": str(root), "classes": num_classes, **counts}
