"""Kinetics-400 / -600 and Something-Something v2 on disk: class folders, list files or the SSv2 release's JSON
files; clips decoded with PyAV, multi-view testing.

Layouts (``data.root``):

* class folders ``root/{train,val}/<class>/*.mp4`` (classes indexed in sorted order of train/);
* a list file per split (``data.train_list`` / ``data.val_list``, relative to root), one
  ``path label`` line per video with paths relative to root, as the common Kinetics
  releases ship (mmaction2's ``kinetics400_{train,val}_list_videos.txt``).

A training sample is one clip (``clip_len`` frames ``frame_interval`` apart at a random
offset), short side resized to ``train_short_side``, a random resized crop of ``crop_size``
(or, with ``crop_scales``, mmaction2's ``MultiScaleCrop`` at fixed corners and centre, the I3D
configs' crop) and a horizontal flip: (C, T, H, W). A validation sample is every view of a video,
``num_test_clips`` clips spread evenly times ``num_test_crops`` crops of ``eval_crop_size``
(3: both ends and the middle of the long side) after resizing the short side to
``eval_short_side``: (views, C, T, H, W). The task averages the views' softmax.

Something-Something v2 (:class:`SomethingSomethingV2DataModule`) takes its labels from the release's templates and,
with ``frame_uniform``, samples one frame per segment of the whole video (Video Swin's SSv2 sampling).

Real Kinetics downloads contain broken, truncated and undecodable files: with
``skip_corrupt`` (default) each one is skipped with a warning naming it and counted
(``train/skipped_samples``, ``val/skipped_samples``: :mod:`vtrain.data.datamodule`), and the run goes on.
"""
from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from timm.data.random_erasing import RandomErasing
from vtrain.tasks.video.clips import VideoReader, test_clip_indices, train_clip_indices, uniform_clip_indices

from vtrain.config import ConfigError
from vtrain.data.datamodule import (
    DataModule,
    LabelledFileDataset,
    PredictionInputs,
    Samples,
    check_class_folders,
    class_folder_samples,
    list_classes,
)

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")
FOLDERS = "root/train/<class>/*.mp4 and root/val/<class>/*.mp4"


def read_list_file(root: Path, list_file: Path) -> Samples:
    """``path label`` lines (path relative to root, may contain spaces); blank lines ignored."""
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"{list_file}:{number}: {line.strip()!r} is not a 'path label' line")
        samples.append((str(root / parts[0]), int(parts[1])))
    return samples


class VideoClipDataset(LabelledFileDataset):
    """Videos -> clips. Training: one clip (C, T, H, W); evaluation: all views (V, C, T, H, W).
    An unreadable video is named in an error, or, with ``skip_corrupt``, warned about and returned as None."""

    kind = "video"

    def __init__(self, samples: Samples, transform, clip_len: int, frame_interval: int, short_side: int,
                 num_clips: int | None = None, skip_corrupt: bool = True, frame_uniform: bool = False):
        super().__init__(samples, skip_corrupt)
        self.transform = transform
        self.clip_len, self.frame_interval, self.short_side = clip_len, frame_interval, short_side
        self.num_clips = num_clips  # None: one random training clip
        self.frame_uniform = frame_uniform  # one frame per segment of the whole video (clips.uniform_clip_indices)

    def frame_indices(self, num_frames: int) -> np.ndarray:
        rng = None
        if self.num_clips is None:
            # torch's generator is seeded per sample by the training loader (vtrain.data.datamodule.SeededDataset)
            rng = np.random.default_rng(int(torch.randint(0, 2**31 - 1, ())))
        if self.frame_uniform:
            return uniform_clip_indices(num_frames, self.clip_len, rng)[None]
        if rng is not None:
            return train_clip_indices(num_frames, self.clip_len, self.frame_interval, rng)[None]
        return test_clip_indices(num_frames, self.clip_len, self.frame_interval, self.num_clips)

    def load(self, path: str) -> torch.Tensor:
        return self.clips(path)

    def frames(self, path: str) -> tuple[np.ndarray, np.ndarray]:
        """The sampled frame indices (clips, T) and their frames (clips * T, H, W, 3)."""
        with VideoReader(path) as video:
            indices = self.frame_indices(video.num_frames)
            return indices, video.read(indices.reshape(-1), self.short_side)

    def clips(self, path: str) -> torch.Tensor:
        """The sampled clips of one video, uint8 (clips, T, 3, H, W)."""
        indices, frames = self.frames(path)
        # (clips * T, H, W, 3) -> clips of (T, 3, H, W)
        return torch.from_numpy(frames).permute(0, 3, 1, 2).unflatten(0, (len(indices), self.clip_len))

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        path, label = self.samples[i]
        clips = self.read(path)
        if clips is None:
            return None
        return {"clips": self.transform(clips), "label": label}


