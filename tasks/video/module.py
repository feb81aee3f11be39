"""Video classification: video backbone -> pooled clip embedding -> dropout 0.5 -> linear classifier.

Training sees one clip per video. Validation scores every view of a video (clips x crops) and
averages their softmax, the multi-view testing of the I3D / NL / Video Swin papers; top-1 and
top-5 are over whole videos (``val/top1``, ``val/top5``).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from vtrain.inference.visualize import draw_top_k, frame_strip
from vtrain.training.checkpoint import (
    is_lightning_checkpoint,
    load_classifier,
    load_matching,
    read_checkpoint,
    unwrap_state_dict,
)
from vtrain.training.classifier import ClassifierTask
from vtrain.training.module import PredictOptions

# the classifier's keys in this framework's checkpoints and in mmaction2's (official Video Swin) ones
_HEAD_PREFIXES = ("head.", "cls_head.fc_cls.")


class VideoClassificationTask(ClassifierTask):
    """Args:
        model: a video backbone config (``conf/video_backbone/*.yaml``); ``frames`` wraps the 2D ``backbone``.
        head_drop: dropout before the classifier (0.5 in the I3D / Video Swin heads).
        label_smoothing: of the training cross-entropy.
    """

    SAMPLES = "clips"

    def __init__(
        self,
        model: Mapping[str, Any],
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        num_classes: int,
        monitor: str = "val/top1",
        monitor_mode: str = "max",
        head_drop: float = 0.5,
        label_smoothing: float = 0.0,
    ):
        super().__init__(instantiate(model, _recursive_=False), num_classes, optim, sched, monitor, monitor_mode,
                         head_drop)
        nn.init.normal_(self.head.weight, std=0.01)  # mmaction2's I3DHead init
        nn.init.zeros_(self.head.bias)
        self.train_loss = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def video_probabilities(self, views: torch.Tensor) -> torch.Tensor:
        """(N, V, C, T, H, W) views of N videos -> (N, classes): the softmax averaged over the V views."""
        n, v = views.shape[:2]
        return self(views.flatten(0, 1)).softmax(dim=-1).view(n, v, -1).mean(dim=1)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.train_loss(self(batch["clips"]), batch["labels"])
        self.log_train_loss(loss, len(batch["labels"]))
        return loss

    def validation_step(self, batch: dict[str, Any] | None, batch_idx: int) -> None:
        if batch is None:
            return  # none of its videos could be read (vtrain.data.datamodule.ReadableCollate)
        probabilities, labels = self.video_probabilities(batch["clips"]), batch["labels"]
        self.log_accuracy(probabilities, labels, F.nll_loss(probabilities.clamp_min(1e-8).log(), labels))

    # ------------------------------------------------------------------ predictions and export
    @torch.no_grad()
    def predict_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each video's (V, C, T, H, W) views -> the softmax averaged over them, as validation scores a video."""
        probabilities = self.video_probabilities(torch.stack(inputs).to(self.device))
        return [{"probabilities": p, "views": torch.tensor(len(v))} for p, v in zip(probabilities, inputs)]

    def prediction_record(self, output: dict[str, torch.Tensor], options: PredictOptions) -> dict[str, Any]:
        return {**super().prediction_record(output, options), "views": int(output["views"])}

    def draw_prediction(self, original: torch.Tensor, record: dict[str, Any], options: PredictOptions) -> torch.Tensor:
        """The frames of the first sampled clip (``original``: (clips, T, 3, H, W)) beside the top-5 over the views."""
        entries = [(c["name"], c["score"]) for c in record["top_k"][:5]]
        title = f"over {record['views']} views" if "views" in record else ""  # none: the ground truth
        return draw_top_k(frame_strip(original[0]), entries, title=title)

    def example_input(self, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Clips of the validation views: (N, 3, T, H, W)."""
        data = self.run_config["data"]
        side = int(data["eval_crop_size"])
        return torch.randn(batch, 3, int(data["clip_len"]), *(size or (side, side)))

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Video backbone weights from a checkpoint of the same video model (this framework's, torchvision's,
        official Video Swin) or inflated from a 2D ImageNet one (official / timm / torchvision / this
        framework's); plus the classifier when the checkpoint has one of the right shape."""
        obj = read_checkpoint(path)
        state_dict = unwrap_state_dict(obj)
        if is_lightning_checkpoint(obj) or any(k.startswith("backbone.") for k in state_dict):
            head = {k.removeprefix(p): v for k, v in state_dict.items() for p in _HEAD_PREFIXES if k.startswith(p)}
            state_dict = {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")}
            backbone_sd, _ = self.backbone.checkpoint_filter(state_dict)
        else:
            backbone_sd, head = self.backbone.checkpoint_filter(state_dict)
        load_matching(self.backbone, backbone_sd, path, "video backbone", strict=strict)
        load_classifier(self.head, head, path)
