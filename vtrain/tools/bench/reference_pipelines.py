"""The reference training pipeline of each data family, re-stated with the reference's own settings taken from
the data module (``bench.pipeline=true``: :mod:`vtrain.tools.bench.pipeline`), one function per family.

Each reads sample ``i`` of the data module's training set from its encoded file(s) and returns what the
reference's loader would hand the model, drawing its random numbers in the same order as vtrain's pipeline where
the two share the steps (so that, seeded alike, both do the same work):

* ImageNet: timm's ``ImageDataset`` read (``PIL.Image.open(...).convert("RGB")``) and ``create_transform(
  is_training=True, ...)`` with the recipe's values;
* COCO: torchvision's ``references/detection`` (``train.py --use-v2``, ``backend=pil``, ``presets.py``
  ``DetectionPresetTrain(data_augmentation="multiscale")``): a PIL image and the targets of
  ``wrap_dataset_for_transforms_v2`` (masks ``mask.decode(mask.merge(mask.frPyObjects(...)))`` stacked),
  ``RandomShortestSize`` + ``RandomHorizontalFlip`` on the PIL image, ``ToImage``, ``ToDtype(float, scale=True)``,
  ``ConvertBoundingBoxFormat(XYXY)``, ``SanitizeBoundingBoxes``, ``ToPureTensor``; the presets are not importable
  (a script folder), so they are written out here with the data module's sizes;
* ADE20K (and mmseg's other layouts): mmseg's ``train_pipeline`` (``configs/_base_/datasets/ade20k.py``) with PIL
  and numpy in place of mmcv / OpenCV (not installed): PIL read, ``LoadAnnotations(reduce_zero_label)``,
  ``Resize(img_scale, ratio_range)`` by PIL (bilinear image, nearest label), ``RandomCrop(crop_size,
  cat_max_ratio)``, ``RandomFlip``, ``PhotoMetricDistortion`` (vtrain's numpy/PIL re-statement of both, the same
  code: mmseg's are numpy too), ``Normalize`` and ``Pad`` in numpy, then ``DefaultFormatBundle``'s transpose;
* Kinetics: mmaction2's ``PyAVInit`` + ``PyAVDecode`` (``mmaction/datasets/pipelines/loading.py``: every frame up to
  the last sampled one decoded and converted at full size with ``frame.to_rgb().to_ndarray()``, the sampled ones
  picked), ``Resize(scale=(-1, short_side))`` (bilinear without antialiasing, as mmcv's OpenCV resize), then
  vtrain's crop, flip and normalisation (the same code): what differs is the decoding strategy.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from timm.data import create_transform
from torchvision import tv_tensors
from torchvision.transforms import v2
from vtrain.tasks.classification.data import ImageFolderDataModule
from vtrain.tasks.detection.data import CocoDataModule, annotation_rle
from vtrain.tasks.segmentation.data import IGNORE_INDEX, SegmentationDataModule, photometric_distortion, random_crop
from vtrain.tasks.segmentation.inference import rescale_size
from vtrain.tasks.video.clips import resized_size
from vtrain.tasks.video.data import KineticsDataModule

from vtrain.config import ConfigError


@dataclass
class ReferencePipeline:
    """The reference's training pipeline on the data module's training set: ``load(i)`` is sample ``i`` as the
    model gets it; ``image_files`` are the set's image files for the decoder comparison (None: not images)."""

    name: str
    load: Callable[[int], Any]
    image_files: list[str] | None
    note: str | None = None


def read_pil_rgb(path: str) -> Image.Image:
    """timm's and torchvision's dataset read: the file through PIL, converted to RGB."""
    with Image.open(path) as image:
        return image.convert("RGB")


def imagenet(datamodule: Any) -> ReferencePipeline:
    transform = create_transform(datamodule.img_size, is_training=True, mean=datamodule.mean, std=datamodule.std,
                                 **datamodule.augment)
    samples = datamodule.train_set.samples

    def load(i: int) -> tuple[torch.Tensor, int]:
        path, target = samples[i]
        return transform(read_pil_rgb(path)), target

    return ReferencePipeline("timm create_transform", load, [path for path, _ in samples])


