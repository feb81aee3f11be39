"""Unreadable data, one policy for the four tasks (vtrain.data.datamodule): skipped and counted where users see it, or named in
one line; a run stops with one line when too much of an epoch or a validation is unreadable."""
from __future__ import annotations

import csv
import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torch.utils.data import DataLoader

from conftest import CONF, TINY_CLS, compose
from vtrain.data.datamodule import CorruptFileError, DataModule, Read, ReadableCollate, SeededDataset, read_rgb

TASK_DATA = sorted(p.stem for p in (CONF / "data").glob("*.yaml"))  # every data config of every task


@pytest.mark.parametrize("data", TASK_DATA)
def test_one_policy_with_one_name_and_default_for_every_task(data):
    defaults = {name: p.default for name, p in inspect.signature(DataModule.__init__).parameters.items()}
    cfg = compose(f"data={data}", "output_dir=/tmp/unused")
    datamodule = instantiate(cfg.data, root="/nowhere")
    assert (cfg.data.skip_corrupt, cfg.data.max_skipped_fraction) == (True, 0.01)
    assert (datamodule.skip_corrupt, datamodule.max_skipped_fraction) == (
        defaults["skip_corrupt"], defaults["max_skipped_fraction"])


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    from vtrain.tasks.segmentation.synthetic import write

    root = tmp_path_factory.mktemp("ade20k")
    write(root, seed=0, num_classes=6, train=4, val=3, height=32, width=40)
    return root


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    from vtrain.tasks.detection.synthetic import write

    root = tmp_path_factory.mktemp("coco")
    write(root, seed=0, train_images=4, val_images=3)
    return root


def _ade_val(root, **options):
    from vtrain.tasks.segmentation.data import SegmentationDataset, list_pairs

    return SegmentationDataset(list_pairs(root, "val"), 6, train=False, mean=(0, 0, 0), std=(1 / 255,) * 3, **options)


def test_an_unreadable_ade20k_image_is_one_line_or_skipped_even_from_a_worker(ade_root, tmp_path):
    """It was PIL's bare UnidentifiedImageError, with a loader worker's traceback around it."""
    from vtrain.tasks.segmentation.data import collate_padded

    root = tmp_path / "ade"
    shutil.copytree(ade_root, root)
    bad = root / "images" / "validation" / "ADE_val_00000001.jpg"
    bad.write_bytes(b"not an image")
    strict = _ade_val(root, skip_corrupt=False)
    loader = DataLoader(strict, batch_size=3, num_workers=1, collate_fn=ReadableCollate(collate_padded))
    with pytest.raises(CorruptFileError) as error:
        next(iter(loader))
    assert str(error.value) == (f"cannot read image {bad} (UnidentifiedImageError: cannot identify image file "
                                f"'{bad}'): fix or remove it, or set data.skip_corrupt=true to skip (and count) "
                                "unreadable files")
    counted = ReadableCollate(collate_padded)([_ade_val(root)[i] for i in range(3)])
    assert (counted.samples, counted.skipped) == (3, 1) and counted.batch["images"].shape[0] == 2


def test_an_unreadable_coco_image_is_one_line_or_skipped(coco_root, tmp_path):
    from vtrain.tasks.detection.data import CocoDataModule, collate_detection

    root = tmp_path / "coco"
    shutil.copytree(coco_root, root)
    bad = sorted((root / "val2017").iterdir())[0]
    bad.write_bytes(b"\xff\xd8 a cut jpeg")
    for skip in (False, True):
        datamodule = CocoDataModule(str(root), num_classes=4, num_workers=0, skip_corrupt=skip)
        datamodule.setup("validate")
        index = [i for i in range(len(datamodule.val_set)) if datamodule.val_set.records[i]["file_name"] == bad.name]
        if not skip:
            with pytest.raises(CorruptFileError, match=rf"^cannot read image {bad} \("):
                datamodule.val_set[index[0]]
            continue
        counted = ReadableCollate(collate_detection)([datamodule.val_set[i] for i in range(len(datamodule.val_set))])
        assert (counted.samples, counted.skipped) == (3, 1) and len(counted.batch[0]) == 2


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation", "video"])
def test_a_batch_with_no_readable_sample_is_none_not_an_index_error(task):
    from vtrain.tasks.detection.data import collate_detection
    from vtrain.tasks.segmentation.data import collate_padded
    from vtrain.tasks.video.data import collate_clips

    collate = {"classification": None, "detection": collate_detection, "segmentation": collate_padded,
               "video": collate_clips}[task]
    assert tuple(ReadableCollate(collate)([None, None, Read(None, 11)])) == (None, 3, 13)


