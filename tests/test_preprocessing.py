"""What the weights expect of an image (conf/preprocessing/): the evaluation transform of each recipe against its
reference's, and every task reading the one place."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from torchvision import transforms

from conftest import compose

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(width: int = 331, height: int = 250) -> Image.Image:
    """Not square, so that a centre crop and a resize of both sides differ."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _eval_transform(*overrides: str):
    cfg = compose(*overrides, "data.root=/nowhere", "output_dir=/tmp/unused")
    return instantiate(cfg.data).eval_transform(), cfg


def test_timm_vit_weights_evaluate_with_their_own_preprocessing():
    """timm's default ViT-B/16 weights (augreg): mean = std = 0.5, crop_pct 0.9, as their pretrained_cfg says."""
    from timm.data import create_transform, resolve_data_config
    from timm.models import get_pretrained_cfg

    ours, cfg = _eval_transform("experiment=vit_b16_imagenet", "preprocessing=vit_augreg")
    assert list(cfg.data.mean) == list(cfg.data.std) == [0.5, 0.5, 0.5] and cfg.data.eval_crop_pct == 0.9
    reference = create_transform(**resolve_data_config({}, pretrained_cfg=get_pretrained_cfg(
        "vit_base_patch16_224").to_dict()))
    image = _image()
    torch.testing.assert_close(ours(image), reference(image), rtol=0, atol=0)
    assert ours(image).shape == (3, 224, 224)


@pytest.mark.parametrize("experiment", ["vit_b16_imagenet", "vit_s16_imagenet", "swin_t_imagenet"])
def test_deit_and_swin_recipes_evaluate_as_their_code(experiment):
    """DeiT's datasets.py / Swin's data/build.py (TEST.CROP): resize to int(224 / 0.875) = 256, bicubic, centre
    crop 224, ImageNet mean and std. (timm's pretrained_cfg of these weights says crop_pct 0.9; the recipes follow
    the code that trained them.)"""
    ours, _ = _eval_transform(f"experiment={experiment}")
    reference = transforms.Compose([
        transforms.Resize(int(224 / 0.875), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    image = _image()
    torch.testing.assert_close(ours(image), reference(image), rtol=0, atol=0)


def test_swin_b_384_resizes_straight_to_384_without_a_crop():
    """The official Swin-B 384 fine-tuning config (TEST.CROP False) resizes both sides to 384 (data/build.py); the
    backbone's config selects that preprocessing, an explicit preprocessing= still wins."""
    ours, cfg = _eval_transform("experiment=swin_b_imagenet", "backbone=swin_b_384")
    assert cfg.data.eval_crop_pct == 1.0 and cfg.data.eval_crop_mode == "squash"
    reference = transforms.Compose([
        transforms.Resize((384, 384), interpolation=transforms.InterpolationMode.BICUBIC), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    image = _image()
    torch.testing.assert_close(ours(image), reference(image), rtol=0, atol=0)
    cropped, _ = _eval_transform("experiment=swin_b_imagenet", "backbone=swin_b_384", "preprocessing=imagenet")
    assert cropped(image).shape == (3, 384, 384) and not torch.equal(cropped(image), reference(image))


def test_every_task_normalises_with_the_chosen_preprocessing(tmp_path):
    """One choice (preprocessing=vit_augreg: pixels to [-1, 1]) reaches segmentation and video data and the
    detector."""
    from vtrain.tasks.segmentation.data import SegmentationDataset

    seg = instantiate(compose("experiment=quickstart_seg", "preprocessing=vit_augreg", "data.root=/nowhere",
                              "output_dir=/tmp/unused").data)
    dataset = SegmentationDataset([], 6, False, **seg.sample_options)
    torch.testing.assert_close(dataset.mean.flatten(), torch.full((3,), 127.5))
    torch.testing.assert_close(dataset.std.flatten(), torch.full((3,), 127.5))

    video = instantiate(compose("experiment=quickstart_video", "preprocessing=vit_augreg", "data.root=/nowhere",
                                "output_dir=/tmp/unused").data)
    clip = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 4, 4)  # (T, 3, H, W)
    torch.testing.assert_close(video.normalize(clip)[:, :, 0, 0], torch.tensor([[-1.0, 1.0]] * 3))

    cfg = compose("experiment=quickstart_det", "preprocessing=vit_augreg", "output_dir=/tmp/unused")
    assert list(cfg.task.image_mean) == list(cfg.task.image_std) == [0.5, 0.5, 0.5]
    default = compose("experiment=quickstart_det", "output_dir=/tmp/unused")
    assert list(default.task.image_mean) == list(IMAGENET_MEAN) and list(default.task.image_std) == list(IMAGENET_STD)
