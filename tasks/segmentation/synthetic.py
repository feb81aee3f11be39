"""Small, learnable datasets in the exact layouts of ADE20K (``ADEChallengeData2016``), Cityscapes and
PASCAL-Context (``VOC2010``), the layouts of ``conf/data/{ade20k,cityscapes,pascal_context_59}.yaml``.

Each image is a random textured background (annotation 0, ADE20K's "other", which the label reduction
turns into ignore) with one to three shapes drawn over it, later ones covering earlier ones; class k
(1..num_classes in the annotation) is one (shape, colour) pair. Up to six classes have six different
colours and shapes, so a small model learns them in minutes on a CPU; beyond six, pairs share a colour
and only the shape tells them apart. Deterministic by seed. Cityscapes: the background is a void label id (0
"unlabeled" or 9 "parking", train id 255) and class k is train id k, written twice as cityscapesscripts does:
``*_gtFine_labelIds.png`` (its label id) and ``*_gtFine_labelTrainIds.png`` (k). PASCAL-Context: background 0,
class k annotated k + 1, the split files list the names.

    python scripts/make_synthetic.py ade20k --out data/synthetic/ade20k [--set num_classes=6 train=160]
    python scripts/make_synthetic.py cityscapes --out data/synthetic/cityscapes
    python scripts/make_synthetic.py pascal_context --out data/synthetic/pascal_context
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from vtrain.tasks.segmentation.data import CITYSCAPES_TRAIN_ID_LABEL_IDS

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
                 max_shapes: int) -> tuple[Image.Image, np.ndarray]:
    """An image and its (H, W) uint8 map: 0 the background, k + 1 where class k is drawn."""
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
    return image, label


def _samples(root: Path, seed: int, num_classes: int, counts: dict[str, int], height: int, width: int,
             max_shapes: int):
    """(split, index from 1, image, map) of every sample, and ``classes.txt`` written: ``<value> <name>`` lines,
    value = the class's label after the dataset's reduction + ``shift``."""
    rng = np.random.default_rng(seed)
    classes = class_pairs(num_classes)
    root.mkdir(parents=True, exist_ok=True)
    for split, count in counts.items():
        for i in range(1, count + 1):
            yield (split, i, *write_sample(rng, classes, height, width, max_shapes))


def _write_classes(root: Path, num_classes: int, shift: int) -> None:
    (root / "classes.txt").write_text("".join(f"{k + shift} {s}_{c}\n" for k, (s, c) in enumerate(class_pairs(num_classes))))


def _save(image: Image.Image | np.ndarray, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else Image.fromarray(image)).save(path, **options)


def write(root: str | Path, seed: int = 0, num_classes: int = 6, train: int = 160, val: int = 40,
          height: int = 96, width: int = 128, max_shapes: int = 3) -> dict:
    """ADE20K: ``images/{training,validation}/ADE_*.jpg``, ``annotations/.../ADE_*.png`` (0 = "other")."""
    root = Path(root)
    for split, i, image, label in _samples(root, seed, num_classes, {"training": train, "validation": val}, height,
                                           width, max_shapes):
        name = f"ADE_{'train' if split == 'training' else 'val'}_{i:08d}"
        _save(image, root / "images" / split / f"{name}.jpg", quality=92)
        _save(label, root / "annotations" / split / f"{name}.png")
    _write_classes(root, num_classes, shift=1)
    return {"root": str(root), "classes": num_classes, "train": train, "val": val, "size": [height, width]}


CITIES = {"train": ("aachen", "bochum"), "val": ("frankfurt",)}


def write_cityscapes(root: str | Path, seed: int = 0, num_classes: int = 4, train: int = 24, val: int = 6,
                     height: int = 64, width: int = 128, max_shapes: int = 3) -> dict:
    """Cityscapes: ``leftImg8bit/{train,val}/<city>/<city>_000000_<frame>_leftImg8bit.png`` with
    ``gtFine/.../<city>_000000_<frame>_gtFine_{labelIds,labelTrainIds}.png``; ``num_classes`` train ids 0.."""
    root = Path(root)
    if num_classes > len(CITYSCAPES_TRAIN_ID_LABEL_IDS):
        raise ValueError(f"Cityscapes has {len(CITYSCAPES_TRAIN_ID_LABEL_IDS)} train ids")
    label_ids = np.array((0, *CITYSCAPES_TRAIN_ID_LABEL_IDS), dtype=np.uint8)
    for split, i, image, label in _samples(root, seed, num_classes, {"train": train, "val": val}, height, width,
                                           max_shapes):
        cities = CITIES[split]
        name = f"{cities[i % len(cities)]}/{cities[i % len(cities)]}_000000_{i:06d}"
        ids = label_ids[label]
        ids[(label == 0) & (np.arange(width) < width // 4)] = 9  # "parking": a void id other than 0
        _save(image, root / "leftImg8bit" / split / f"{name}_leftImg8bit.png")
        _save(ids, root / "gtFine" / split / f"{name}_gtFine_labelIds.png")
        _save(np.where(label == 0, 255, label - 1).astype(np.uint8),
              root / "gtFine" / split / f"{name}_gtFine_labelTrainIds.png")
    _write_classes(root, num_classes, shift=0)
    return {"root": str(root), "classes": num_classes, "train": train, "val": val, "size": [height, width]}


def write_pascal_context(root: str | Path, seed: int = 0, num_classes: int = 4, train: int = 24, val: int = 6,
                         height: int = 80, width: int = 96, max_shapes: int = 3) -> dict:
    """PASCAL-Context: ``JPEGImages/2008_<n>.jpg``, ``SegmentationClassContext/2008_<n>.png`` (0 = background,
    class k = k + 1) and ``ImageSets/SegmentationContext/{train,val}.txt``."""
    root = Path(root)
    names: dict[str, list[str]] = {"train": [], "val": []}
    for split, i, image, label in _samples(root, seed, num_classes, {"train": train, "val": val}, height, width,
                                           max_shapes):
        name = f"2008_{i + (0 if split == 'train' else train):06d}"
        names[split].append(name)
        _save(image, root / "JPEGImages" / f"{name}.jpg", quality=92)
        _save(label, root / "SegmentationClassContext" / f"{name}.png")
    lists = root / "ImageSets" / "SegmentationContext"
    lists.mkdir(parents=True, exist_ok=True)
    for split, listed in names.items():
        (lists / f"{split}.txt").write_text("".join(f"{n}\n" for n in listed))
    _write_classes(root, num_classes, shift=1)
    return {"root": str(root), "classes": num_classes, "train": train, "val": val, "size": [height, width]}


# The layouts written, by name: `scripts/make_synthetic.py <kind>`, an experiment's `synthetic` key.
WRITERS = {"ade20k": write, "cityscapes": write_cityscapes, "pascal_context": write_pascal_context}
