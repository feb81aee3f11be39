"""COCO reading: the synthetic writer's files, category mapping, crowd/empty handling, bad input messages
and clean-ups, and the training transforms on boxes and masks."""
from __future__ import annotations

import json
import logging
import math
import pickle

import numpy as np

import pytest
import torch
from torchvision import tv_tensors

from vtrain.tasks.detection.data import CocoDataModule, collate_detection, index_annotation_file
from vtrain.tasks.detection.transforms import RandomSizeCrop, train_transform
from vtrain.config import ConfigError


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from vtrain.tasks.detection.synthetic import write

    root = tmp_path_factory.mktemp("coco")
    summary = write(root, seed=0, train_images=24, val_images=9)
    return root, summary


def _datamodule(root, **kw):
    return CocoDataModule(str(root), num_classes=4, batch_size=3, num_workers=0, train_sizes=[64], max_size=96, **kw)


def test_synthetic_layout_and_mapping(coco_root):
    root, summary = coco_root
    assert summary["train2017"]["crowd"] > 0 and summary["train2017"]["empty_images"] > 0
    dm = _datamodule(root)
    dm.check()
    dm.setup("fit")
    assert dm.category_ids == [1, 4, 7, 10]  # non-contiguous ids -> labels 1..4
    train = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    with_targets = {a["image_id"] for a in train["annotations"] if not a["iscrowd"]}
    assert len(dm.train_set) == len(with_targets) < len(train["images"])  # empty (and crowd-only) images skipped
    assert len(dm.val_set) == 9  # every image is evaluated
    images, targets = next(iter(dm.train_dataloader())).batch  # a vtrain.data.datamodule.CountedBatch
    assert len(images) == 3 and {tuple(i.shape[-2:]) for i in images} != {(64, 64)}  # sizes differ, no padding yet
    for image, target in zip(images, targets):
        assert image.dtype == torch.float32 and min(image.shape[-2:]) == 64
        assert target["labels"].min() >= 1 and target["labels"].max() <= 4
        assert target["masks"].shape == (len(target["boxes"]), *image.shape[-2:])
        for box, mask in zip(target["boxes"], target["masks"]):  # each mask lies in its box
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert xs.min() >= box[0] - 1 and xs.max() <= box[2] + 1 and ys.min() >= box[1] - 1 and ys.max() <= box[3] + 1
    # no crowd region is a target: targets per image equal the non-crowd annotations
    by_image = {}
    for a in train["annotations"]:
        if not a["iscrowd"]:
            by_image[a["image_id"]] = by_image.get(a["image_id"], 0) + 1
    assert all(len(t["labels"]) == by_image[t["image_id"]] for t in targets)
    val_images, val_targets = next(iter(dm.val_dataloader())).batch
    assert set(val_targets[0]) == {"image_id"} and val_images[0].max() <= 1.0


def _write(root, data=None, text=None):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split in ("train2017", "val2017"):
        (root / split).mkdir(exist_ok=True)
        path = root / "annotations" / f"instances_{split}.json"
        path.write_text(text if text is not None else json.dumps(data))
    return root / "annotations" / "instances_train2017.json"


def _base(**ann):
    a = {"id": 17, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20], "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]], **ann}
    return {"images": [{"id": 1, "file_name": "a.jpg", "height": 50, "width": 60}], "annotations": [a],
            "categories": [{"id": 5, "name": "x"}]}


@pytest.mark.parametrize(
    "data,text,expected",
    [
        (None, '{"images": [', "is not valid JSON (Expecting value at line 1 column 13)"),
        ({"images": [], "annotations": []}, None, "has no 'categories' list"),
        (_base(category_id=9), None, "annotation 17 has category_id 9"),
        (_base(image_id=4), None, "annotation 17 refers to image_id 4"),
        (_base(bbox=[1, 2, 3]), None, "annotation 17 has bbox [1, 2, 3]"),
    ],
)
def test_bad_annotation_files_name_file_and_annotation(tmp_path, data, text, expected):
    path = _write(tmp_path, data, text)
    dm = CocoDataModule(str(tmp_path), num_classes=1)
    with pytest.raises(ConfigError) as e:
        dm.check()
    assert str(path) in str(e.value) and expected in str(e.value) and "\n" not in str(e.value)


