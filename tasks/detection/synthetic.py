"""A small, learnable dataset in the exact COCO 2017 layout.

Each category is a shape (any colour) on a random textured background; images differ in size. The
annotation files hold what a real COCO file holds: polygon masks, a few instances as compressed RLE, crowd
regions (a cluster of small shapes of one category, one ``iscrowd=1`` annotation with an uncompressed RLE,
as COCO writes crowds), images with no annotation, and non-contiguous category ids.
Deterministic by seed: the same call writes byte-identical files.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils
from vtrain.tasks.detection.data import annotation_rle

from vtrain.data.synthetic import (
    COLORS,
    background,
    draw_polygon,
    polygon_mask,
    shape_polygon,
)

# Shapes that stay distinct under small rotations (a rotated square is not a diamond here).
CATEGORY_SHAPES = ("square", "triangle", "circle", "star", "hexagon")


def category_id(index: int) -> int:
    return 1 + 3 * index  # 1, 4, 7, ...: not contiguous, as COCO's ids are not


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's crowd format: run lengths over the column-major mask, starting with a run of zeros."""
    flat = mask.flatten(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(np.concatenate([[0], flat, [1 - flat[-1]]]))) if flat.size else []
    counts = np.diff(np.concatenate([[0], changes])).tolist()
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def _place(rng: np.random.Generator, placed: list[tuple[float, float, float]], r: float, w: int, h: int):
    """A centre for a shape of circumradius ``r`` inside the image, clear of the shapes already placed."""
    for _ in range(50):
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if all(math.hypot(cx - x, cy - y) > r + pr + 2 for x, y, pr in placed):
            return cx, cy
    return None


def _image(rng: np.random.Generator, image_id: int, num_classes: int, min_side: int, max_side: int,
           max_objects: int, next_ann_id: int):
    w, h = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    image = background(rng, h, w)
    anns: list[dict] = []
    placed: list[tuple[float, float, float]] = []
    count = 0 if rng.random() < 0.1 else int(rng.integers(1, max_objects + 1))
    for _ in range(count):
        label = int(rng.integers(num_classes))
        r = rng.uniform(0.12, 0.25) * min(w, h)
        centre = _place(rng, placed, r, w, h)
        if centre is None:
            continue
        placed.append((*centre, r))
        polygon = shape_polygon(CATEGORY_SHAPES[label], *centre, r, rng.uniform(-0.25, 0.25))
        draw_polygon(image, polygon, list(COLORS.values())[int(rng.integers(len(COLORS)))])
        mask = polygon_mask(polygon, h, w)
        if rng.random() < 0.15:  # some instances as compressed RLE, as in LVIS-style files
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            segmentation = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        else:
            segmentation = [[round(float(v), 2) for xy in polygon for v in xy]]
        anns.append({"category_id": category_id(label), "segmentation": segmentation, "iscrowd": 0})
    if count and rng.random() < 0.2:  # a crowd: a cluster of small shapes of one category
        label = int(rng.integers(num_classes))
        r = 0.2 * min(w, h)
        centre = _place(rng, placed, r, w, h)
        if centre is not None:
            placed.append((*centre, r))
            union = np.zeros((h, w), dtype=bool)
            color = list(COLORS.values())[int(rng.integers(len(COLORS)))]
            for k in range(4):
                a = 2 * math.pi * k / 4 + rng.uniform(0, 0.5)
                polygon = shape_polygon(CATEGORY_SHAPES[label], centre[0] + 0.5 * r * math.cos(a),
                                        centre[1] + 0.5 * r * math.sin(a), 0.35 * r)
                draw_polygon(image, polygon, color)
                union |= polygon_mask(polygon, h, w)
            anns.append({"category_id": category_id(label), "segmentation": _uncompressed_rle(union), "iscrowd": 1})
    out = []
    for k, ann in enumerate(anns):
        # area and box from the annotation as the COCO API rasterises it
        rle = annotation_rle(ann["segmentation"], h, w)
        out.append({
            "id": next_ann_id + k,
            "image_id": image_id,
            **ann,
            "area": float(mask_utils.area(rle)),
            "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        })
    return image, {"id": image_id, "file_name": f"{image_id:012d}.jpg", "height": h, "width": w}, out


KIND = "coco"  # the layout written: `scripts/make_synthetic.py coco`, an experiment's `synthetic` key


def write(root: str | Path, seed: int = 0, num_classes: int = 4, train_images: int = 192, val_images: int = 31,
          min_side: int = 64, max_side: int = 96, max_objects: int = 3) -> dict:
    root = Path(root)
    if not 1 <= num_classes <= len(CATEGORY_SHAPES):
        raise ValueError(f"num_classes must be 1..{len(CATEGORY_SHAPES)}")
    rng = np.random.default_rng(seed)
    categories = [{"id": category_id(i), "name": CATEGORY_SHAPES[i], "supercategory": "shape"} for i in range(num_classes)]
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    summary: dict = {"root": str(root), "classes": num_classes}
    next_image_id, next_ann_id = 1, 1
    for split, n in (("train2017", train_images), ("val2017", val_images)):
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(n):
            image, info, anns = _image(rng, next_image_id, num_classes, min_side, max_side, max_objects, next_ann_id)
            image.save(folder / info["file_name"], quality=92)
            images.append(info)
            annotations += anns
            next_image_id += 1
            next_ann_id += len(anns)
        data = {"info": {"description": "vtrain synthetic COCO"}, "licenses": [], "images": images,
                "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
        summary[split] = {"images": n, "instances": sum(1 for a in annotations if not a["iscrowd"]),
                          "crowd": sum(a["iscrowd"] for a in annotations),
                          "empty_images": n - len({a["image_id"] for a in annotations})}
    return summary