def coco(datamodule: Any) -> ReferencePipeline:
    dataset = datamodule.train_set
    transform = v2.Compose([
        v2.RandomShortestSize(list(datamodule.train_sizes), datamodule.max_size),
        v2.RandomHorizontalFlip(datamodule.hflip),
        v2.ToImage(),
        v2.ToDtype(torch.float, scale=True),
        v2.ConvertBoundingBoxFormat(tv_tensors.BoundingBoxFormat.XYXY),
        v2.SanitizeBoundingBoxes(),
        v2.ToPureTensor(),
    ])

    def load(i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        record = dataset.records[i]
        image = read_pil_rgb(str(dataset.image_dir / record["file_name"]))
        h, w = record["height"], record["width"]
        target = {"boxes": tv_tensors.BoundingBoxes(torch.from_numpy(record["boxes"]), format="XYXY", canvas_size=(h, w)),
                  "labels": torch.from_numpy(record["labels"])}
        if dataset.masks:
            target["masks"] = tv_tensors.Mask(torch.stack([
                torch.from_numpy(mask_utils.decode(annotation_rle(s, h, w))) for s in record["segmentations"]]))
        return transform(image, target)

    note = ("the reference has no crop branch (torchvision's multiscale preset); vtrain's pipeline runs data.crop"
            if datamodule.crop else None)
    files = [str(dataset.image_dir / dataset.records[i]["file_name"]) for i in range(len(dataset))]
    return ReferencePipeline("torchvision references/detection multiscale", load, files, note)


def mmseg(datamodule: Any) -> ReferencePipeline:
    dataset = datamodule.train_set
    mean, std = dataset.mean.view(1, 1, 3).numpy(), dataset.std.view(1, 1, 3).numpy()  # 0-255, as mmseg's

    def load(i: int) -> dict[str, torch.Tensor]:
        image_path, label_path = dataset.pairs[i]
        image = read_pil_rgb(image_path)
        with Image.open(label_path) as annotation:
            label = np.array(annotation)
        if dataset.label_map is not None:
            label = dataset.label_map[label]
        if dataset.reduce_zero_label:  # LoadAnnotations: 0 -> 255, k -> k - 1
            label = label.astype(np.uint8)
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        ratio = np.random.random_sample() * (dataset.ratio_range[1] - dataset.ratio_range[0]) + dataset.ratio_range[0]
        h, w = rescale_size(image.height, image.width, dataset.img_scale, ratio)
        image = np.asarray(image.resize((w, h), Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
        image, label = random_crop(image, label, dataset.crop_size, dataset.cat_max_ratio)
        if np.random.rand() < dataset.hflip:
            image, label = image[:, ::-1], label[:, ::-1]
        if dataset.photometric:
            image = photometric_distortion(np.ascontiguousarray(image))
        image = (image.astype(np.float32) - mean) / std
        pad_h, pad_w = max(dataset.crop_size[0] - label.shape[0], 0), max(dataset.crop_size[1] - label.shape[1], 0)
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), constant_values=0)
        label = np.pad(label, ((0, pad_h), (0, pad_w)), constant_values=IGNORE_INDEX)
        return {"image": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "label": torch.from_numpy(np.ascontiguousarray(label)).long()}

    note = ("PIL's bilinear resize antialiases when it shrinks (mmcv's OpenCV resize and vtrain's do not): pixel "
            "values differ from mmseg's there")
    return ReferencePipeline("mmseg train_pipeline (PIL/numpy)", load, [image for image, _ in dataset.pairs], note)


def mmaction2_pyav(datamodule: Any) -> ReferencePipeline:
    dataset = datamodule.train_set

    def load(i: int) -> dict[str, Any]:
        path, label = dataset.samples[i]
        container = av.open(path)
        try:
            indices = dataset.frame_indices(container.streams.video[0].frames).reshape(-1)
            last, frames = int(indices.max()), []
            for k, frame in enumerate(container.decode(video=0)):
                if k > last + 1:
                    break
                frames.append(frame.to_rgb().to_ndarray())
        finally:
            container.close()
        clip = torch.from_numpy(np.stack([frames[k % len(frames)] for k in indices.tolist()])).permute(0, 3, 1, 2)
        size = list(resized_size(clip.shape[-2], clip.shape[-1], dataset.short_side))
        clip = v2.functional.resize(clip, size, antialias=False)
        return {"clips": dataset.transform(clip[None]), "label": label}

    note = "torchcodec is not installed (torchvision 0.29 reads no video): PyAV's two decoding strategies compared"
    return ReferencePipeline("mmaction2 PyAVDecode", load, None, note)


def reference_pipeline(datamodule: Any) -> ReferencePipeline:
    """The reference of the data module's family (its training set built)."""
    families = {ImageFolderDataModule: imagenet, CocoDataModule: coco, SegmentationDataModule: mmseg,
                KineticsDataModule: mmaction2_pyav}
    for family, build in families.items():
        if isinstance(datamodule, family):
            return build(datamodule)
    raise ConfigError(f"bench.pipeline=true: data._target_ {type(datamodule).__qualname__} has no reference pipeline; "
                      f"the bench knows {', '.join(f.__name__ for f in families)}")
