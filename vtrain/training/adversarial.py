"""L-inf PGD (Madry et al., ICLR 2018), targeted at a random wrong class or untargeted, on 0-1 pixels: the attack of
LR-Net's robustness table (Hu et al., ICCV 2019), which follows Feature Denoising (Xie et al., CVPR 2019; official
code facebookresearch/ImageNet-Adversarial-Training, adv_model.py ``PGDAttacker``)."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vtrain.config import ConfigError


@dataclass(frozen=True)
class PGD:
    """``steps`` signed-gradient steps of ``step_size``, each projected back into the L-inf ball of radius ``epsilon``
    around the image and into [0, 1]; all three on 0-1 pixels (Feature Denoising's 16 and 1 of 255 are 16/255, 1/255).

    Args:
        epsilon: the largest change of any pixel.
        step_size: the change per step.
        steps: gradient steps.
        targeted: True: push each image towards a target drawn uniformly from the wrong classes, descending that
            class's cross-entropy (Feature Denoising Sec. 6, adv_model.py ``_create_random_target``); False: away
            from the true class, ascending its cross-entropy (Madry et al.).
        start_from_clean: the chance that a batch starts at the clean image rather than at a uniform point of the
            ball (Feature Denoising Sec. 5: 0.2 in training, 0 when evaluating).
    """

    epsilon: float
    step_size: float
    steps: int
    targeted: bool = True
    start_from_clean: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 < self.epsilon <= 1.0 or not 0.0 < self.step_size <= 1.0:
            raise ConfigError(f"PGD epsilon={self.epsilon}, step_size={self.step_size}: both are on 0-1 pixels, in "
                              "(0, 1] (Feature Denoising's 16 of 255 is 0.0627)")
        if self.steps < 1:
            raise ConfigError(f"PGD steps={self.steps}: use a whole number >= 1")
        if not 0.0 <= self.start_from_clean <= 1.0:
            raise ConfigError(f"PGD start_from_clean={self.start_from_clean}: a probability, in [0, 1]")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], where: str) -> PGD:
        """The attack a config's mapping describes (``where``: its key, for the one-line error)."""
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(settings) - set(fields))
        missing = [name for name in ("epsilon", "step_size", "steps") if name not in settings]
        if unknown or missing:
            raise ConfigError(f"{where} has {'unknown key(s) ' + str(unknown) if unknown else 'no ' + str(missing)}: "
                              f"a PGD attack takes {', '.join(fields)} (conf/attack/ has examples)")
        return cls(**settings)

    def perturb(self, logits_of: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor, labels: torch.Tensor,
                num_classes: int) -> torch.Tensor:
        """Adversarial 0-1 pixels for ``pixels`` (N, 3, H, W in [0, 1]) of classes ``labels`` against ``logits_of``
        (0-1 pixels -> logits). Gradients reach the pixels only (the model's parameters gather none)."""
        pixels = pixels.detach()
        lower, upper = (pixels - self.epsilon).clamp(0, 1), (pixels + self.epsilon).clamp(0, 1)
        goal = (labels + torch.randint_like(labels, 1, num_classes)) % num_classes if self.targeted else labels
        adversarial = pixels
        if torch.rand(()).item() >= self.start_from_clean:
            adversarial = torch.maximum(torch.minimum(pixels + torch.empty_like(pixels).uniform_(
                -self.epsilon, self.epsilon), upper), lower)
        # targeted: descend the target's loss; untargeted: ascend the true class's
        sign = -1.0 if self.targeted else 1.0
        for _ in range(self.steps):
            adversarial = adversarial.detach().requires_grad_(True)
            loss = F.cross_entropy(logits_of(adversarial), goal, reduction="sum")
            (gradient,) = torch.autograd.grad(loss, adversarial)
            adversarial = torch.maximum(torch.minimum(adversarial + sign * self.step_size * gradient.sign(), upper),
                                        lower)
        return adversarial.detach()


def attack_normalised(model: nn.Module, attack: PGD, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised batch (what the loaders give) -> its adversarial counterpart, normalised alike. The attack works
    on the 0-1 pixels and normalises inside the model's forward, so ``epsilon`` is in pixels whatever the
    normalisation; the model runs in evaluation mode while attacked (batch-norm statistics neither used from the
    batch nor updated: Feature Denoising's adv_model.py, ``BatchNorm, training=False``) and gets its mode back.
    Works inside Lightning's validation, which runs under inference mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad():  # no inference tensor may enter the graph
            mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
            std_t = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
            pixels = (images.clone() * std_t + mean_t).clamp(0, 1)
            adversarial = attack.perturb(lambda x: model((x - mean_t) / std_t), pixels, labels.clone(), num_classes)
    finally:
        model.train(was_training)
    return (adversarial - mean_t) / std_t
