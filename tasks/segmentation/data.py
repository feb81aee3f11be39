"""Semantic segmentation datasets in mmsegmentation's layouts, and mmseg's training pipeline.

One data module reads every layout; its options are mmseg ``CustomDataset``'s (:class:`Layout`): per split an
image folder and an annotation folder under ``root``, searched recursively, the image and annotation of one sample
sharing the name before their suffixes (``img_suffix``, ``seg_map_suffix``), optionally only the names a split file
lists (``split``). ``conf/data/`` holds each dataset's values:

* ADE20K (``ade20k.yaml``): ``images/{training,validation}/*.jpg`` with ``annotations/.../*.png``; 150 classes,
  annotation 0 = "other";
* Cityscapes (``cityscapes.yaml``): ``leftImg8bit/{train,val}/<city>/*_leftImg8bit.png`` with
  ``gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`` (19 train ids, 255 = ignore; cityscapesscripts'
  ``createTrainIdLabelImgs`` writes them; ``label_map: cityscapes_label_ids`` reads ``*_gtFine_labelIds.png``
  instead, mapped by the official table);
* PASCAL-Context 59 (``pascal_context_59.yaml``): ``JPEGImages/*.jpg`` with ``SegmentationClassContext/*.png``,
  the names of ``ImageSets/SegmentationContext/{train,val}.txt``; annotation 0 = background, 1..59 the classes.

An annotation is a single-channel PNG of class indices. The label reduction (mmseg ``reduce_zero_label``: ADE20K,
PASCAL-Context 59) makes 0 the ignore index 255 and shifts the rest down by one.

Training sample (mmseg ``configs/_base_/datasets/{ade20k,cityscapes,pascal_context_59}.py``), in this order:
resize keeping the aspect ratio into ``img_scale`` (ADE20K (2048, 512), Cityscapes (2048, 1024), PASCAL-Context
(520, 520)) times a ratio drawn from [0.5, 2.0] -> random ``crop_size`` crop in which no class covers 75 % or
more of the labelled pixels (10 tries) -> horizontal flip (p = 0.5) -> photometric distortion -> normalise -> pad
to ``crop_size`` (image 0, label 255). Validation sample: the image at its original size, normalised, and its
label; the task's inference resizes it (``img_scale``) and resizes the logits back, so the metric sees
original-size labels.

An image or annotation file that cannot be read is skipped and counted, or named in an error
(``data.skip_corrupt``: :mod:`vtrain.data.datamodule`); a 16-bit image is read as 8 bits (:func:`vtrain.data.datamodule.read_rgb`).
Bad input is named before or when it is read: an image without its annotation or the reverse
(``check``; or leave them out with ``skip_unpaired=true``, the count is logged), a name of the split file without
its files, an annotation whose size differs from its image's, an annotation that is not single-channel, and label
values above ``num_classes`` that are not 255 (or map them to ignore with ``ignore_invalid_labels=true``; each file
and its count is logged).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from vtrain.tasks.segmentation.inference import rescale_size

from vtrain.config import ConfigError
from vtrain.data.datamodule import (
    DataFileError,
    DataModule,
    DatasetInfo,
    PredictionInputs,
    read_names_file,
    read_or_skip,
    read_rgb,
)
from vtrain.training.lightning_internals import unrepeated_sampler

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
IGNORE_INDEX = 255


@dataclass(frozen=True)
class Layout:
    """Where the files of a split are (mmseg ``CustomDataset``'s ``img_dir``, ``ann_dir``, ``img_suffix``,
    ``seg_map_suffix``, ``split``), each folder and file relative to the dataset root.

    A sample is the image ``img_dir[split]/<name><img_suffix>`` and the annotation
    ``ann_dir[split]/<name><seg_map_suffix>``, ``<name>`` a path below the folder (Cityscapes: ``<city>/<frame>``);
    with ``split`` files, only the names they list (one a line, as mmseg reads them), else every image found.
    """

    img_dir: Mapping[str, str]
    ann_dir: Mapping[str, str]
    img_suffix: tuple[str, ...] = (".jpg",)
    seg_map_suffix: str = ".png"
    split: Mapping[str, str] | None = None

    def describe(self) -> str:
        images = f"root/{self.img_dir['train']}/**/*{self.img_suffix[0]}"
        labels = f"root/{self.ann_dir['train']}/**/*{self.seg_map_suffix}"
        listed = f", the names of root/{self.split['train']}" if self.split else ""
        return f"{images} with {labels}{listed} (and the same for val)"


# ADE20KDataset: img_suffix '.jpg' (.jpeg and .png images are read too), seg_map_suffix '.png'.
ADE20K_LAYOUT = Layout(
    img_dir={"train": "images/training", "val": "images/validation"},
    ann_dir={"train": "annotations/training", "val": "annotations/validation"},
    img_suffix=(".jpg", ".jpeg", ".png"),
)

# mmseg ADE20KDataset.METAINFO["classes"]: the order of ADE20K's objectInfo150 (label 1 .. 150).
ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)



# mmseg CityscapesDataset.CLASSES: train ids 0..18 (cityscapesscripts helpers/labels.py, the labels whose trainId
# is not 255).
CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
# cityscapesscripts helpers/labels.py: the label id of train id 0, 1, ..., 18; every other id (0-6 void, 9 parking,
# 10 rail track, 14-16 guard rail / bridge / tunnel, 18 polegroup, 29-30 caravan / trailer) has train id 255.
CITYSCAPES_TRAIN_ID_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)

# mmseg PascalContextDataset59.CLASSES (annotation 1..59 of SegmentationClassContext; 0 is background).
PASCAL_CONTEXT_59_CLASSES = (
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle", "building", "bus",
    "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow", "cup", "curtain", "dog", "door", "fence",
    "floor", "flower", "food", "grass", "ground", "horse", "keyboard", "light", "motorbike", "mountain", "mouse",
    "person", "plate", "platform", "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky",
    "snow", "sofa", "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
)

# ``data.classes``: the official names of a dataset, by the order of its labels.
CLASSES = {"ade20k": ADE20K_CLASSES, "cityscapes": CITYSCAPES_CLASSES, "pascal_context_59": PASCAL_CONTEXT_59_CLASSES}


def cityscapes_label_id_map() -> np.ndarray:
    """Lookup table label id -> train id (cityscapesscripts' ``createTrainIdLabelImgs`` as a table)."""
    table = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    table[list(CITYSCAPES_TRAIN_ID_LABEL_IDS)] = np.arange(len(CITYSCAPES_TRAIN_ID_LABEL_IDS))
    return table


# ``data.label_map``: a table applied to the annotation values as read (mmseg ``LoadAnnotations`` label_map).
LABEL_MAPS = {"cityscapes_label_ids": cityscapes_label_id_map}


class AnnotationError(DataFileError):
    """An annotation that cannot be used as it is; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- listing
def _find(folder: Path, suffixes: Sequence[str]) -> dict[str, str]:
    """{name: path} of the files below ``folder`` (recursively) ending in one of ``suffixes``; the name is the
    path below ``folder`` without its suffix."""
    found = {}
    for directory, _, files in os.walk(folder):
        for file in files:
            suffix = next((x for x in suffixes if file.lower().endswith(x.lower())), None)
            if suffix is not None:
                path = os.path.join(directory, file)
                found[os.path.relpath(path, folder)[: -len(suffix)]] = path
    return found


def _listed(root: Path, layout: Layout, split: str) -> list[str]:
    path = root / layout.split[split]
    if not path.is_file():
        raise ConfigError(f"data.root={root}: no split file {layout.split[split]}; expected {layout.describe()}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def list_pairs(root: Path, split: str, skip_unpaired: bool = False,
               layout: Layout = ADE20K_LAYOUT) -> list[tuple[str, str]]:
    """Sorted (image, annotation) paths of one split; unpaired files raise a ConfigError or are left out."""
    image_dir, label_dir = root / layout.img_dir[split], root / layout.ann_dir[split]
    for folder in (image_dir, label_dir):
        if not folder.is_dir():
            raise ConfigError(f"data.root={root}: no {folder.relative_to(root)}/ folder; expected {layout.describe()}")
    images, labels = _find(image_dir, layout.img_suffix), _find(label_dir, (layout.seg_map_suffix,))
    if not images:
        raise ConfigError(f"data.root={root}: {image_dir} holds no *{layout.img_suffix[0]} image; expected {layout.describe()}")
    if layout.split:
        names = _listed(root, layout, split)
        unpaired = (
            (sorted(set(names) - set(images)), {}, f"names of {layout.split[split]} have no image in {layout.img_dir[split]}"),
            (sorted(set(names) - set(labels)), {}, f"names of {layout.split[split]} have no annotation in {layout.ann_dir[split]}"),
        )
    else:
        names = list(images)
        unpaired = (
            (sorted(set(images) - set(labels)), images, f"images in {layout.img_dir[split]} have no annotation in {layout.ann_dir[split]}"),
            (sorted(set(labels) - set(images)), labels, f"annotations in {layout.ann_dir[split]} have no image in {layout.img_dir[split]}"),
        )
    for missing, present, what in unpaired:
        if not missing:
            continue
        first = Path(present[missing[0]]).name if present else missing[0]
        message = f"data.root={root}: {len(missing)} {what} (first: {first})"
        if not skip_unpaired:
            raise ConfigError(f"{message}: add the missing files, remove these, or set data.skip_unpaired=true to leave them out")
        log.warning("%s; left out (data.skip_unpaired=true)", message)
    return [(images[s], labels[s]) for s in sorted(set(names) & set(images) & set(labels))]


# ---------------------------------------------------------------------------------------------- reading
def read_image(path: str) -> np.ndarray:
    return np.array(read_rgb(path))


def read_label(path: str, image_path: str, image_size: tuple[int, int], num_classes: int, reduce_zero_label: bool,
               ignore_invalid: bool, label_map: np.ndarray | None = None) -> np.ndarray:
    """The (H, W) uint8 class map of ``path``, mapped (``label_map``: a 256-entry table), reduced and checked
    against its image."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I;16", "I"):
            raise AnnotationError(
                f"annotation {path} is a {im.mode} image: it must be a single-channel PNG of class indices (mode L or P)"
            )
        label = np.array(im)
    if label.shape != image_size:
        raise AnnotationError(
            f"annotation {path} is {label.shape[1]}x{label.shape[0]} but its image {image_path} is "
            f"{image_size[1]}x{image_size[0]}: they must have the same size"
        )
    if label.max(initial=0) > 255:
        raise AnnotationError(f"annotation {path} has values above 255: class indices must fit in 8 bits")
    label = label.astype(np.uint8)
    if label_map is not None:  # mmseg LoadAnnotations: label_map first, then reduce_zero_label
        label = label_map[label]
    if reduce_zero_label:
        # mmseg LoadAnnotations(reduce_zero_label=True): 0 ("other") -> 255, k -> k - 1, 255 stays 255.
        label[label == 0] = 255
        label = label - 1
        label[label == 254] = 255
    invalid = (label >= num_classes) & (label != IGNORE_INDEX)
    if invalid.any():
        values = np.unique(label[invalid]).astype(int) + int(reduce_zero_label)  # as written in the file
        count = int(invalid.sum())
        if not ignore_invalid:
            raise AnnotationError(
                f"annotation {path} has {count} pixels with labels {values[:5].tolist()} above {num_classes} "
                f"(only 0..{num_classes} and 255 are classes or ignore): fix the file or set "
                "data.ignore_invalid_labels=true to ignore those pixels"
            )
        log.warning("annotation %s: %d pixels with labels %s above %d set to ignore", path, count, values[:5].tolist(), num_classes)
        label[invalid] = IGNORE_INDEX
    return label


