"""Image classification: backbone -> pooled embedding -> dropout -> linear classifier."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from vtrain.inference.visualize import draw_top_k, to_uint8_image
from vtrain.training.checkpoint import (
    load_classifier,
    load_matching,
    read_checkpoint,
    split_reference,
)
from vtrain.training.module import PredictOptions, TaskModule, top_k


class ClassificationTask(TaskModule):
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
        super().__init__(optim, sched, monitor, monitor_mode)
        self.backbone = instantiate(backbone)  # a classifier's trunk (out_levels=None)
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.mixup = Mixup(**dict(mixup), label_smoothing=label_smoothing, num_classes=num_classes) if mixup else None
        if self.mixup is not None:
            self.train_loss = SoftTargetCrossEntropy()  # Mixup makes the (smoothed) soft targets
        elif label_smoothing > 0:
            self.train_loss = LabelSmoothingCrossEntropy(smoothing=label_smoothing)
        else:
            self.train_loss = nn.CrossEntropyLoss()
        self.val_loss = nn.CrossEntropyLoss()
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # With a reference backbone this is exactly the reference classifier.
        return self.head(self.head_drop(self.backbone.forward_pooled(x)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.mixup is not None:
            if images.shape[0] % 2:  # timm's batch Mixup pairs samples with the flipped batch
                images, targets = images[:-1], targets[:-1]
            images, targets = self.mixup(images, targets)
        loss = self.train_loss(self(images), targets)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=images.shape[0])
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor] | None, batch_idx: int) -> None:
        if batch is None:
            return  # none of its images could be read (vtrain.data.datamodule.ReadableCollate)
        images, targets = batch
        logits = self(images)
        n = images.shape[0]
        self.val_top1(logits, targets)
        self.val_top5(logits, targets)
        self.log("val/loss", self.val_loss(logits, targets), sync_dist=True, batch_size=n)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=n)
        self.log("val/top5", self.val_top5, batch_size=n)

    # ------------------------------------------------------------------ predictions and export
    @torch.no_grad()
    def predict_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        probabilities = self(torch.stack(inputs).to(self.device)).softmax(dim=-1)
        return [{"probabilities": p} for p in probabilities]

    def prediction_record(self, output: dict[str, torch.Tensor], options: PredictOptions) -> dict[str, Any]:
        return {"top_k": top_k(output["probabilities"], self.label_names(), self.class_ids, options.top_k)}

    def draw_prediction(self, original: Any, record: dict[str, Any], options: PredictOptions) -> torch.Tensor:
        return draw_top_k(to_uint8_image(original), [(c["name"], c["score"]) for c in record["top_k"][:5]])

    def export_module(self) -> nn.Module:
        return Classifier(self.backbone, self.head).eval()

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Backbone weights, plus the classifier when the checkpoint has one of the right shape."""
        backbone_sd, head_sd = split_reference(self.backbone, read_checkpoint(path))
        load_matching(self.backbone, backbone_sd, path, "backbone", strict=strict)
        load_classifier(self.head, head_sd, path)


class Classifier(nn.Module):
    """The evaluation model alone (what export writes): a normalised (N, 3, H, W) batch -> (N, classes) logits, as
    :meth:`ClassificationTask.forward` in eval mode (its dropout is the identity there)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_pooled(images))
