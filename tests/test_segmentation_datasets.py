"""Cityscapes and PASCAL-Context 59 in mmseg's layouts (conf/data/cityscapes.yaml, pascal_context_59.yaml), read
from the synthetic writers' files: the label mappings against the official tables, the split files, the ignore
index kept out of the metric, mIoU on a hand case, bad files named in one line, and one training step of a tiny
model on each."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from conftest import compose
from vtrain.config import ConfigError
from vtrain.tasks.segmentation.data import (
    CITYSCAPES_CLASSES,
    PASCAL_CONTEXT_59_CLASSES,
    AnnotationError,
    cityscapes_label_id_map,
)
from vtrain.tasks.segmentation.metrics import SegmentationMetrics
from vtrain.tasks.segmentation.synthetic import write_cityscapes, write_pascal_context
from vtrain.training.build import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

# cityscapesscripts helpers/labels.py (name, id, trainId) of the 34 labels with an id (license plate has none)
CITYSCAPES_LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255), ("out of roi", 3, 255),
    ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255), ("road", 7, 0), ("sidewalk", 8, 1),
    ("parking", 9, 255), ("rail track", 10, 255), ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4),
    ("guard rail", 14, 255), ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9), ("sky", 23, 10),
    ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14), ("bus", 28, 15),
    ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18),
)
TINY = ["backbone=swin_t", "backbone.embed_dim=16", "backbone.depths=[1,1,1,1]", "backbone.num_heads=[1,1,1,1]",
        "backbone.window_size=4", "backbone.img_size=32", "task.head.channels=8", "task.aux_head.channels=8",
        "data.num_workers=0", "data.num_classes=4", "output_dir=/tmp/vtrain-test-seg-datasets"]


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cityscapes")
    write_cityscapes(root, seed=0, num_classes=4, train=4, val=3, height=32, width=64)
    return root


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pascal_context")
    write_pascal_context(root, seed=0, num_classes=4, train=4, val=3, height=40, width=48)
    return root


@functools.cache
def _data_config(data: str):
    return compose(f"data={data}", "output_dir=/tmp/vtrain-test-seg-datasets").data


def _datamodule(data: str, root: Path, **options):
    """The data module of conf/data/<data>.yaml on ``root`` (4 classes unless ``options`` say otherwise)."""
    return instantiate(_data_config(data), root=str(root), num_workers=0, **{"num_classes": 4, **options})


def test_cityscapes_train_ids_are_the_official_table():
    assert CITYSCAPES_CLASSES == tuple(n for n, _, t in sorted(CITYSCAPES_LABELS, key=lambda x: x[2]) if t != 255)
    table = cityscapes_label_id_map()
    assert [int(table[i]) for _, i, _ in CITYSCAPES_LABELS] == [t for _, _, t in CITYSCAPES_LABELS]
    assert (table[34:] == 255).all()
    assert len(PASCAL_CONTEXT_59_CLASSES) == 59 == len(set(PASCAL_CONTEXT_59_CLASSES))
    assert list(PASCAL_CONTEXT_59_CLASSES) == sorted(PASCAL_CONTEXT_59_CLASSES)  # mmseg's 59 are alphabetical


def test_cityscapes_layout_reads_train_ids_or_maps_label_ids(cityscapes_root):
    data = _datamodule("cityscapes", cityscapes_root)
    data.check()
    data.build_sets("fit")
    assert len(data.train_set) == 4 and len(data.val_set) == 3
    image_path, label_path = data.val_set.pairs[0]
    assert image_path.endswith("val/frankfurt/frankfurt_000000_000001_leftImg8bit.png")
    assert label_path.endswith("gtFine/val/frankfurt/frankfurt_000000_000001_gtFine_labelTrainIds.png")
    _, train_ids = data.val_set.load(0)
    ids = np.asarray(Image.open(label_path.replace("labelTrainIds", "labelIds")))
    np.testing.assert_array_equal(train_ids, [[dict((i, t) for _, i, t in CITYSCAPES_LABELS)[v] for v in row] for row in ids])
    assert {0, 9} <= set(np.unique(ids)) and 255 in train_ids  # void ids 0 and 9 -> ignore, kept as 255

    mapped = _datamodule("cityscapes", cityscapes_root, seg_map_suffix="_gtFine_labelIds.png",
                         label_map="cityscapes_label_ids")
    mapped.build_sets("validate")
    np.testing.assert_array_equal(mapped.val_set.load(0)[1], train_ids)
    assert _datamodule("cityscapes", cityscapes_root, num_classes=19).class_names == list(CITYSCAPES_CLASSES)

    # label ids read without the map: one line naming the file and the fix
    unmapped = _datamodule("cityscapes", cityscapes_root, seg_map_suffix="_gtFine_labelIds.png")
    unmapped.build_sets("validate")
    with pytest.raises(AnnotationError, match=r"labelIds\.png has \d+ pixels with labels \[\d+.*above 4") as error:
        unmapped.val_set.load(0)
    assert "\n" not in str(error.value)


def test_pascal_context_split_files_and_zero_label_reduction(pascal_root, tmp_path):
    data = _datamodule("pascal_context_59", pascal_root)
    data.check()
    data.build_sets("validate")
    listed = (pascal_root / "ImageSets/SegmentationContext/val.txt").read_text().split()
    assert [Path(i).stem for i, _ in data.val_set.pairs] == listed and len(listed) == 3  # only the listed names
    assert _datamodule("pascal_context_59", pascal_root, num_classes=59).class_names == list(PASCAL_CONTEXT_59_CLASSES)
    assert data.class_names[0] == (pascal_root / "classes.txt").read_text().split("\n")[0].split()[1]

    # 0 (background) -> 255, 1..59 -> 0..58, 255 stays: mmseg reduce_zero_label
    annotation = np.array([[0, 1, 2], [58, 59, 255]], np.uint8)
    image = tmp_path / "JPEGImages" / "x.jpg"
    image.parent.mkdir()
    Image.new("RGB", (3, 2)).save(image)
    (tmp_path / "SegmentationClassContext").mkdir()
    Image.fromarray(annotation).save(tmp_path / "SegmentationClassContext" / "x.png")
    (tmp_path / "ImageSets/SegmentationContext").mkdir(parents=True)
    for split in ("train", "val"):
        (tmp_path / f"ImageSets/SegmentationContext/{split}.txt").write_text("x\n")
    full = _datamodule("pascal_context_59", tmp_path, num_classes=59)
    full.build_sets("validate")
    np.testing.assert_array_equal(full.val_set.load(0)[1], [[255, 0, 1], [57, 58, 255]])

    (tmp_path / "ImageSets/SegmentationContext/val.txt").write_text("x\n2008_999999\n")
    with pytest.raises(ConfigError, match=r"1 names of ImageSets/SegmentationContext/val\.txt have no image in "
                                          r"JPEGImages \(first: 2008_999999\).*skip_unpaired=true") as error:
        full.check()
    assert "\n" not in str(error.value)
    skipping = _datamodule("pascal_context_59", tmp_path, num_classes=59, skip_unpaired=True)
    skipping.build_sets("validate")
    assert len(skipping.val_set) == 1


def test_metric_hand_case_and_the_ignore_index_kept_out(cityscapes_root):
    # mmseg mean_iou by hand: class 0 I=1 U=2, class 1 I=2 U=4, class 2 I=0 U=1; the 255 pixel counts nowhere
    metric = SegmentationMetrics(3)
    metric.update(torch.tensor([[0, 1, 1], [1, 1, 2]]), torch.tensor([[0, 0, 1], [1, 2, 255]]))
    got = metric.compute()
    assert got["IoU"].tolist() == [0.5, 0.5, 0.0] and got["mIoU"].item() == pytest.approx(1 / 3, abs=1e-15)
    assert got["mAcc"].item() == 0.5 and got["aAcc"].item() == 0.6

    # the void pixels of Cityscapes reach the metric as 255 and count nowhere: predicting class 0 there keeps IoU 1
    data = _datamodule("cityscapes", cityscapes_root)
    data.build_sets("validate")
    metric = SegmentationMetrics(4, ignore_index=data.info().ignore_index)
    for i in range(len(data.val_set)):
        label = data.val_set[i]["label"]
        metric.update(torch.where(label == 255, 0, label), label)
    assert (metric.area_label.sum() < 3 * 32 * 64) and metric.compute()["mIoU"].item() == 1.0


@pytest.mark.parametrize("data", ["cityscapes", "pascal_context_59"])
def test_a_tiny_model_trains_and_evaluates_on_each_layout(data, cityscapes_root, pascal_root):
    root = cityscapes_root if data == "cityscapes" else pascal_root
    cfg = compose("task=segmentation", f"data={data}", f"data.root={root}", *TINY, "data.batch_size=2",
                  "data.img_scale=[64,32]", "data.crop_size=[32,32]", "task.inference.crop_size=[32,32]",
                  "task.inference.stride=[16,16]")
    datamodule = instantiate(cfg.data)
    datamodule.build_sets("fit")
    torch.manual_seed(0)
    module = build_task(cfg)
    np.random.seed(0)
    batch = datamodule.collate_fn([datamodule.train_set[0], datamodule.train_set[1]])
    assert batch["images"].shape == (2, 3, 32, 32)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    loss = module.losses(batch["images"], batch["labels"])["loss"]
    loss.backward()
    optimizer.step()
    assert module.losses(batch["images"], batch["labels"])["loss"] < loss  # one step on the batch lowers its loss
    module.eval()
    val = datamodule.val_set[0]
    probs = module.predict_probs(val["image"][None])
    assert probs.shape == (1, 4, *val["label"].shape)
