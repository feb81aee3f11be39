"""Every recipe against a transcription of its reference (docs/recipes.md is the table of the same comparison).

For each experiment the reference's effective values are written out here from its own files: the lr and weight
decay each kind of parameter gets (on the real model, built on the meta device), the lr at points of the schedule
(the reference's formula), the samples per optimizer step on several device counts, the clip sampling and the
model options that change results. The pieces the recipes rely on are checked against their references too:
ResNetV1c against timm's resnet50c and mmseg's checkpoint keys, DeiT's repeated-augmentation sampler against its
samplers.py, mmaction2's MultiScaleCrop against its crop sizes and fixed positions.
"""
from __future__ import annotations

import functools
import inspect
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pytest
import timm
import torch
from hydra.utils import get_class
from omegaconf import OmegaConf
from torch import nn

from conftest import ROOT, compose
from vtrain.config import ConfigError
from vtrain.training.build import build_task
from vtrain.training.optim import build_optimizer, build_scheduler, lr_scale_factor
from vtrain.config.validate import accumulate_grad_batches
from vtrain.config.validate import validate

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------ the references' schedules
# Each: (update, updates per epoch) -> the lr of a parameter with lr multiplier 1, as the reference computes it.
def swin_timm_cosine(lr: float, warmup_lr: float, min_lr: float, warmup_epochs: int, epochs: int):
    """Swin lr_scheduler.py as the paper's models and the released weights were trained (timm CosineLRScheduler,
    t_in_epochs=False, ``t_initial=num_steps``, no warm-up prefix: the repository's WARMUP_PREFIX came in October
    2022): linear from ``warmup_lr`` to ``lr`` over the warm-up epochs, then the cosine of the step over all the
    epochs down to ``min_lr`` (each as main.py scales it by the images per update / 512)."""
    def schedule(u: int, s: int) -> float:
        warm, total = warmup_epochs * s, epochs * s
        if u < warm:
            return warmup_lr + u * (lr - warmup_lr) / warm
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * u / total))
    return schedule


swin_cosine = swin_timm_cosine(1e-3, 1e-6, 1e-5, 20, 300)  # ImageNet-1K at 1024 images: 5e-4, 5e-7, 5e-6 x 2
# ImageNet-22K pre-training at 4096 images (1.25e-4, 1.25e-7, 1.25e-6 x 8) and the 22K->1K fine-tunes at 1024
# (2e-5, 2e-8, 2e-7 x 2): configs/swin/swin_{base,large}_patch4_window7_224_22k.yaml, *_22kto1k_finetune.yaml
swin_22k_cosine = swin_timm_cosine(1e-3, 1e-6, 1e-5, 5, 90)
swin_22kto1k_cosine = swin_timm_cosine(4e-5, 4e-8, 4e-7, 5, 30)


def deit_timm_cosine(lr: float, min_lr: float, epochs: int):
    """DeiT main.py: timm's cosine in epochs (warm-up 5 from 1e-6, neither scaled, t_initial ``epochs``, no prefix)
    from ``lr`` (as main.py scales it) to ``min_lr``; ``lr_scheduler.step(epoch)`` after each epoch, so epoch e
    trains at t = e - 1."""
    def schedule(u: int, s: int) -> float:
        t = max(u // s - 1, 0)
        if t < 5:
            return 1e-6 + t * (lr - 1e-6) / 5
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / epochs))
    return schedule


deit_cosine = deit_timm_cosine(1e-3, 1e-5, 300)  # at 1024 images: lr 5e-4 * 1024 / 512


