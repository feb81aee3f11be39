"""Parameter groups, lr scaling, batch per step and the schedules of the recipes."""
from __future__ import annotations

import math

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from vtrain.config import ConfigError
from vtrain.backbones import SwinTransformer
from vtrain.config.validate import accumulation_for
from vtrain.training.optim import build_optimizer, build_scheduler, lr_scale_factor, param_groups, param_multipliers

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
    sched = build_scheduler(opt, {"_target_": "vtrain.training.optim.cosine", "warmup_epochs": 2, "warmup_lr": 5e-7, "min_lr": 5e-6},
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
    cfg = {"_target_": "torch.optim.SGD", "lr": 0.02, "weight_decay": 1e-4, "momentum": 0.9,
           "custom_keys": {"backbone": {"lr_mult": 0.1}}}
    opt = build_optimizer(model, cfg, total_batch_size=16)
    sched = build_scheduler(opt, {"_target_": "vtrain.training.optim.multistep", "milestones_epochs": [8, 11], "gamma": 0.1, "warmup_steps": 500,
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
    sched = build_scheduler(opt, {"_target_": "vtrain.training.optim.poly", "power": 0.9, "min_lr": 1e-4, "warmup_steps": 0},
                            total_steps=1000, steps_per_epoch=10)
    sched.step_update(400)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4 + (0.01 - 1e-4) * (1 - 0.4) ** 0.9)


def test_a_schedule_option_that_does_not_exist_is_named():
    from vtrain.config import ConfigError

    opt = build_optimizer(Tiny(), ADAMW, total_batch_size=512)
    with pytest.raises(ConfigError, match="sched has no option warmup_epoch for vtrain.training.optim.cosine"):
        build_scheduler(opt, {"_target_": "vtrain.training.optim.cosine", "warmup_epoch": 2}, total_steps=10, steps_per_epoch=1)


def test_mmdet_sgd_recipes_decay_every_parameter():
    model = Tiny()
    groups = param_groups(model, 1e-4, 0.02, exempt_1d_and_listed=False)
    assert [g["weight_decay"] for g in groups] == [1e-4]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_custom_keys_apply_the_longest_key_as_mmcv_does():
    """mmcv's DefaultOptimizerConstructor (paramwise_cfg.custom_keys): keys sorted alphabetically, then by length,
    longest first; the first key contained in the full name sets lr_mult and decay_mult (default 1), the others
    are not consulted. Video Swin's keys, worked out by hand for each kind of parameter."""
    keys = {"absolute_pos_embed": {"decay_mult": 0.0}, "relative_position_bias_table": {"decay_mult": 0.0},
            "norm": {"decay_mult": 0.0}, "backbone": {"lr_mult": 0.1}}
    model = Tiny()
    got = param_multipliers(model, exempt_1d_and_listed=False, custom_keys=keys)
    assert got["backbone.layers.0.blocks.0.norm1.weight"] == (0.1, 1.0)       # "backbone" (8) is longer than "norm" (4)
    assert got["backbone.layers.0.blocks.0.attn.qkv.bias"] == (0.1, 1.0)
    assert got["backbone.layers.0.blocks.0.attn.relative_position_bias_table"] == (1.0, 0.0)  # 28 characters
    assert got["head.bias"] == (1.0, 1.0) and got["head.weight"] == (1.0, 1.0)  # no key: decayed, lr x1
    # two keys of one length: the alphabetically first wins
    ties = param_multipliers(model, exempt_1d_and_listed=False,
                             custom_keys={"head": {"lr_mult": 2.0}, "bias": {"lr_mult": 3.0}})
    assert ties["head.bias"] == (3.0, 1.0) and ties["head.weight"] == (2.0, 1.0)
    # without custom keys, timm's rule: 1-D tensors and no_weight_decay() names exempt
    timm_rule = param_multipliers(model)
    assert timm_rule["head.bias"] == (1.0, 0.0) and timm_rule["backbone.layers.0.blocks.0.norm1.weight"] == (1.0, 0.0)
    assert timm_rule["backbone.layers.0.blocks.0.attn.relative_position_bias_table"] == (1.0, 0.0)
    assert timm_rule["head.weight"] == (1.0, 1.0)
    groups = param_groups(model, 0.02, 1e-3, exempt_1d_and_listed=False, custom_keys=keys)
    by_id = {id(p): g for g in groups for p in g["params"]}
    norm = by_id[id(model.backbone.layers[0].blocks[0].norm1.weight)]
    assert (norm["lr"], norm["weight_decay"], norm["lr_scale"]) == pytest.approx((1e-4, 0.02, 0.1))


def _lr_after(sched, optimizer, update: int) -> float:
    sched.step_update(update)
    return optimizer.param_groups[0]["lr"]


def test_cosine_epoch_is_deits_loop_over_timms_scheduler():
    """DeiT's main.py: lr scaled by batch / 512 (warmup_lr and min_lr not), timm's create_scheduler (cosine,
    t_in_epochs) and ``lr_scheduler.step(epoch)`` after each epoch. The reference is that loop run here with timm's
    own scheduler; vtrain's lr during each update of an epoch must be the lr DeiT trains that epoch with."""
    epochs, steps = 300, 3
    reference_opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=5e-4 * 1024 / 512)
    reference = CosineLRScheduler(reference_opt, t_initial=epochs, lr_min=1e-5, warmup_lr_init=1e-6, warmup_t=5,
                                  cycle_limit=1, t_in_epochs=True, cycle_decay=0.1)  # decay_rate in timm 0.3
    expected = []
    for epoch in range(epochs):
        expected.append(reference_opt.param_groups[0]["lr"])
        reference.step(epoch)
    opt = build_optimizer(Tiny(), ADAMW, total_batch_size=1024)
    sched = build_scheduler(opt, {"_target_": "vtrain.training.optim.cosine_epoch", "warmup_epochs": 5, "warmup_lr": 1e-6,
                                  "min_lr": 1e-5}, total_steps=epochs * steps, steps_per_epoch=steps,
                            lr_scale=lr_scale_factor(ADAMW, 1024))
    got = [opt.param_groups[0]["lr"]]  # before the first update
    got += [_lr_after(sched, opt, u) for u in range(1, epochs * steps)]
    for update, lr in enumerate(got):
        assert lr == pytest.approx(expected[update // steps], rel=1e-12), update
    assert expected[0] == expected[1] == 1e-6 and expected[6] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 5 / 300)))


