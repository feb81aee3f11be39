"""bench.pipeline=true: vtrain's training pipeline and its reference's, on the same files with the same settings and
seeds; the report; bad input in one line. Nothing here is timed."""
from __future__ import annotations

import statistics

import pytest
import torch
from omegaconf import OmegaConf

from vtrain.config import ConfigError
from vtrain.data.samplers import seed_host
from vtrain.tools.bench.pipeline import model_input, run_pipeline
from vtrain.tools.bench.reference_pipelines import reference_pipeline

IMAGENET = "vtrain.tasks.classification.data.ImageFolderDataModule"


def both(datamodule, index: int):
    """Sample ``index`` through vtrain's training set and through the reference, each seeded with the index (as the
    bench seeds them)."""
    datamodule.setup("fit")
    reference = reference_pipeline(datamodule)
    seed_host(index)
    ours = datamodule.train_set[index]
    seed_host(index)
    return ours, reference.load(index)


def test_imagenet_sides_are_equal_under_the_same_seed(imagenet_root, one_thread):
    """vtrain's ImageNet set is timm's create_transform on the same RGB image: RandAugment, random erasing, crop and
    flip drawn alike give the same tensor."""
    from vtrain.tasks.classification.data import ImageFolderDataModule

    datamodule = ImageFolderDataModule(str(imagenet_root), num_classes=4, img_size=32, num_workers=0, augment={
        "auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 1.0, "re_mode": "pixel", "color_jitter": 0.4,
        "interpolation": "bicubic"})
    for index in (0, 5):
        (ours, label), (theirs, their_label) = both(datamodule, index)
        assert ours.dtype == theirs.dtype == torch.float32 and ours.shape == theirs.shape == (3, 32, 32)
        assert torch.equal(ours, theirs) and label == their_label


def test_coco_sides_give_the_same_targets_and_shapes(tmp_path, one_thread):
    """torchvision's multiscale preset on a PIL image against vtrain's on decode_image's tensor: the same short side,
    flip, boxes, labels and masks; the images differ only by the resize of PIL and of tensors."""
    from vtrain.tasks.detection.data import CocoDataModule
    from vtrain.tasks.detection.synthetic import write

    write(tmp_path, seed=1, train_images=3, val_images=1, min_side=48, max_side=64)
    datamodule = CocoDataModule(str(tmp_path), num_classes=4, train_sizes=[40, 56], max_size=90, num_workers=0)
    datamodule.setup("fit")
    assert len(datamodule.train_set) >= 2  # images with objects
    for index in range(len(datamodule.train_set)):
        (ours, target), (theirs, their_target) = both(datamodule, index)
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
        for key in ("boxes", "labels", "masks"):
            assert torch.equal(target[key], their_target[key]), key
        assert (ours - theirs).abs().max() <= 1 / 255 + 1e-6  # PIL's and the tensor resize's rounding: one level


def test_ade20k_sides_give_the_same_shapes(tmp_path, one_thread):
    """mmseg's pipeline re-stated with PIL against vtrain's: the padded crop and its label of the same size and type."""
    from vtrain.tasks.segmentation.data import SegmentationDataModule
    from vtrain.tasks.segmentation.synthetic import write

    write(tmp_path, train=2, val=1, height=40, width=56)
    datamodule = SegmentationDataModule(str(tmp_path), num_classes=6, img_scale=(56, 40), crop_size=(32, 48),
                                        num_workers=0)
    ours, theirs = both(datamodule, 1)
    for key, dtype in (("image", torch.float32), ("label", torch.int64)):
        assert ours[key].shape == theirs[key].shape and ours[key].dtype == theirs[key].dtype == dtype
    assert ours["image"].shape == (3, 32, 48)


def test_kinetics_sides_sample_the_same_clip(tmp_path, one_thread):
    """mmaction2's PyAVDecode (every frame converted at full size, resized after) against vtrain's reader (the
    sampled frames resized by swscale): the same frames, crop and flip, so the clips nearly agree."""
    from vtrain.tasks.video.data import KineticsDataModule
    from vtrain.tasks.video.synthetic import write

    write(tmp_path, num_classes=1, train_per_class=1, val_per_class=1, size=32, min_frames=8, max_frames=8)
    datamodule = KineticsDataModule(str(tmp_path), num_classes=1, clip_len=4, frame_interval=2, train_short_side=24,
                                    crop_size=16, scale=(0.5, 1.0), num_workers=0)
    ours, theirs = both(datamodule, 0)
    assert ours["clips"].shape == theirs["clips"].shape == (3, 4, 16, 16)
    assert ours["clips"].dtype == theirs["clips"].dtype == torch.float32
    # normalised values: two bilinear resizes (swscale's, torch's) of the same frames and window differ by 0.04 on
    # average; another seed's clip differs from vtrain's by 0.2
    assert (ours["clips"] - theirs["clips"]).abs().mean() < 0.08


def bench_settings(**changes):
    return OmegaConf.create({"pipeline_samples": 2, "pipeline_repeats": 3, "pipeline_warmup": 0,
                             "pipeline_decode": True, **changes})


def test_report_holds_each_side_the_ratio_and_the_decoders(imagenet_root):
    cfg = OmegaConf.create({"data": {"_target_": IMAGENET, "root": str(imagenet_root), "num_classes": 4, "img_size": 32,
                                     "num_workers": 0}})
    report = run_pipeline(cfg, bench_settings(), "tiny")
    assert report["experiment"] == "tiny" and report["data"] == "ImageFolderDataModule"
    assert report["reference"] == "timm create_transform"
    assert report["outputs"]["vtrain"] == report["outputs"]["reference"] == {"shape": [3, 32, 32], "dtype": "float32"}
    blocks = report["blocks_s"]
    ratios = [theirs / ours for ours, theirs in zip(blocks["vtrain"], blocks["reference"])]
    assert len(ratios) == 3 and report["ratio"] == pytest.approx(statistics.median(ratios))
    assert report["samples_per_s"]["vtrain"] == pytest.approx(2 / statistics.median(blocks["vtrain"]))
    assert report["settings"]["threads"] == 1 and report["settings"]["training_samples"] == 48
    assert set(report["load_average"]) == {"before", "after"}
    decode = report["decode"]
    # the synthetic JPEGs (PIL-written, baseline) decode to the same pixels with libjpeg-turbo and PIL
    assert decode["max_abs_difference"] == 0 and decode["identical"] and decode["files_checked"] == 48
    assert torch.get_num_threads() > 0  # restored


def test_bad_root_and_experiment_are_one_line(tmp_path):
    from vtrain.tools.bench.cli import pipeline

    cfg = OmegaConf.create({"data": {"_target_": IMAGENET, "root": str(tmp_path / "none"), "num_classes": 4}})
    with pytest.raises(ConfigError, match="none") as error:
        run_pipeline(cfg, bench_settings())
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="quickstartt") as error:
        pipeline(["experiment=quickstartt", "bench.pipeline=true"])
    assert "\n" not in str(error.value)


def test_model_input_is_the_image_or_the_clips():
    x = torch.zeros(1)
    assert model_input((x, 3)) is x and model_input({"image": x, "label": 1}) is x and model_input({"clips": x}) is x