def test_missing_layout(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        CocoDataModule(str(tmp_path / "nowhere")).check()
    (tmp_path / "train2017").mkdir()
    with pytest.raises(ConfigError, match=r"instances_train2017.json does not exist: expected the COCO layout"):
        CocoDataModule(str(tmp_path)).check()
    _write(tmp_path, _base())
    with pytest.raises(ConfigError, match="has 1 categories but data.num_classes=80: set data.num_classes=1"):
        CocoDataModule(str(tmp_path)).check()


def test_cleanup_is_counted(tmp_path, caplog):
    data = _base()
    a = data["annotations"][0]
    data["annotations"] = [
        a,
        {**a, "id": 18, "bbox": [50, 40, 30, 30]},  # partly outside: clipped to 50..60 x 40..50
        {**a, "id": 19, "bbox": [5, 5, 0, 10]},  # zero width: dropped
        {**a, "id": 20, "bbox": [70, 10, 5, 5]},  # entirely outside: dropped
        {**a, "id": 21, "segmentation": [[1, 2, 3, 4], [10, 10, 30, 10, 30, 30, 10, 30]]},  # one bad part
        {**a, "id": 22, "segmentation": [[1, 2, 3, 4, 5]]},  # no valid polygon: dropped with masks
        {**a, "id": 23, "iscrowd": 1},
    ]
    path = _write(tmp_path, data)
    index = index_annotation_file(path, masks=True)
    record = index.records[0]
    assert record["boxes"].tolist() == [[10, 10, 30, 30], [50, 40, 60, 50], [10, 10, 30, 30]]
    assert len(record["segmentations"][2]) == 1
    assert index.cleanup == {
        "boxes clipped to their image": 1, "boxes under one pixel dropped": 2, "degenerate polygons dropped": 2,
        "instances without a valid mask dropped": 1, "crowd regions left out of training": 1,
    }
    assert len(index_annotation_file(path, masks=False).records[0]["labels"]) == 4  # boxes need no mask
    with caplog.at_level(logging.WARNING):
        CocoDataModule(str(tmp_path), num_classes=1).index("train2017")
    assert "1 boxes clipped to their image" in caplog.text and "2 boxes under one pixel dropped" in caplog.text


def _sample(h=40, w=60):
    image = tv_tensors.Image(torch.arange(h * w, dtype=torch.uint8).reshape(1, h, w).expand(3, h, w).clone())
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 5:15, 10:30] = 1
    masks[1, 20:40, 40:60] = 1
    target = {
        "boxes": tv_tensors.BoundingBoxes([[10, 5, 30, 15], [40, 20, 60, 40]], format="XYXY", canvas_size=(h, w)),
        "labels": torch.tensor([1, 2]),
        "masks": tv_tensors.Mask(masks),
    }
    return image, target


def _mask_box(mask):
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def test_flip_and_resize_move_boxes_with_masks():
    torch.manual_seed(0)
    transform = train_transform(sizes=[80, 120], max_size=150, hflip=1.0)
    seen = set()
    for _ in range(8):
        image, target = transform(*_sample())
        h, w = image.shape[-2:]
        seen.add(h)
        assert h in (80, 100) and max(h, w) <= 150  # short side 80 or 120 capped by the long side 150
        assert image.dtype == torch.float32
        for box, mask in zip(target["boxes"], target["masks"]):
            np.testing.assert_allclose(box.tolist(), _mask_box(mask), atol=1.01)
        assert target["boxes"][0, 0] >= w / 2  # the left object (x 10..30 of 60) is on the right after the flip
    assert seen == {80, 100}


def test_random_size_crop_range_and_sanitising():
    torch.manual_seed(0)
    crop = RandomSizeCrop(20, 30)
    sizes = set()
    for _ in range(30):
        image, target = crop(*_sample())
        sizes.add(tuple(image.shape[-2:]))
        assert all(20 <= s <= 30 for s in image.shape[-2:])
        assert target["masks"].shape[-2:] == image.shape[-2:]
    assert len(sizes) > 5
    # A crop away from both objects leaves nothing after sanitising, labels and masks included.
    transform = train_transform(sizes=[40], max_size=100, hflip=0.0,
                                crop={"prob": 1.0, "sizes": [40], "min_size": 10, "max_size": 10})
    counts = set()
    for _ in range(40):
        _, target = transform(*_sample())
        assert len(target["boxes"]) == len(target["labels"]) == len(target["masks"])
        counts.add(len(target["labels"]))
    assert 0 in counts and 1 in counts


