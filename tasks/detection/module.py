"""Detection / instance segmentation: backbone -> a detector built from the parts of its config, COCO AP on validation."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from pycocotools import mask as mask_utils
from timm.layers import freeze_batch_norm_2d
from torch import nn
from vtrain.tasks.detection.data import Batch, read_annotation_file
from vtrain.tasks.detection.evaluation import STAT_NAMES, CocoEvaluator, records_to_coco_results
from vtrain.tasks.detection.detector import DetectorSpec, build_spec
from vtrain.tasks.detection import test_time_augmentation
from vtrain.tasks.detection.test_time_augmentation import multi_scale_flip_views

from vtrain.config import ConfigError
from vtrain.data.datamodule import DatasetInfo
from vtrain.inference.visualize import draw_detections, palette, to_uint8_image
from vtrain.training.module import PredictOptions, TaskModule

BATCH_NORM_MODES = ("train", "eval", "frozen", "sync")


class DetectionTask(TaskModule):
    """Any backbone under any detector: a family's detector built from the parts its config names.

    Args:
        num_classes: dataset categories (the detector gets one more, the background).
        detector: a detector config (``conf/task/detector/``: ``mask_rcnn``, ``faster_rcnn``, ``retinanet``,
            ``fcos``, ``atss``, ``detr``, ``deformable_detr``, ``sparse_rcnn``; ``task/detector=<name>``), instantiated recursively into a
            :class:`detector.DetectorSpec` whose parts (pyramid, anchor generator, heads, duplicate removal) are
            ``_target_`` objects; the task knows none of them.
        batch_norm: the backbone's BatchNorm layers: ``train`` (ordinary), ``eval`` (statistics frozen,
            affine trained: mmdet's ``norm_eval=True`` of the ResNet 1x recipes), ``frozen`` (statistics and
            affine frozen: torchvision's ``FrozenBatchNorm2d``) or ``sync`` (``SyncBatchNorm`` across
            devices, the GCNet recipe; needs GPUs under DDP).
        test_size, test_max_size: the test-time resize, done by the detector so that detections come back
            in original image coordinates (training sizes are the data pipeline's).
        test_scales, test_flip: multi-scale + flip testing (:mod:`test_time_augmentation`, mmdet v2's
            ``MultiScaleFlipAug`` and its merges): the short sides of the test views (None: ``test_size`` alone),
            and each also flipped horizontally.
        image_mean, image_std: the normalisation the detector applies to 0-1 pixels (what the weights expect).
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
        test_scales: Sequence[int] | None = None,
        test_flip: bool = False,
        image_mean: Sequence[float] = (0.485, 0.456, 0.406),
        image_std: Sequence[float] = (0.229, 0.224, 0.225),
        evaluator: str = "pycocotools",
    ):
        super().__init__(optim, sched, monitor, monitor_mode)
        if batch_norm not in BATCH_NORM_MODES:
            raise ConfigError(f"task.batch_norm={batch_norm!r}: use one of {', '.join(BATCH_NORM_MODES)}")
        self.spec: DetectorSpec = build_spec(detector)
        self.batch_norm, self.evaluator_backend = batch_norm, evaluator
        self.backbone = _with_batch_norm(instantiate(backbone, out_indices=self.spec.out_indices), batch_norm)
        transform = {"min_size": test_size, "max_size": test_max_size, "image_mean": list(image_mean),
                     "image_std": list(image_std)}
        self.detector = self.spec.build(self.backbone, num_classes + 1, transform)
        self.evaluator: CocoEvaluator | None = None
        self.test_views = multi_scale_flip_views(test_scales, bool(test_flip), test_size)

    def train(self, mode: bool = True) -> "DetectionTask":
        super().train(mode)
        if self.batch_norm == "eval":
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, images: list[torch.Tensor], targets: list[dict[str, torch.Tensor]] | None = None):
        if self.training or self.test_views is None:
            return self.detector(images, targets)
        return test_time_augmentation.detect(self.detector, images, self.test_views)

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Backbone weights, or a whole detector's release that its config reads (DETR's official checkpoints)."""
        if not self.spec.load_release(self, path, strict):
            super().load_pretrained(path, strict)

    # ----------------------------------------------------------------- training
    def use_dataset(self, info: DatasetInfo) -> None:
        if "segm" in self.spec.iou_types and info.masks is False:
            raise ConfigError(f"task.detector ({type(self.spec).__name__}) predicts masks but data.masks=false: "
                              "set data.masks=true, or use a detector without masks (task/detector=faster_rcnn)")
        super().use_dataset(info)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        keys = ("boxes", "labels", "masks") if "segm" in self.spec.iou_types else ("boxes", "labels")
        losses = self(images, [{k: t[k] for k in keys} for t in targets])
        loss = sum(losses.values())
        n = len(images)
        self.log_train_terms(losses)
        self.log_train_loss(loss, n)
        return loss

    # ----------------------------------------------------------------- evaluation
    def on_validation_epoch_start(self) -> None:
        if self.evaluator is None:
            info = self.dataset_info
            if info is None or info.annotation_file is None:
                raise ConfigError("COCO evaluation reads the validation split's annotation file: fit or validate "
                                  "with the detection data module (datamodule=...), or call use_dataset first")
            self.evaluator = CocoEvaluator(info.annotation_file, list(info.class_ids), list(info.class_names),
                                           self.spec.iou_types, backend=self.evaluator_backend)
        self.evaluator.reset()

    def validation_step(self, batch: Batch | None, batch_idx: int) -> None:
        if batch is None:
            return  # none of its images could be read (vtrain.data.datamodule.ReadableCollate)
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

    # ----------------------------------------------------------------- predictions
    @torch.no_grad()
    def predict_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """torchvision's detections (original image coordinates), as validation computes them."""
        return [{k: v.cpu() for k, v in output.items()} for output in self([x.to(self.device) for x in inputs])]

    def prediction_record(self, output: dict[str, torch.Tensor], options: PredictOptions) -> dict[str, Any]:
        """The detections scoring at least ``score_threshold``, the best ``max_detections``: box (XYXY pixels), score,
        label (0-based, the index of ``class_names``), name, the dataset's category id, and the mask as COCO RLE
        (pycocotools, probability > ``mask_threshold``, as the COCO evaluation encodes it)."""
        names, ids = self.label_names(), self.class_ids
        labels = output["labels"]
        keep = (labels >= 1) & (labels <= len(names)) & (output["scores"] >= options.score_threshold)
        order = output["scores"][keep].argsort(descending=True, stable=True)[: options.max_detections]
        index = keep.nonzero().flatten()[order]
        rles = []
        if "masks" in output and len(index):
            masks = (output["masks"][index, 0] > options.mask_threshold).numpy().astype(np.uint8)
            rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        instances = []
        for k, i in enumerate(index.tolist()):
            label = int(labels[i]) - 1
            instance = {"box": [float(v) for v in output["boxes"][i]], "score": float(output["scores"][i]),
                        "label": label, "name": names[label]}
            if ids:
                instance["category_id"] = ids[label]
            if rles:
                instance["mask"] = {"size": list(rles[k]["size"]), "counts": rles[k]["counts"].decode("ascii")}
            instances.append(instance)
        return {"instances": instances}

    def results_files(self, sources: Sequence[str], records: Sequence[dict[str, Any]], datamodule: Any
                      ) -> dict[str, Any]:
        """COCO results (``detections_bbox.json``, and ``detections_segm.json`` with masks: XYWH boxes, category ids,
        RLE masks), what ``COCO.loadRes`` reads and the evaluation writes, for the images of :func:`coco_image_ids`."""
        if not self.class_ids:
            return {}  # no dataset category ids to write (a model without its dataset's description)
        results = records_to_coco_results(coco_image_ids(sources, getattr(datamodule, "val_annotation_file", None)), records)
        return {f"detections_{iou_type}.json": found for iou_type, found in results.items()}

    def truth_record(self, truth: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The objects as instances without a score (their captions are the names alone)."""
        names = self.label_names()
        return {"instances": [{"box": [float(v) for v in box], "label": int(label) - 1, "name": names[int(label) - 1]}
                              for box, label in zip(truth["boxes"], truth["labels"].tolist())]}

    def draw_prediction(self, original: torch.Tensor, record: dict[str, Any], options: PredictOptions) -> torch.Tensor:
        instances = record["instances"]
        colors = palette(len(self.label_names()))
        boxes = torch.tensor([d["box"] for d in instances], dtype=torch.float32).reshape(-1, 4)
        masks = None
        if instances and "mask" in instances[0]:
            rles = [{"size": d["mask"]["size"], "counts": d["mask"]["counts"].encode("ascii")} for d in instances]
            masks = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).bool()
        return draw_detections(to_uint8_image(original), boxes, [d["name"] + (f" {d['score']:.2f}" if "score" in d else "") for d in instances],
                               [colors[d["label"]] for d in instances], masks)

    def export_module(self) -> nn.Module:
        raise ConfigError(EXPORT_REFUSAL)

    def example_input(self, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        raise ConfigError(EXPORT_REFUSAL)


# Measured with torch 2.14.1 / torchvision 0.29.1 on quickstart_det's Faster and Mask R-CNN: torchvision's documented
# path (torch.onnx.export(model.eval(), ([image],), opset_version=11, dynamo=False) under no_grad) writes a file
# that onnxruntime runs, within 1e-5 of PyTorch at the traced size, but 80 px off at another (the backbone's
# padding and the RoI heads' per-image counts are traced as constants); the torch.export-based exporter stops on
# the proposals' data-dependent sizes; torch.jit.script cannot compile the backbone wrappers.
EXPORT_REFUSAL = ("detection models do not export: torchvision's ONNX path (torch.onnx.export with a list of images) "
                  "traces this detector at one image size only, and TorchScript cannot script it; use the checkpoint "
                  "itself, its state dict with the model's config (vtrain.load(path), vtrain.Predictor(path), "
                  "python -m vtrain.predict ckpt_path=FILE)")


def coco_image_ids(sources: Sequence[str], annotation_file: str | Path | None) -> list[int]:
    """An image id per input: the annotation file's, when every input's file name is listed there (the run's
    validation images); else the number a COCO file name is (``000000397133.jpg``: 397133), when every name is
    one; else the input's position, 1, 2, ... (mixing the rules could give two images one id)."""
    names = [Path(source).name for source in sources]
    if annotation_file is not None and Path(annotation_file).is_file():
        ids = {image["file_name"]: image["id"] for image in read_annotation_file(Path(annotation_file))["images"]}
        if all(name in ids for name in names):
            return [ids[name] for name in names]
    stems = [Path(name).stem for name in names]
    if all(stem.isdigit() for stem in stems) and len(set(map(int, stems))) == len(stems):
        return [int(stem) for stem in stems]
    return list(range(1, len(sources) + 1))


def _with_batch_norm(backbone: nn.Module, mode: str) -> nn.Module:
    if mode == "frozen":
        return freeze_batch_norm_2d(backbone)
    if mode == "sync":
        return nn.SyncBatchNorm.convert_sync_batchnorm(backbone)
    return backbone