# ---------------------------------------------------------------------------------------------- transforms
def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear image (half-pixel centres, no antialiasing: cv2 ``INTER_LINEAR`` as mmcv, within one level of it),
    in float32 rounded to the nearest level, and nearest label.

    The image is interpolated in channels_last (the pixels' own order), which torch's bilinear kernel runs 2.5x
    faster than NCHW on one core, and without a clamp (bilinear weights are convex: values stay within 0..255); the
    label in uint8. Both give the pixels the NCHW float path gives (``bench.pipeline=true``, docs/benchmarks.md)."""
    if image.shape[:2] == tuple(size):
        return image, label
    img = torch.from_numpy(image).permute(2, 0, 1)[None].to(torch.float32, memory_format=torch.channels_last)
    img = F.interpolate(img, size=size, mode="bilinear", align_corners=False).round_()
    lab = F.interpolate(torch.from_numpy(label)[None, None], size=size, mode="nearest")
    return img[0].permute(1, 2, 0).to(torch.uint8).numpy(), lab[0, 0].numpy()


def random_resize(image: np.ndarray, label: np.ndarray, img_scale: Sequence[int], ratio_range: Sequence[float]):
    """mmseg ``Resize(img_scale, ratio_range, keep_ratio=True)``."""
    ratio = np.random.random_sample() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    return resize_pair(image, label, rescale_size(*image.shape[:2], img_scale, ratio))


def random_crop(image: np.ndarray, label: np.ndarray, crop_size: Sequence[int], cat_max_ratio: float):
    """mmseg ``RandomCrop``: up to 10 draws until no class holds ``cat_max_ratio`` of the labelled pixels."""
    h, w = label.shape

    def draw() -> tuple[int, int]:
        return np.random.randint(0, max(h - crop_size[0], 0) + 1), np.random.randint(0, max(w - crop_size[1], 0) + 1)

    y, x = draw()
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = np.unique(label[y:y + crop_size[0], x:x + crop_size[1]], return_counts=True)
            counts = counts[values != IGNORE_INDEX]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            y, x = draw()
    window = (slice(y, y + crop_size[0]), slice(x, x + crop_size[1]))
    return image[window], label[window]


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, brightness_delta: int = 32, contrast_range=(0.5, 1.5),
                           saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: each step with probability 1/2; contrast before or after the colour
    steps. HSV is PIL's (hue in 0..255) instead of OpenCV's (0..179): the hue shift is rescaled."""
    if np.random.randint(2):
        image = _convert(image, beta=np.random.uniform(-brightness_delta, brightness_delta))
    contrast_first = np.random.randint(2)
    if contrast_first and np.random.randint(2):
        image = _convert(image, alpha=np.random.uniform(*contrast_range))
    if np.random.randint(2):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        hsv[..., 1] = _convert(hsv[..., 1], alpha=np.random.uniform(*saturation_range))
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if np.random.randint(2):
        hsv = np.array(Image.fromarray(image).convert("HSV"))
        shift = round(np.random.randint(-hue_delta, hue_delta) * 256 / 180)
        hsv[..., 0] = (hsv[..., 0].astype(int) + shift) % 256
        image = np.array(Image.fromarray(hsv, "HSV").convert("RGB"))
    if not contrast_first and np.random.randint(2):
        image = _convert(image, alpha=np.random.uniform(*contrast_range))
    return image


# ---------------------------------------------------------------------------------------------- datasets
class SegmentationDataset(Dataset):
    """(image, annotation) pairs -> ``{"image": (3, H, W) float normalised, "label": (H, W) int64}``.

    ``train=True`` applies the training pipeline (module doc); otherwise the sample keeps its original size.
    """

    def __init__(self, pairs: list[tuple[str, str]], num_classes: int, train: bool, *, mean: Sequence[float],
                 std: Sequence[float], img_scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 crop_size: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                 photometric: bool = True, reduce_zero_label: bool = True, ignore_invalid_labels: bool = False,
                 label_map: str | None = None, skip_corrupt: bool = True):
        self.pairs, self.num_classes, self.train = pairs, num_classes, train
        # on 0-1 pixels, as in every task (conf/preprocessing/); these images are 0-255 (mmseg's 123.675 = 0.485 * 255)
        self.mean = torch.tensor(mean, dtype=torch.float64).mul(255).float().view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float64).mul(255).float().view(3, 1, 1)
        self.img_scale, self.ratio_range, self.crop_size = tuple(img_scale), tuple(ratio_range), tuple(crop_size)
        self.cat_max_ratio, self.hflip, self.photometric = cat_max_ratio, hflip, photometric
        self.reduce_zero_label, self.ignore_invalid_labels = reduce_zero_label, ignore_invalid_labels
        self.label_map = LABEL_MAPS[label_map]() if label_map else None
        self.skip_corrupt = skip_corrupt

    def __len__(self) -> int:
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The image and its class map; None when either file cannot be read and ``skip_corrupt`` (an annotation
        that reads but does not fit is an :class:`AnnotationError`)."""
        image_path, label_path = self.pairs[i]
        image = read_or_skip("image", image_path, lambda: read_image(image_path), self.skip_corrupt)
        if image is None:
            return None
        label = read_or_skip("annotation", label_path, lambda: read_label(
            label_path, image_path, image.shape[:2], self.num_classes, self.reduce_zero_label,
            self.ignore_invalid_labels, self.label_map), self.skip_corrupt)
        return None if label is None else (image, label)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor] | None:
        loaded = self.load(i)
        if loaded is None:
            return None
        image, label = loaded
        if self.train:
            image, label = random_resize(image, label, self.img_scale, self.ratio_range)
            image, label = random_crop(image, label, self.crop_size, self.cat_max_ratio)
            if np.random.rand() < self.hflip:
                image, label = image[:, ::-1], label[:, ::-1]
            if self.photometric:
                image = photometric_distortion(np.ascontiguousarray(image))
        image = normalize(image, self.mean, self.std)
        label = torch.from_numpy(np.ascontiguousarray(label)).long()
        if self.train:  # mmseg Pad(size=crop_size, pad_val=0, seg_pad_val=255), after Normalize
            pad_h, pad_w = self.crop_size[0] - label.shape[0], self.crop_size[1] - label.shape[1]
            if pad_h > 0 or pad_w > 0:
                image = F.pad(image, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=0.0)
                label = F.pad(label, (0, max(pad_w, 0), 0, max(pad_h, 0)), value=IGNORE_INDEX)
        return {"image": image, "label": label}


def normalize(image: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float, ``(x - mean) / std`` on 0-255 pixels (mmseg ``Normalize``)."""
    return (torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() - mean) / std


def collate_padded(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples padded to the largest (image 0, label 255); ``sizes`` keeps each one's (H, W)."""
    sizes = torch.tensor([s["label"].shape for s in samples], dtype=torch.long)
    h, w = sizes.max(dim=0).values.tolist()
    images = samples[0]["image"].new_zeros(len(samples), 3, h, w)
    labels = torch.full((len(samples), h, w), IGNORE_INDEX, dtype=torch.long)
    for k, s in enumerate(samples):
        sh, sw = s["label"].shape
        images[k, :, :sh, :sw] = s["image"]
        labels[k, :sh, :sw] = s["label"]
    return {"images": images, "labels": labels, "sizes": sizes}


# ---------------------------------------------------------------------------------------------- data module
class SegmentationDataModule(DataModule):
    """A dataset in one of mmseg's layouts with mmseg's pipelines (module doc; ``conf/data/{ade20k,cityscapes,
    pascal_context_59}.yaml``). The constructor reads nothing; ``check`` inspects ``root``.

    Args:
        num_classes: classes without the ignore index (ADE20K 150, Cityscapes 19, PASCAL-Context 59).
        img_dir, ann_dir: {"train": folder, "val": folder} of the images and the annotations, below ``root``.
        img_suffix: the end of an image file's name (one or a list); seg_map_suffix: of an annotation's.
        split: {"train": file, "val": file} listing the names of each split (PASCAL-Context), or None: every image.
        classes: the dataset whose official class names label the classes (``CLASSES``), when ``num_classes`` is
            their count.
        label_map: a table applied to the annotation values before anything else (``LABEL_MAPS``), or None.
        img_scale, ratio_range, crop_size, cat_max_ratio, hflip, photometric: the training pipeline
            (module doc; ``hflip`` is the flip probability).
        mean, std: normalisation, on 0-1 pixels (the configs read ``conf/preprocessing/``).
        reduce_zero_label: 0 ("other") becomes the ignore index and the rest shift down by one.
        batch_size: training crops per device (2 in the 16-image recipes on 8 GPUs).
        val_batch_size: validation images per device (they differ in size: a batch pads them to the largest).
        skip_unpaired: leave out (and count) an image without annotation and the reverse instead of failing.
        ignore_invalid_labels: label values above ``num_classes`` (not 255) become ignore instead of failing.
        **loading: the other :class:`vtrain.data.datamodule.DataModule` arguments (``num_workers``, ``seed``,
            ``skip_corrupt``, ...).
    """

    collate_fn = staticmethod(collate_padded)

    def __init__(
        self,
        root: str,
        num_classes: int = 150,
        img_scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        crop_size: Sequence[int] = (512, 512),
        cat_max_ratio: float = 0.75,
        hflip: float = 0.5,
        photometric: bool = True,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        reduce_zero_label: bool = True,
        img_dir: Mapping[str, str] = ADE20K_LAYOUT.img_dir,
        ann_dir: Mapping[str, str] = ADE20K_LAYOUT.ann_dir,
        img_suffix: str | Sequence[str] = ADE20K_LAYOUT.img_suffix,
        seg_map_suffix: str = ADE20K_LAYOUT.seg_map_suffix,
        split: Mapping[str, str] | None = None,
        classes: str = "ade20k",
        label_map: str | None = None,
        batch_size: int = 2,
        val_batch_size: int = 1,
        skip_unpaired: bool = False,
        ignore_invalid_labels: bool = False,
        **loading: Any,
    ):
        super().__init__(root, num_classes, batch_size=batch_size, val_batch_size=val_batch_size, **loading)
        for name, value, known in (("classes", classes, CLASSES), ("label_map", label_map, LABEL_MAPS)):
            if value is not None and value not in known:
                raise ConfigError(f"data.{name}={value} is not known: use one of {', '.join(known)}")
        self.layout = Layout(
            img_dir=dict(img_dir), ann_dir=dict(ann_dir),
            img_suffix=(img_suffix,) if isinstance(img_suffix, str) else tuple(img_suffix),
            seg_map_suffix=seg_map_suffix, split=dict(split) if split else None,
        )
        self.classes = classes
        self.skip_unpaired = skip_unpaired
        self.sample_options = dict(
            mean=tuple(mean), std=tuple(std), img_scale=tuple(img_scale), ratio_range=tuple(ratio_range),
            crop_size=tuple(crop_size), cat_max_ratio=cat_max_ratio, hflip=hflip, photometric=photometric,
            reduce_zero_label=reduce_zero_label, ignore_invalid_labels=ignore_invalid_labels, label_map=label_map,
            skip_corrupt=self.skip_corrupt,
        )
        self.reduce_zero_label = reduce_zero_label

    def info(self) -> DatasetInfo:
        return replace(super().info(), ignore_index=IGNORE_INDEX)

    @property
    def class_names(self) -> list[str]:
        """The official names of ``classes`` (mmseg's order) when there are as many classes; otherwise the dataset's
        ``classes.txt`` (``<annotation value> <name>`` lines, as the synthetic data writes), else ``class_<label>``."""
        if self.num_classes == len(CLASSES[self.classes]):
            return list(CLASSES[self.classes])
        names = read_names_file(self.root / "classes.txt")
        shift = 1 if self.reduce_zero_label else 0  # annotation value of label 0
        return [names.get(str(label + shift), f"class_{label}") for label in range(self.num_classes)]

    def preprocessing(self) -> dict[str, Any]:
        """Normalisation only: validation reads each image at its own size (the task resizes it,
        ``task.inference.scale``)."""
        options = self.sample_options
        return {"mean": list(options["mean"]), "std": list(options["std"]), "input_size": [3, None, None]}

    def predict_set(self, paths: list[str]) -> PredictionInputs:
        val = SegmentationDataset([], self.num_classes, False, **self.sample_options)  # validation's settings
        return PredictionInputs(paths, read_image, lambda image: normalize(image, val.mean, val.std),
                                from_array=np.asarray)

    def example_files(self, count: int) -> list[str]:
        return [image for image, _ in self.validation_set().pairs[:count]]

    def example_truths(self, count: int) -> list[torch.Tensor | None]:
        """Each file's label map (ignored pixels 255), as validation scores it."""
        val_set = self.validation_set()
        loaded = [val_set.load(i) for i in range(min(count, len(val_set)))]
        return [None if pair is None else torch.from_numpy(pair[1]).long() for pair in loaded]

    def check(self) -> None:
        """Fail in one line when ``root`` is missing, not in its layout, or has unpaired files."""
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} does not exist: point it at the dataset ({self.layout.describe()})")
        for split in SPLITS:
            list_pairs(self.root, split, self.skip_unpaired, self.layout)

    def build_sets(self, stage: str) -> None:
        if stage == "fit":
            self.train_set = SegmentationDataset(
                list_pairs(self.root, "train", self.skip_unpaired, self.layout), self.num_classes, True,
                **self.sample_options,
            )
        self.val_set = SegmentationDataset(
            list_pairs(self.root, "val", self.skip_unpaired, self.layout), self.num_classes, False, **self.sample_options
        )

    def val_dataloader(self) -> DataLoader:
        # Lightning's default DistributedSampler repeats images to even out the ranks, which would count
        # them twice in the dataset-level sums; each rank takes a disjoint share instead (mmseg does the same).
        sampler = None
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            sampler = unrepeated_sampler(self.val_set, trainer.world_size, trainer.global_rank)
        return self._loader(self.val_set, train=False, sampler=sampler)
