"""Image classification: backbone -> pooled embedding -> dropout -> linear classifier."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from vtrain.inference.visualize import draw_top_k, to_uint8_image
from vtrain.training.checkpoint import (
    load_classifier,
    load_matching,
    read_checkpoint,
    split_reference,
)
from vtrain.training.classifier import ClassifierTask
from vtrain.training.module import PredictOptions


class ClassificationTask(ClassifierTask):
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
    ):
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

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
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
        logits = self(images)
        self.log_accuracy(logits, targets, self.val_loss(logits, targets))

    # ------------------------------------------------------------------ predictions and export
    @torch.no_grad()
    def predict_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        probabilities = self(torch.stack(inputs).to(self.device)).softmax(dim=-1)
        return [{"probabilities": p} for p in probabilities]

    def draw_prediction(self, original: Any, record: dict[str, Any], options: PredictOptions) -> torch.Tensor:
        return draw_top_k(to_uint8_image(original), [(c["name"], c["score"]) for c in record["top_k"][:5]])

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Backbone weights, plus the classifier when the checkpoint has one of the right shape."""
        backbone_sd, head_sd = split_reference(self.backbone, read_checkpoint(path))
        load_matching(self.backbone, backbone_sd, path, "backbone", strict=strict)
        load_classifier(self.head, head_sd, path)
