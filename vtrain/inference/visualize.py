"""Pictures of predictions, what ``vtrain.predict`` writes and the training callback logs: boxes and masks with
names and scores (torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks``, each caption on a filled
label placed off the others), a semi-transparent segmentation overlay with a legend of the same colours, the top-k bars of a classifier and a strip of a video's frames.

Every function takes and returns uint8 (3, H, W) tensors. Small inputs are enlarged by a whole factor (nearest
neighbour: each input pixel becomes a block, nothing is invented) so that names stay readable on 64-pixel images.
"""
from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

MIN_SIDE = 384  # pictures are enlarged until their longer side reaches this
PANEL_WIDTH = 300  # the legend / bars beside an image
BACKGROUND = (250, 250, 250)
SEGMENTATION_ALPHA = 0.55  # a class's colour over the image: out = (1 - alpha) * image + alpha * colour


def palette(count: int) -> list[tuple[int, int, int]]:
    """``count`` distinct saturated colours (hues a golden-ratio step apart), the same for a label in every picture."""
    return [tuple(int(255 * c) for c in colorsys.hsv_to_rgb((0.61803398875 * i) % 1.0, 0.75, 0.95))
            for i in range(count)]


def enlargement(height: int, width: int) -> int:
    """The whole factor that brings the longer side to at least :data:`MIN_SIDE`."""
    return max(1, math.ceil(MIN_SIDE / max(height, width)))


def enlarge(image: torch.Tensor, factor: int) -> torch.Tensor:
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1) if factor > 1 else image


def font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def to_uint8_image(picture) -> torch.Tensor:
    """A PIL image, an (H, W, 3) array or a (3, H, W) tensor as a uint8 (3, H, W) tensor."""
    if isinstance(picture, Image.Image):
        picture = np.array(picture.convert("RGB"))
    if isinstance(picture, np.ndarray):
        picture = torch.from_numpy(np.ascontiguousarray(picture)).permute(2, 0, 1)
    return picture.to(torch.uint8).cpu()


def draw_detections(image: torch.Tensor, boxes: torch.Tensor, captions: Sequence[str],
                    colors: Sequence[tuple[int, int, int]], masks: torch.Tensor | None = None) -> torch.Tensor:
    """Masks (boolean (N, H, W), half transparent) under boxes (XYXY, input pixels), each with its caption on a
    filled label of its colour (:func:`caption_places`: inside the picture, off the other labels where there is
    room; the first boxes, the best scoring, placed first)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    factor = enlargement(*image.shape[-2:])
    picture = enlarge(image, factor)
    if masks is not None and len(masks):
        picture = draw_segmentation_masks(picture, enlarge(masks, factor), alpha=0.45, colors=list(colors))
    if not len(boxes):
        return picture
    picture = draw_bounding_boxes(picture, boxes.float() * factor, colors=list(colors), width=2)
    canvas = Image.fromarray(picture.permute(1, 2, 0).numpy())
    draw, text_font = ImageDraw.Draw(canvas), font(13)
    sizes = [caption_size(text_font, caption) for caption in captions]
    places = caption_places((boxes.float() * factor).tolist(), sizes, canvas.width, canvas.height)
    for (x, y, x2, y2), caption, color in zip(places, captions, colors):
        draw.rectangle((x, y, x2 - 1, y2 - 1), fill=tuple(color))
        draw.text((x + CAPTION_PAD, y + CAPTION_PAD), caption, fill=text_color(color), font=text_font)
    return to_uint8_image(canvas)


CAPTION_PAD = 3  # pixels of label around a caption's text


def caption_size(text_font: ImageFont.ImageFont, caption: str) -> tuple[int, int]:
    """(width, height) of a caption's filled label."""
    left, top, right, bottom = text_font.getbbox(caption)
    return right + 2 * CAPTION_PAD, bottom + 2 * CAPTION_PAD


def text_color(background: Sequence[int]) -> tuple[int, int, int]:
    """Black on a light label, white on a dark one (ITU-R BT.601 luma)."""
    r, g, b = background[:3]
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 150 else (255, 255, 255)


def caption_places(boxes: Sequence[Sequence[float]], sizes: Sequence[tuple[int, int]], width: int, height: int
                   ) -> list[tuple[int, int, int, int]]:
    """Where each box's label goes, (x1, y1, x2, y2) in picture pixels, in order: the first of above the box, inside
    its top, below it, inside its bottom (each moved into the picture) that meets no label placed before; where all
    of them meet one, the one that covers the least of the others."""
    placed: list[tuple[int, int, int, int]] = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes):
        candidates = []
        for x, y in ((x1, y1 - h), (x1, y1), (x1, y2), (x1, y2 - h)):
            x, y = int(min(max(x, 0), max(width - w, 0))), int(min(max(y, 0), max(height - h, 0)))
            candidates.append((x, y, x + w, y + h))
        placed.append(min(candidates, key=lambda c: sum(_overlap(c, other) for other in placed)))  # first of the least
    return placed


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def draw_segmentation(image: torch.Tensor, label_map: torch.Tensor, names: Sequence[str],
                      shares: dict[int, float]) -> torch.Tensor:
    """The label map over the image (each class in its palette colour, half transparent), and a legend of the
    classes present with their share of the pixels, largest first."""
    from torchvision.utils import draw_segmentation_masks

    factor = enlargement(*image.shape[-2:])
    colors = palette(len(names))
    present = sorted(shares, key=lambda label: -shares[label])
    overlay = enlarge(image, factor)
    if present:
        masks = torch.stack([label_map == label for label in present])
        overlay = draw_segmentation_masks(overlay, enlarge(masks, factor), alpha=SEGMENTATION_ALPHA,
                                          colors=[colors[label] for label in present])
    rows = [(colors[label], f"{names[label]}  {100 * shares[label]:.1f}%") for label in present]
    return _with_panel(overlay, _legend(rows, overlay.shape[-2]))


