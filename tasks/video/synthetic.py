"""A small Kinetics-layout dataset whose class is a motion, not an appearance.

Each video is one shape (random kind, colour, rotation) on a random, darker, static textured
background, moving left, right, up or down at constant speed, or growing or shrinking.
Each class is the time reversal of another (left/right, up/down, grow/shrink), and the
start positions and sizes are drawn so that a class and its reversal show the same
distribution of single frames: a model that sees frames without their order (TSN-style
averaging of per-frame features) cannot tell the two apart, so it is capped at 50%
(chance 16.7%), while a temporal model can reach 100%.

Written as class folders ``root/{train,val}/<class>/*.mp4`` (the Kinetics layout) and as
list files ``root/{train,val}_list.txt`` with ``path label`` lines, paths relative to root;
or (:func:`write_ssv2`) in the Something-Something v2 release's layout, each motion a template.
Deterministic by seed: the same call writes byte-identical files.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import av
import numpy as np
from PIL import Image

from vtrain.data.synthetic import (
    COLORS,
    SHAPES,
    background,
    draw_polygon,
    shape_polygon,
)

MOTIONS = ("move_left", "move_right", "move_up", "move_down", "grow", "shrink")


def encoder() -> str:
    """H.264 when PyAV's FFmpeg has it (the codec of Kinetics downloads), else MPEG-4 part 2."""
    return "libx264" if "libx264" in av.codecs_available else "mpeg4"


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: int = 10) -> None:
    """RGB uint8 (H, W, 3) frames -> an mp4, or a VP9 webm where ``path`` ends in .webm (the codec of the
    Something-Something v2 release); yuv420p, so H and W must be even."""
    height, width = frames[0].shape[:2]
    webm = str(path).endswith(".webm")
    # Matroska writes a random segment UID unless asked to be bit-exact
    with av.open(str(path), "w", options={"fflags": "+bitexact"} if webm else None) as container:
        codec = "libvpx-vp9" if webm else encoder()
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        # lossless H.264 (qp 0) or VP9: small motions survive, and the files are byte-identical run to run.
        # A lossy x264 rate (crf 14, even single-threaded) decoded to frames differing by up to 13 grey
        # levels between two writes of the same frames, enough to move the quickstart's top-1 by 0.3.
        stream.options = ({"lossless": "1", "threads": "1", "deadline": "realtime", "cpu-used": "8"} if webm
                          else {"qp": "0", "threads": "1"} if codec == "libx264" else {"qscale": "2"})
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def motion_frames(motion: str, rng: np.random.Generator, size: int, num_frames: int) -> list[np.ndarray]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS.values())[rng.integers(len(COLORS))]
    angle = rng.uniform(0, np.pi)
    # the shared texture, darkened: every shape is brighter than its background, so a motion has one
    # contrast polarity (an edge detector need not learn both) and a small model learns it in a few epochs
    texture = np.asarray(background(rng, size, size), dtype=np.float32)
    scene = Image.fromarray((0.4 * texture).astype(np.uint8))
    t = np.linspace(0.0, 1.0, num_frames)
    if motion in ("grow", "shrink"):
        small, large = rng.uniform(0.10, 0.15) * size, rng.uniform(0.28, 0.34) * size
        radius = small + (large - small) * (t if motion == "grow" else 1 - t)
        cx, cy = rng.uniform(large, size - large, size=2)
        centres = [(cx, cy)] * num_frames
    else:
        r = rng.uniform(0.10, 0.15) * size
        travel = 0.65 * size
        start = rng.uniform(r, size - r - travel)  # the path [start, start + travel] has the same law for both directions
        forward = motion in ("move_right", "move_down")
        along = start + travel * (t if forward else 1 - t)
        across = rng.uniform(r, size - r)
        centres = [(a, across) if motion in ("move_left", "move_right") else (across, a) for a in along]
        radius = np.full(num_frames, r)
    frames = []
    for (cx, cy), rad in zip(centres, radius):
        image = scene.copy()
        draw_polygon(image, shape_polygon(shape, cx, cy, rad, angle), color)
        frames.append(np.asarray(image))
    return frames