def collate_clips(batch: list[dict]) -> dict[str, Any]:
    """Stack the samples (the readable ones: :class:`vtrain.data.datamodule.ReadableCollate` leaves out the others)."""
    return {
        "clips": torch.stack([b["clips"] for b in batch]),
        "labels": torch.tensor([b["label"] for b in batch], dtype=torch.long),
    }


class Normalize:
    """uint8 (T, 3, H, W) -> normalised float (3, T, H, W); ``mean`` and ``std`` on 0-1 pixels, as in every task
    (mmaction2's Kinetics configs write ImageNet's times 255: 123.675, ...)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float64).mul(255).float().view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).mul(255).float().view(1, 3, 1, 1)

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        return ((clip.float() - self.mean) / self.std).transpose(0, 1).contiguous()


IMAGENET = Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class MultiScaleCrop:
    """mmaction2's ``MultiScaleCrop`` with ``random_crop=False`` and its five fixed crops, then its
    ``Resize(scale=(size, size), keep_ratio=False)``, on a whole clip (T, 3, H, W) -> (T, 3, size, size).

    The crop's sides are ``int(min(H, W) * s)`` for ``s`` in ``scales``, width and height at most
    ``max_wh_scale_gap`` entries of ``scales`` apart (the I3D configs: ``scales=(1, 0.8)``, gap 0: squares of the
    short side or 0.8 of it); a side within 2 pixels of ``size`` becomes ``size``. It is placed at one of the four
    corners or the centre of a grid of quarter steps (``(W - w) // 4``, ``(H - h) // 4``), each with
    probability 1/5, and resized bilinearly without antialiasing (mmcv's ``imresize``, cv2's INTER_LINEAR).
    Draws use python's ``random``, as mmaction2's (seeded per sample by the training loader).
    """

    def __init__(self, size: int, scales: Sequence[float], max_wh_scale_gap: int = 0):
        self.size, self.scales, self.max_wh_scale_gap = int(size), tuple(float(s) for s in scales), int(max_wh_scale_gap)

    def crop_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """The candidate (width, height) of a crop."""
        sides = [int(min(height, width) * s) for s in self.scales]
        out = []
        for i, h in enumerate(sides):
            for j, w in enumerate(sides):
                if abs(i - j) <= self.max_wh_scale_gap:
                    out.append(tuple(self.size if abs(v - self.size) < 3 else v for v in (w, h)))
        return out

    @staticmethod
    def offsets(height: int, width: int, crop_w: int, crop_h: int) -> list[tuple[int, int]]:
        """The candidate (x, y) of a crop's top-left corner: upper left, upper right, lower left, lower right,
        centre."""
        w_step, h_step = (width - crop_w) // 4, (height - crop_h) // 4
        return [(0, 0), (4 * w_step, 0), (0, 4 * h_step), (4 * w_step, 4 * h_step), (2 * w_step, 2 * h_step)]

    def __call__(self, clip: torch.Tensor) -> torch.Tensor:
        height, width = clip.shape[-2:]
        crop_w, crop_h = random.choice(self.crop_sizes(height, width))
        x, y = random.choice(self.offsets(height, width, crop_w, crop_h))
        cropped = clip[..., y:y + crop_h, x:x + crop_w]
        resized = v2.functional.resize(cropped.as_subclass(torch.Tensor), [self.size, self.size], antialias=False)
        return tv_tensors.wrap(resized, like=clip) if isinstance(clip, tv_tensors.Video) else resized


class TrainClipTransform:
    """A crop and a horizontal flip, the same for every frame of the clip: mmaction2's ``RandomResizedCrop`` (or,
    with ``crop_scales``, its :class:`MultiScaleCrop`) + ``Flip``: (1, T, 3, H, W) uint8 -> (3, T, crop, crop)
    float. Optionally (Video Swin's Something-Something v2 pipeline) RandAugment before the normalisation and
    random erasing after it, each the same on every frame.

    ``rand_augment``: ``{num_ops, magnitude}``, torchvision's ``RandAugment`` on the whole clip. Departure: the
    official pipeline runs imgaug's ``RandAugment(n, m)``, whose operations and magnitude scale differ; imgaug is
    unmaintained and not a dependency here. ``random_erasing``: the probability of timm's ``RandomErasing``
    (its defaults, mode 'const': zeros after normalising), as the official ``RandomErasing`` wraps it, replaying
    one draw on every frame: one rectangle through the whole clip.
    """

    def __init__(self, crop_size: int, scale: Sequence[float], hflip: float, crop_scales: Sequence[float] | None = None,
                 normalize: Normalize = IMAGENET, rand_augment: Mapping[str, int] | None = None,
                 random_erasing: float = 0.0):
        crop = (MultiScaleCrop(crop_size, crop_scales) if crop_scales
                else v2.RandomResizedCrop(crop_size, scale=tuple(scale), antialias=True))
        steps = [crop, v2.RandomHorizontalFlip(hflip)]
        if rand_augment:
            steps.append(v2.RandAugment(num_ops=int(rand_augment["num_ops"]), magnitude=int(rand_augment["magnitude"])))
        self.augment = v2.Compose(steps)
        self.normalize = normalize
        self.erase = RandomErasing(probability=random_erasing, device="cpu") if random_erasing > 0 else None

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        clip = self.normalize(self.augment(tv_tensors.Video(clips[0])).as_subclass(torch.Tensor))
        if self.erase is not None:  # (3, T, H, W) as one (3T, H, W) image: the same rectangle in every frame
            clip = self.erase(clip.flatten(0, 1)).view_as(clip)
        return clip


class TestViewsTransform:
    """Every clip times ``num_crops`` crops (1: centre; 3: both ends and the middle of the long side, mmaction2's
    ``ThreeCrop``): (clips, T, 3, H, W) uint8 -> (clips * crops, 3, T, crop, crop) float, clip-major."""

    def __init__(self, crop_size: int, num_crops: int, normalize: Normalize = IMAGENET):
        if num_crops not in (1, 3):
            raise ConfigError(f"data.num_test_crops={num_crops}: use 1 (centre) or 3 (three crops)")
        self.crop_size, self.num_crops, self.normalize = crop_size, num_crops, normalize

    def crop_offsets(self, height: int, width: int) -> list[tuple[int, int]]:
        c = self.crop_size
        top, left = max(height - c, 0), max(width - c, 0)
        if self.num_crops == 1:
            return [(top // 2, left // 2)]
        if width >= height:
            return [(top // 2, 0), (top // 2, left // 2), (top // 2, left)]
        return [(0, left // 2), (top // 2, left // 2), (top, left // 2)]

    def __call__(self, clips: torch.Tensor) -> torch.Tensor:
        height, width = clips.shape[-2:]
        if min(height, width) < self.crop_size:
            raise ConfigError(f"eval crops of {self.crop_size} from {height}x{width} frames: data.eval_short_side must be >= data.eval_crop_size")
        c = self.crop_size
        views = [self.normalize(clip[..., y:y + c, x:x + c]) for clip in clips for y, x in self.crop_offsets(height, width)]
        return torch.stack(views)


class KineticsDataModule(DataModule):
    """Kinetics-400 clips (module doc).

    Args:
        train_list, val_list: list files (relative to ``root``), both or neither (class folders).
        clip_len, frame_interval: frames per clip and the stride between them.
        num_test_clips, num_test_crops: validation views of a video, clips times crops (1 or 3).
        train_short_side, crop_size, scale, hflip: training resize, random resized crop and flip probability.
        crop_scales: mmaction2's ``MultiScaleCrop`` with these scales of the short side (:class:`MultiScaleCrop`,
            the I3D configs' ``(1, 0.8)``) instead of the random resized crop; None: the random resized crop.
        eval_short_side, eval_crop_size: validation resize and crop.
        frame_uniform: sample one frame from each of ``clip_len`` equal segments of the whole video (Video Swin's
            Something-Something v2 sampling, :func:`clips.uniform_clip_indices`; ``frame_interval`` unused, one test
            clip) instead of ``clip_len`` frames ``frame_interval`` apart.
        rand_augment, random_erasing: training augmentations after the crop (:class:`TrainClipTransform`); None / 0:
            none.
        mean, std: normalisation, on 0-1 pixels (the configs read ``conf/preprocessing/``).
        batch_size: training clips per device.
        val_batch_size: validation videos per device (each is ``num_test_clips * num_test_crops`` views).
        **loading: the other :class:`vtrain.data.datamodule.DataModule` arguments (``seed``, ``skip_corrupt``, ...).
    """

    collate_fn = staticmethod(collate_clips)
    input_extensions = VIDEO_EXTENSIONS

    def __init__(
        self,
        root: str,
        num_classes: int,
        train_list: str | None = None,
        val_list: str | None = None,
        clip_len: int = 32,
        frame_interval: int = 2,
        num_test_clips: int = 4,
        num_test_crops: int = 3,
        train_short_side: int = 256,
        crop_size: int = 224,
        scale: Sequence[float] = (0.08, 1.0),
        hflip: float = 0.5,
        crop_scales: Sequence[float] | None = None,
        eval_short_side: int = 224,
        eval_crop_size: int = 224,
        frame_uniform: bool = False,
        rand_augment: Mapping[str, int] | None = None,
        random_erasing: float = 0.0,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        batch_size: int = 8,
        val_batch_size: int = 1,
        num_workers: int = 8,
        **loading: Any,
    ):
        super().__init__(root, num_classes, batch_size=batch_size, val_batch_size=val_batch_size,
                         num_workers=num_workers, **loading)
        self.train_list, self.val_list = train_list, val_list
        self.clip_len, self.frame_interval = clip_len, frame_interval
        self.num_test_clips, self.num_test_crops = num_test_clips, num_test_crops
        self.train_short_side, self.crop_size, self.scale, self.hflip = train_short_side, crop_size, scale, hflip
        self.crop_scales = crop_scales
        self.eval_short_side, self.eval_crop_size = eval_short_side, eval_crop_size
        self.frame_uniform, self.rand_augment, self.random_erasing = frame_uniform, rand_augment, random_erasing
        self.mean, self.std = list(mean), list(std)
        self.normalize = Normalize(mean, std)
        self.classes: list[str] = []

    @property
    def num_views(self) -> int:
        return self.num_test_clips * self.num_test_crops

    # ------------------------------------------------------------------ checks before anything starts
    def check(self) -> None:
        """Fail in one line when ``root`` is missing or laid out in neither supported way."""
        self._check_sampling()
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} does not exist: pass the Kinetics folder ({FOLDERS}, or list files)")
        if (self.train_list is None) != (self.val_list is None):
            raise ConfigError("set both data.train_list and data.val_list (list-file layout) or neither (class folders)")
        if self.train_list is not None:
            self._check_lists()
        else:
            self._check_folders()

    def _check_sampling(self) -> None:
        if self.frame_uniform and self.num_test_clips != 1:
            raise ConfigError(f"data.num_test_clips={self.num_test_clips} with data.frame_uniform=true: uniform "
                              "sampling spans the whole video in one clip; set data.num_test_clips=1")

    def _check_lists(self) -> None:
        for option, name in (("train_list", self.train_list), ("val_list", self.val_list)):
            path = self.root / name
            if not path.is_file():
                raise ConfigError(f"data.{option}={name}: no file {path}; expected a 'path label' line per video")
            samples = read_list_file(self.root, path)
            if not samples:
                raise ConfigError(f"data.{option}={name}: {path} lists no video")
            if not Path(samples[0][0]).is_file():
                raise ConfigError(f"data.{option}={name}: its first video {samples[0][0]} does not exist; "
                                  f"paths in list files are relative to data.root={self.root}")
            labels = [label for _, label in samples]
            if min(labels) < 0 or max(labels) >= self.num_classes:
                raise ConfigError(f"data.{option}={name} has labels {min(labels)}..{max(labels)} but "
                                  f"data.num_classes={self.num_classes}: set data.num_classes={max(labels) + 1}")

    def _check_folders(self) -> None:
        check_class_folders(self.root, self.num_classes, VIDEO_EXTENSIONS, "video",
                            f"{FOLDERS}, or data.train_list/val_list")

    # ------------------------------------------------------------------ datasets
    def samples(self, split: str) -> Samples:
        if self.train_list is not None:
            return read_list_file(self.root, self.root / (self.train_list if split == "train" else self.val_list))
        self.classes = list_classes(self.root / "train")
        return class_folder_samples(self.root / split, self.classes, VIDEO_EXTENSIONS)

    # ------------------------------------------------------------------ classes and predictions
    @property
    def class_names(self) -> list[str]:
        """The class folders' names (Kinetics' labels), or with list files the lines of ``root/classes.txt``
        (one name per label, as the synthetic data and mmaction2's label maps write them), else ``class_<label>``."""
        if self.train_list is None and (self.root / "train").is_dir():
            return list_classes(self.root / "train")
        listed = self.root / "classes.txt"
        names = [line.strip() for line in listed.read_text().splitlines() if line.strip()] if listed.is_file() else []
        return names if len(names) == self.num_classes else super().class_names

    def eval_set(self, samples: Samples) -> VideoClipDataset:
        """Every view of each video, as validation scores it."""
        return VideoClipDataset(
            samples, TestViewsTransform(self.eval_crop_size, self.num_test_crops, self.normalize), self.clip_len,
            self.frame_interval,
            self.eval_short_side, num_clips=self.num_test_clips, skip_corrupt=self.skip_corrupt,
            frame_uniform=self.frame_uniform,
        )

    def preprocessing(self) -> dict[str, Any]:
        """timm's keys for validation's views: the short side resized to ``eval_short_side`` (FFmpeg's bilinear
        swscale, :mod:`clips`), ``num_test_crops`` crops of ``eval_crop_size`` (1: the centre, 3: mmaction2's
        ``ThreeCrop``) of ``num_test_clips`` clips; the softmax of the views averaged."""
        return {"mean": list(self.mean), "std": list(self.std),
                "input_size": [3, self.clip_len, self.eval_crop_size, self.eval_crop_size],
                "interpolation": "bilinear", "crop_pct": self.eval_crop_size / self.eval_short_side,
                "crop_mode": "center" if self.num_test_crops == 1 else "three_crop",
                "frame_interval": self.frame_interval, "num_test_clips": self.num_test_clips,
                "num_test_crops": self.num_test_crops}

    def predict_set(self, paths: list[str]) -> PredictionInputs:
        videos = self.eval_set([])
        return PredictionInputs(paths, videos.clips, videos.transform)

    def example_files(self, count: int) -> list[str]:
        return [path for path, _ in self.validation_set().samples[:count]]

    def example_truths(self, count: int) -> list[int]:
        return [label for _, label in self.validation_set().samples[:count]]

    def build_sets(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = VideoClipDataset(
                self.samples("train"),
                TrainClipTransform(self.crop_size, self.scale, self.hflip, self.crop_scales, self.normalize,
                                   self.rand_augment, self.random_erasing),
                self.clip_len, self.frame_interval, self.train_short_side, skip_corrupt=self.skip_corrupt,
                frame_uniform=self.frame_uniform,
            )
        self.val_set = self.eval_set(self.samples("val"))


# ---------------------------------------------------------------------------------------------- Something-Something v2
SSV2_FOLDERS = ("root/20bn-something-something-v2/<id>.webm and root/annotations/something-something-v2-"
                "{labels,train,validation}.json")


def ssv2_template_labels(labels_file: Path) -> dict[str, int]:
    """The release's labels file: ``{template without brackets: "index"}`` (174 templates) -> {template: index}."""
    try:
        mapping = json.loads(labels_file.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{labels_file}: not a readable JSON labels file ({e}); expected the release's "
                          "{template: index} mapping") from e
    return {template: int(index) for template, index in mapping.items()}


def read_ssv2_annotations(videos: Path, annotation_file: Path, labels: Mapping[str, int]) -> Samples:
    """A split file (a JSON list of ``{id, label, template, placeholders}``) -> ``(videos/<id>.webm, label)``; the
    label is the template's index once its brackets are removed ("Pushing [something] from left to right" ->
    "Pushing something from left to right"), as mmaction2's ``parse_sthv2_splits``."""
    samples = []
    for item in json.loads(annotation_file.read_text()):
        template = item["template"].replace("[", "").replace("]", "")
        if template not in labels:
            raise ConfigError(f"{annotation_file}: video {item['id']}'s template {template!r} is not in the labels "
                              "file: data.labels_file must be the labels of the same release")
        samples.append((str(videos / f"{item['id']}.webm"), labels[template]))
    return samples


class SomethingSomethingV2DataModule(KineticsDataModule):
    """Something-Something v2 in its release's layout (``SSV2_FOLDERS``; mmaction2's tools/data/sthv2 keeps it):
    the videos ``<id>.webm`` in one folder, a JSON file per split whose ``template`` names the class, and the labels
    file mapping each template (brackets removed) to its index. Sampling and views are
    :class:`KineticsDataModule`'s options (``conf/data/ssv2.yaml``: Video Swin's).

    Args:
        videos_dir, labels_file, train_file, val_file: paths relative to ``root`` (the release's names by default;
            the later release's ``labels/labels.json``, ``labels/train.json``, ``labels/validation.json`` work
            too).
        **options: :class:`KineticsDataModule`'s.
    """

    def __init__(self, root: str, num_classes: int = 174, videos_dir: str = "20bn-something-something-v2",
                 labels_file: str = "annotations/something-something-v2-labels.json",
                 train_file: str = "annotations/something-something-v2-train.json",
                 val_file: str = "annotations/something-something-v2-validation.json", **options: Any):
        super().__init__(root, num_classes, **options)
        self.videos_dir, self.labels_file, self.train_file, self.val_file = videos_dir, labels_file, train_file, val_file

    def check(self) -> None:
        self._check_sampling()
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} does not exist: pass the Something-Something v2 folder ({SSV2_FOLDERS})")
        for option in ("labels_file", "train_file", "val_file"):
            if not (self.root / getattr(self, option)).is_file():
                raise ConfigError(f"data.{option}={getattr(self, option)}: no file under data.root={self.root} "
                                  f"(expected {SSV2_FOLDERS})")
        labels = self.labels()
        if len(labels) != self.num_classes:
            raise ConfigError(f"data.labels_file has {len(labels)} templates but data.num_classes={self.num_classes}: "
                              f"set data.num_classes={len(labels)}")
        for option in ("train_file", "val_file"):
            samples = self.samples("train" if option == "train_file" else "val")
            if not samples:
                raise ConfigError(f"data.{option}={getattr(self, option)} lists no video")
            if not Path(samples[0][0]).is_file():
                raise ConfigError(f"data.{option}: its first video {samples[0][0]} does not exist; videos are "
                                  f"data.root/data.videos_dir/<id>.webm (data.videos_dir={self.videos_dir})")

    def labels(self) -> dict[str, int]:
        return ssv2_template_labels(self.root / self.labels_file)

    def samples(self, split: str) -> Samples:
        annotations = self.root / (self.train_file if split == "train" else self.val_file)
        return read_ssv2_annotations(self.root / self.videos_dir, annotations, self.labels())

    @property
    def class_names(self) -> list[str]:
        """The templates (brackets removed), by label."""
        labels = self.labels() if (self.root / self.labels_file).is_file() else {}
        names = sorted(labels, key=labels.get)
        return names if len(names) == self.num_classes else DataModule.class_names.fget(self)
