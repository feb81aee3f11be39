"""Drawing for the synthetic datasets every task generates in its real on-disk layout.

A sample is coloured shapes on a random textured background. The shapes are polygons, so the same
description gives an image, a class, a box, a COCO polygon and a segmentation mask.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPES = ("square", "triangle", "circle", "diamond", "hexagon", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "magenta": (200, 40, 200),
    "cyan": (40, 200, 210),
}


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float = 0.0) -> list[tuple[float, float]]:
    """Vertices of ``shape`` centred at (cx, cy) with circumradius ``r``, rotated by ``angle`` radians."""
    if shape == "circle":
        n, radii = 32, [r] * 32
    elif shape == "star":
        n, radii = 10, [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    else:
        n = {"square": 4, "triangle": 3, "diamond": 4, "hexagon": 6}[shape]
        radii = [r] * n
        angle += {"square": math.pi / 4, "triangle": -math.pi / 2, "diamond": 0.0, "hexagon": 0.0}[shape]
    return [
        (cx + radii[i] * math.cos(angle + 2 * math.pi * i / n), cy + radii[i] * math.sin(angle + 2 * math.pi * i / n))
        for i in range(n)
    ]


def background(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A smooth random texture (low-frequency noise plus a gradient), never a flat colour."""
    small = rng.integers(60, 196, size=(max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    noise = rng.normal(0, 12, size=(height, width, 3))
    arr = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr).filter(ImageFilter.GaussianBlur(0.6))


def draw_polygon(image: Image.Image, polygon: list[tuple[float, float]], color: tuple[int, int, int]) -> None:
    ImageDraw.Draw(image).polygon(polygon, fill=color)


def polygon_mask(polygon: list[tuple[float, float]], height: int, width: int) -> np.ndarray:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(polygon, fill=1)
    return np.asarray(mask, dtype=bool)