def test_mmcv_cosine_is_mmcvs_epoch_cosine_with_warmup_by_iterations():
    """mmcv's CosineAnnealingLrUpdaterHook (by_epoch) with warmup='linear', warmup_by_epoch=True, warmup_iters=2.5,
    warmup_ratio 0.1 (lr_updater.py), written out: regular(e) = min + (base - min)(1 + cos(pi e / E)) / 2, times
    1 - (1 - i / W)(1 - ratio) while the iteration i < W = 2.5 epochs."""
    epochs, steps, base = 30, 10, 1e-3
    cfg = {"_target_": "torch.optim.AdamW", "lr": base, "weight_decay": 0.02,
           "custom_keys": {"backbone": {"lr_mult": 0.1}}}
    opt = build_optimizer(Tiny(), cfg, total_batch_size=256)
    sched = build_scheduler(opt, {"_target_": "vtrain.training.optim.mmcv_cosine", "warmup_epochs": 2.5, "warmup_ratio": 0.1,
                                  "min_lr": 0.0}, total_steps=epochs * steps, steps_per_epoch=steps)
    head = next(g for g in opt.param_groups if g["lr_scale"] == 1.0)
    body = next(g for g in opt.param_groups if g["lr_scale"] == 0.1)

    def mmcv(i: int, lr: float) -> float:
        regular = 0.5 * lr * (1 + math.cos(math.pi * (i // steps) / epochs))
        return regular * (1 - (1 - i / 25) * 0.9) if i < 25 else regular

    assert head["lr"] == pytest.approx(base * 0.1) and body["lr"] == pytest.approx(base * 0.01)  # update 0
    for i in (1, 12, 24, 25, 26, 149, 150, 299):
        sched.step_update(i)
        assert (head["lr"], body["lr"]) == pytest.approx((mmcv(i, base), mmcv(i, base * 0.1)), rel=1e-12), i


def test_batch_per_step_is_made_of_whole_passes_on_any_device_count():
    # Video Swin-T: 8 clips per GPU x 8 GPUs x update_interval 4 = 256
    assert [accumulation_for(256, 8, n) for n in (8, 4, 1, 32)] == [4, 8, 32, 1]
    assert accumulation_for(16, 4, 4) == 1 and accumulation_for(16, 2, 8) == 1  # mmseg's 16 images
    with pytest.raises(ConfigError, match=r"^optim.batch_per_step=16 is not a whole number of passes of "
                                          r"data.batch_size=4 on 8 device\(s\) \(32 samples\): use data.batch_size=2$"):
        accumulation_for(16, 4, 8)


@pytest.mark.parametrize("trainer_kwargs, data_overrides", [
    (dict(max_epochs=3), []),
    (dict(max_epochs=2, limit_train_batches=5, accumulate_grad_batches=2), []),
    (dict(max_epochs=4, limit_train_batches=0.5, max_steps=7), []),
    (dict(max_epochs=-1, max_steps=11), []),
    (dict(max_epochs=2, accumulate_grad_batches=4), ["+data.repeated_augmentation.repeats=3",
                                                     "+data.repeated_augmentation.epoch_multiple=20"]),
])
def test_training_steps_equal_lightnings_count_without_building_the_loader(imagenet_root, trainer_kwargs,
                                                                          data_overrides):
    """The command line gives the task its length (vtrain.training.steps); Lightning's own count, which builds the
    training loader to know it, must agree: steps per epoch and total steps."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from conftest import TINY_CLS, compose
    from vtrain.training.steps import training_steps

    cfg = compose(*TINY_CLS, f"data.root={imagenet_root}", "data.batch_size=3", *data_overrides)
    kwargs = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                  enable_model_summary=False, **trainer_kwargs)
    counted = training_steps(pl.Trainer(**kwargs), instantiate(cfg.data))

    class Counted(Exception):
        pass

    class Lightnings(pl.LightningModule):  # Lightning's count, as a module asks it in configure_optimizers
        def training_step(self, batch, batch_idx):
            raise AssertionError("never reached")

        def configure_optimizers(self):
            self.total = self.trainer.estimated_stepping_batches  # builds the training loader to know it
            self.batches = self.trainer.num_training_batches
            raise Counted

    lightning = Lightnings()
    with pytest.raises(Counted):
        pl.Trainer(**kwargs).fit(lightning, datamodule=instantiate(cfg.data))
    assert counted.total == lightning.total
    accumulate = trainer_kwargs.get("accumulate_grad_batches", 1)
    if trainer_kwargs["max_epochs"] == -1:  # Lightning counts no epoch then; the schedule's epochs still need one
        assert lightning.batches == float("inf") and counted.per_epoch == 48 // 3
    else:
        assert counted.per_epoch == math.ceil(lightning.batches / accumulate)
    assert counted.batch_size == 3 * accumulate


def test_training_steps_count_each_process_share(imagenet_root):
    """Under DDP each process draws ceil(N / processes) samples (DistributedSampler's padding), in whole batches."""
    from hydra.utils import instantiate

    from conftest import TINY_CLS, compose

    cfg = compose(*TINY_CLS, f"data.root={imagenet_root}", "data.batch_size=5")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    samples = len(datamodule.train_set)
    for world_size in (1, 2, 3, 7):
        assert datamodule.train_batches_per_epoch(world_size) == math.ceil(samples / world_size) // 5