def torchvision_step(u: int, s: int) -> float:
    """references/classification/train.py: StepLR(step_size=30, gamma=0.1) stepped per epoch, lr 0.1."""
    return 0.1 * 0.1 ** (u // s // 30)


def san_cosine(u: int, s: int) -> float:
    """hszhao/SAN tool/train.py: lr_scheduler.CosineAnnealingLR(T_max=100 epochs), stepped after each epoch, lr 0.1."""
    return 0.5 * 0.1 * (1 + math.cos(math.pi * (u // s) / 100))


def vit_jax_schedule(base: float, warmup: int, total_epochs: int | None = None, total_steps: int | None = None,
                     decay: str = "cosine", linear_end: float = 1e-5):
    """google-research/vision_transformer vit_jax/utils.py create_learning_rate_schedule: decay_type 'cosine',
    base * 0.5 * (1 + cos(pi * progress)), or 'linear', linear_end + (base - linear_end) * (1 - progress), with
    progress = clip((step - warmup) / (total - warmup), 0, 1), times min(1, step / warmup); the total in epochs (at
    the check's updates per epoch) or in steps."""
    def schedule(u: int, s: int) -> float:
        total = total_steps or total_epochs * s
        progress = min(max((u - warmup) / (total - warmup), 0.0), 1.0)
        decayed = (base * 0.5 * (1 + math.cos(math.pi * progress)) if decay == "cosine"
                   else linear_end + (base - linear_end) * (1 - progress))
        return decayed * min(1.0, u / warmup)
    return schedule


def mmcv_step(lr: float, milestones: tuple[int, ...], warmup: int | None = None, ratio: float = 0.001):
    """mmcv StepLrUpdaterHook by epoch (lr x0.1 from each milestone epoch on) and its linear warm-up by iterations:
    regular lr x (1 - (1 - i / warmup)(1 - ratio)) while i < warmup (mmdet schedule_1x.py: 500, 0.001)."""
    def schedule(u: int, s: int) -> float:
        regular = lr * 0.1 ** sum(u // s >= m for m in milestones)
        if warmup and u < warmup:
            return regular * (1 - (1 - u / warmup) * (1 - ratio))
        return regular
    return schedule


def mmcv_poly(lr: float, power: float, min_lr: float, total: int, warmup: int = 0, ratio: float = 0.0):
    """mmcv PolyLrUpdaterHook by iteration: (lr - min) (1 - i / total)^power + min, times the linear warm-up factor."""
    def schedule(u: int, s: int) -> float:
        regular = (lr - min_lr) * (1 - u / total) ** power + min_lr
        return regular * (1 - (1 - u / warmup) * (1 - ratio)) if u < warmup else regular
    return schedule


def pix2seq_warmup_linear(lr: float, warmup_epochs: int, epochs: int, end_lr_factor: float):
    """Pix2seq models/model_utils.py WarmUpAndDecay('linear'): u / warmup x lr during the warm-up, then Keras'
    PolynomialDecay(lr, total - warmup, lr x end_lr_factor, power 1) of the steps after it."""
    def schedule(u: int, s: int) -> float:
        warmup, total = warmup_epochs * s, epochs * s
        if u < warmup:
            return u / warmup * lr
        progress = min(u - warmup, total - warmup) / (total - warmup)
        return (lr - lr * end_lr_factor) * (1 - progress) + lr * end_lr_factor
    return schedule


def mmcv_cosine_by_epoch(u: int, s: int) -> float:
    """Video Swin lr_config: CosineAnnealing by epoch over 30 epochs (min 0), linear warm-up over 2.5 epochs of
    iterations from warmup_ratio 0.1 (mmcv's default) times the regular lr; lr 1e-3."""
    regular = 0.5 * 1e-3 * (1 + math.cos(math.pi * (u // s) / 30))
    warm = 2.5 * s
    return regular * (1 - (1 - u / warm) * 0.9) if u < warm else regular


@dataclass
class Reference:
    """What a recipe's reference does, transcribed from its files (``source``)."""

    source: str
    batch: int                                   # samples per optimizer step in the reference run
    params: dict[str, tuple[float, float]]       # vtrain parameter -> (lr, weight decay) of its counterpart
    schedule: Callable[[int, int], float]
    points: tuple[int, ...]                      # updates at which the schedule is compared
    epochs: int = 0                              # 0: iteration-based (values.trainer.max_steps)
    update_interval: tuple[int, int] | None = None  # (devices, accumulation) of the reference run
    values: dict[str, Any] = field(default_factory=dict)  # config key -> the reference's value
    pretrained: str | None = None                # the reference's ImageNet checkpoint
    published: bool = True                       # false: the start is a vtrain run of another recipe, no download
    rtol_before: int = 0                         # updates below this compared at 1% (see swin_t_upernet_ade20k)
    steps_per_epoch: int = 10                    # of the schedule check (iteration-based: 1000)


SWIN_RULE = {  # Swin main.py set_weight_decay: 1-D, .bias, skip absolute_pos_embed, keyword relative_position_bias_table
    "backbone.layers.0.blocks.0.norm1.weight": (1e-3, 0.0),
    "backbone.layers.0.blocks.0.attn.qkv.bias": (1e-3, 0.0),
    "backbone.layers.0.blocks.0.attn.qkv.weight": (1e-3, 0.05),
    "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (1e-3, 0.0),  # 2-D: exempt by its name
    "head.weight": (1e-3, 0.05), "head.bias": (1e-3, 0.0),
}
# The 22K->1K fine-tunes: the same rule at lr 4e-5 and weight decay 1e-8
SWIN_22KTO1K_RULE = {name: (4e-5, 1e-8 if decay else 0.0) for name, (_, decay) in SWIN_RULE.items()}
# config.py's AUG defaults, which the 22k and 22kto1k configs keep
SWIN_AUGMENT = {"data.augment.auto_augment": "rand-m9-mstd0.5-inc1", "data.augment.re_prob": 0.25,
                "task.mixup.mixup_alpha": 0.8, "task.mixup.cutmix_alpha": 1.0, "task.mixup.switch_prob": 0.5,
                "task.label_smoothing": 0.1, "trainer.gradient_clip_val": 5.0, "backbone.drop_path_rate": 0.2}
RESNET_V1C = "resnet50_v1c-2cccc1ad.pth"
# mmseg _base_/models/fcn_r50-d8.py (ResNetV1c, dilated to stride 8, SyncBN, auxiliary FCN head 0.4), fp32
MMSEG_R50_D8 = {"backbone.deep_stem": True, "backbone.output_stride": 8, "trainer.precision": "32-true",
                "trainer.sync_batchnorm": True, "task.aux_weight": 0.4}


def mmseg_sgd(lr: float, weight_decay: float) -> dict[str, tuple[float, float]]:
    """mmseg's SGD without paramwise_cfg: every parameter (stem conv, BN bias, heads' classifiers) at lr, decayed."""
    names = ("backbone.conv1.1.weight", "backbone.layer1.0.bn1.bias", "head.classifier.bias", "aux_head.classifier.bias")
    return {name: (lr, weight_decay) for name in names}


TORCHVISION_R50 = "resnet50-0676ba61.pth"
SWIN_T_IN1K = "swin_tiny_patch4_window7_224.pth"

REFERENCES = {
    "swin_t_imagenet": Reference(
        source="Swin-Transformer configs/swin/swin_tiny_patch4_window7_224.yaml, config.py, lr_scheduler.py, optimizer.py",
        batch=1024, params=SWIN_RULE, schedule=swin_cosine, epochs=300,
        points=(0, 5, 199, 200, 201, 1500, 2999),
        values={"backbone.drop_path_rate": 0.2, "trainer.gradient_clip_val": 5.0, "data.augment.re_prob": 0.25}),
    "moby_swin_t_imagenet": Reference(
        source="Transformer-SSL configs/moby_swin_tiny.yaml, config.py, moby_main.py (lr, warm-up and min lr x "
               "batch / 512), get_started.md (8 GPUs x 64), models/build.py and moby.py, optimizer.py (the MoBY "
               "model has no no_weight_decay: only 1-D tensors and biases are exempt), lr_scheduler.py",
        batch=512, epochs=300, schedule=swin_timm_cosine(1e-3, 5e-7, 5e-6, 5, 300),
        points=(0, 25, 49, 50, 51, 1500, 2999),
        params={"backbone.layers.0.blocks.0.norm1.weight": (1e-3, 0.0),
                "backbone.layers.0.blocks.0.attn.qkv.bias": (1e-3, 0.0),
                "backbone.layers.0.blocks.0.attn.qkv.weight": (1e-3, 0.05),
                "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (1e-3, 0.05),
                "projector.linear_hidden.1.weight": (1e-3, 0.05), "projector.linear_hidden.2.weight": (1e-3, 0.0),
                "predictor.linear_out.weight": (1e-3, 0.05), "predictor.linear_out.bias": (1e-3, 0.0)},
        values={"backbone.drop_path_rate": 0.2, "task.target_drop_path_rate": 0.0, "task.momentum": 0.99,
                "task.temperature": 0.2, "task.queue_size": 4096, "task.proj_layers": 2, "task.pred_layers": 2,
                "task.hidden_dim": 4096, "task.out_dim": 256, "data.crop_scale": 0.08, "data.blur": [1.0, 0.1],
                "data.solarize": [0.0, 0.2], "trainer.gradient_clip_val": 5.0, "trainer.sync_batchnorm": True,
                "optim.betas": [0.9, 0.999], "optim.eps": 1e-8}),
    "moby_deit_s_imagenet": Reference(
        source="Transformer-SSL configs/moby_deit_small.yaml (timm vit_deit_small_patch16_224), the rest as "
               "moby_swin_t_imagenet",
        batch=512, epochs=300, schedule=swin_timm_cosine(1e-3, 5e-7, 5e-6, 5, 300),
        points=(0, 25, 49, 50, 51, 1500, 2999),
        params={"backbone.pos_embed": (1e-3, 0.05), "backbone.cls_token": (1e-3, 0.05),
                "backbone.blocks.0.norm1.weight": (1e-3, 0.0), "backbone.blocks.0.attn.qkv.bias": (1e-3, 0.0),
                "backbone.blocks.0.attn.qkv.weight": (1e-3, 0.05), "projector.linear_hidden.1.weight": (1e-3, 0.05)},
        values={"backbone.embed_dim": 384, "backbone.depth": 12, "backbone.drop_path_rate": 0.2,
                "task.target_drop_path_rate": 0.0, "task.queue_size": 4096, "task.temperature": 0.2,
                "trainer.gradient_clip_val": 5.0, "trainer.sync_batchnorm": True}),
    "moby_swin_t_linear": Reference(
        source="Transformer-SSL moby_linear.py (parse_option fixes SGD, --lr 1.0, no weight decay, 100 epochs, 5 "
               "warm-up, --drop-path-rate 0.2, SSL_LINEAR_AUG, no Mixup; lr x batch / 512), config.py (label "
               "smoothing 0.1, clip 5.0, warm-up 5e-7, min 5e-6), optimizer.py (SGD nesterov), data/build.py",
        batch=512, epochs=100, schedule=swin_timm_cosine(1.0, 5e-7, 5e-6, 5, 100),
        points=(0, 25, 49, 50, 51, 500, 999),
        params={"head.weight": (1.0, 0.0), "head.bias": (1.0, 0.0)},
        values={"task.linear_probe": True, "task.mixup": None, "task.label_smoothing": 0.1, "task.head_drop": 0.0,
                "backbone.drop_path_rate": 0.2, "optim.momentum": 0.9, "optim.nesterov": True,
                "trainer.gradient_clip_val": 5.0, "data.augment.auto_augment": None, "data.augment.re_prob": 0.0,
                "data.augment.color_jitter": None, "data.augment.interpolation": "bilinear",
                "data.augment.hflip": 0.5, "data.eval_crop_pct": 0.875, "data.eval_crop_mode": "center",
                "data.eval_interpolation": "bilinear"}),
    "moby_deit_s_linear": Reference(
        source="Transformer-SSL moby_linear.py with configs/moby_deit_small.yaml: moby_swin_t_linear's values",
        batch=512, epochs=100, schedule=swin_timm_cosine(1.0, 5e-7, 5e-6, 5, 100),
        points=(0, 25, 49, 50, 51, 500, 999),
        params={"head.weight": (1.0, 0.0), "head.bias": (1.0, 0.0)},
        values={"backbone.embed_dim": 384, "task.linear_probe": True, "task.mixup": None,
                "task.label_smoothing": 0.1, "backbone.drop_path_rate": 0.2, "optim.nesterov": True,
                "trainer.gradient_clip_val": 5.0, "data.augment.auto_augment": None,
                "data.eval_interpolation": "bilinear"}),
    "swin_b_imagenet22k": Reference(
        source="Swin-Transformer configs/swin/swin_base_patch4_window7_224_22k.yaml, config.py, main.py, "
               "get_started.md (64 per GPU x 8 GPUs x 8 accumulation), data/build.py (21841 classes)",
        batch=4096, update_interval=(8, 8), params=SWIN_RULE, schedule=swin_22k_cosine, epochs=90,
        points=(0, 25, 49, 50, 51, 400, 899),
        values={**SWIN_AUGMENT, "data.num_classes": 21841, "task.num_classes": 21841,
                "data.lists.train": "ILSVRC2011fall_whole_map_train.txt"}),
    "swin_b_22kto1k_224": Reference(
        source="Swin-Transformer configs/swin/swin_base_patch4_window7_224_22kto1k_finetune.yaml, config.py, main.py, "
               "get_started.md (64 per GPU x 8 GPUs x 2 accumulation), utils.py load_pretrained (map22kto1k.txt)",
        batch=1024, update_interval=(8, 2), params=SWIN_22KTO1K_RULE, schedule=swin_22kto1k_cosine, epochs=30,
        points=(0, 25, 49, 50, 51, 150, 299), pretrained="swin_base_patch4_window7_224_22k.pth",
        values={**SWIN_AUGMENT, "data.num_classes": 1000, "data.eval_crop_pct": 0.875}),
    "vit_s16_imagenet": Reference(
        source="deit main.py (first release) with timm create_optimizer / create_scheduler, samplers.py",
        batch=1024, epochs=300, schedule=deit_cosine, points=(0, 9, 10, 19, 20, 49, 50, 60, 1500, 2999),
        params={  # timm add_weight_decay(skip_list=model.no_weight_decay() = {pos_embed, cls_token})
            "backbone.pos_embed": (1e-3, 0.0), "backbone.cls_token": (1e-3, 0.0),
            "backbone.blocks.0.norm1.weight": (1e-3, 0.0), "backbone.blocks.0.attn.qkv.bias": (1e-3, 0.0),
            "backbone.blocks.0.attn.qkv.weight": (1e-3, 0.05), "head.weight": (1e-3, 0.05)},
        values={"data.repeated_augmentation.repeats": 3, "backbone.drop_path_rate": 0.1,
                "trainer.gradient_clip_val": None, "data.augment.auto_augment": "rand-m9-mstd0.5-inc1",
                "data.augment.re_prob": 0.25, "task.mixup.mixup_alpha": 0.8, "task.mixup.cutmix_alpha": 1.0,
                "task.mixup.switch_prob": 0.5, "task.label_smoothing": 0.1, "data.eval_crop_pct": 0.875}),
    "deit_b_384_finetune": Reference(
        source="deit README (fine-tune DeiT-base at 384: --batch-size 32 on 2 nodes x 8 GPUs, --lr 5e-6 "
               "--weight-decay 1e-8 --epochs 30 --min-lr 5e-6), main.py defaults and --finetune",
        batch=512, update_interval=(16, 1), epochs=30, schedule=deit_timm_cosine(5e-6, 5e-6, 30),
        points=(0, 9, 10, 29, 49, 50, 51, 299),
        params={"backbone.pos_embed": (5e-6, 0.0), "backbone.blocks.0.norm1.weight": (5e-6, 0.0),
                "backbone.blocks.0.attn.qkv.weight": (5e-6, 1e-8), "head.weight": (5e-6, 1e-8)},
        pretrained="deit_base_patch16_224-b5f2ef4d.pth",
        values={"backbone.img_size": 384, "backbone.drop_path_rate": 0.1, "data.repeated_augmentation.repeats": 3,
                "data.augment.auto_augment": "rand-m9-mstd0.5-inc1", "data.augment.re_prob": 0.25,
                "task.mixup.mixup_alpha": 0.8, "task.mixup.cutmix_alpha": 1.0, "task.label_smoothing": 0.1,
                "trainer.gradient_clip_val": None, "data.eval_crop_pct": 0.875, "data.eval_crop_mode": "center"}),
    "resnet50_imagenet": Reference(
        source="torchvision references/classification/train.py defaults (norm_weight_decay=None), resnet50()",
        batch=256, epochs=90, schedule=torchvision_step, points=(0, 299, 300, 599, 600, 899),
        params={"backbone.conv1.weight": (0.1, 1e-4), "backbone.bn1.weight": (0.1, 1e-4),
                "backbone.layer1.0.bn3.bias": (0.1, 1e-4), "head.bias": (0.1, 1e-4)},
        values={"backbone.zero_init_last": False, "data.augment.auto_augment": None, "task.mixup": None,
                "trainer.precision": "32-true",
                "task.label_smoothing": 0.0, "data.eval_interpolation": "bilinear"}),
    "san_resnet26_imagenet": Reference(
        source="hszhao/SAN README (Train Parameters), config/imagenet/*.yaml, tool/train.py (SGD over "
               "model.parameters(), CosineAnnealingLR per epoch, RandomResizedCrop + flip, Resize 256 + CenterCrop 224)",
        batch=256, epochs=100, schedule=san_cosine, points=(0, 9, 10, 11, 500, 999),
        params={"backbone.conv1.weight": (0.1, 1e-4), "backbone.bn1.weight": (0.1, 1e-4),
                "backbone.layer1.0.bn3.bias": (0.1, 1e-4), "head.bias": (0.1, 1e-4)},
        values={"backbone.layers": [1, 2, 4, 1], "data.augment.auto_augment": None, "data.augment.re_prob": 0.0,
                "task.mixup": None, "task.label_smoothing": 0.1, "trainer.precision": "32-true",
                "data.augment.interpolation": "bilinear", "data.eval_interpolation": "bilinear",
                "data.eval_crop_pct": 0.875, "trainer.gradient_clip_val": None}),
    "vit_b16_imagenet_vitpaper": Reference(
        source="ViT paper (arXiv:2010.11929) Appendix B.1 and Table 3 (ViT-* / ImageNet row and caption), "
               "vision_transformer vit_jax/utils.py (warm-up x cosine), input_pipeline.py (Inception crop, resize)",
        batch=4096, update_interval=(8, 4), epochs=300, steps_per_epoch=100,
        schedule=vit_jax_schedule(3e-3, 10_000, total_epochs=300), points=(0, 5000, 9999, 10_000, 10_001, 20_000, 29_999),
        params={name: (3e-3, 0.3) for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight",
                                               "backbone.blocks.0.attn.qkv.weight", "head.bias")},
        values={"optim.betas": [0.9, 0.999], "backbone.pos_drop_rate": 0.1, "backbone.proj_drop_rate": 0.1,
                "backbone.drop_path_rate": 0.0, "backbone.img_size": 224,
                "trainer.gradient_clip_val": 1.0, "task.mixup": None, "task.label_smoothing": 0.0,
                "data.augment.auto_augment": None, "data.augment.re_prob": 0.0, "data.augment.scale": [0.05, 1.0],
                "data.augment.interpolation": "bilinear", "data.mean": [0.5, 0.5, 0.5], "data.std": [0.5, 0.5, 0.5],
                "data.eval_crop_pct": 1.0, "data.eval_crop_mode": "squash"}),
    "vit_b16_imagenet21k_vitpaper": Reference(
        source="ViT paper (arXiv:2010.11929) Appendix B.1 and Table 3 (ViT-B/{16,32} / ImageNet-21k row and caption), "
               "vision_transformer vit_jax/utils.py (warm-up x linear to 1e-5)",
        batch=4096, update_interval=(8, 4), epochs=90, steps_per_epoch=200,
        schedule=vit_jax_schedule(1e-3, 10_000, total_epochs=90, decay="linear"),
        points=(0, 5000, 9999, 10_000, 10_001, 12_000, 17_999),
        params={name: (1e-3, 0.03) for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight",
                                                "backbone.blocks.0.attn.qkv.weight", "head.bias")},
        values={"data.num_classes": 21841, "optim.betas": [0.9, 0.999], "backbone.pos_drop_rate": 0.1,
                "backbone.proj_drop_rate": 0.1, "backbone.drop_path_rate": 0.0, "backbone.img_size": 224,
                "trainer.gradient_clip_val": 1.0, "task.mixup": None, "task.label_smoothing": 0.0,
                "data.augment.auto_augment": None, "data.augment.scale": [0.05, 1.0], "data.mean": [0.5, 0.5, 0.5],
                "data.eval_crop_pct": 1.0, "data.eval_crop_mode": "squash"}),
    "vit_b16_384_vitpaper_finetune": Reference(
        source="ViT paper Appendix B.1.1 and Table 4 (ImageNet: 20k steps), vision_transformer vit_jax/configs/"
               "common.py (batch 512, warm-up 500, base lr 0.03, clip 1), train.py (SGD momentum 0.9), models.py",
        batch=512, update_interval=(8, 1), schedule=vit_jax_schedule(0.03, 500, total_steps=20_000),
        points=(0, 250, 499, 500, 501, 10_000, 19_999),
        params={name: (0.03, 0.0) for name in ("backbone.pos_embed", "backbone.blocks.0.attn.qkv.weight", "head.weight")},
        pretrained="vit_b16_imagenet_vitpaper.ckpt", published=False,
        values={"optim.momentum": 0.9, "optim.nesterov": False, "backbone.img_size": 384,
                "backbone.pos_drop_rate": 0.0, "backbone.proj_drop_rate": 0.0, "backbone.drop_path_rate": 0.0,
                "backbone.pos_embed_interpolation": "bilinear_align_corners", "trainer.max_steps": 20_000,
                "trainer.gradient_clip_val": 1.0, "task.mixup": None, "task.label_smoothing": 0.0,
                "data.augment.auto_augment": None, "data.augment.scale": [0.05, 1.0], "data.mean": [0.5, 0.5, 0.5],
                "data.eval_crop_pct": 1.0, "data.eval_crop_mode": "squash", "data.eval_interpolation": "bilinear"}),
    "r50_maskrcnn_coco_1x": Reference(
        source="mmdetection v2 configs/mask_rcnn/mask_rcnn_r50_fpn_1x_coco.py and _base_/schedules/schedule_1x.py",
        batch=16, epochs=12, schedule=mmcv_step(0.02, (8, 11), warmup=500), points=(0, 250, 499, 500, 799, 800, 1100),
        steps_per_epoch=100,
        params={"backbone.layer2.0.conv1.weight": (0.02, 1e-4), "backbone.layer2.0.conv2.weight": (0.02, 1e-4),
                "detector.roi_heads.box_predictor.cls_score.bias": (0.02, 1e-4)},
        pretrained=TORCHVISION_R50, values={"backbone.frozen_stages": 1, "task.batch_norm": "eval"}),
    "swin_t_maskrcnn_coco_1x": Reference(
        source="Swin-Transformer-Object-Detection configs/swin/mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_adamw_1x_coco.py",
        batch=16, epochs=12, schedule=mmcv_step(1e-4, (8, 11), warmup=500), points=(0, 250, 500, 800, 1100),
        steps_per_epoch=100,
        params={  # paramwise_cfg custom_keys absolute_pos_embed, relative_position_bias_table, norm: decay_mult 0
            "backbone.layers.0.blocks.0.norm1.weight": (1e-4, 0.0), "backbone.out_norms.0.weight": (1e-4, 0.0),
            "backbone.layers.0.blocks.0.attn.qkv.bias": (1e-4, 0.05),
            "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (1e-4, 0.0),
            "detector.backbone.fpn.inner_blocks.0.0.bias": (1e-4, 0.05),  # mmdet: neck.lateral_convs.0.conv.bias
            "detector.roi_heads.box_predictor.cls_score.bias": (1e-4, 0.05)},
        pretrained=SWIN_T_IN1K, values={"backbone.drop_path_rate": 0.1}),
    "detr_r50_coco": Reference(
        source="facebookresearch/detr main.py (defaults, param_dicts), README (--epochs 500 --lr_drop 400), "
               "models/backbone.py",
        batch=64, update_interval=(16, 1), epochs=500, schedule=mmcv_step(1e-4, (400,)), points=(0, 3999, 4000, 4999),
        params={  # two AdamW groups: "backbone" in the name at lr_backbone 1e-5, the rest at 1e-4; decay 1e-4 on all
            "backbone.layer2.0.conv1.weight": (1e-5, 1e-4), "backbone.layer4.2.conv3.weight": (1e-5, 1e-4),
            "detector.class_embed.bias": (1e-4, 1e-4),
            "detector.transformer.encoder.layers.0.norm1.weight": (1e-4, 1e-4)},
        pretrained=TORCHVISION_R50,
        values={"backbone.frozen_stages": 1, "task.batch_norm": "frozen", "trainer.gradient_clip_val": 0.1,
                "trainer.precision": "32-true", "data.masks": False,
                "task.detector.model.class_rows": "coco"}),  # models/detr.py build: num_classes=91 (ids 0..90)
    "pix2seq_r50_coco": Reference(
        source="Pix2seq paper Sec. 4.1 and Appendix A (lr, weight decay, warm-up, epochs, batch); google-research/"
               "pix2seq configs/config_det_finetune.py (betas, eps, end_lr_factor), models/model_utils.py "
               "(WarmUpAndDecay, build_optimizer 'adamw': decay on every variable), architectures/resnet.py",
        batch=128, update_interval=(16, 1), epochs=300, schedule=pix2seq_warmup_linear(3e-3, 10, 300, 0.01),
        points=(0, 50, 99, 100, 101, 1500, 2999, 3000),
        params={  # one AdamW group: lr 0.003, weight decay 0.05 on every parameter
            "backbone.layer2.0.conv1.weight": (3e-3, 0.05), "backbone.layer2.0.bn1.weight": (3e-3, 0.05),
            "detector.token_embed": (3e-3, 0.05), "detector.encoder.0.norm.bias": (3e-3, 0.05),
            "detector.decoder.5.cross_attn.in_proj_weight": (3e-3, 0.05)},
        pretrained=TORCHVISION_R50,
        values={"task.batch_norm": "sync", "data.masks": False, "optim.betas": [0.9, 0.95], "optim.eps": 1e-8,
                "task.test_size": 1333, "task.test_max_size": 1333, "data.train_sizes": [1333],
                "task.detector.model.num_bins": 2000, "task.detector.model.max_objects": 100,
                "task.detector.model.max_objects_test": 100, "task.detector.model.top_p": 0.4,
                "task.detector.model.hidden_dim": 256, "task.detector.model.num_encoder_layers": 6,
                "task.detector.model.num_decoder_layers": 6, "task.detector.model.dim_feedforward": 1024,
                "task.detector.model.noise_class_weight": 1.0, "task.detector.model.eos_weight": 0.1,
                "task.detector.model.class_label_corruption": "rand_n_fake_cls"}),
    "deformable_detr_r50_coco": Reference(
        source="fundamentalvision/Deformable-DETR configs/r50_deformable_detr.sh, main.py (defaults, param_dicts), "
               "README (total batch 32), models/deformable_detr.py build, models/backbone.py",
        batch=32, update_interval=(16, 1), epochs=50, schedule=mmcv_step(2e-4, (40,)), points=(0, 399, 400, 499),
        params={  # three AdamW groups: "backbone.0" at 2e-5, sampling_offsets / reference_points at 2e-5, the rest
            "backbone.layer2.0.conv1.weight": (2e-5, 1e-4), "backbone.layer4.2.conv3.weight": (2e-5, 1e-4),
            "detector.transformer.encoder.layers.0.self_attn.sampling_offsets.weight": (2e-5, 1e-4),
            "detector.transformer.decoder.layers.5.cross_attn.sampling_offsets.bias": (2e-5, 1e-4),
            "detector.transformer.reference_points.weight": (2e-5, 1e-4),
            "detector.transformer.encoder.layers.0.self_attn.value_proj.weight": (2e-4, 1e-4),
            "detector.transformer.level_embed": (2e-4, 1e-4), "detector.class_embed.0.bias": (2e-4, 1e-4),
            "detector.input_proj.3.1.weight": (2e-4, 1e-4)},
        pretrained=TORCHVISION_R50,
        values={"backbone.frozen_stages": 1, "task.batch_norm": "frozen", "trainer.gradient_clip_val": 0.1,
                "trainer.precision": "32-true", "data.masks": False, "task.detector.num_feature_levels": 4,
                "task.detector.model.class_rows": "coco", "task.detector.model.num_queries": 300,
                "task.detector.model.hidden_dim": 256, "task.detector.model.dim_feedforward": 1024,
                "task.detector.model.enc_n_points": 4, "task.detector.model.dec_n_points": 4,
                "task.detector.model.dropout": 0.1, "task.detector.model.class_cost": 2.0,
                "task.detector.model.class_loss_weight": 2.0, "task.detector.model.focal_alpha": 0.25,
                "task.detector.model.with_box_refine": False, "task.detector.model.two_stage": False,
                "data.train_sizes": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                "data.filter_empty": False}),
    "swin_t_sparse_rcnn_coco_3x": Reference(
        source="Swin paper arXiv:2103.14030v2 Sec. 4.2 (AdamW 1e-4, weight decay 0.05, batch 16, 36 epochs, short side "
               "480-800); mmdetection configs/sparse_rcnn/sparse_rcnn_r50_fpn_300_proposals_crop_mstrain_480-800_3x_coco.py "
               "and its _base_ (300 proposals, grad clip 1, DETR's crop, steps 27 / 33, schedule_1x's warm-up); "
               "PeizeSun/SparseR-CNN sparsercnn/config.py (the head); the Swin configs' paramwise_cfg",
        batch=16, epochs=36, schedule=mmcv_step(1e-4, (27, 33), warmup=500), points=(0, 250, 500, 2699, 2700, 3300),
        steps_per_epoch=100,
        params={  # custom_keys absolute_pos_embed, relative_position_bias_table, norm: decay_mult 0 (the head's too)
            "backbone.layers.0.blocks.0.norm1.weight": (1e-4, 0.0),
            "backbone.layers.0.blocks.0.attn.qkv.bias": (1e-4, 0.05),
            "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (1e-4, 0.0),
            "detector.neck.fpn.inner_blocks.0.0.bias": (1e-4, 0.05),
            "detector.stages.0.norm1.weight": (1e-4, 0.0), "detector.stages.5.inst_interact.norm3.bias": (1e-4, 0.0),
            "detector.stages.5.inst_interact.dynamic_layer.weight": (1e-4, 0.05),
            "detector.stages.2.class_logits.bias": (1e-4, 0.05), "detector.init_proposal_boxes.weight": (1e-4, 0.05)},
        pretrained=SWIN_T_IN1K,
        values={"backbone.drop_path_rate": 0.2, "trainer.gradient_clip_val": 1.0, "trainer.precision": "32-true",
                "data.masks": False, "data.train_sizes": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800],
                "data.crop.prob": 0.5, "data.crop.sizes": [400, 500, 600], "data.crop.min_size": 384,
                "data.crop.max_size": 600, "task.test_size": 800, "task.test_max_size": 1333,
                "task.detector.model.num_proposals": 300, "task.detector.model.num_stages": 6,
                "task.detector.model.hidden_dim": 256, "task.detector.neck.out_channels": 256,
                "task.detector.model.dim_feedforward": 2048, "task.detector.model.num_heads": 8,
                "task.detector.model.dim_dynamic": 64, "task.detector.model.dropout": 0.0,
                "task.detector.model.num_cls": 1, "task.detector.model.num_reg": 3,
                "task.detector.model.pooler_resolution": 7, "task.detector.model.sampling_ratio": 2,
                "task.detector.model.class_cost": 2.0, "task.detector.model.bbox_cost": 5.0,
                "task.detector.model.giou_cost": 2.0, "task.detector.model.class_loss_weight": 2.0,
                "task.detector.model.bbox_loss_weight": 5.0, "task.detector.model.giou_loss_weight": 2.0,
                "task.detector.model.focal_alpha": 0.25, "task.detector.model.focal_gamma": 2.0,
                "task.detector.model.prior_prob": 0.01, "task.detector.model.deep_supervision": True,
                "task.detector.model.num_detections": None}),  # test_cfg max_per_img=num_proposals
    "r50_ade20k": Reference(
        source="mmsegmentation configs/fcn/fcn_r50-d8_512x512_80k_ade20k.py, _base_/models/fcn_r50-d8.py, "
               "_base_/schedules/schedule_80k.py, _base_/datasets/ade20k.py",
        batch=16, update_interval=(4, 1), schedule=mmcv_poly(0.01, 0.9, 1e-4, 80000), points=(0, 1, 40000, 79999),
        params={"backbone.conv1.1.weight": (0.01, 5e-4), "backbone.layer1.0.bn1.bias": (0.01, 5e-4),
                "head.convs.0.1.weight": (0.01, 5e-4), "head.classifier.bias": (0.01, 5e-4),
                "aux_head.classifier.bias": (0.01, 5e-4)},
        pretrained=RESNET_V1C,
        values={"backbone.deep_stem": True, "backbone.output_stride": 8, "trainer.max_steps": 80000,
                "trainer.precision": "32-true",
                "trainer.sync_batchnorm": True, "task.aux_weight": 0.4, "data.crop_size": [512, 512]}),
    # mmseg v0.x upernet_r101_512x512_160k_ade20k.py: upernet_r50_512x512_160k_ade20k.py (_base_/models/upernet_r50.py,
    # schedule_160k.py, datasets/ade20k.py) with depth 101 and resnet101_v1c
    "upernet_r101_ade20k": Reference(
        source="mmsegmentation configs/upernet/upernet_r101_512x512_160k_ade20k.py, upernet_r50_512x512_160k_ade20k.py, "
               "_base_/models/upernet_r50.py, _base_/schedules/schedule_160k.py, _base_/datasets/ade20k.py",
        batch=16, update_interval=(4, 1), schedule=mmcv_poly(0.01, 0.9, 1e-4, 160000), points=(0, 1, 80000, 159999),
        params={**mmseg_sgd(0.01, 5e-4), "head.ppm.stages.0.1.1.weight": (0.01, 5e-4)},
        pretrained="resnet101_v1c-e67eebb6.pth",
        values={"backbone.depth": 101, "backbone.deep_stem": True, "backbone.output_stride": 32,
                "trainer.max_steps": 160000, "trainer.precision": "32-true", "trainer.sync_batchnorm": True,
                "task.head._target_": "vtrain.tasks.segmentation.heads.UperNetHead", "task.head.channels": 512,
                "task.head.pool_scales": [1, 2, 3, 6], "task.head.dropout": 0.1, "task.head.out_indices": [0, 1, 2, 3],
                "task.aux_head.out_indices": 2, "task.aux_head.channels": 256, "task.aux_head.num_convs": 1,
                "task.aux_head.concat_input": False, "task.aux_weight": 0.4, "data.crop_size": [512, 512]}),
    "r50_cityscapes": Reference(
        source="mmsegmentation configs/fcn/fcn_r50-d8_512x1024_80k_cityscapes.py, _base_/models/fcn_r50-d8.py, "
               "_base_/schedules/schedule_80k.py, _base_/datasets/cityscapes.py",
        batch=8, update_interval=(4, 1), schedule=mmcv_poly(0.01, 0.9, 1e-4, 80000), points=(0, 1, 40000, 79999),
        params=mmseg_sgd(0.01, 5e-4), pretrained=RESNET_V1C,
        values={**MMSEG_R50_D8, "trainer.max_steps": 80000, "data.num_classes": 19, "data.reduce_zero_label": False, "data.label_map": None,
                "data.img_dir": {"train": "leftImg8bit/train", "val": "leftImg8bit/val"},
                "data.ann_dir": {"train": "gtFine/train", "val": "gtFine/val"},
                "data.img_suffix": "_leftImg8bit.png", "data.seg_map_suffix": "_gtFine_labelTrainIds.png",
                "data.img_scale": [2048, 1024], "data.ratio_range": [0.5, 2.0], "data.crop_size": [512, 1024],
                "data.cat_max_ratio": 0.75, "data.hflip": 0.5, "data.photometric": True,
                "task.inference.mode": "whole", "task.inference.scale": [2048, 1024], "task.inference.ratios": [1.0],
                "task.inference.flip": False}),
    "r50_pascal_context": Reference(
        source="mmsegmentation configs/fcn/fcn_r50-d8_480x480_40k_pascal_context_59.py, _base_/models/fcn_r50-d8.py, "
               "_base_/schedules/schedule_40k.py, _base_/datasets/pascal_context_59.py",
        batch=16, update_interval=(4, 1), schedule=mmcv_poly(0.004, 0.9, 1e-4, 40000), points=(0, 1, 20000, 39999),
        params=mmseg_sgd(0.004, 1e-4), pretrained=RESNET_V1C,
        values={**MMSEG_R50_D8, "trainer.max_steps": 40000, "trainer.val_check_interval": 4000, "optim.momentum": 0.9, "data.num_classes": 59, "data.reduce_zero_label": True,
                "data.img_dir": {"train": "JPEGImages", "val": "JPEGImages"},
                "data.ann_dir": {"train": "SegmentationClassContext", "val": "SegmentationClassContext"},
                "data.split": {"train": "ImageSets/SegmentationContext/train.txt",
                               "val": "ImageSets/SegmentationContext/val.txt"},
                "data.img_suffix": ".jpg", "data.seg_map_suffix": ".png",
                "data.img_scale": [520, 520], "data.ratio_range": [0.5, 2.0], "data.crop_size": [480, 480],
                "data.cat_max_ratio": 0.75, "data.hflip": 0.5, "data.photometric": True,
                "task.inference.mode": "slide", "task.inference.scale": [520, 520],
                "task.inference.crop_size": [480, 480], "task.inference.stride": [320, 320]}),
    "fcn_hr48_ade20k": Reference(
        source="mmsegmentation configs/hrnet/fcn_hr48_512x512_160k_ade20k.py, _base_/models/fcn_hr18.py, "
               "_base_/schedules/schedule_160k.py, _base_/datasets/ade20k.py",
        batch=16, update_interval=(4, 1), schedule=mmcv_poly(0.01, 0.9, 1e-4, 160000), points=(0, 1, 80000, 159999),
        params={"backbone.conv1.weight": (0.01, 5e-4), "backbone.stage4.0.fuse_layers.1.0.0.1.bias": (0.01, 5e-4),
                "head.convs.0.1.weight": (0.01, 5e-4), "head.classifier.bias": (0.01, 5e-4)},
        pretrained="hrnetv2_w48-d2186c55.pth",
        values={"backbone.variant": "hrnet_w48", "trainer.max_steps": 160000, "trainer.precision": "32-true",
                "trainer.sync_batchnorm": True, "task.aux_head": None, "data.crop_size": [512, 512],
                "task.head.out_indices": [0, 1, 2, 3], "task.head.channels": 720, "task.head.num_convs": 1,
                "task.head.kernel_size": 1, "task.head.concat_input": False, "task.head.dropout": 0.0}),
    # SETR: mmseg 0.x _base_/models/setr_naive.py (ViT-L out_indices (9, 14, 19, 23), final_norm False, bilinear
    # position table; SETRUPHead 256 ch, 1 conv 1x1, up 4; 3 auxiliary heads, 2 convs, 0.4 each), the ADE20K config's
    # drop_rate 0 and SGD lr 0.01, weight decay 0, custom_keys {'head': lr_mult 10}; schedule_160k poly
    # The DNL paper's official HRNet model and recipe (DNL-Semantic-Segmentation): the NLModule head of
    # nonlocalbn_single.py on the 720 concatenated channels, OHEM, torchcv's lambda_poly (down to 0), one SGD group
    "nl_hr48_ade20k": Reference(
        source="DNL-Semantic-Segmentation configs/seg/ade20k/NLbn_fcn_ade20k_seg_hrnet.conf, "
               "scripts/seg/ade20k/run_fs_res101_nonlocalbn_ade20k_seg_hrnet.sh, model/seg/nets/nonlocalbn_single.py, "
               "configs/seg/ade20k/NL_fcn_ade20k_seg.conf (the NL block)",
        batch=16, update_interval=(8, 1), schedule=mmcv_poly(0.02, 0.9, 0.0, 150000), points=(0, 1, 75000, 149999),
        params={"backbone.conv1.weight": (0.02, 1e-4), "head.convs.0.1.weight": (0.02, 1e-4),
                "head.context.gamma": (0.02, 1e-4), "head.classifier.bias": (0.02, 1e-4)},
        pretrained="hrnetv2_w48-d2186c55.pth",
        values={"backbone.variant": "hrnet_w48", "trainer.max_steps": 150000, "trainer.val_check_interval": 10000,
                "trainer.sync_batchnorm": True, "optim.momentum": 0.9, "task.aux_head": None,
                "task.ohem": {"thresh": 0.7, "min_kept": 100000}, "data.crop_size": [520, 520],
                "data.ratio_range": [0.5, 2.0], "data.hflip": 0.5, "task.inference.scale": [1040, 520],
                "task.head.out_indices": [0, 1, 2, 3], "task.head.channels": 360, "task.head.num_convs": 2,
                "task.head.kernel_size": 3, "task.head.concat_input": True, "task.head.cat_channels": 512,
                "task.head.dropout": 0.1, "task.head.context.reduction": 2, "task.head.context.temperature": 1.0,
                "task.head.context.whiten": False, "task.head.context.unary": False,
                "task.head.context.out_conv": True}),
    "setr_naive_vit_l_ade20k": Reference(
        source="mmsegmentation 0.x configs/setr/setr_naive_512x512_160k_b16_ade20k.py, _base_/models/setr_naive.py, "
               "_base_/schedules/schedule_160k.py, _base_/datasets/ade20k.py",
        batch=16, update_interval=(8, 1), schedule=mmcv_poly(0.01, 0.9, 1e-4, 160000), points=(0, 1, 80000, 159999),
        params={"backbone.blocks.0.attn.qkv.weight": (0.01, 0.0), "backbone.pos_embed": (0.01, 0.0),
                "head.up_convs.0.0.0.weight": (0.1, 0.0), "head.classifier.bias": (0.1, 0.0),
                "aux_heads.2.norm.weight": (0.1, 0.0)},
        pretrained="jx_vit_large_p16_384-b3be5167.pth",
        values={"backbone.embed_dim": 1024, "backbone.depth": 24, "backbone.img_size": 512,
                "backbone.block_indices": [9, 14, 19, 23], "backbone.final_norm": False,
                "backbone.with_cls_token": True, "backbone.pos_embed_interpolation": "bilinear",
                "backbone.drop_path_rate": 0.0, "backbone.pos_drop_rate": 0.0, "trainer.max_steps": 160000,
                "trainer.val_check_interval": 16000, "trainer.precision": "32-true", "trainer.sync_batchnorm": True,
                "task.aux_head": None, "task.aux_weight": 0.4, "task.head.out_indices": 3, "task.head.channels": 256,
                "task.head.num_convs": 1, "task.head.kernel_size": 1, "task.head.up_scale": 4, "task.head.dropout": 0.0,
                "task.aux_heads": [{"_target_": "vtrain.tasks.segmentation.heads.SETRUpHead", "out_indices": i,
                                    "channels": 256, "num_convs": 2, "kernel_size": 1, "up_scale": 4, "dropout": 0.0}
                                   for i in range(3)],
                "data.crop_size": [512, 512], "task.inference.mode": "slide", "task.inference.crop_size": [512, 512],
                "task.inference.stride": [341, 341]}),
    # setr_vit-large_pup_8x1_768x768_80k_cityscapes.py: the PUP model at 768 with its three auxiliary heads (2 convs
    # 3x3, up 4), schedule_80k's lr 0.01, weight decay 0, heads x10, 8 GPUs x 1 image, slide 768 / 512
    "setr_pup_vit_l_cityscapes": Reference(
        source="mmsegmentation 0.x configs/setr/setr_vit-large_pup_8x1_768x768_80k_cityscapes.py, "
               "_base_/models/setr_pup.py, _base_/schedules/schedule_80k.py, _base_/datasets/cityscapes_768x768.py",
        batch=8, update_interval=(8, 1), schedule=mmcv_poly(0.01, 0.9, 1e-4, 80000), points=(0, 1, 40000, 79999),
        params={"backbone.blocks.23.mlp.fc2.weight": (0.01, 0.0), "head.up_convs.3.0.1.bias": (0.1, 0.0),
                "aux_heads.0.up_convs.1.0.0.weight": (0.1, 0.0)},
        pretrained="jx_vit_large_p16_384-b3be5167.pth",
        values={"backbone.img_size": 768, "backbone.block_indices": [9, 14, 19, 23], "backbone.final_norm": False,
                "backbone.drop_path_rate": 0.0, "data.num_classes": 19, "task.head.num_convs": 4,
                "task.head.kernel_size": 3, "task.head.up_scale": 2, "task.head.channels": 256,
                "task.aux_heads": [{"_target_": "vtrain.tasks.segmentation.heads.SETRUpHead", "out_indices": i,
                                    "channels": 256, "num_convs": 2, "kernel_size": 3, "up_scale": 4, "dropout": 0.0}
                                   for i in range(3)],
                "trainer.max_steps": 80000, "trainer.val_check_interval": 8000, "data.img_scale": [2049, 1025],
                "data.ratio_range": [0.5, 2.0], "data.crop_size": [768, 768], "task.inference.mode": "slide",
                "task.inference.crop_size": [768, 768], "task.inference.stride": [512, 512]}),
    "swin_t_upernet_ade20k": Reference(
        source="Swin-Transformer-Semantic-Segmentation configs/swin/upernet_swin_tiny_patch4_window7_512x512_160k_ade20k.py",
        batch=16, update_interval=(8, 1), schedule=mmcv_poly(6e-5, 1.0, 0.0, 160000, warmup=1500, ratio=1e-6),
        points=(0, 750, 1499, 1500, 80000, 159999), rtol_before=1500,
        params={
            "backbone.layers.0.blocks.0.norm1.weight": (6e-5, 0.0), "backbone.out_norms.0.weight": (6e-5, 0.0),
            "backbone.layers.0.blocks.0.attn.qkv.bias": (6e-5, 0.01),
            "backbone.layers.0.blocks.0.attn.relative_position_bias_table": (6e-5, 0.0),
            "head.ppm.stages.0.1.1.weight": (6e-5, 0.01),  # mmseg: decode_head.psp_modules.0.1.bn.weight
            "head.classifier.bias": (6e-5, 0.01)},  # decode_head.conv_seg.bias
        pretrained=SWIN_T_IN1K,
        values={"backbone.drop_path_rate": 0.3, "trainer.max_steps": 160000, "optim.betas": [0.9, 0.999],
                "trainer.precision": "32-true"}),
    "videoswin_t_k400": Reference(
        source="Video-Swin-Transformer configs/recognition/swin/swin_tiny_patch244_window877_kinetics400_1k.py",
        batch=256, update_interval=(8, 4), epochs=30, schedule=mmcv_cosine_by_epoch,
        points=(0, 1, 12, 24, 25, 26, 100, 150, 299),
        params={  # custom_keys, the longest key contained in the name applies (mmcv)
            "backbone.features.0.0.norm1.weight": (1e-4, 0.02),   # "backbone" beats "norm"
            "backbone.features.0.0.attn.qkv.bias": (1e-4, 0.02),
            "backbone.features.0.0.attn.relative_position_bias_table": (1e-3, 0.0),
            "backbone.patch_embed.proj.weight": (1e-4, 0.02),
            "head.weight": (1e-3, 0.02), "head.bias": (1e-3, 0.02)},
        pretrained=SWIN_T_IN1K,
        values={"data.clip_len": 32, "data.frame_interval": 2, "data.num_test_clips": 4, "data.num_test_crops": 3,
                "data.eval_short_side": 224, "data.crop_size": 224, "data.scale": [0.08, 1.0],
                "data.crop_scales": None, "task.head_drop": 0.5, "video_backbone.drop_path_rate": 0.1,
                "trainer.gradient_clip_val": None}),
    "i3d_r50_k400": Reference(
        source="mmaction2 configs/recognition/i3d/i3d_imagenet-pretrained-r50_8xb8-32x2x1-100e_kinetics400-rgb.py, "
               "_base_/models/i3d_r50.py, _base_/schedules/sgd_100e.py",
        batch=64, update_interval=(8, 1), epochs=100, schedule=mmcv_step(0.01, (40, 80)), points=(0, 399, 400, 800, 999),
        params={"backbone.bn1.weight": (0.01, 1e-4), "backbone.layer1.0.conv1.weight": (0.01, 1e-4),
                "head.bias": (0.01, 1e-4)},
        pretrained=TORCHVISION_R50,
        values={"data.clip_len": 32, "data.frame_interval": 2, "data.crop_scales": [1.0, 0.8], "data.crop_size": 224,
                "data.num_test_clips": 10, "data.num_test_crops": 3, "data.eval_short_side": 256,
                "data.eval_crop_size": 256, "video_backbone.conv1_temporal_kernel": 5,
                "video_backbone.conv1_stride_t": 2, "video_backbone.pool1_stride_t": 2,
                "video_backbone.pool1_temporal_kernel": 1, "video_backbone.pool2_stride_t": 2,
                "trainer.gradient_clip_val": 40.0, "task.head_drop": 0.5, "optim.momentum": 0.9,
                "trainer.precision": "32-true"}),
    "faster_rcnn_r50_c4_coco_1x": Reference(
        source="detectron2 configs/COCO-Detection/faster_rcnn_R_50_C4_1x.yaml, Base-RCNN-C4.yaml, config/defaults.py "
               "(WarmupMultiStepLR: the same linear warm-up and steps as mmcv's, here by iterations)",
        batch=16, update_interval=(8, 1), schedule=mmcv_step(0.02, (60, 80), warmup=1000), steps_per_epoch=1000,
        points=(0, 500, 999, 1000, 59999, 60000, 79999, 80000, 89999),
        params={"backbone.layer2.0.conv1.weight": (0.02, 1e-4), "backbone.layer4.0.conv2.weight": (0.02, 1e-4),
                "detector.rpn.head.conv.0.0.bias": (0.02, 1e-4),
                "detector.roi_heads.box_predictor.cls_score.bias": (0.02, 1e-4)},
        pretrained=TORCHVISION_R50,
        values={"backbone.frozen_stages": 1, "task.batch_norm": "frozen", "trainer.max_steps": 90000,
                "trainer.precision": "32-true", "data.train_sizes": [640, 672, 704, 736, 768, 800],
                "data.max_size": 1333, "data.group_by_aspect_ratio": True, "data.masks": False, "data.crop": None,
                "task.detector.roi_size": 14, "task.detector.rcnn.roi_align_aligned": True,
                "task.detector.rcnn.roi_align_sampling_ratio": 0, "task.detector.rcnn.rpn_box_loss_beta": 0.0,
                "task.detector.rcnn.box_loss_beta": 0.0, "task.detector.rcnn.box_loss": "smooth_l1",
                "task.detector.model.rpn_pre_nms_top_n_train": 12000,
                "task.detector.model.rpn_post_nms_top_n_train": 2000,
                "task.detector.model.rpn_pre_nms_top_n_test": 6000,
                "task.detector.model.rpn_post_nms_top_n_test": 1000,
                "task.detector.model.rpn_anchor_generator.sizes": [[32, 64, 128, 256, 512]]}),
    "faster_rcnn_r50_fpn_plus_coco_9x": Reference(
        source="DETR (Carion et al., ECCV 2020) Sec. 4.1 and Table 1 (GIoU, random crops, 9x = 109 epochs); detectron2 "
               "faster_rcnn_R_50_FPN_3x.yaml, Base-RCNN-FPN.yaml, mask_rcnn_R_50_FPN_1x_giou.yaml (GIoU weights 2 / "
               "10), Misc/scratch_mask_rcnn_R_50_FPN_9x_gn.yaml (steps 60k and 20k iterations before the end); DETR "
               "datasets/coco.py (the crop)",
        batch=16, update_interval=(8, 1), schedule=mmcv_step(0.02, (750, 790), warmup=1000), steps_per_epoch=1000,
        points=(0, 999, 1000, 749999, 750000, 789999, 790000, 809999),
        params={"backbone.layer2.0.conv1.weight": (0.02, 1e-4), "detector.backbone.fpn.inner_blocks.0.0.bias": (0.02, 1e-4),
                "detector.roi_heads.box_head.fc6.weight": (0.02, 1e-4)},
        pretrained=TORCHVISION_R50,
        values={"backbone.frozen_stages": 1, "task.batch_norm": "frozen", "trainer.max_steps": 810000,
                "data.train_sizes": [640, 672, 704, 736, 768, 800], "data.max_size": 1333,
                "data.crop": {"prob": 0.5, "sizes": [400, 500, 600], "min_size": 384, "max_size": 600},
                "task.detector.rcnn.rpn_box_loss": "giou", "task.detector.rcnn.rpn_box_loss_weight": 2.0,
                "task.detector.rcnn.box_loss": "giou", "task.detector.rcnn.box_loss_weight": 10.0,
                "task.detector.rcnn.roi_align_aligned": True, "task.detector.rcnn.roi_align_sampling_ratio": 0,
                "task.detector.model.rpn_pre_nms_top_n_train": 2000,
                "task.detector.model.rpn_post_nms_top_n_train": 1000,
                "task.detector.model.rpn_pre_nms_top_n_test": 1000,
                "task.detector.model.rpn_post_nms_top_n_test": 1000, "task.detector.box_head_dim": 1024}),
}

# Recipes that are another recipe with a few values changed, as their references are: (parent, the differences).
# the DNL paper's official HRNet config's block (NLbn_fcn_ade20k_seg_hrnet.conf "nonlocal"), on the NL recipes
HR48_DNL_BLOCK = {"task.head.context.temperature": 0.1, "task.head.context.whiten": True,
                  "task.head.context.unary": True, "task.head.context.out_conv": False}
# the official DCN symbol's changes to the C4 base: res5's 3x3 convs deformable (num_deformable_group 4), deformable
# RoI pooling (group_size 1, pooled_size 7, sample_per_part 4, spatial_scale 0.0625, trans_std 0.1), its offset fc
# at lr_mult 0.01
DCN_BASE = {"backbone.dcn": {"stages": [False, False, False, True], "modulated": False, "deform_groups": 4},
            "task.detector.box_roi_pool.output_size": 7, "task.detector.box_roi_pool.sample_per_part": 4,
            "task.detector.box_roi_pool.spatial_scale": 0.0625, "task.detector.box_roi_pool.trans_std": 0.1,
            "optim.custom_keys": {"box_roi_pool.offset": {"lr_mult": 0.01}}}
DERIVED = {
    "resnet26_imagenet": ("resnet50_imagenet", {"backbone.depth": 26}),
    "resnet101_imagenet": ("resnet50_imagenet", {"backbone.depth": 101}),
    "lrnet26_imagenet": ("resnet50_imagenet", {"backbone.depth": 26}),
    "lrnet50_imagenet": ("resnet50_imagenet", {"backbone.depth": 50}),
    # LR-Net's robustness table trains as Feature Denoising (facebookresearch/ImageNet-Adversarial-Training): main.py
    # (30-step PGD of 1/255 within 16/255, 20% of batches from the clean image, 110 epochs, x0.1 at 35/70/95),
    # adv_model.py (random wrong target, label smoothing 0.1, [-1, 1] pixels), imagenet_utils.py (Nesterov, decay on
    # conv / fc weights only, eval resize bicubic), resnet_model.py (last BN of a block at 0); evaluation: 10 steps of
    # epsilon / 10, targeted and untargeted (Feature Denoising Sec. 6.1)
    "resnet50_imagenet_adv": ("resnet50_imagenet", {
        "task.adversarial_training": {"epsilon": pytest.approx(16 / 255), "step_size": pytest.approx(1 / 255),
                                      "steps": 30, "targeted": True, "start_from_clean": 0.2},
        "task.attacks": {name: {"epsilon": pytest.approx(16 / 255), "step_size": pytest.approx(1.6 / 255), "steps": 10,
                                "targeted": name == "pgd_targeted", "start_from_clean": 0.0}
                         for name in ("pgd_targeted", "pgd_untargeted")},
        "task.label_smoothing": 0.1, "trainer.max_epochs": 110, "sched.milestones_epochs": [35, 70, 95],
        "optim.nesterov": True, "optim.exempt_1d_and_listed": True, "backbone.zero_init_last": True,
        "data.mean": [0.5, 0.5, 0.5], "data.std": [0.5, 0.5, 0.5], "data.eval_interpolation": "bicubic",
        "data.augment.color_jitter": 0.4}),
    "resnet26_imagenet_adv": ("resnet50_imagenet_adv", {"backbone.depth": 26}),
    "lrnet26_imagenet_adv": ("resnet50_imagenet_adv", {"backbone.depth": 26}),
    "san_resnet38_imagenet": ("san_resnet26_imagenet", {"backbone.layers": [2, 3, 5, 2]}),
    # the ViT paper's Table 3 has one ImageNet row for every ViT, and one fine-tuning setting (B.1.1)
    "vit_l16_imagenet_vitpaper": ("vit_b16_imagenet_vitpaper", {"backbone.embed_dim": 1024, "backbone.depth": 24}),
    "vit_l16_384_vitpaper_finetune": ("vit_b16_384_vitpaper_finetune", {
        "backbone.embed_dim": 1024, "backbone.depth": 24, "pretrained": "vit_l16_imagenet_vitpaper.ckpt"}),
    # Table 3's ViT-L ImageNet-21k row is the ViT-B one (its 30 / 90 epochs: the 90 kept); the fine-tunes from the
    # published ImageNet-21k weights are the paper's one fine-tuning (vit_jax/configs/vit.py: common.py's values);
    # Table 2's ImageNet entry at 512 with Polyak averaging 0.9999 (Sec. 4.1)
    "vit_l16_imagenet21k_vitpaper": ("vit_b16_imagenet21k_vitpaper", {"backbone.embed_dim": 1024, "backbone.depth": 24}),
    "vit_b16_384_21kto1k_vitpaper": ("vit_b16_384_vitpaper_finetune", {
        "pretrained": "ViT-B_16.npz", "pretrained_url": "ViT-B_16.npz"}),
    "vit_l16_384_21kto1k_vitpaper": ("vit_b16_384_21kto1k_vitpaper", {
        "backbone.embed_dim": 1024, "backbone.depth": 24, "pretrained": "ViT-L_16.npz", "pretrained_url": "ViT-L_16.npz"}),
    "vit_l16_512_21kto1k_vitpaper": ("vit_l16_384_21kto1k_vitpaper", {
        "backbone.img_size": 512, "data.img_size": 512, "callbacks.weight_ema.decay": 0.9999}),
    "swin_s_imagenet": ("swin_t_imagenet", {"backbone.drop_path_rate": 0.3}),
    "swin_b_imagenet": ("swin_t_imagenet", {"backbone.drop_path_rate": 0.5}),
    "vit_b16_imagenet": ("vit_s16_imagenet", {"backbone.embed_dim": 768}),
    # the official Swin-L 22k / 22kto1k configs differ from Swin-B's in the architecture only; the 384 fine-tunes in
    # DATA.IMG_SIZE, WINDOW_SIZE and TEST.CROP False (resized straight to 384, conf/preprocessing/swin_384.yaml)
    "swin_l_imagenet22k": ("swin_b_imagenet22k", {"backbone.embed_dim": 192, "backbone.num_heads": [6, 12, 24, 48]}),
    "swin_b_22kto1k_384": ("swin_b_22kto1k_224", {"backbone.img_size": 384, "backbone.window_size": 12,
                                                  "data.eval_crop_pct": 1.0, "data.eval_crop_mode": "squash",
                                                  "pretrained_url": "swin_base_patch4_window7_224_22k.pth"}),
    # configs/swin/swin_base_patch4_window12_384_finetune.yaml (get_started.md: from swin_base_patch4_window7_224.pth)
    # is the 22K->1K 384 config with DROP_PATH_RATE 0.5, its 1000-way classifier kept (load_pretrained)
    "swin_b_384_finetune": ("swin_b_22kto1k_384", {"backbone.drop_path_rate": 0.5, "task.map22kto1k": None,
                                                   "pretrained_url": "swin_base_patch4_window7_224.pth"}),
    "swin_l_22kto1k_224": ("swin_b_22kto1k_224", {"backbone.embed_dim": 192, "backbone.num_heads": [6, 12, 24, 48],
                                                  "pretrained_url": "swin_large_patch4_window7_224_22k.pth"}),
    "swin_l_22kto1k_384": ("swin_l_22kto1k_224", {"backbone.img_size": 384, "backbone.window_size": 12,
                                                  "data.eval_crop_pct": 1.0, "data.eval_crop_mode": "squash",
                                                  "pretrained_url": "swin_large_patch4_window7_224_22k.pth"}),
    "gcnet_r50_maskrcnn_coco_1x": ("r50_maskrcnn_coco_1x", {"task.batch_norm": "sync"}),
    "swin_t_maskrcnn_coco_3x": ("swin_t_maskrcnn_coco_1x", {"trainer.max_epochs": 36, "sched.milestones_epochs": [27, 33],
                                                            "backbone.drop_path_rate": 0.2}),
    # Swin Table 2(b): the official cascade_mask_rcnn_swin_{tiny,small,base}_..._giou_4conv1f_adamw_3x_coco configs
    # are the Mask R-CNN 3x recipe with the cascade heads of _base_/models/cascade_mask_rcnn_swin_fpn.py and 4conv1fc
    # GIoU box heads; the ResNe(X)t rows are "the same settings" (paper Sec. 4.2) with mmdet's ResNet defaults
    "swin_t_cascade_mask_rcnn_coco_3x": ("swin_t_maskrcnn_coco_3x", {
        "task.detector._target_": "vtrain.tasks.detection.cascade.CascadeSpec",
        "task.detector.iou_thresholds": [0.5, 0.6, 0.7], "task.detector.loss_weights": [1.0, 0.5, 0.25],
        "task.detector.target_stds": [[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]],
        "task.detector.class_agnostic": False, "task.detector.box_loss": "giou", "task.detector.box_loss_weight": 10.0,
        "task.detector.box_head.num_convs": 4, "task.detector.box_head.conv_dim": 256,
        "task.detector.box_head.num_fcs": 1, "task.detector.box_head_dim": 1024, "task.detector.box_head.norm": True,
        "task.detector.mask_head_dims": [256, 256, 256, 256], "task.detector.batch_size_per_image": 512,
        "task.detector.model.rpn_post_nms_top_n_train": 2000, "task.detector.model.rpn_pre_nms_top_n_train": 2000,
        "task.detector.model.rpn_pre_nms_top_n_test": 1000, "task.detector.model.rpn_post_nms_top_n_test": 1000,
        "task.detector.rcnn.rpn_box_loss_beta": pytest.approx(1 / 9), "task.detector.rcnn.rpn_min_pos_iou": 0.3,
        "task.detector.rcnn.roi_align_aligned": True, "task.detector.rcnn.roi_align_sampling_ratio": 0}),
    "swin_s_cascade_mask_rcnn_coco_3x": ("swin_t_cascade_mask_rcnn_coco_3x", {
        "backbone.depths": [2, 2, 18, 2], "backbone.drop_path_rate": 0.2,
        "pretrained_url": "swin_small_patch4_window7_224.pth"}),
    "swin_b_cascade_mask_rcnn_coco_3x": ("swin_t_cascade_mask_rcnn_coco_3x", {
        "backbone.embed_dim": 128, "backbone.depths": [2, 2, 18, 2], "backbone.drop_path_rate": 0.3,
        "pretrained_url": "swin_base_patch4_window7_224.pth"}),
    "r50_cascade_mask_rcnn_coco_3x": ("swin_t_cascade_mask_rcnn_coco_3x", {
        "backbone.depth": 50, "backbone.frozen_stages": 1, "backbone.drop_path_rate": 0.0, "task.batch_norm": "eval",
        "pretrained_url": "resnet50-0676ba61.pth"}),
    "x101_32x4d_cascade_mask_rcnn_coco_3x": ("r50_cascade_mask_rcnn_coco_3x", {
        "backbone.depth": 101, "backbone.cardinality": 32, "backbone.base_width": 4,
        "pretrained_url": "resnext101_32x4d-a5af3160.pth"}),
    "x101_64x4d_cascade_mask_rcnn_coco_3x": ("r50_cascade_mask_rcnn_coco_3x", {
        "backbone.depth": 101, "backbone.cardinality": 64, "backbone.base_width": 4,
        "pretrained_url": "resnext101_64x4d-ee2c6f71.pth"}),
    # Swin Table 2(a)'s ATSS rows: "the same settings" as its other frameworks (paper Sec. 4.2; the Swin repository
    # has no ATSS config), i.e. the Mask R-CNN 3x recipe's data, optimiser and schedule, on mmdet's
    # configs/atss/atss_r50_fpn_1x_coco.py detector (model, train_cfg, test_cfg)
    "swin_t_atss_coco_3x": ("swin_t_maskrcnn_coco_3x", {
        "task.detector._target_": "vtrain.tasks.detection.one_stage.OneStageSpec",
        "task.detector.model._target_": "vtrain.tasks.detection.one_stage.ATSS", "data.masks": False,
        # written out, not inherited (the Mask R-CNN recipe's R-CNN parts are no ATSS keys): the parent's values
        "data.train_sizes": [480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800], "data.group_by_aspect_ratio": True,
        "data.crop": {"prob": 0.5, "sizes": [400, 500, 600], "min_size": 384, "max_size": 600},
        "backbone.drop_path_rate": 0.2, "pretrained_url": "swin_tiny_patch4_window7_224.pth",
        "task.detector.out_indices": [1, 2, 3], "task.detector.neck.out_channels": 256,
        "task.detector.neck.extra_block.from_p5": True, "task.detector.neck.extra_block.relu_before_p7": False,
        "task.detector.model.anchor_generator.sizes": [[64], [128], [256], [512], [1024]],
        "task.detector.model.anchor_generator.aspect_ratios": [[1.0]] * 5,
        "task.detector.model.anchor_generator.strides": [8, 16, 32, 64, 128],
        "task.detector.model.assigner.topk": 9, "task.detector.model.box_coder_stds": [0.1, 0.1, 0.2, 0.2],
        "task.detector.model.focal_alpha": 0.25, "task.detector.model.focal_gamma": 2.0,
        "task.detector.model.box_loss_weight": 2.0, "task.detector.model.centerness_loss_weight": 1.0,
        "task.detector.model.topk_candidates": 1000, "task.detector.model.score_thresh": 0.05,
        "task.detector.model.nms_thresh": 0.6, "task.detector.model.detections_per_img": 100}),
    "atss_r50_coco_3x": ("swin_t_atss_coco_3x", {
        "backbone.depth": 50, "backbone.frozen_stages": 1, "backbone.drop_path_rate": 0.0, "task.batch_norm": "eval",
        "pretrained_url": "resnet50-0676ba61.pth"}),
    # Swin Table 2(a)'s RepPointsV2 rows: the Swin detection repository's
    # configs/swin/reppoitsv2_swin_tiny_patch4_window7_mstrain_480_960_giou_gfocal_bifpn_adamw_3x_coco.py (model from
    # configs/_base_/models/reppointsv2_swin_bifpn.py): the ATSS rows' optimiser and schedule (the same AdamW,
    # custom_keys, steps 27 / 33 of 36, warm-up, no clipping), its own sizes (480-960) and no crop branch
    "swin_t_reppoints_v2_coco": ("swin_t_atss_coco_3x", {
        "task.detector.model._target_": "vtrain.tasks.detection.one_stage.RepPointsV2",
        "data.train_sizes": list(range(480, 961, 32)), "data.crop": None,
        "task.detector.out_indices": [1, 2, 3], "task.detector.neck._target_": "vtrain.tasks.detection.bifpn.BiFPN",
        "task.detector.neck.out_channels": 256, "task.detector.neck.num_outs": 5, "task.detector.neck.num_repeat": 2,
        "task.detector.neck.num_groups": 32, "task.detector.neck.extra_block": None,
        "task.detector.model.point_strides": [8, 16, 32, 64, 128], "task.detector.model.point_base_scale": 4,
        "task.detector.model.head_options": {
            "feat_channels": 256, "point_feat_channels": 256, "stacked_convs": 3, "num_points": 9,
            "gradient_mul": 0.1, "transform_method": "exact_minmax", "shared_stacked_convs": 1,
            "first_kernel_size": 3, "kernel_size": 1, "corner_dim": 64},
        "task.detector.model.init_assigner.scale": 4, "task.detector.model.init_assigner.pos_num": 1,
        "task.detector.model.refine_assigner.topk": 9, "task.detector.model.heatmap_assigner.gaussian_iou": 0.7,
        "task.detector.model.quality_focal_beta": 2.0, "task.detector.model.giou_plus_one": True,
        "task.detector.model.init_loss_weight": 1.0, "task.detector.model.refine_loss_weight": 2.0,
        "task.detector.model.heatmap_loss_weight": 0.25, "task.detector.model.offset_loss_weight": 1.0,
        "task.detector.model.foreground_loss_weight": 0.1,
        "task.detector.model.topk_candidates": 1000, "task.detector.model.score_thresh": 0.05,
        "task.detector.model.nms_thresh": 0.6, "task.detector.model.detections_per_img": 100}),
    "reppoints_v2_r50_coco": ("swin_t_reppoints_v2_coco", {
        "backbone.depth": 50, "backbone.frozen_stages": 1, "backbone.drop_path_rate": 0.0, "task.batch_norm": "eval",
        "pretrained_url": "resnet50-0676ba61.pth"}),
    # Relation Networks (arXiv:1711.11575v2, Table 5) on mmdet's faster_rcnn_r50_fpn_1x_coco recipe (the R-CNN of
    # r50_maskrcnn_coco_1x without masks); the R-101 rows start from torchvision's ResNet-101, mmdet's
    # faster_rcnn_r101_fpn_1x_coco (torchvision://resnet101)
    # Soft-NMS of the official lib/nms/nms.py: Gaussian, sigma 0.6 (the FPN config's TEST.NMS), no score floor
    "r50_fpn_2fc_softnms_coco_1x": ("r50_maskrcnn_coco_1x", {"data.masks": False, "task.detector.nms.method": "gaussian",
                                                             "task.detector.nms.sigma": 0.6,
                                                             "task.detector.nms.score_threshold": 0.0}),
    "relation_r50_fpn_coco_1x": ("r50_fpn_2fc_softnms_coco_1x", {"task.detector.box_head.num_heads": 16}),
    "relation_r50_fpn_e2e_coco_1x": ("r50_maskrcnn_coco_1x", {"data.masks": False, "task.detector.box_head.num_heads": 16,
                                                              "task.detector.nms.thresholds": [0.5, 0.6, 0.7, 0.8, 0.9]}),
    "r101_fpn_2fc_softnms_coco_1x": ("r50_fpn_2fc_softnms_coco_1x", {"backbone.depth": 101,
                                                                     "pretrained_url": "resnet101-63fe2227.pth"}),
    "relation_r101_fpn_coco_1x": ("relation_r50_fpn_coco_1x", {"backbone.depth": 101,
                                                               "pretrained_url": "resnet101-63fe2227.pth"}),
    "relation_r101_fpn_e2e_coco_1x": ("relation_r50_fpn_e2e_coco_1x", {"backbone.depth": 101,
                                                                       "pretrained_url": "resnet101-63fe2227.pth"}),
    # the C4 rows: the official C4 base (relation_rcnn/symbols/resnet_v1_101_rcnn.py), the FPN rows' recipes otherwise
    "r101_c4_2fc_softnms_coco_1x": ("r101_fpn_2fc_softnms_coco_1x", {"backbone.output_stride": 16}),
    "relation_r101_c4_coco_1x": ("relation_r101_fpn_coco_1x", {"backbone.output_stride": 16}),
    "relation_r101_c4_e2e_coco_1x": ("relation_r101_fpn_e2e_coco_1x", {"backbone.output_stride": 16}),
    # the DCN rows: the C4 rows on the official DCN base (relation_rcnn/symbols/resnet_v1_101_rcnn_dcn*.py; the
    # configs ..._rcnn_dcn_end2end*_8epoch.yaml are the C4 ones but for the symbol)
    "dcn_r101_c4_2fc_softnms_coco_1x": ("r101_c4_2fc_softnms_coco_1x", DCN_BASE),
    "relation_dcn_r101_c4_coco_1x": ("relation_r101_c4_coco_1x", DCN_BASE),
    "relation_dcn_r101_c4_e2e_coco_1x": ("relation_r101_c4_e2e_coco_1x", DCN_BASE),
    # the README's 150-epoch run: one machine (8 GPUs x 2), lr drop at 100
    # DETR's other released models (README model zoo; main.py --dilation / --backbone resnet101; DC5 trained with
    # 1 image per GPU)
    # detectron2's DC5 (faster_rcnn_R_50_DC5_3x.yaml: RES5_DILATION 2, the 3x steps) and DETR Table 1's "+" models
    "faster_rcnn_r50_dc5_coco_3x": ("faster_rcnn_r50_c4_coco_1x", {"backbone.output_stride": 16,
                                                                   "sched.milestones_steps": [210000, 250000],
                                                                   "trainer.max_steps": 270000}),
    "faster_rcnn_r101_fpn_plus_coco_9x": ("faster_rcnn_r50_fpn_plus_coco_9x", {
        "backbone.depth": 101, "pretrained_url": "resnet101-63fe2227.pth"}),
    "faster_rcnn_r50_dc5_plus_coco_9x": ("faster_rcnn_r50_fpn_plus_coco_9x", {
        "backbone.output_stride": 16, "task.detector.model.rpn_pre_nms_top_n_train": 12000,
        "task.detector.model.rpn_post_nms_top_n_train": 2000}),
    "detr_r50_dc5_coco": ("detr_r50_coco", {"backbone.output_stride": 16, "data.batch_size": 1}),
    "detr_r101_coco": ("detr_r50_coco", {"backbone.depth": 101, "pretrained_url": "resnet101-63fe2227.pth"}),
    "detr_r101_dc5_coco": ("detr_r101_coco", {"backbone.output_stride": 16, "data.batch_size": 1}),
    "detr_r50_coco_150e": ("detr_r50_coco", {"trainer.max_epochs": 150, "sched.milestones_epochs": [100],
                                             "optim.batch_per_step": 16, "data.batch_size": 2}),
    # configs/*_plus_iterative_bbox_refinement.sh: --with_box_refine; *_plus_plus_two_stage.sh: and --two_stage
    "deformable_detr_r50_refine_coco": ("deformable_detr_r50_coco", {"task.detector.model.with_box_refine": True}),
    "deformable_detr_r50_two_stage_coco": ("deformable_detr_r50_coco", {"task.detector.model.with_box_refine": True,
                                                                        "task.detector.model.two_stage": True}),
    # Swin Table 2(a)'s R-50 row: "the same settings" (paper Sec. 4.2) with mmdet's Sparse R-CNN ResNet
    # (frozen_stages=1, norm_eval=True, torchvision://resnet50)
    "sparse_rcnn_r50_coco_3x": ("swin_t_sparse_rcnn_coco_3x", {
        "backbone.depth": 50, "backbone.frozen_stages": 1, "backbone.drop_path_rate": 0.0, "task.batch_norm": "eval",
        "pretrained_url": "resnet50-0676ba61.pth"}),
    # setr_pup_512x512_160k_b16_ade20k.py: the PUP head (4 convs 3x3, up 2) and auxiliary heads (2 convs 3x3), lr 0.001
    "setr_pup_vit_l_ade20k": ("setr_naive_vit_l_ade20k", {
        "optim.lr": 0.001, "task.head.num_convs": 4, "task.head.kernel_size": 3, "task.head.up_scale": 2,
        "task.aux_heads": [{"_target_": "vtrain.tasks.segmentation.heads.SETRUpHead", "out_indices": i, "channels": 256,
                            "num_convs": 2, "kernel_size": 3, "up_scale": 4, "dropout": 0.0} for i in range(3)]}),
    # setr_mla_512x512_160k_b16_ade20k.py (b8 with 2 images per GPU): blocks (5, 11, 17, 23) without the class token,
    # MLANeck 256, SETRMLAHead 128 per level, 4 auxiliary FCN heads without convs on the neck's outputs, lr 0.001
    "setr_mla_vit_l_ade20k": ("setr_naive_vit_l_ade20k", {
        "optim.lr": 0.001, "backbone.block_indices": [5, 11, 17, 23], "backbone.with_cls_token": False,
        "task.neck.channels": 256, "task.head.channels": 128, "task.head.up_scale": 4,
        "task.head.out_indices": [0, 1, 2, 3],
        "task.aux_heads": [{"_target_": "vtrain.tasks.segmentation.heads.FCNHead", "out_indices": i, "channels": 256,
                            "num_convs": 0, "concat_input": False, "dropout": 0.0} for i in range(4)]}),
    "nl_r50_ade20k": ("r50_ade20k", {"task.head.context.reduction": 2}),
    "gcnet_r50_ade20k": ("r50_ade20k", {"task.head.context.ratio": 0.25}),
    "dnl_r50_ade20k": ("r50_ade20k", {"task.head.context.temperature": 0.05}),
    # mmseg's fcn_hr48_512x1024_80k_cityscapes.py / fcn_hr48_480x480_40k_pascal_context_59.py: the fcn_hr18 model
    # (W48 widths, no auxiliary head) on the same dataset and schedule bases as the fcn_r50-d8 configs
    "fcn_hr48_cityscapes": ("r50_cityscapes", {"backbone.variant": "hrnet_w48", "task.head.channels": 720,
                                               "task.aux_head": None, "task.num_classes": 19,
                                               "pretrained_url": "hrnetv2_w48-d2186c55.pth"}),
    "fcn_hr48_pascal_context": ("r50_pascal_context", {"backbone.variant": "hrnet_w48", "task.head.channels": 720,
                                                       "task.aux_head": None, "task.num_classes": 59,
                                                       "pretrained_url": "hrnetv2_w48-d2186c55.pth"}),
    "nl_r50_cityscapes": ("r50_cityscapes", {"task.head.context.reduction": 2}),
    "dnl_r50_cityscapes": ("r50_cityscapes", {"task.head.context.temperature": 0.05}),
    # mmseg has no NL / DNL PASCAL-Context config: its FCN PASCAL-Context 59 setting with the ADE20K recipes' heads
    "nl_r50_pascal_context": ("r50_pascal_context", {"task.head.context.reduction": 2}),
    "dnl_r50_pascal_context": ("r50_pascal_context", {"task.head.context.temperature": 0.05}),
    # swin_small/base_patch244_window877_kinetics400_1k.py: update_interval 8 (512 clips); Swin-B decay 0.05
    "videoswin_s_k400": ("videoswin_t_k400", {"optim.batch_per_step": 512, "optim.weight_decay": 0.02,
                                              "pretrained_url": "swin_small_patch4_window7_224.pth"}),
    "videoswin_b_k400": ("videoswin_t_k400", {"optim.batch_per_step": 512, "optim.weight_decay": 0.05,
                                              "video_backbone.drop_path_rate": 0.3,
                                              "pretrained_url": "swin_base_patch4_window7_224.pth"}),
    # swin_base_patch244_window877_kinetics400_22k.py: the 1k config with the 22K start, drop path 0.2 and lr 3e-4;
    # swin_base_patch244_window877_kinetics600_22k.py: that config on Kinetics-600 (600 classes)
    "videoswin_b_k400_22k": ("videoswin_b_k400", {"video_backbone.drop_path_rate": 0.2, "optim.lr": 3e-4,
                                                  "optim.weight_decay": 0.05, "optim.batch_per_step": 512,
                                                  "pretrained_url": "swin_base_patch4_window7_224_22k.pth"}),
    "videoswin_b_k600_22k": ("videoswin_b_k400_22k", {"data.num_classes": 600, "task.num_classes": 600,
                                                      "pretrained_url": "swin_base_patch4_window7_224_22k.pth"}),
    # swin_base_patch244_window1677_sthv2.py: the K400 22k config's optimizer and schedule over 60 epochs from the
    # official K400 model, window 16x7x7, drop path 0.4, label smoothing 0.1, uniform sampling, no flip,
    # RandAugment n=4 m=7, random erasing 0.25, 1x3 test views (ThreeCrop 224 at short side 224)
    "videoswin_b_ssv2": ("videoswin_b_k400_22k", {
        "video_backbone.window_size": [16, 7, 7], "video_backbone.drop_path_rate": 0.4, "trainer.max_epochs": 60,
        "task.label_smoothing": 0.1, "data.num_classes": 174, "data.clip_len": 32, "data.frame_uniform": True,
        "data.hflip": 0.0, "data.rand_augment": {"num_ops": 4, "magnitude": 7}, "data.random_erasing": 0.25,
        "data.train_short_side": 256, "data.crop_size": 224, "data.scale": [0.08, 1.0], "data.num_test_clips": 1,
        "data.num_test_crops": 3, "data.eval_short_side": 224, "data.eval_crop_size": 224,
        "data.batch_size": 8, "optim.lr": 3e-4, "optim.weight_decay": 0.05, "optim.batch_per_step": 512,
        "pretrained_url": "swin_base_patch244_window1677_kinetics400_22k.pth"}),
    "i3d_r50_nl_k400": ("i3d_r50_k400", {"video_backbone.nl.after_blocks": [1, 3, 5]}),
    "i3d_r50_dnl_k400": ("i3d_r50_k400", {"video_backbone.dnl.after_blocks": [1, 3, 5]}),
    # DNL-Semantic-Segmentation: the HRNet config's DNL block (nonlocal: whiten_type in_nostd, temp 0.1, with_gc,
    # no use_out / out_bn); its Cityscapes and PASCAL-Context 59 NL recipes (scripts/seg/cityscapes/
    # run_fs_res101_nonlocal_cityscapes_seg.sh + NL_fcn_cityscapes_seg.conf: 4 GPUs x 2, 769 crops, lr 0.01, weight
    # decay 5e-4, 60k, sliding 769 windows at stride 0.667; scripts/seg/pcontext/run_fs_res101_nonlocal_pcontext_seg.sh
    # + NL59c_fcn_pcontext_seg.conf: 4 GPUs x 4, lr 0.001, 30k, evaluation every 4000), OHEM as both scripts
    "dnl_hr48_ade20k": ("nl_hr48_ade20k", HR48_DNL_BLOCK),
    "nl_hr48_cityscapes": ("nl_hr48_ade20k", {
        "optim.lr": 0.01, "optim.weight_decay": 5e-4, "optim.batch_per_step": 8, "data.batch_size": 2,
        "trainer.max_steps": 60000, "data.crop_size": [769, 769], "data.img_scale": [2048, 1024],
        "task.num_classes": 19, "task.inference.mode": "slide", "task.inference.crop_size": [769, 769],
        "task.inference.stride": [513, 513], "task.ohem": {"thresh": 0.7, "min_kept": 100000}}),
    "dnl_hr48_cityscapes": ("nl_hr48_cityscapes", HR48_DNL_BLOCK),
    "nl_hr48_pascal_context": ("nl_hr48_ade20k", {
        "optim.lr": 0.001, "optim.weight_decay": 1e-4, "optim.batch_per_step": 16, "data.batch_size": 4,
        "trainer.max_steps": 30000, "trainer.val_check_interval": 4000, "data.crop_size": [520, 520],
        "task.num_classes": 59, "task.inference.mode": "whole", "task.inference.scale": [1040, 520],
        "task.ohem": {"thresh": 0.7, "min_kept": 100000}}),
    "dnl_hr48_pascal_context": ("nl_hr48_pascal_context", HR48_DNL_BLOCK),
    # video-nonlocal-net (the NL paper's code) for MODEL.DEPTH 101: res3 NL every 2nd block, res4 every 7th, USE_SCALE
    "i3d_r101_nl_k400": ("i3d_r50_nl_k400", {"video_backbone.depth": 101,
                                             "video_backbone.nl.after_blocks": [[], [1, 3], [6, 13, 20], []],
                                             "video_backbone.nl.use_scale": True,
                                             "pretrained_url": "resnet101-63fe2227.pth"}),
}
# Demo recipes for synthetic data on a CPU: no reference.
DEMOS = {"quickstart", "quickstart_det", "quickstart_seg", "quickstart_video", "quickstart_relation", "quickstart_detr",
         "quickstart_ddetr", "quickstart_sparse_rcnn", "quickstart_cascade"}
EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# keys a derived recipe must share with its parent: the optimizer, the schedule, the batch and the start
SHARED = ("optim", "sched", "data.batch_size", "trainer.max_epochs", "trainer.max_steps", "trainer.gradient_clip_val")


def _value(cfg, key: str):
    """The effective value of ``key``: the config's, or else the default of the constructor its group names."""
    value = OmegaConf.select(cfg, key, default="<absent>")
    if value == "<absent>" and "." in key:
        group, name = key.rsplit(".", 1)
        target = OmegaConf.select(cfg, f"{group}._target_")
        if target:
            parameter = inspect.signature(get_class(target)).parameters.get(name)
            value = parameter.default if parameter is not None else value
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def test_every_experiment_has_a_reference_and_a_table_in_docs():
    assert set(EXPERIMENTS) == set(REFERENCES) | set(DERIVED) | DEMOS
    docs = (ROOT / "docs" / "recipes.md").read_text()
    for name in EXPERIMENTS:
        assert f"\n## `{name}`" in docs, name


@pytest.mark.parametrize("experiment", sorted(REFERENCES))
def test_recipe_equals_its_reference(experiment):
    ref = REFERENCES[experiment]
    cfg = compose(f"experiment={experiment}")
    for key, expected in ref.values.items():
        assert _value(cfg, key) == expected, key
    assert (Path(cfg.pretrained).name if cfg.pretrained else None) == ref.pretrained
    if not ref.published:
        assert not cfg.pretrained_url
    elif ref.pretrained:
        assert Path(cfg.pretrained_url).name == ref.pretrained and cfg.pretrained_url.startswith("https://")

    # samples per optimizer step: the reference's on its devices, the same on others
    if cfg.optim.batch_per_step:
        assert cfg.optim.batch_per_step == ref.batch and not cfg.optim.base_batch_size
        devices, interval = ref.update_interval

        def accumulation(n: int) -> int:
            run = OmegaConf.merge(cfg, {"trainer": {"accelerator": "gpu", "devices": n}})
            return accumulate_grad_batches(run)

        for n in sorted({1, 2, 4, 8, devices}):
            if ref.batch % (cfg.data.batch_size * n) == 0:
                assert cfg.data.batch_size * n * accumulation(n) == ref.batch
        assert accumulation(devices) == interval
    else:  # linear scaling from base_batch_size (Swin, DeiT, Goyal et al.): the reference's lr at its batch
        assert ref.update_interval is None

    # lr and weight decay of each kind of parameter, on the recipe's own model
    with torch.device("meta"):
        module = build_task(cfg)
    optimizer = build_optimizer(module, cfg.optim, total_batch_size=ref.batch)
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    parameters = dict(module.named_parameters())
    for name, (lr, weight_decay) in ref.params.items():
        group = groups[id(parameters[name])]
        assert (group["lr"], group["weight_decay"]) == pytest.approx((lr, weight_decay), rel=1e-12), name

    # the schedule at the reference's points
    steps = ref.steps_per_epoch if ref.epochs else 1000
    total = ref.epochs * steps if ref.epochs else cfg.trainer.max_steps
    scheduler = build_scheduler(optimizer, cfg.sched, total_steps=total, steps_per_epoch=steps,
                                lr_scale=lr_scale_factor(cfg.optim, ref.batch))
    plain = next(g for g in optimizer.param_groups if g["lr_scale"] == 1.0)
    for update in ref.points:
        scheduler.step_update(update)
        expected = ref.schedule(update, steps)
        tolerance = 0.0096 if update < ref.rtol_before else 1e-9  # see swin_t_upernet_ade20k's comment
        assert plain["lr"] == pytest.approx(expected, rel=tolerance), update


@functools.lru_cache(maxsize=None)
def _composed(experiment: str):
    return compose(f"experiment={experiment}")


@pytest.mark.parametrize("experiment", sorted(DERIVED))
def test_derived_recipe_differs_from_its_parent_where_its_reference_does(experiment):
    parent, differences = DERIVED[experiment]
    cfg, base = _composed(experiment), _composed(parent)
    for key, expected in differences.items():
        got = _value(cfg, key)
        assert (Path(got).name if key in ("pretrained", "pretrained_url") else got) == expected, key
    for key in SHARED:
        if key not in differences and not any(k.startswith(key + ".") for k in differences):
            assert _value(cfg, key) == _value(base, key), key
    if cfg.pretrained_url or base.pretrained_url:  # a published start (not another recipe's run) names its file
        assert Path(cfg.pretrained or "").name == Path(cfg.pretrained_url or "").name


@pytest.mark.parametrize("experiment, timm_name", [("swin_b_imagenet22k", "swin_base_patch4_window7_224.ms_in22k"),
                                                  ("swin_l_imagenet22k", "swin_large_patch4_window7_224.ms_in22k")])
def test_swin_22k_models_have_timms_parameters(experiment, timm_name):
    """The 22K models (21,841-way classifier) parameter for parameter as timm's, whose 22K weights are the official
    releases (timm's pretrained URL); and the 22K->1K fine-tunes start from those releases with the class map."""
    with torch.device("meta"):
        module = build_task(_composed(experiment))
        reference = timm.create_model(timm_name, pretrained=False, num_classes=21841, weight_init="skip")
    ours = {n: p.shape for n, p in module.named_parameters()}
    theirs = {n: p.shape for n, p in reference.named_parameters()}
    assert module.head.weight.shape[0] == 21841
    assert sum(s.numel() for s in ours.values()) == sum(s.numel() for s in theirs.values())
    assert sorted(s.numel() for s in ours.values()) == sorted(s.numel() for s in theirs.values())
    fine_tune = _composed(experiment.replace("imagenet22k", "22kto1k_224"))
    assert Path(fine_tune.task.map22kto1k).name == "map22kto1k.txt"
    official = timm.models.get_pretrained_cfg(timm_name)  # timm's 22K weights: the official release's URL
    assert official.num_classes == 21841 and fine_tune.pretrained_url == official.url
    assert Path(fine_tune.pretrained).name == Path(official.url).name


def test_i3d_recipe_strides_time_as_mmaction2():
    """mmaction2's ResNet3d with conv1_stride_t=2, pool1_stride_t=2 (pool of temporal extent 1) and pool2: 32 frames
    leave 4 at C5 (32 / 2 / 2 / 2), 224 pixels 7."""
    cfg = compose("experiment=i3d_r50_k400", "output_dir=/tmp/vtrain-test-recipes")
    with torch.device("meta"):
        module = build_task(cfg)
        c5 = module.backbone(torch.zeros(1, 3, 32, 224, 224))
    assert tuple(c5.shape) == (1, 2048, 4, 7, 7)
    assert module.backbone.maxpool.kernel_size == (1, 3, 3) and module.backbone.maxpool.stride == (2, 2, 2)


def test_a_missing_reference_checkpoint_is_one_line_before_anything_starts(tmp_path):
    """The file, where it is published, and that pretrained=null trains from scratch on purpose; raised by
    ``validate``, which the command line runs before any worker or DDP process (its one-line exit:
    tests/test_configs.py)."""
    weights = tmp_path / "weights"
    expected = (f"pretrained={weights}/{RESNET_V1C} does not exist: download it from "
                f"https://download.openmmlab.com/pretrain/third_party/{RESNET_V1C} into paths.weights_dir={weights} "
                "(or set VTRAIN_WEIGHTS), or pass pretrained=null to train from scratch on purpose")
    with pytest.raises(ConfigError) as raised:
        validate(compose("experiment=r50_ade20k", "trainer=cpu", f"paths.weights_dir={weights}"), datamodule=None)
    assert str(raised.value) == expected
    # on purpose from scratch, evaluating, or resuming (the weights come from the checkpoint): no weights file needed
    validate(compose("experiment=r50_ade20k", "trainer=cpu", "pretrained=null"), datamodule=None)
    checkpoint = tmp_path / "last.ckpt"
    checkpoint.write_bytes(b"")
    validate(compose("experiment=r50_ade20k", "trainer=cpu", "mode=eval", f"ckpt_path={checkpoint}",
                     f"paths.weights_dir={weights}"), datamodule=None)
    validate(compose("experiment=r50_ade20k", "trainer=cpu", f"ckpt_path={checkpoint}",
                     f"paths.weights_dir={weights}"), datamodule=None)


# ------------------------------------------------------------------------------------ ResNetV1c
def _randomise(module: nn.Module) -> None:
    generator = torch.Generator().manual_seed(0)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean):
                t.data = torch.randn(t.shape, generator=generator) * 0.1 + (1.0 if t is m.weight else 0.0)
            m.running_var.data = torch.rand(m.running_var.shape, generator=generator) + 0.5


def test_resnet_v1c_is_timms_resnet50c_and_loads_mmseg_resnet50_v1c_keys(tmp_path):
    """The deep stem of mmseg's ResNetV1c (stem.0 conv 3->32 s2, .1 BN, .3 conv 32->32, .4 BN, .6 conv 32->64, .7 BN)
    and timm's resnet50c: same size, and a state dict in mmseg's naming (``{'state_dict': ...}`` with ``stem.*`` and
    torchvision's other keys, as open-mmlab://resnet50_v1c) gives the network timm's outputs."""
    from vtrain.backbones import ResNet
    from vtrain.backbones.base import Classifier
    from vtrain.training.checkpoint import load_backbone_weights

    reference = timm.create_model("resnet50c", num_classes=1000).eval()
    _randomise(reference)
    ours = ResNet(depth=50, deep_stem=True)
    assert sum(p.numel() for p in Classifier(ours).parameters()) == sum(p.numel() for p in reference.parameters()) == 25_576_264
    mmseg = {}
    for key, value in reference.state_dict().items():
        for timm_prefix, mmseg_prefix in (("conv1.0.", "stem.0."), ("conv1.1.", "stem.1."), ("conv1.3.", "stem.3."),
                                          ("conv1.4.", "stem.4."), ("conv1.6.", "stem.6."), ("bn1.", "stem.7.")):
            if key.startswith(timm_prefix):
                key = mmseg_prefix + key[len(timm_prefix):]
        mmseg[key] = value
    assert {"stem.7.running_var", "layer1.0.downsample.0.weight", "fc.weight"} <= set(mmseg)
    torch.save({"meta": {}, "state_dict": mmseg}, tmp_path / RESNET_V1C)
    load_backbone_weights(ours, tmp_path / RESNET_V1C)  # strict: every tensor must come from the file
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_pooled(x), reference.forward_head(reference.forward_features(x),
                                                                                        pre_logits=True))
    # the init option: timm zero-inits each bottleneck's last BN, torchvision's resnet50() does not
    assert ResNet(depth=50).layer1[0].bn3.weight.abs().sum() == 0
    assert torch.equal(ResNet(depth=50, zero_init_last=False).layer1[0].bn3.weight, torch.ones(256))


# ------------------------------------------------------------------------------------ DeiT's repeated augmentation
def deit_ra_sampler(length: int, num_replicas: int, rank: int, epoch: int, seed: int = 0) -> list[int]:
    """deit samplers.py RASampler.__iter__, transcribed (its generator is seeded by the epoch; vtrain's by
    seed + epoch, equal at seed 0)."""
    num_samples = int(math.ceil(length * 3.0 / num_replicas))
    total_size = num_samples * num_replicas
    num_selected_samples = int(math.floor(length // 256 * 256 / num_replicas))
    g = torch.Generator()
    g.manual_seed(seed + epoch)
    indices = torch.randperm(length, generator=g).tolist()
    indices = [ele for ele in indices for i in range(3)]
    indices += indices[:(total_size - len(indices))]
    indices = indices[rank:total_size:num_replicas]
    return indices[:num_selected_samples]


class _Draws(torch.utils.data.Dataset):
    def __init__(self, length: int):
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[int, float]:
        return index, torch.rand(()).item()  # an "augmentation": whatever the seeded generator draws


def test_repeated_augmentation_sampler_is_deits_and_resumes_exactly():
    from vtrain.data.datamodule import SeededDataset
    from vtrain.data.samplers import EpochSeededIterator, RepeatedAugmentationSampler

    dataset = SeededDataset(_Draws(700), seed=0)
    for replicas in (1, 4):
        for rank in range(replicas):
            sampler = RepeatedAugmentationSampler(dataset, seed=0, num_replicas=replicas, rank=rank)
            assert len(sampler) == 700 // 256 * 256 // replicas
            for epoch in (0, 3):
                assert sampler.indices(epoch) == deit_ra_sampler(700, replicas, rank, epoch), (replicas, rank, epoch)
    one = RepeatedAugmentationSampler(dataset, seed=0)
    assert len(one) == 512  # 700 // 256 * 256 on one process: 170 or 171 images, each 3 times in a row
    one.set_epoch(2)
    draws = [dataset[key].sample for key in EpochSeededIterator(one)]
    assert [index for index, _ in draws][:6] == [draws[0][0]] * 3 + [draws[3][0]] * 3
    copies = [value for index, value in draws if index == draws[0][0]]
    assert len(set(copies)) == 3  # the three copies of a sample are augmented apart
    # exact resume: an iterator restored from a mid-epoch state continues with the same draws
    iterator = EpochSeededIterator(one)
    first = [next(iterator) for _ in range(100)]
    resumed = EpochSeededIterator(RepeatedAugmentationSampler(dataset, seed=0))
    resumed.load_state_dict(iterator.state_dict())
    assert list(resumed) == list(iterator) and first[0] == (2, draws[0][0], 0)
    assert [dataset[key].sample for key in first] == draws[:100]
    with pytest.raises(ConfigError, match="none on each of 1 rank"):
        RepeatedAugmentationSampler(SeededDataset(_Draws(100), seed=0), seed=0)


# ------------------------------------------------------------------------------------ mmaction2's MultiScaleCrop
def test_multi_scale_crop_takes_mmaction2s_sizes_at_its_five_fixed_places():
    """MultiScaleCrop(input_size=224, scales=(1, 0.8), random_crop=False, max_wh_scale_gap=0) on a 256x340 frame
    (short side 256): square crops of 256 or int(256 * 0.8) = 204, at (x, y) = upper left, upper right, lower
    left, lower right or centre on quarter steps of (340 - w) // 4 and (256 - h) // 4; then resized to 224."""
    from vtrain.tasks.video.data import MultiScaleCrop

    crop = MultiScaleCrop(224, (1.0, 0.8))
    assert crop.crop_sizes(256, 340) == [(256, 256), (204, 204)]
    assert crop.offsets(256, 340, 256, 256) == [(0, 0), (84, 0), (0, 0), (84, 0), (42, 0)]
    assert crop.offsets(256, 340, 204, 204) == [(0, 0), (136, 0), (0, 52), (136, 52), (68, 26)]
    ys, xs = torch.meshgrid(torch.arange(256), torch.arange(340), indexing="ij")
    frame = torch.stack([xs % 256, ys, xs // 256]).to(torch.uint8)  # each pixel holds its own position
    clip = torch.stack([frame, frame.flip(-1)])  # two different frames
    seen = set()
    random.seed(0)
    for _ in range(60):
        out = crop(clip)
        assert out.shape == (2, 3, 224, 224) and out.dtype == torch.uint8
        # the corner output pixels sample the crop's corners: read the crop back from the first frame
        x, y = int(out[0, 0, 0, 0]) + 256 * int(out[0, 2, 0, 0]), int(out[0, 1, 0, 0])
        side = int(out[0, 1, -1, -1]) - y + 1
        seen.add((side, x, y))
        expected = torch.nn.functional.interpolate(clip[..., y:y + side, x:x + side].float(), size=(224, 224),
                                                   mode="bilinear", align_corners=False)
        torch.testing.assert_close(out.float(), expected, atol=1, rtol=0)  # the same crop of both frames
    assert seen == {(256, 0, 0), (256, 84, 0), (256, 42, 0),
                    (204, 0, 0), (204, 136, 0), (204, 0, 52), (204, 136, 52), (204, 68, 26)}