def test_collate_keeps_sizes():
    a, b = torch.zeros(3, 10, 20), torch.zeros(3, 30, 5)
    images, targets = collate_detection([(a, {"image_id": 1}), (b, {"image_id": 2})])
    assert [i.shape for i in images] == [a.shape, b.shape] and [t["image_id"] for t in targets] == [1, 2]


def test_packed_records_read_back_plain_values_and_arrays_only():
    import collections

    import numpy as np

    from vtrain.tasks.detection.data import PackedRecords

    records = PackedRecords([{"id": 1, "boxes": np.arange(8, dtype=np.float32).reshape(2, 4), "segmentations": [[1.0]]},
                             {"id": 2, "extra": collections.Counter(a=1)}])
    first = records[0]
    assert first["id"] == 1 and first["segmentations"] == [[1.0]]
    np.testing.assert_array_equal(first["boxes"], np.arange(8, dtype=np.float32).reshape(2, 4))
    with pytest.raises(pickle.UnpicklingError, match="not collections.Counter"):
        records[1]


def mmdet_group_order(groups, batch_size, replicas, seed, epoch):
    """mmdet v2's DistributedGroupSampler.__iter__, transcribed (numpy indices, torch generator): every rank's list."""
    g = torch.Generator().manual_seed(epoch + seed)
    flag, spg = np.asarray(groups), batch_size
    sizes = np.bincount(flag)
    num_samples = sum(int(math.ceil(s / spg / replicas)) * spg for s in sizes)
    indices = []
    for i, size in enumerate(sizes):
        if size > 0:
            indice = np.where(flag == i)[0]
            indice = indice[list(torch.randperm(int(size), generator=g).numpy())].tolist()
            extra = int(math.ceil(size / spg / replicas)) * spg * replicas - len(indice)
            tmp = indice.copy()
            for _ in range(extra // size):
                indice.extend(tmp)
            indice.extend(tmp[:extra % size])
            indices.extend(indice)
    indices = [indices[j] for i in list(torch.randperm(len(indices) // spg, generator=g))
               for j in range(i * spg, (i + 1) * spg)]
    return [indices[num_samples * r: num_samples * (r + 1)] for r in range(replicas)]


def test_aspect_ratio_groups_are_mmdets_and_resume_exactly():
    """The grouped order equals mmdet's DistributedGroupSampler (1 and 2 ranks, two epochs); every batch is one
    group; every image appears; a stopped iterator's state resumes the same remainder."""
    from vtrain.tasks.detection.data import AspectRatioGroupedSampler, aspect_ratio_groups

    records = [{"width": w, "height": h} for w, h in [(64, 48), (48, 64), (80, 60), (50, 50), (90, 40), (30, 70),
                                                       (60, 45), (40, 41), (100, 20), (33, 44), (70, 50)]]
    groups = aspect_ratio_groups(records)
    assert groups == [1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    dataset = list(range(len(records)))
    for replicas in (1, 2):
        samplers = [AspectRatioGroupedSampler(dataset, groups, 2, seed=5, num_replicas=replicas, rank=rank)
                    for rank in range(replicas)]
        for epoch in (0, 3):
            expected = mmdet_group_order(groups, 2, replicas, 5, epoch)
            for rank, sampler in enumerate(samplers):
                order = sampler.indices(epoch)
                assert order == expected[rank] and len(sampler) == len(order)
                assert all(len({groups[i] for i in order[b: b + 2]}) == 1 for b in range(0, len(order), 2))
            assert set().union(*expected) == set(dataset)
    sampler = AspectRatioGroupedSampler(dataset, groups, batch_size=2, seed=5)
    assert len(sampler) == 12  # 6 wide -> 6, 5 others -> 6 (one repeated)
    sampler.set_epoch(2)
    iterator = iter(sampler)
    first = [next(iterator) for _ in range(5)]
    resumed = iter(sampler)
    resumed.load_state_dict(iterator.state_dict())
    rest = list(resumed)
    assert {epoch for epoch, _ in first + rest} == {2}
    assert [i for _, i in first + rest] == sampler.indices(2) != sampler.indices(3)
