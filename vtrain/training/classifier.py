"""What image and video classification share: the pooled embedding -> dropout -> linear classifier, top-1 and top-5,
the top-k predictions and the exported classifier."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from vtrain.backbones.base import Classifier
from vtrain.training.module import PredictOptions, TaskModule, top_k


class ClassifierTask(TaskModule):
    """A task whose model is ``backbone.forward_pooled -> dropout(head_drop) -> Linear(num_classes)`` (``head_drop``,
    ``head``: with a reference backbone and no dropout, exactly the reference classifier), scored by top-1 and top-5
    accuracy (``val/top1``, ``val/top5``) and a loss (``val/loss``)."""

    def __init__(self, backbone: nn.Module, num_classes: int, optim: Mapping[str, Any], sched: Mapping[str, Any],
                 monitor: str = "val/top1", monitor_mode: str = "max", head_drop: float = 0.0):
        super().__init__(optim, sched, monitor, monitor_mode)
        self.backbone = backbone
        self.head_drop = nn.Dropout(head_drop)
        self.head = nn.Linear(self.backbone.num_features, num_classes)
        self.val_top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro")
        self.val_top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """An image (N, 3, H, W) or clip (N, C, T, H, W) batch -> (N, classes) logits."""
        return self.head(self.head_drop(self.backbone.forward_pooled(x)))

    def log_accuracy(self, scores: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor) -> None:
        """A validation batch's top-1, top-5 (of logits or probabilities: the same ranking) and loss."""
        n = len(labels)
        self.val_top1(scores, labels)
        self.val_top5(scores, labels)
        self.log("val/loss", loss, sync_dist=True, batch_size=n)
        self.log("val/top1", self.val_top1, prog_bar=True, batch_size=n)
        self.log("val/top5", self.val_top5, batch_size=n)

    def prediction_record(self, output: dict[str, torch.Tensor], options: PredictOptions) -> dict[str, Any]:
        return {"top_k": top_k(output["probabilities"], self.label_names(), self.class_ids, options.top_k)}

    def truth_record(self, truth: int) -> dict[str, Any]:
        """The true class, drawn as a bar at 1."""
        names = self.label_names()
        return {"top_k": [{"label": int(truth), "name": names[int(truth)], "score": 1.0}]}

    export_output = "logits (classes)"

    def example_input(self, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        side = int(self.run_config["data"]["img_size"])
        return torch.randn(batch, 3, *(size or (side, side)))

    def export_module(self) -> nn.Module:
        """The evaluation model alone: a normalised batch -> logits (a video's score averages its views' softmax)."""
        return Classifier(self.backbone, head=self.head).eval()
