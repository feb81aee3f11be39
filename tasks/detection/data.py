"""COCO 2017 layout: ``root/annotations/instances_{train,val}2017.json`` and ``root/{train,val}2017/*.jpg``.

Reading an annotation file checks it and cleans it for training; every check that fails names the file
(and the annotation or image id), and every clean-up is counted in the log:

==========================================  ===============================================================
file missing, not JSON, no images/...        ``ConfigError`` naming the file (and the JSON error position)
annotation of an unknown category or image   ``ConfigError`` naming the file and the annotation id
bbox not four numbers                        ``ConfigError`` naming the file and the annotation id
box partly outside its image                 clipped to the image (training)
box under one pixel wide or high             dropped from training (after clipping: zero-area boxes,
                                             boxes entirely outside)
polygon with < 3 points or an odd length     that polygon dropped; an instance with no valid polygon or an
                                             RLE of the wrong size is dropped from training when masks are
                                             trained
crowd (``iscrowd=1``)                        not a training target (torchvision's detectors have no ignore
                                             regions); kept for evaluation
image with no training target left           skipped in training when ``filter_empty`` (default); every
                                             image is evaluated
image file that cannot be read               skipped and counted, or a ``CorruptFileError`` naming it
                                             (``data.skip_corrupt``: :mod:`vtrain.data.datamodule`)
image whose size is not the annotation's     ``CorruptFileError`` naming the image and the annotation file
==========================================  ===============================================================

Evaluation never reads these cleaned targets: it scores against the annotation file itself
(:mod:`vtrain.tasks.detection.evaluation`), as the official COCO API does.

Category ids are mapped to labels 1..K in increasing id order (0 is the background) and back by
``category_ids[label - 1]``.
"""
from __future__ import annotations

import io
import json
import logging
import math
import pickle
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from vtrain.tasks.detection.transforms import eval_transform, train_transform

from vtrain.config import ConfigError
from vtrain.data.datamodule import (
    CorruptFileError,
    DataModule,
    DatasetInfo,
    PredictionInputs,
    read_or_skip,
)
from vtrain.data.samplers import EpochSeededSampler

log = logging.getLogger(__name__)
LAYOUT = "root/annotations/instances_{train,val}2017.json and root/{train,val}2017/*.jpg"

# What the collate function returns: a list of CHW float images (sizes differ) and a list of target dicts
# (``boxes`` XYXY float, ``labels`` int64 1..K, ``masks`` uint8 NxHxW when trained, ``image_id`` int).
Batch = tuple[list[torch.Tensor], list[dict[str, Any]]]


# ----------------------------------------------------------------------------- reading annotation files
def read_annotation_file(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: expected the COCO layout {LAYOUT}")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise ConfigError(f"{path} is not valid JSON ({reason}{where}): re-download or repair the annotation file") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a JSON {type(data).__name__}, not a COCO object with images/annotations/categories")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ConfigError(f"{path} has no '{key}' list: not a COCO instances file")
    return data


# What a packed record may hold besides plain values: numpy arrays (how pickle rebuilds them). Nothing else is
# ever unpickled, even from this in-memory buffer.
_ARRAY_GLOBALS = {(module, name) for module in ("numpy", "numpy.core.numeric", "numpy._core.numeric",
                                                "numpy.core.multiarray", "numpy._core.multiarray")
                  for name in ("dtype", "ndarray", "_frombuffer", "_reconstruct")}


class _RecordUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ARRAY_GLOBALS:
            raise pickle.UnpicklingError(f"a packed record may hold plain values and numpy arrays, not {module}.{name}")
        return super().find_class(module, name)