def write(root: str | Path, seed: int = 0, num_classes: int = 6, train_per_class: int = 80, val_per_class: int = 20,
          size: int = 32, min_frames: int = 8, max_frames: int = 10) -> dict:
    if not 1 <= num_classes <= len(MOTIONS):
        raise ValueError(f"num_classes must be 1..{len(MOTIONS)}")
    if size % 2:
        raise ValueError("size must be even (yuv420p)")
    root = Path(root)
    rng = np.random.default_rng(seed)
    classes = sorted(MOTIONS[:num_classes])  # labels in folder-name order, as the class-folder layout reads them
    counts = {}
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        lines = []
        for label, motion in enumerate(classes):
            folder = root / split / motion
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                num_frames = int(rng.integers(min_frames, max_frames + 1))
                path = folder / f"{motion}_{k:05d}.mp4"
                write_video(path, motion_frames(motion, rng, size, num_frames))
                lines.append(f"{path.relative_to(root).as_posix()} {label}\n")
        (root / f"{split}_list.txt").write_text("".join(lines))
        counts[split] = per_class * num_classes
    (root / "classes.txt").write_text("".join(f"{m}\n" for m in classes))
    return {"root": str(root), "classes": num_classes, "codec": encoder(), **counts}


# Something-Something v2 templates (with their [something] placeholder) naming the synthetic motions
SSV2_TEMPLATES = {"move_left": "Pushing [something] from right to left",
                  "move_right": "Pushing [something] from left to right",
                  "move_up": "Moving [something] up", "move_down": "Moving [something] down",
                  "grow": "Moving [something] closer to the camera", "shrink": "Moving [something] away from the camera"}


def write_ssv2(root: str | Path, seed: int = 0, num_classes: int = 6, train_per_class: int = 80,
               val_per_class: int = 20, size: int = 32, min_frames: int = 8, max_frames: int = 10) -> dict:
    """The motions in the Something-Something v2 release's layout: ``20bn-something-something-v2/<id>.webm``,
    ``annotations/something-something-v2-{train,validation}.json`` (``id``, ``label``, ``template``,
    ``placeholders``) and ``annotations/something-something-v2-labels.json`` ({template without brackets:
    "index"}, templates indexed in sorted order as the release's)."""
    if not 1 <= num_classes <= len(MOTIONS):
        raise ValueError(f"num_classes must be 1..{len(MOTIONS)}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    motions = MOTIONS[:num_classes]
    templates = {m: SSV2_TEMPLATES[m].replace("[", "").replace("]", "") for m in motions}
    labels = {t: str(i) for i, t in enumerate(sorted(templates.values()))}
    (root / "20bn-something-something-v2").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    video_id, counts = 0, {}
    for split, per_class, name in (("train", train_per_class, "train"), ("val", val_per_class, "validation")):
        items = []
        for k in range(per_class):
            for motion in motions:
                video_id += 1
                num_frames = int(rng.integers(min_frames, max_frames + 1))
                write_video(root / "20bn-something-something-v2" / f"{video_id}.webm",
                            motion_frames(motion, rng, size, num_frames))
                items.append({"id": str(video_id), "label": templates[motion].replace("something", "a shape"),
                              "template": SSV2_TEMPLATES[motion], "placeholders": ["a shape"]})
        (root / "annotations" / f"something-something-v2-{name}.json").write_text(json.dumps(items, indent=1))
        counts[split] = per_class * num_classes
    (root / "annotations" / "something-something-v2-labels.json").write_text(json.dumps(labels, indent=1))
    return {"root": str(root), "classes": num_classes, "codec": "libvpx-vp9", **counts}


# the layouts written: `scripts/make_synthetic.py kinetics|ssv2`, an experiment's `synthetic` key
WRITERS = {"kinetics": write, "ssv2": write_ssv2}