class _Squares(torch.utils.data.Dataset):
    """index -> index squared; the indices in ``bad`` cannot be read."""

    def __init__(self, bad):
        self.bad = set(bad)

    def __len__(self):
        return 20

    def __getitem__(self, i):
        return None if i in self.bad else i * i


def test_an_unreadable_training_sample_is_replaced_by_a_seeded_draw():
    """Batches keep their size (and DDP processes their step); the draw follows the seed, so a resumed run reads
    what the uninterrupted one read."""
    seeded = SeededDataset(_Squares(bad=[3]), seed=0)
    first = seeded[(1, 3)]
    assert first.skipped == 1 and first.sample is not None and first.sample != 9
    assert seeded[(1, 3)] == first and seeded[(1, 4)] == Read(16, 0)
    assert SeededDataset(_Squares(bad=range(20)), seed=0)[(0, 5)] == Read(None, SeededDataset.max_refetch + 1)


def test_16_bit_images_are_read_as_8_bit_not_white(tmp_path):
    """PIL's convert("RGB") clips a 16-bit greyscale PNG at 255 (99% white here); it is read as its high byte, as
    OpenCV reads it for mmseg, and as torchvision's decoder gives it for COCO. Floating-point images are refused."""
    from vtrain.tasks.detection.data import CocoDetectionDataset

    values = (np.arange(32 * 40).reshape(32, 40) * 51 % 65536).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    expected = np.repeat((values >> 8).astype(np.uint8)[..., None], 3, axis=2)
    assert (np.asarray(Image.open(tmp_path / "deep.png").convert("RGB")) == 255).mean() > 0.99  # what PIL does
    np.testing.assert_array_equal(np.asarray(read_rgb(tmp_path / "deep.png")), expected)
    coco = CocoDetectionDataset(tmp_path, tmp_path / "annotations.json", None, None, targets=False, masks=False)
    image = coco.read_image({"file_name": "deep.png", "height": 32, "width": 40, "id": 1})
    assert image.dtype == torch.uint8
    np.testing.assert_array_equal(image.permute(1, 2, 0).numpy(), expected)
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "float.tiff")
    with pytest.raises(CorruptFileError, match=r"float\.tiff is a floating-point image \(PIL mode F\): save it as"):
        read_rgb(tmp_path / "float.tiff")


def test_16_bit_annotations_are_read_as_they_are_or_refused(tmp_path):
    """Class indices in a 16-bit PNG are the values themselves; one above 255 cannot be a class (8-bit labels)."""
    from vtrain.tasks.segmentation.data import AnnotationError, read_label

    labels = np.arange(20, dtype=np.uint16).reshape(4, 5) % 7  # 0 ("other") and 1..6
    Image.fromarray(labels).save(tmp_path / "label16.png")
    assert Image.open(tmp_path / "label16.png").mode == "I;16"
    read = read_label(str(tmp_path / "label16.png"), "image.jpg", (4, 5), 6, True, False)
    np.testing.assert_array_equal(read, np.where(labels == 0, 255, labels - 1))
    labels[1, 2] = 300
    Image.fromarray(labels).save(tmp_path / "label16.png")
    with pytest.raises(AnnotationError, match=r"label16\.png has values above 255: class indices must fit in 8 bits"):
        read_label(str(tmp_path / "label16.png"), "image.jpg", (4, 5), 6, True, False)