class PackedRecords:
    """Records pickled into one numpy buffer. Data-loader workers share it as it is; a list of millions of
    Python objects would be copied page by page as reference counts change (detectron2's
    ``DatasetFromList(serialize=True)``). Read back with an allow-list: plain values and numpy arrays only."""

    def __init__(self, records: Sequence[dict]):
        blobs = [pickle.dumps(r, protocol=pickle.HIGHEST_PROTOCOL) for r in records]
        self._ends = np.cumsum([len(b) for b in blobs], dtype=np.int64)
        self._buffer = np.frombuffer(b"".join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> dict:
        start = int(self._ends[i - 1]) if i > 0 else 0
        return _RecordUnpickler(io.BytesIO(self._buffer[start : int(self._ends[i])].tobytes())).load()


@dataclass
class CocoIndex:
    """One annotation file, checked; ``records`` are the training form of its images."""

    path: Path
    category_ids: list[int]  # label l (1..K) is category category_ids[l - 1]
    category_names: list[str]
    records: PackedRecords  # {id, file_name, height, width, boxes (N,4) XYXY, labels (N,), segmentations}
    num_images: int
    cleanup: Counter = field(default_factory=Counter)


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _clean_segmentation(segm: Any, height: int, width: int, cleanup: Counter) -> Any | None:
    """Polygons without their degenerate parts, or an RLE of the image's size; None if nothing valid is left."""
    if isinstance(segm, list):
        parts = [p for p in segm if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 and all(map(_number, p))]
        cleanup["degenerate polygons dropped"] += len(segm) - len(parts)
        return parts or None
    if isinstance(segm, dict) and "counts" in segm and list(segm.get("size", [])) == [height, width]:
        return segm
    return None


def index_annotation_file(path: Path, masks: bool) -> CocoIndex:
    """Read, check and clean one COCO instances file (see the module doc for the rules)."""
    data = read_annotation_file(path)
    categories = sorted(data["categories"], key=lambda c: c.get("id", 0) if isinstance(c, dict) else 0)
    category_ids: list[int] = []
    for c in categories:
        if not isinstance(c, dict) or not isinstance(c.get("id"), int):
            raise ConfigError(f"{path}: category {c!r} has no integer 'id'")
        if category_ids and c["id"] == category_ids[-1]:
            raise ConfigError(f"{path}: category id {c['id']} appears twice in 'categories'")
        category_ids.append(c["id"])
    label_of = {cid: i + 1 for i, cid in enumerate(category_ids)}
    names = [str(c.get("name", c["id"])) for c in categories]

    images: dict[int, dict] = {}
    for im in data["images"]:
        image_id = im.get("id") if isinstance(im, dict) else None
        if not isinstance(image_id, int):
            raise ConfigError(f"{path}: image entry {str(im)[:80]} has no integer 'id'")
        if image_id in images:
            raise ConfigError(f"{path}: image id {image_id} appears twice in 'images'")
        h, w = im.get("height"), im.get("width")
        if not (isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 and isinstance(im.get("file_name"), str)):
            raise ConfigError(f"{path}: image {image_id} needs a file_name and positive integer height and width")
        images[image_id] = {"id": image_id, "file_name": im["file_name"], "height": h, "width": w, "anns": []}

    cleanup: Counter = Counter()
    for ann in data["annotations"]:
        ann_id = ann.get("id") if isinstance(ann, dict) else None
        if ann_id is None:
            raise ConfigError(f"{path}: annotation {str(ann)[:80]} has no 'id'")
        if ann.get("category_id") not in label_of:
            raise ConfigError(
                f"{path}: annotation {ann_id} has category_id {ann.get('category_id')!r}, which 'categories' does not "
                "list: fix the annotation or add the category"
            )
        image = images.get(ann.get("image_id"))
        if image is None:
            raise ConfigError(f"{path}: annotation {ann_id} refers to image_id {ann.get('image_id')!r}, which 'images' does not list")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(map(_number, bbox))):
            raise ConfigError(f"{path}: annotation {ann_id} has bbox {bbox!r}; COCO boxes are [x, y, width, height]")
        if ann.get("iscrowd", 0):
            cleanup["crowd regions left out of training"] += 1
            continue
        h, w = image["height"], image["width"]
        x, y, bw, bh = bbox
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, float(w)), min(y + bh, float(h))
        if x2 - x1 < 1 or y2 - y1 < 1:
            cleanup["boxes under one pixel dropped"] += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
            cleanup["boxes clipped to their image"] += 1
        segm = None
        if masks:
            segm = _clean_segmentation(ann.get("segmentation"), h, w, cleanup)
            if segm is None:
                cleanup["instances without a valid mask dropped"] += 1
                continue
        image["anns"].append((float(x1), float(y1), float(x2), float(y2), label_of[ann["category_id"]], segm))

    records = []
    for image in images.values():
        anns = image.pop("anns")
        image["boxes"] = np.array([a[:4] for a in anns], dtype=np.float32).reshape(-1, 4)
        image["labels"] = np.array([a[4] for a in anns], dtype=np.int64)
        image["segmentations"] = [a[5] for a in anns] if masks else None
        records.append(image)
    return CocoIndex(path, category_ids, names, PackedRecords(records), len(records), cleanup)


