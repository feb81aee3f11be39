"""Detection / instance segmentation: backbone -> FPN -> a torchvision detector, COCO AP on validation."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from hydra.utils import instantiate
from timm.layers import freeze_batch_norm_2d
from torch import nn

from vtrain.tasks.detection.data import Batch
from vtrain.tasks.detection.evaluation import STAT_NAMES, CocoEvaluator
from vtrain.tasks.detection.models import DetectorSpec
from vtrain import ConfigError
from vtrain.module import TaskModule

BATCH_NORM_MODES = ("train", "eval", "frozen", "sync")


class DetectionTask(TaskModule):
    """Any backbone with an FPN into torchvision's Mask R-CNN, Faster R-CNN, RetinaNet or FCOS.

    Args:
        num_classes: dataset categories (the detector gets one more, the background).
        detector: a :class:`models.DetectorSpec` config (``conf/task/detector/``: ``mask_rcnn``, ``faster_rcnn``,
            ``retinanet``, ``fcos``; picked with ``task/detector=<name>``) or :class:`detr.DETRSpec` (``detr``).
        batch_norm: the backbone's BatchNorm layers: ``train`` (ordinary), ``eval`` (statistics frozen,
            affine trained: mmdet's ``norm_eval=True`` of the ResNet 1x recipes), ``frozen`` (statistics and
            affine frozen: torchvision's ``FrozenBatchNorm2d``) or ``sync`` (``SyncBatchNorm`` across
            devices, the GCNet recipe; needs GPUs under DDP).
        test_size, test_max_size: the test-time resize, done by the detector so that detections come back
            in original image coordinates (training sizes are the data pipeline's).
        fpn_channels, box_head_dim, mask_head_dims: widths (see :func:`models.build_detector`).
        detector_kwargs: anything else torchvision's constructor takes (e.g. ``rpn_post_nms_top_n_train``).
        evaluator: ``pycocotools`` (official) or ``faster_coco_eval`` (same numbers, faster).
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        num_classes: int,
        detector: Mapping[str, Any],
        monitor: str = "val/bbox_AP",
        monitor_mode: str = "max",
        batch_norm: str = "train",
        test_size: int = 800,
        test_max_size: int = 1333,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        fpn_channels: int = 256,
        box_head_dim: int = 1024,
        mask_head_dims: Sequence[int] = (256, 256, 256, 256),
        detector_kwargs: Mapping[str, Any] | None = None,
        evaluator: str = "pycocotools",
    ):
        super().__init__(optim, sched, monitor, monitor_mode)
        if batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(f"task.batch_norm={batch_norm!r}: use one of {', '.join(BATCH_NORM_MODES)}")
        if not isinstance(detector, Mapping):
            raise ConfigError(f"task.detector is a config, not {detector!r}: pick one with task/detector=<name> "
                              "(mask_rcnn, faster_rcnn, retinanet, fcos, detr: the files of conf/task/detector/)")
        self.spec: DetectorSpec = instantiate(detector)
        self.batch_norm, self.evaluator_backend = batch_norm, evaluator
        self.backbone = _with_batch_norm(instantiate(backbone, out_levels=self.spec.levels), batch_norm)
        self.detector = self.spec.build(
            self.backbone,
            num_classes + 1,
            fpn_channels=fpn_channels,
            box_head_dim=box_head_dim,
            mask_head_dims=mask_head_dims,
            min_size=test_size,
            max_size=test_max_size,
            image_mean=list(image_mean),
            image_std=list(image_std),
            _skip_resize=True,  # torchvision's switch: no resize in training, the data pipeline did it
            **dict(detector_kwargs or {}),
        )
        self.evaluator: CocoEvaluator | None = None

    def train(self, mode: bool = True) -> "DetectionTask":
        super().train(mode)
        if self.batch_norm == "eval":
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        return self.detector(images, targets)

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Backbone weights, or a whole detector's release that its config reads (DETR's official checkpoints)."""
        if not self.spec.load_release(self, path, strict):
            super().load_pretrained(path, strict)

    # ----------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit" and self.spec.masks and datamodule is not None and not getattr(datamodule, "masks", True):
            raise ConfigError(f"task.detector ({self.spec.cls.__name__}) predicts masks but data.masks=false: "
                              "set data.masks=true")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        keys = ("boxes", "labels", "masks") if self.spec.masks else ("boxes", "labels")
        losses = self(images, [{k: t[k] for k in keys} for t in targets])
        loss = sum(losses.values())
        n = len(images)
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, on_step=True, on_epoch=False, batch_size=n)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=n)
        return loss

    # ----------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        if self.evaluator is None:
            datamodule = self.trainer.datamodule
            self.evaluator = CocoEvaluator(
                datamodule.val_annotation_file,
                datamodule.category_ids,
                datamodule.category_names,
                self.spec.iou_types,
                backend=self.evaluator_backend,
            )
        self.evaluator.reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        images, targets = batch
        self.evaluator.update([t["image_id"] for t in targets], self(images))

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return  # a few images say nothing; the sanity check only runs the code
        summary = self.evaluator.compute(self.trainer.default_root_dir)
        for iou_type in self.spec.iou_types:
            for name in STAT_NAMES:
                # identical on every rank (computed on rank 0 and broadcast): no reduction needed
                self.log(f"val/{iou_type}_{name}", summary[iou_type][name], prog_bar=name == "AP")
        self.summary_metrics["coco"] = {t: summary[t] for t in self.spec.iou_types}
        self.summary_metrics["coco_per_category_AP"] = summary["per_category"]
        self.summary_metrics["coco_num_images"] = summary["num_images"]
        self.evaluator.reset()


def _with_batch_norm(backbone: nn.Module, mode: str) -> nn.Module:
    if mode == "frozen":
        return freeze_batch_norm_2d(backbone)
    if mode == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone
