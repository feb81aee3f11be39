"""PGD (vtrain.training.adversarial) against hand computations: one step on a linear model is epsilon times the sign
of the input gradient written out by hand; every step stays in the epsilon ball and in [0, 1]; a targeted attack
raises the target's probability; the normalised entry point attacks pixels in evaluation mode."""
from __future__ import annotations

import random

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from torch import nn
from torch.utils.data import DataLoader

from conftest import TINY_CLS, compose
from vtrain.config import ConfigError
from vtrain.training.adversarial import PGD, attack_normalised
from vtrain.training.build import build_task

EPS = 16 / 255


def _linear(num_classes: int, seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, num_classes))
    return model, model[1].weight.detach(), model[1].bias.detach()


def _hand_gradient(weight: torch.Tensor, bias: torch.Tensor, pixels: torch.Tensor, goal: torch.Tensor) -> torch.Tensor:
    """d CE(W x + b, goal) / dx = (softmax(W x + b) - onehot(goal)) W, per image."""
    flat = pixels.flatten(1)
    probabilities = (flat @ weight.T + bias).softmax(-1)
    onehot = torch.eye(weight.shape[0])[goal]
    return ((probabilities - onehot) @ weight).view_as(pixels)


@pytest.mark.parametrize("targeted", [False, True])
def test_one_step_on_a_linear_model_is_epsilon_times_the_sign_of_the_hand_gradient(targeted):
    model, weight, bias = _linear(num_classes=2)
    pixels = torch.rand(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 0.6 + 0.2  # away from 0 and 1
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    attack = PGD(epsilon=EPS, step_size=EPS, steps=1, targeted=targeted, start_from_clean=1.0)
    adversarial = attack.perturb(model, pixels, labels, num_classes=2)
    if targeted:  # two classes: the one wrong class is the target, whose loss the attack descends
        expected = pixels - EPS * _hand_gradient(weight, bias, pixels, 1 - labels).sign()
    else:
        expected = pixels + EPS * _hand_gradient(weight, bias, pixels, labels).sign()
    torch.testing.assert_close(adversarial, expected, rtol=0, atol=1e-6)
    assert weight.grad is None and model[1].weight.grad is None  # the parameters gather no gradient


def test_many_steps_stay_within_epsilon_and_zero_one_and_the_target_gains(one_thread):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    pixels = torch.rand(8, 3, 8, 8)
    pixels[:, :, 0] = 0.0  # pixels at the edges of [0, 1]: the projection must keep them inside
    pixels[:, :, 1] = 1.0
    labels = torch.randint(0, 2, (8,))
    adversarial = PGD(epsilon=EPS, step_size=1 / 255, steps=20, targeted=True).perturb(model, pixels, labels, 2)
    assert (adversarial - pixels).abs().max() <= EPS + 1e-6
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    target = (1 - labels).unsqueeze(1)
    with torch.no_grad():
        before = model(pixels).log_softmax(-1).gather(1, target)
        after = model(adversarial).log_softmax(-1).gather(1, target)
    assert (after > before).all()


def test_the_normalised_entry_point_attacks_pixels_in_evaluation_mode_even_under_inference_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).train()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    pixels = torch.rand(4, 3, 8, 8)
    running_mean = model[1].running_mean.clone()
    with torch.inference_mode():  # as in Lightning's validation loop
        adversarial = attack_normalised(model, PGD(EPS, 2 / 255, 3), (pixels - m) / s, torch.tensor([0, 1, 2, 0]),
                                        3, mean, std)
    assert model.training and torch.equal(model[1].running_mean, running_mean)  # attacked in eval mode, restored
    assert (adversarial * s + m - pixels).abs().max() <= EPS + 1e-5  # epsilon counts in pixels


def test_bad_settings_say_what_is_wrong():
    with pytest.raises(ConfigError, match="0-1 pixels"):
        PGD(epsilon=16, step_size=1, steps=10)
    with pytest.raises(ConfigError, match="steps=0"):
        PGD(epsilon=EPS, step_size=1 / 255, steps=0)
    with pytest.raises(ConfigError, match=r"task.attacks.pgd has unknown key\(s\) \['step'\]: a PGD attack takes"):
        PGD.from_settings({"epsilon": EPS, "step": 1 / 255, "steps": 10}, "task.attacks.pgd")


def test_a_trained_tiny_classifier_loses_accuracy_under_both_attacks_and_trains_on_attacked_images(imagenet_root,
                                                                                                   one_thread):
    """The classification task's wiring, in process: a tiny Swin fitted to the synthetic ImageNet's training images,
    then Lightning's validation (under inference mode, as in a run) reports the clean top-1 and the top-1 under the
    two attacks of LR-Net's table (conf/attack/); and a training step with ``adversarial_training`` feeds the model
    images within epsilon of the clean ones, in training mode."""
    cfg = compose(*TINY_CLS, f"data.root={imagenet_root}", "output_dir=/tmp/unused", "backbone.embed_dim=16",
                  "backbone.depths=[1,1,1,1]", "backbone.num_heads=[1,1,2,2]",
                  "+attack@task.attacks.pgd_targeted=pgd_targeted", "+attack@task.attacks.pgd_untargeted=pgd_untargeted")
    torch.manual_seed(0)
    random.seed(0)
    task = build_task(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    images, labels = next(iter(DataLoader(datamodule.train_set, batch_size=48)))  # all 48 training images
    optimizer = torch.optim.AdamW(task.parameters(), lr=2e-3)
    for _ in range(10):
        optimizer.zero_grad()
        nn.functional.cross_entropy(task(images), labels).backward()
        optimizer.step()
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    (metrics,) = trainer.validate(task, DataLoader(datamodule.val_set, batch_size=16), verbose=False)
    # measured: clean 9 of the 16 validation images (chance is 4), 0 under either attack
    assert metrics["val/top1"] >= 0.5
    assert metrics["val/top1_pgd_targeted"] <= 0.125 and metrics["val/top1_pgd_untargeted"] <= 0.125

    task.trainer = None  # the step below outside a loop: its self.log does nothing
    task.adversarial_training = PGD(epsilon=EPS, step_size=EPS / 2, steps=2, start_from_clean=1.0)
    seen = []
    task.register_forward_pre_hook(lambda module, args: seen.append((args[0].detach(), module.training)))
    task.train().training_step((images[:8], labels[:8]), 0)
    trained_on, mode = seen[-1]  # the attack's own forwards come first, in evaluation mode
    assert mode and not any(training for _, training in seen[:-1]) and len(seen) == 3
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (cfg.data.mean, cfg.data.std))
    change = (trained_on - images[:8]) * std
    assert EPS / 2 <= change.abs().max() <= EPS + 1e-5
