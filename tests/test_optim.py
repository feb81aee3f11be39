"""Parameter groups, lr scaling and the per-iteration schedules of the recipes."""
from __future__ import annotations

import math

import pytest
from torch import nn

from vtrain.backbones import SwinTransformer
from vtrain.optim import build_optimizer, build_scheduler, lr_scale_factor, param_groups

ADAMW = {"_target_": "torch.optim.AdamW", "lr": 5e-4, "weight_decay": 0.05, "betas": [0.9, 0.999], "eps": 1e-8,
         "base_batch_size": 512}


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = SwinTransformer(img_size=32, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                                        window_size=4, drop_path_rate=0.0)
        self.head = nn.Linear(self.backbone.num_features, 3)


def test_no_weight_decay_on_norms_biases_and_position_tables():
    model = Tiny()
    groups = param_groups(model, 0.05, 1e-3)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in model.named_parameters():
        exempt = p.ndim <= 1 or "relative_position_bias_table" in name
        assert (id(p) not in decayed) == exempt, name
    assert any("relative_position_bias_table" in n for n, _ in model.named_parameters())


def test_swin_linear_lr_scaling_applies_to_warmup_and_min_lr():
    model = Tiny()
    opt = build_optimizer(model, ADAMW, total_batch_size=1024)
    assert lr_scale_factor(ADAMW, 1024) == 2.0
    sched = build_scheduler(opt, {"_target_": "vtrain.optim.cosine", "warmup_epochs": 2, "warmup_lr": 5e-7, "min_lr": 5e-6},
                            total_steps=100, steps_per_epoch=10, lr_scale=2.0)
    lrs = []
    for step in range(101):
        sched.step_update(step)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-6)            # warmup_lr 5e-7 x 2
    assert lrs[20] == pytest.approx(1e-3)           # peak 5e-4 x 2 at the end of 2 warm-up epochs
    assert lrs[10] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6))
    t = (60 - 20) / 80                               # cosine over the 80 steps after warm-up
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * t)))
    assert lrs[100] == pytest.approx(1e-5)
    assert all(g["lr"] == lrs[-1] for g in opt.param_groups)


def test_multistep_with_mmdet_warmup_and_backbone_multiplier():
    model = Tiny()
    cfg = {"_target_": "torch.optim.SGD", "lr": 0.02, "weight_decay": 1e-4, "momentum": 0.9, "backbone_lr_mult": 0.1}
    opt = build_optimizer(model, cfg, total_batch_size=16)
    sched = build_scheduler(opt, {"_target_": "vtrain.optim.multistep", "milestones_epochs": [8, 11], "gamma": 0.1, "warmup_steps": 500,
                                  "warmup_ratio": 0.001}, total_steps=1200, steps_per_epoch=100)
    head = next(g for g in opt.param_groups if g["lr_scale"] == 1.0)
    body = next(g for g in opt.param_groups if g["lr_scale"] == 0.1)

    def at(step):
        sched.step_update(step)
        return head["lr"], body["lr"]

    assert at(0)[0] == pytest.approx(0.02 * 0.001)
    assert at(250)[0] == pytest.approx(0.02 * (1 - (1 - 0.001) * (1 - 250 / 500)))  # mmcv's linear warm-up
    assert at(700) == pytest.approx((0.02, 0.002))
    assert at(799)[0] == pytest.approx(0.02)
    assert at(800) == pytest.approx((0.002, 0.0002))
    assert at(1100)[0] == pytest.approx(0.0002)


def test_poly_decay():
    model = Tiny()
    opt = build_optimizer(model, {"_target_": "torch.optim.SGD", "lr": 0.01, "weight_decay": 5e-4, "momentum": 0.9},
                          total_batch_size=16)
    sched = build_scheduler(opt, {"_target_": "vtrain.optim.poly", "power": 0.9, "min_lr": 1e-4, "warmup_steps": 0},
                            total_steps=1000, steps_per_epoch=10)
    sched.step_update(400)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 + (0.01 - 1e-4) * (1 - 0.4) ** 0.9)


def test_a_schedule_option_that_does_not_exist_is_named():
    from vtrain import ConfigError

    opt = build_optimizer(Tiny(), ADAMW, total_batch_size=512)
    with pytest.raises(ConfigError, match="sched has no option warmup_epoch for vtrain.optim.cosine"):
        build_scheduler(opt, {"_target_": "vtrain.optim.cosine", "warmup_epoch": 2}, total_steps=10, steps_per_epoch=1)


def test_mmdet_sgd_recipes_decay_every_parameter():
    model = Tiny()
    groups = param_groups(model, 1e-4, 0.02, filter_bias_and_bn=False)
    assert [g["weight_decay"] for g in groups] == [1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    from conftest import compose

    assert compose("experiment=r50_maskrcnn_coco_1x").optim.filter_bias_and_bn is False
    assert compose("experiment=swin_t_maskrcnn_coco_1x").optim.filter_bias_and_bn is True