def draw_top_k(image: torch.Tensor, entries: Sequence[tuple[str, float]], title: str = "") -> torch.Tensor:
    """The image beside a bar per class of the top-k (name, probability), most probable first."""
    picture = enlarge(image, enlargement(*image.shape[-2:]))
    return _with_panel(picture, _bars(entries, picture.shape[-2], title))


def frame_strip(frames: torch.Tensor, count: int = 8) -> torch.Tensor:
    """Up to ``count`` frames of a (T, 3, H, W) clip, evenly spaced, side by side with a 4-pixel gap."""
    indices = np.linspace(0, len(frames) - 1, num=min(count, len(frames))).round().astype(int)
    height, width = frames.shape[-2:]
    factor = max(1, math.ceil(MIN_SIDE / 2 / max(height, width)))
    tiles = [enlarge(frames[i], factor) for i in indices]
    gap = torch.full((3, tiles[0].shape[-2], 4), 255, dtype=torch.uint8)
    return torch.cat([t for tile in tiles for t in (tile, gap)][:-1], dim=-1)


TITLE_HEIGHT = 24  # the strip above each panel of :func:`side_by_side` that names it
PANEL_GAP = 8


def side_by_side(panels: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """Pictures in a row, each under its title (``("ground truth", ...), ("prediction", ...)``), tops aligned,
    :data:`PANEL_GAP` pixels apart; panel k's picture starts at row :data:`TITLE_HEIGHT` and column
    ``sum(width of the ones before) + k * PANEL_GAP``."""
    height = TITLE_HEIGHT + max(p.shape[-2] for _, p in panels)
    width = sum(p.shape[-1] for _, p in panels) + PANEL_GAP * (len(panels) - 1)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw, x = ImageDraw.Draw(canvas), 0
    for title, picture in panels:
        draw.text((x + 6, 4), title, fill=(20, 20, 20), font=font(15))
        canvas.paste(Image.fromarray(picture.permute(1, 2, 0).numpy()), (x, TITLE_HEIGHT))
        x += picture.shape[-1] + PANEL_GAP
    return to_uint8_image(canvas)


def stack_vertically(top: torch.Tensor, bottom: torch.Tensor) -> torch.Tensor:
    width = max(top.shape[-1], bottom.shape[-1])
    pad = [torch.nn.functional.pad(x, (0, width - x.shape[-1]), value=255) for x in (top, bottom)]
    return torch.cat(pad, dim=-2)


def save_picture(picture: torch.Tensor, path: str | Path) -> None:
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)


# ----------------------------------------------------------------------------------------------- panels
def _with_panel(picture: torch.Tensor, panel: Image.Image) -> torch.Tensor:
    height = max(picture.shape[-2], panel.height)
    canvas = Image.new("RGB", (picture.shape[-1] + panel.width, height), BACKGROUND)
    canvas.paste(Image.fromarray(picture.permute(1, 2, 0).numpy()), (0, 0))
    canvas.paste(panel, (picture.shape[-1], 0))
    return to_uint8_image(canvas)


def _legend(rows: Sequence[tuple[tuple[int, int, int], str]], height: int) -> Image.Image:
    line = 22
    panel = Image.new("RGB", (PANEL_WIDTH, max(height, 16 + line * len(rows))), BACKGROUND)
    draw, text_font = ImageDraw.Draw(panel), font(14)
    for i, (color, text) in enumerate(rows):
        y = 8 + i * line
        draw.rectangle((10, y + 2, 26, y + 16), fill=color, outline=(60, 60, 60))
        draw.text((34, y), text, fill=(20, 20, 20), font=text_font)
    return panel


def _bars(entries: Sequence[tuple[str, float]], height: int, title: str) -> Image.Image:
    line, top = 34, 34 if title else 8
    panel = Image.new("RGB", (PANEL_WIDTH, max(height, top + line * len(entries) + 8)), BACKGROUND)
    draw, text_font = ImageDraw.Draw(panel), font(14)
    if title:
        draw.text((10, 8), title, fill=(20, 20, 20), font=font(15))
    colors = palette(1)
    for i, (name, score) in enumerate(entries):
        y = top + i * line
        draw.text((10, y), f"{name}  {100 * score:.1f}%", fill=(20, 20, 20), font=text_font)
        draw.rectangle((10, y + 18, 10 + max(1, round(score * (PANEL_WIDTH - 20))), y + 28), fill=colors[0])
    return panel
