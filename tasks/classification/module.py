"""Image classification: backbone -> pooled embedding -> dropout -> linear classifier."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from hydra.utils import instantiate
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from vtrain.config import ConfigError
from vtrain.inference.visualize import draw_top_k, to_uint8_image
from vtrain.training.adversarial import PGD, attack_normalised
from vtrain.training.checkpoint import (
    load_classifier,
    load_matching,
    read_checkpoint,
    split_reference,
)
from vtrain.training.classifier import ClassifierTask
from vtrain.training.module import PredictOptions

log = logging.getLogger(__name__)


def read_class_map(path: str | Path, num_classes: int, source_classes: int) -> list[int]:
    """The official Swin ``data/map22kto1k.txt`` format: line ``i`` is the row of the source classifier (0-based,
    of ``source_classes``) that becomes class ``i`` of this model (utils.py ``load_pretrained``:
    ``head.weight[map22kto1k, :]``). One line says what is wrong with a file that is not that."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task.map22kto1k={path} does not exist: give the official data/map22kto1k.txt of "
                          "microsoft/Swin-Transformer, or task.map22kto1k=null to start the classifier afresh")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        if not line.isdigit() or int(line) >= source_classes:
            raise ConfigError(f"{path} line {number} is {line[:40]!r}, not a row of the checkpoint's {source_classes}-way "
                              "classifier: one 0-based row number per line (the official data/map22kto1k.txt)")
    if len(lines) != num_classes:
        raise ConfigError(f"{path} maps {len(lines)} classes but the model has {num_classes}: one line per class of the "
                          "model (the official data/map22kto1k.txt for ImageNet-1K)")
    return [int(line) for line in lines]


def rotate_clockwise(images: torch.Tensor, degrees: int) -> torch.Tensor:
    """(N, C, H, W) images turned ``degrees`` clockwise as they are seen (row 0 on top): SAN's robustness test (Zhao
    et al., CVPR 2020, the rotation table: 90 and 180 degrees clockwise). ``torch.rot90`` turns from the first of
    ``dims`` towards the second, from H towards W, which is anticlockwise on screen: hence ``-k``."""
    return torch.rot90(images, -(degrees // 90), dims=(-2, -1)) if degrees else images


class ClassificationTask(ClassifierTask):
    """``linear_probe``: the backbone is frozen and only the classifier trains (a linear evaluation).
    ``map22kto1k``: a class map (:func:`read_class_map`) that gives this model the rows of a pretrained classifier
    of more classes (an official ImageNet-22K release for a 1000-class model), as the official fine-tuning does.

    ``attacks``: name -> :class:`~vtrain.training.adversarial.PGD` settings; validation reports ``val/top1_<name>``,
    the top-1 on each image's adversarial counterpart, beside the clean ``val/top1``. ``adversarial_training``: PGD
    settings whose adversarial images the model trains on, all of them (Feature Denoising's adversarial training).
    ``mean`` / ``std``: the loaders' normalisation, undone so that the attacks work on 0-1 pixels.
    ``test_rotation``: validation images turned by 0, 90, 180 or 270 degrees clockwise (:func:`rotate_clockwise`), so
    that ``val/*`` are the metrics under that rotation."""

    def __init__(
        self,
        backbone: Mapping[str, Any],
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        num_classes: int,
        monitor: str = "val/top1",
        monitor_mode: str = "max",
        head_drop: float = 0.0,
        label_smoothing: float = 0.0,
        mixup: Mapping[str, Any] | None = None,
        map22kto1k: str | None = None,
        linear_probe: bool = False,
        attacks: Mapping[str, Mapping[str, Any]] | None = None,
        adversarial_training: Mapping[str, Any] | None = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        test_rotation: int = 0,
    ):
        if test_rotation not in (0, 90, 180, 270):
            raise ConfigError(f"task.test_rotation={test_rotation}: the validation images turn by 0, 90, 180 or 270 "
                              "degrees clockwise (SAN's rotation table: 90 and 180)")
        # a classifier's trunk (out_indices=None)
        super().__init__(instantiate(backbone), num_classes, optim, sched, monitor, monitor_mode, head_drop)
        self.mixup = Mixup(**dict(mixup), label_smoothing=label_smoothing, num_classes=num_classes) if mixup else None
        if self.mixup is not None:
            self.train_loss = SoftTargetCrossEntropy()  # Mixup makes the (smoothed) soft targets
        elif label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.val_loss = nn.CrossEntropyLoss()
        self.map22kto1k = map22kto1k
        if linear_probe:
            # linear evaluation of a self-supervised backbone (MoBY's moby_linear.py: every parameter but the
            # head's frozen; the backbone stays in training mode, its drop path on, as there)
            self.backbone.requires_grad_(False)
        self.attacks = {name: PGD.from_settings(settings, f"task.attacks.{name}")
                        for name, settings in (attacks or {}).items()}
        self.adversarial_training = (PGD.from_settings(adversarial_training, "task.adversarial_training")
                                     if adversarial_training else None)
        self.mean, self.std = tuple(mean), tuple(std)
        self.val_top1_attacked = nn.ModuleDict({name: MulticlassAccuracy(num_classes=num_classes, top_k=1,
                                                                         average="micro") for name in self.attacks})
        self.test_rotation = test_rotation

    def attacked(self, attack: PGD, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The normalised batch's adversarial counterpart under ``attack``."""
        return attack_normalised(self, attack, images, labels, self.head.out_features, self.mean, self.std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.adversarial_training is not None:
            images = self.attacked(self.adversarial_training, images, targets)
        if self.mixup is not None:
            if images.shape[0] % 2:  # timm's batch Mixup pairs samples with the flipped batch
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self(images), targets)
        self.log_train_loss(loss, images.shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        if batch is None:
            return  # none of its images could be read (vtrain.data.datamodule.ReadableCollate)
        images, targets = batch
        logits = self(rotate_clockwise(images, self.test_rotation))
        self.log_accuracy(logits, targets, self.val_loss(logits, targets))
        for name, attack in self.attacks.items():
            top1 = self.val_top1_attacked[name]
            top1(self(self.attacked(attack, images, targets)), targets)
            self.log(f"val/top1_{name}", top1, batch_size=len(targets))

    # ------------------------------------------------------------------ predictions and export
    @torch.no_grad()
    def predict_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        probabilities = self(torch.stack(inputs).to(self.device)).softmax(dim=-1)
        return [{"probabilities": p} for p in probabilities]

    def draw_prediction(self, original: Any, record: dict[str, Any], options: PredictOptions) -> torch.Tensor:
        return draw_top_k(to_uint8_image(original), [(c["name"], c["score"]) for c in record["top_k"][:5]])

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Backbone weights, plus the classifier when the checkpoint has one of the right shape, or one of more
        classes whose rows ``map22kto1k`` picks."""
        backbone_sd, head_sd = split_reference(self.backbone, read_checkpoint(path))
        load_matching(self.backbone, backbone_sd, path, "backbone", strict=strict)
        rows, hint = head_sd.get("weight", self.head.weight).shape[0], ""
        if rows != self.head.out_features and self.map22kto1k:
            picked = read_class_map(self.map22kto1k, self.head.out_features, rows)
            head_sd = {name: tensor[picked] for name, tensor in head_sd.items()}
            log.info("the %d-way classifier of %s gives this model's %d classes its rows listed in %s", rows, path,
                     len(picked), self.map22kto1k)
        elif rows != self.head.out_features:
            hint = " (task.map22kto1k=<a class map> keeps the rows of this model's classes)"
        load_classifier(self.head, head_sd, path, hint)