# ------------------------------------------------------------------------------------------------ in a run
def _fit(*overrides, root):
    """A run of the composed experiment in this process (the CLI's flow without its exit), with the default
    callbacks: the data module's counts, SkippedSamples, MetricsJSON."""
    from vtrain.training.build import build_task
    from vtrain.training.trainer import build_trainer

    cfg = compose(*overrides, f"data.root={root}", f"output_dir={root.parent / 'run'}")
    datamodule = instantiate(cfg.data)
    trainer = build_trainer(cfg).trainer
    trainer.fit(build_task(cfg), datamodule=datamodule)
    return trainer, cfg


def _corrupt(path):
    path.write_bytes(b"not an image")
    return path


def test_skipped_images_are_counted_in_metrics_json_and_the_progress_bar(imagenet_root, tmp_path):
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_root, root)
    _corrupt(sorted((root / "train").rglob("*.JPEG"))[5])
    _corrupt(sorted((root / "val").rglob("*.JPEG"))[2])
    trainer, cfg = _fit(*TINY_CLS, "data.max_skipped_fraction=0.1", "+trainer.num_sanity_val_steps=0",
                        "trainer.max_epochs=2", "trainer.log_every_n_steps=2", root=root)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    # one training image in each epoch's 48, replaced by another; one of the 16 validation images, left out
    assert metrics["final"]["train/skipped_samples"] == 2 and metrics["final"]["val/skipped_samples"] == 1
    assert {"train/skipped_samples", "val/skipped_samples"} <= set(trainer.progress_bar_metrics)
    assert "train/skipped_samples" not in metrics["best"]
    # every training row of metrics.csv has the count over the run so far (logged when it changes)
    with open(tmp_path / "run" / "metrics.csv", newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["train/loss_step"]]
    counts = [float(row["train/skipped_samples"]) for row in rows]
    assert [int(row["step"]) for row in rows] == [1, 3, 5, 7, 9, 11]
    assert counts == sorted(counts) and counts[2] == 1 and counts[-1] == 2


def test_too_many_unreadable_training_videos_stop_the_run_with_one_line(tmp_path):
    """Kinetics with every training video unreadable used to train on nothing and exit 0."""
    root = tmp_path / "kinetics"
    for split, count in (("train", 4), ("val", 2)):
        for motion in ("grow", "shrink"):
            (root / split / motion).mkdir(parents=True)
            for i in range(count):
                (root / split / motion / f"{motion}_{i}.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    with pytest.raises(CorruptFileError) as error:
        _fit("experiment=quickstart_video", "data.num_classes=2", "data.batch_size=4",
             "+trainer.num_sanity_val_steps=0", "callbacks.progress_bar=null", root=root)
    message = str(error.value)
    assert "\n" not in message and message.startswith("44 samples of this training epoch could not be read (of 8 in ")
    assert "more than data.max_skipped_fraction=0.01 allows" in message


def test_a_validation_set_with_no_readable_image_is_one_clear_line(imagenet_root, tmp_path):
    """Every validation image unreadable: the limit stops the run at the sanity check; with no limit
    (max_skipped_fraction=1) it stops after the validation, where Lightning's "monitored metric not found" would
    have come."""
    root = tmp_path / "imagenet"
    shutil.copytree(imagenet_root, root)
    for path in (root / "val").rglob("*.JPEG"):
        _corrupt(path)
    with pytest.raises(CorruptFileError, match=r"^8 samples of this validation could not be read \(of 16 in "):
        _fit(*TINY_CLS, root=root)
    with pytest.raises(CorruptFileError, match=rf"^none of the 16 validation samples of {root} could be read"):
        _fit(*TINY_CLS, "data.max_skipped_fraction=1", "trainer.limit_train_batches=1", root=root)