def annotation_rle(segmentation: list | dict, height: int, width: int) -> dict:
    """A COCO ``segmentation`` (polygons, uncompressed or compressed RLE) as one compressed RLE, as the COCO
    API's ``annToRLE`` makes it."""
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    return segmentation


def decode_masks(segmentations: list, height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 masks from cleaned polygons / RLEs (pycocotools, as the COCO API rasterises them)."""
    out = np.zeros((len(segmentations), height, width), dtype=np.uint8)
    for i, segm in enumerate(segmentations):
        out[i] = mask_utils.decode(annotation_rle(segm, height, width))
    return out


# ----------------------------------------------------------------------------- datasets
class CocoDetectionDataset(Dataset):
    """Images of one split; with ``targets``, their cleaned training targets through ``transform``. An image that
    cannot be read is named in an error, or skipped (None) with ``skip_corrupt`` (:mod:`vtrain.data.datamodule`)."""

    def __init__(self, image_dir: Path, annotation_file: Path, records: PackedRecords, transform, targets: bool,
                 masks: bool, skip_corrupt: bool = True):
        self.image_dir, self.annotation_file = image_dir, annotation_file
        self.records, self.transform = records, transform
        self.targets, self.masks, self.skip_corrupt = targets, masks, skip_corrupt

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, record: dict) -> torch.Tensor | None:
        path = self.image_dir / record["file_name"]
        image = read_or_skip("image", path, lambda: decode_rgb(path), self.skip_corrupt)
        if image is None:
            return None
        if tuple(image.shape[-2:]) != (record["height"], record["width"]):
            raise CorruptFileError(
                f"{path} is {image.shape[-1]}x{image.shape[-2]} but {self.annotation_file} says "
                f"{record['width']}x{record['height']} (image id {record['id']}): fix the annotation file"
            )
        return image

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]] | None:
        record = self.records[i]
        image = self.read_image(record)
        if image is None:
            return None
        image = tv_tensors.Image(image)
        if not self.targets:
            return self.transform(image).as_subclass(torch.Tensor), {"image_id": record["id"]}
        h, w = record["height"], record["width"]
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(torch.from_numpy(record["boxes"]), format="XYXY", canvas_size=(h, w)),
            "labels": torch.from_numpy(record["labels"]),
        }
        if self.masks:
            target["masks"] = tv_tensors.Mask(torch.from_numpy(decode_masks(record["segmentations"], h, w)))
        image, target = self.transform(image, target)
        target = {k: v.as_subclass(torch.Tensor) for k, v in target.items()}
        target["image_id"] = record["id"]
        return image.as_subclass(torch.Tensor), target


def decode_rgb(path: str | Path) -> torch.Tensor:
    """An image file as uint8 RGB (3, H, W); a 16-bit PNG keeps its high byte, as 8-bit readers (OpenCV, PIL for
    RGB) do."""
    image = decode_image(str(path), mode=ImageReadMode.RGB)
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image


def collate_detection(batch: list[tuple[torch.Tensor, dict]]) -> Batch:
    """Images keep their own sizes; the detector pads them (to a multiple of 32)."""
    return [image for image, _ in batch], [target for _, target in batch]


# ----------------------------------------------------------------------------- aspect-ratio groups
class AspectRatioGroupedSampler(EpochSeededSampler):
    """mmdet's ``DistributedGroupSampler`` (``GroupSampler`` on one process) on vtrain's resumable sampler: every
    batch holds images of one aspect-ratio group, so a padded batch wastes little.

    Per epoch, with a generator seeded by ``seed + epoch`` (mmdet's): each group's indices shuffled and padded by
    repeating its own (shuffled) indices to a multiple of ``batch_size x replicas``, the groups concatenated, the
    ``batch_size`` blocks shuffled, and this rank's contiguous share taken. The order is a function of
    ``(seed, epoch, rank)`` only, so :class:`~vtrain.data.samplers.EpochSeededIterator` resumes it exactly.

    Args:
        dataset: the training set (its length).
        groups: each sample's group (mmdet: 1 when width / height > 1, else 0).
        batch_size: images per batch and device.
        seed: the run's seed.
        num_replicas, rank: the split (default: the process group's, as ``DistributedSampler``).
    """

    def __init__(self, dataset, groups: Sequence[int], batch_size: int, seed: int, num_replicas: int | None = None,
                 rank: int | None = None):
        super().__init__(dataset, seed, shuffle=True, drop_last=False, num_replicas=num_replicas, rank=rank)
        self.groups = torch.as_tensor(list(groups), dtype=torch.long)
        if len(self.groups) != len(dataset):
            raise ValueError(f"{len(self.groups)} groups for {len(dataset)} samples")
        self.batch_size = int(batch_size)
        block = self.batch_size * self.num_replicas
        sizes = torch.bincount(self.groups).tolist() if len(self.groups) else []
        self.num_samples = sum(math.ceil(size / block) * self.batch_size for size in sizes)
        self.total_size = self.num_samples * self.num_replicas

    def indices(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        block = self.batch_size * self.num_replicas
        parts = []
        for group in range(int(self.groups.max()) + 1 if len(self.groups) else 0):
            members = torch.where(self.groups == group)[0]
            size = len(members)
            if size == 0:
                continue
            members = members[torch.randperm(size, generator=generator)]
            extra = math.ceil(size / block) * block - size
            parts += [members] + [members] * (extra // size) + [members[: extra % size]]
        order = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        batches = order.view(-1, self.batch_size)[torch.randperm(len(order) // self.batch_size, generator=generator)]
        start = self.num_samples * self.rank
        return batches.flatten()[start: start + self.num_samples].tolist()


def aspect_ratio_groups(records: Sequence[dict]) -> list[int]:
    """mmdet's ``flag``: 1 for an image wider than high, else 0."""
    return [int(r["width"] / r["height"] > 1) for r in records]


# ----------------------------------------------------------------------------- data module
class CocoDataModule(DataModule):
    """COCO 2017 instances.

    Args:
        root: dataset root (see ``LAYOUT``).
        num_classes: categories in the annotation files (80 for COCO).
        batch_size: training images per device (2 in the 16-image recipes on 8 GPUs).
        val_batch_size: evaluation images per device; 1 (mmdet's default) keeps every image's detections
            independent of which images share its padded batch.
        masks: decode instance masks for training (Mask R-CNN); box-only detectors may switch it off.
        filter_empty: skip training images with no target left (mmdet and torchvision do).
        train_sizes, max_size, hflip, crop: the training augmentation (:func:`transforms.train_transform`).
        group_by_aspect_ratio: batches of images that are all wider than high or all not
            (:class:`AspectRatioGroupedSampler`, mmdet's ``GroupSampler``; torchvision's references group too).
        train_split, val_split: folder / annotation file names (``instances_<split>.json``).
        **loading: the other :class:`vtrain.data.datamodule.DataModule` arguments (``num_workers``, ``seed``,
            ``skip_corrupt``, ...).
    """

    collate_fn = staticmethod(collate_detection)

    def __init__(
        self,
        root: str,
        num_classes: int = 80,
        batch_size: int = 2,
        val_batch_size: int = 1,
        masks: bool = True,
        filter_empty: bool = True,
        train_sizes: Sequence[int] = (800,),
        max_size: int = 1333,
        hflip: float = 0.5,
        crop: Mapping[str, Any] | None = None,
        group_by_aspect_ratio: bool = False,
        train_split: str = "train2017",
        val_split: str = "val2017",
        **loading: Any,
    ):
        super().__init__(root, num_classes, batch_size=batch_size, val_batch_size=val_batch_size, **loading)
        self.masks, self.filter_empty = masks, filter_empty
        self.train_sizes, self.max_size, self.hflip = list(train_sizes), max_size, hflip
        self.crop = dict(crop) if crop else None
        self.group_by_aspect_ratio = group_by_aspect_ratio
        self.train_split, self.val_split = train_split, val_split
        self._indexes: dict[str, CocoIndex] = {}

    def annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"instances_{split}.json"

    def index(self, split: str) -> CocoIndex:
        """The checked annotation file of ``split``, read once per process."""
        if split not in self._indexes:
            index = index_annotation_file(self.annotation_file(split), masks=self.masks and split == self.train_split)
            cleaned = +index.cleanup  # the clean-ups that happened (a Counter keeps keys counted 0 times)
            if split == self.train_split and cleaned:
                log.warning("%s: %s", index.path, ", ".join(f"{n} {what}" for what, n in sorted(cleaned.items())))
            self._indexes[split] = index
        return self._indexes[split]

    @property
    def val_annotation_file(self) -> Path:
        return self.annotation_file(self.val_split)

    @property
    def category_ids(self) -> list[int]:
        return self.index(self.val_split).category_ids

    @property
    def category_names(self) -> list[str]:
        return self.index(self.val_split).category_names

    # ------------------------------------------------------------------ classes and predictions
    def info(self) -> DatasetInfo:
        return replace(super().info(), annotation_file=self.val_annotation_file, masks=self.masks)

    @property
    def class_ids(self) -> list[int]:
        return self.category_ids

    @property
    def class_names(self) -> list[str]:
        return self.category_names

    def predict_set(self, paths: list[str]) -> PredictionInputs:
        transform = eval_transform()
        return PredictionInputs(paths, decode_rgb,
                                lambda image: transform(tv_tensors.Image(image)).as_subclass(torch.Tensor),
                                from_array=lambda array: torch.from_numpy(array).permute(2, 0, 1).contiguous())

    def example_files(self, count: int) -> list[str]:
        val_set = self.validation_set()
        return [str(val_set.image_dir / val_set.records[i]["file_name"]) for i in range(min(count, len(val_set)))]

    def example_truths(self, count: int) -> list[dict[str, torch.Tensor]]:
        """Each file's objects: ``boxes`` (XYXY, original pixels) and ``labels`` (1..K), crowd regions left out."""
        val_set = self.validation_set()
        records = [val_set.records[i] for i in range(min(count, len(val_set)))]
        return [{"boxes": torch.from_numpy(r["boxes"]).float().reshape(-1, 4), "labels": torch.from_numpy(r["labels"])}
                for r in records]

    # ------------------------------------------------------------------ checks before anything starts
    def check(self) -> None:
        """One line when ``root`` is not laid out as COCO or an annotation file is unusable."""
        if not self.root.is_dir():
            raise ConfigError(f"data.root={self.root} does not exist: pass the COCO root ({LAYOUT})")
        for split in (self.train_split, self.val_split):
            if not (self.root / split).is_dir():
                raise ConfigError(f"data.root={self.root}: no {split}/ image folder; expected {LAYOUT}")
            index = self.index(split)
            if len(index.category_ids) != self.num_classes:
                raise ConfigError(
                    f"{index.path} has {len(index.category_ids)} categories but data.num_classes={self.num_classes}: "
                    f"set data.num_classes={len(index.category_ids)}"
                )
        train, val = self.index(self.train_split), self.index(self.val_split)
        if train.category_ids != val.category_ids:
            raise ConfigError(f"{train.path} and {val.path} list different category ids: they must share one category list")

    # ------------------------------------------------------------------ datasets
    def build_sets(self, stage: str) -> None:
        if stage == "fit":
            index = self.index(self.train_split)
            records = [index.records[i] for i in range(len(index.records))]
            if self.filter_empty:
                kept = [r for r in records if len(r["labels"])]
                if len(kept) < len(records):
                    log.info("%s: %d of %d images have no training target and are skipped in training",
                             index.path, len(records) - len(kept), len(records))
                records = kept
            self.train_set = CocoDetectionDataset(
                self.root / self.train_split, index.path, PackedRecords(records),
                train_transform(self.train_sizes, self.max_size, self.hflip, self.crop), targets=True, masks=self.masks,
                skip_corrupt=self.skip_corrupt,
            )
            self.train_groups = aspect_ratio_groups(records)
        index = self.index(self.val_split)
        self.val_set = CocoDetectionDataset(
            self.root / self.val_split, index.path, index.records, eval_transform(), targets=False, masks=False,
            skip_corrupt=self.skip_corrupt,
        )

    def train_sampler(self, num_replicas: int | None = None, rank: int | None = None) -> EpochSeededSampler:
        if not self.group_by_aspect_ratio:
            return super().train_sampler(num_replicas, rank)
        return AspectRatioGroupedSampler(self.train_set, self.train_groups, self.batch_size, self.seed,
                                         num_replicas=num_replicas, rank=rank)
