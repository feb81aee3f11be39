"""Semantic segmentation: backbone -> decode head (+ auxiliary head while training) -> per-pixel classes.

mmsegmentation's ``EncoderDecoder`` in one LightningModule: the head's logits are resized (bilinear) to
the label size and scored with cross-entropy (ignore 255); the auxiliary FCN head on stage 3 adds its loss
times 0.4 (PSPNet's deep supervision; mmseg's UperNet / NL / GC / DNL configs). Validation runs the test-time
pipeline of ``inference.predict`` on each image (whole or sliding window, optional multi-scale + flip)
and accumulates mmseg's dataset-level mIoU / mAcc / aAcc (``metrics.SegmentationMetrics``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from vtrain.tasks.segmentation.heads import head_out_indices, keys_of_mmseg_segmentor
from vtrain.tasks.segmentation.inference import predict
from vtrain.tasks.segmentation.metrics import SegmentationMetrics

from vtrain.config import ConfigError
from vtrain.data.datamodule import DatasetInfo
from vtrain.inference.visualize import draw_segmentation, to_uint8_image
from vtrain.training.checkpoint import load_matching, read_checkpoint, split_reference, unwrap_state_dict
from vtrain.training.module import PredictOptions, TaskModule


class SegmentationTask(TaskModule):
    """
    Args:
        backbone, optim, sched: configs (``TaskModule``); the backbone is built with the levels the heads
            read (their ``out_indices``).
        num_classes: classes (150 on ADE20K), without the ignore index.
        head: config of the decode head (``conf/task/head/*.yaml``); it gets ``in_channels`` (the backbone's,
            by level) and ``num_classes``.
        aux_head: config of the auxiliary head (same arguments), or None.
        aux_heads: configs of more auxiliary heads (SETR's, one per backbone level; their keys ``aux_heads.<i>.*``).
        aux_weight: the loss weight of each auxiliary head (0.4).
        neck: config of a module between the backbone and every head (SETR-MLA's ``MLANeck``), or None: it is
            built with the backbone's ``in_channels`` and names the levels it reads in ``out_indices``; the heads
            then read its outputs (keyed by the same levels, channels from its ``out_channels``).
        ignore_index: label of pixels that count neither in the loss nor in the metric.
        avg_non_ignore: divide the loss by the labelled pixels (True) or by all pixels, ignored ones
            counting zero (False, mmseg's default ``avg_non_ignore=False``, with which the papers trained).
        ohem: ``{thresh, min_kept}`` or None: the decode head's cross-entropy over its hard pixels only
            (:func:`ohem_cross_entropy`; the DNL paper's official HRNet models: 0.7, 100000); the auxiliary heads
            keep the plain one, as the official ``dsnohemce_loss``.
        size_divisor: inputs are zero-padded (bottom, right) to a multiple of this before the backbone and
            the logits cropped back (Swin needs sides divisible by its patch and merging strides).
        inference: ``mode`` whole|slide, ``scale`` (long, short) test size, ``ratios``, ``flip``,
            ``crop_size`` / ``stride`` of the sliding window (``inference.predict``).
        monitor, monitor_mode: the metric that picks the best checkpoint.
    """

    def __init__(
        self,
        backbone: Mapping[str, Any],
        optim: Mapping[str, Any],
        sched: Mapping[str, Any],
        num_classes: int,
        head: Mapping[str, Any],
        aux_head: Mapping[str, Any] | None = None,
        aux_heads: Sequence[Mapping[str, Any]] = (),
        aux_weight: float = 0.4,
        ignore_index: int = 255,
        avg_non_ignore: bool = False,
        size_divisor: int = 32,
        inference: Mapping[str, Any] | None = None,
        monitor: str = "val/mIoU",
        monitor_mode: str = "max",
        neck: Mapping[str, Any] | None = None,
        ohem: Mapping[str, float] | None = None,
    ):
        super().__init__(optim, sched, monitor, monitor_mode)
        if ohem is not None and set(ohem) != {"thresh", "min_kept"}:
            raise ConfigError(f"task.ohem={dict(ohem)!r}: give thresh and min_kept (e.g. {{thresh: 0.7, "
                              "min_kept: 100000}), or null for the plain cross-entropy")
        self.ohem = dict(ohem) if ohem is not None else None
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.aux_weight, self.avg_non_ignore, self.size_divisor = aux_weight, avg_non_ignore, size_divisor
        self.inference_cfg = dict(inference or {})
        readers = [neck] if neck else [head, *([aux_head] if aux_head else []), *aux_heads]
        levels = {level for cfg in readers for level in head_out_indices(cfg)}
        self.backbone = instantiate(backbone, out_indices=sorted(levels))
        channels = dict(zip(self.backbone.feature_info.out_indices(), self.backbone.feature_info.channels()))
        self.neck = instantiate(neck, in_channels=channels) if neck else None
        if self.neck is not None:
            channels = dict(self.neck.out_channels)
        self.head = instantiate(head, in_channels=channels, num_classes=num_classes)
        self.aux_head = instantiate(aux_head, in_channels=channels, num_classes=num_classes) if aux_head else None
        self.aux_heads = nn.ModuleList(instantiate(cfg, in_channels=channels, num_classes=num_classes)
                                       for cfg in aux_heads)
        self.val_metrics = SegmentationMetrics(num_classes, ignore_index)

    def use_dataset(self, info: DatasetInfo) -> None:
        if info.ignore_index is not None and info.ignore_index != self.ignore_index:
            raise ConfigError(f"task.ignore_index={self.ignore_index} but the dataset marks ignored pixels "
                              f"{info.ignore_index}: set task.ignore_index={info.ignore_index}")
        super().use_dataset(info)

    # ------------------------------------------------------------------ model
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits (N, C, H, W) at the input's size (mmseg ``encode_decode``)."""
        return self._logits(images)[0]

    def _logits(self, images: torch.Tensor, with_aux: bool = False) -> list[torch.Tensor]:
        """The decode head's logits, then (``with_aux``) each auxiliary head's."""
        aux = ([self.aux_head] if self.aux_head is not None else []) + list(self.aux_heads)
        heads = [self.head, *aux] if with_aux else [self.head]
        return encode(self.backbone, heads, images, self.size_divisor, neck=self.neck)

    def cross_entropy(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="none")
        if self.avg_non_ignore:
            return loss.sum() / (labels != self.ignore_index).sum().clamp(min=1)
        return loss.mean()

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self._logits(images, with_aux=True)
        decode = (ohem_cross_entropy(outputs[0], labels, self.ignore_index, **self.ohem) if self.ohem
                  else self.cross_entropy(outputs[0], labels))
        losses = {"decode": decode}
        if len(outputs) > 1:  # mmseg: each auxiliary head's loss times its loss_weight (0.4)
            losses["aux"] = self.aux_weight * sum(self.cross_entropy(logits, labels) for logits in outputs[1:])
        losses["loss"] = sum(losses.values())
        return losses

    @torch.no_grad()
    def predict_probs(self, image: torch.Tensor) -> torch.Tensor:
        """Class probabilities of one (1, 3, H, W) original-size image at (H, W), test-time pipeline."""
        cfg = self.inference_cfg
        return predict(
            self,
            image,
            scale=cfg.get("scale"),
            mode=cfg.get("mode", "whole"),
            ratios=tuple(cfg.get("ratios") or (1.0,)),
            flip=bool(cfg.get("flip", False)),
            crop_size=tuple(cfg.get("crop_size", (512, 512))),
            stride=tuple(cfg.get("stride", (341, 341))),
        )

    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Backbone weights (``TaskModule``), or a whole mmseg segmentor release (``state_dict`` with
        ``decode_head.*``: mmseg's SETR models) into the backbone, neck and heads, every tensor required
        (``strict``)."""
        obj = read_checkpoint(path)  # read once: a ViT-L file is over 1 GB
        state_dict = unwrap_state_dict(obj)
        if not any(key.startswith("decode_head.") for key in state_dict):
            load_matching(self.backbone, split_reference(self.backbone, obj)[0], str(path), "backbone", strict=strict)
            return
        backbone, _ = self.backbone.checkpoint_filter(
            {k.removeprefix("backbone."): v for k, v in state_dict.items() if k.startswith("backbone.")})
        converted = {**{f"backbone.{k}": v for k, v in backbone.items()}, **keys_of_mmseg_segmentor(state_dict)}
        load_matching(self, converted, str(path), "segmenter", strict=strict)

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.losses(batch["images"], batch["labels"])
        n = batch["images"].shape[0]
        self.log_train_loss(losses["loss"], n)
        self.log_train_terms({f"loss_{name}": losses[name] for name in ("decode", "aux") if name in losses})
        return losses["loss"]

    def validation_step(self, batch: dict[str, torch.Tensor] | None, batch_idx: int) -> None:
        if batch is None:
            return  # none of its images could be read (vtrain.data.datamodule.ReadableCollate)
        for image, label, (h, w) in zip(batch["images"], batch["labels"], batch["sizes"].tolist()):
            probs = self.predict_probs(image[None, :, :h, :w])
            self.val_metrics.update(probs.argmax(dim=1)[0], label[:h, :w])

    def on_validation_epoch_end(self) -> None:
        result = self.val_metrics.compute()  # sums the areas over all processes
        self.val_metrics.reset()
        self.log_dict({f"val/{k}": result[k].float() for k in ("mIoU", "mAcc", "aAcc")}, prog_bar=True, sync_dist=True)
        names = self._class_names()
        self.summary_metrics = {
            f"per_class_{k}": {n: (None if v != v else round(v, 6)) for n, v in zip(names, result[k].tolist())}
            for k in ("IoU", "Acc")
        }

    def _class_names(self) -> Sequence[str]:
        names = self.label_names()
        return names if names and len(names) == self.num_classes else [f"class_{i}" for i in range(self.num_classes)]

    # ------------------------------------------------------------------ predictions and export
    @torch.no_grad()
    def predict_batch(self, inputs: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Each normalised (3, H, W) image through the test-time pipeline (``predict_probs``), as validation."""
        return [{"label_map": self.predict_probs(image[None].to(self.device))[0].argmax(dim=0)} for image in inputs]

    def prediction_record(self, output: dict[str, torch.Tensor], options: PredictOptions) -> dict[str, Any]:
        """The label map (a tensor; ``python -m vtrain.predict`` writes it as a PNG of label values) and each present
        class's share of the pixels, largest first."""
        label_map = output["label_map"].cpu()
        counts = torch.bincount(label_map.flatten(), minlength=self.num_classes)
        names = self._class_names()
        shares = [{"label": label, "name": names[label], "share": count / label_map.numel()}
                  for label, count in enumerate(counts.tolist()) if count]
        return {"label_map": label_map.to(torch.uint8 if self.num_classes <= 256 else torch.int32),
                "image_size": list(label_map.shape), "classes": sorted(shares, key=lambda c: -c["share"])}

    def truth_record(self, truth: torch.Tensor) -> dict[str, Any]:
        """The label map and each class's share of the labelled pixels (ignored ones drawn as the image)."""
        labelled = truth[truth != self.ignore_index]
        counts = torch.bincount(labelled, minlength=self.num_classes).tolist()
        names = self._class_names()
        return {"label_map": truth, "classes": [{"label": label, "name": names[label], "share": n / labelled.numel()}
                                                for label, n in enumerate(counts) if n]}

    def draw_prediction(self, original: Any, record: dict[str, Any], options: PredictOptions) -> torch.Tensor:
        shares = {c["label"]: c["share"] for c in record["classes"]}
        return draw_segmentation(to_uint8_image(original), record["label_map"].long(), self._class_names(), shares)

    export_output = "logits (classes, H, W)"
    export_dynamic_axes = {0: "batch", 2: "height", 3: "width"}  # any image size, as validation feeds it

    def export_preprocessing(self, datamodule: Any) -> dict[str, Any]:
        """The data module's normalisation, and the test-time resize this task does before the model
        (``task.inference``: mmseg's ``Resize(keep_ratio=True)``, bilinear, then the softmax)."""
        cfg = self.inference_cfg
        return {**datamodule.preprocessing(), "interpolation": "bilinear",
                "resize": {"scale": list(cfg["scale"]) if cfg.get("scale") else None,
                           "rule": "keep the aspect ratio: long side <= max(scale), short side <= min(scale)"},
                "mode": cfg.get("mode", "whole"), "ratios": list(cfg.get("ratios") or [1.0]),
                "flip": bool(cfg.get("flip", False))}

    def example_input(self, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Images of the training crop's size (the exported model takes others: it pads and crops as mmseg does)."""
        return torch.randn(batch, 3, *(size or tuple(self.run_config["data"]["crop_size"])))

    def export_module(self) -> nn.Module:
        return Segmenter(self.backbone, self.head, self.size_divisor, self.neck).eval()


def ohem_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, thresh: float,
                       min_kept: int) -> torch.Tensor:
    """Online hard example mining (Shrivastava et al., CVPR 2016, on pixels), as the DNL paper's official code
    (DNL-Semantic-Segmentation ``model/seg/loss/ohem_ce_loss.py``, ``OhemCELoss``): the mean cross-entropy of the
    labelled pixels whose softmax probability of their label is below ``max(thresh, p_k)``, p_k the (k+1)-th
    smallest such probability, k = ``min_kept`` per image (so at least about that many pixels per image count)."""
    labelled = labels != ignore_index
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")[labelled]
    if loss.numel() == 0:
        return logits.sum() * 0.0  # nothing labelled: a zero that keeps the graph (the official sum of nothing)
    prob = (-loss.detach()).exp()  # softmax probability of the label: exp(-cross-entropy)
    k = min(max(min_kept, 1) * labels.shape[0], prob.numel() - 1)
    threshold = max(prob.kthvalue(k + 1).values.item(), thresh)
    return loss[prob < threshold].mean() if (prob < threshold).any() else loss.sum() * 0.0


def encode(backbone: nn.Module, heads: Sequence[nn.Module], images: torch.Tensor, size_divisor: int,
           any_size: bool = False, neck: nn.Module | None = None) -> list[torch.Tensor]:
    """Each head's logits at the input's size: the input zero-padded to a multiple of ``size_divisor``, the logits
    resized (bilinear) to the padded size and cropped back (mmseg ``encode_decode``). ``any_size``: written so that
    an export of it takes any height and width (the crop copied, not a view)."""
    h, w = images.shape[-2:]
    pad_h, pad_w = (-h) % size_divisor, (-w) % size_divisor
    # an export pads even by nothing (a branch on the size would fix it to one side of it); training and validation
    # skip the copy when there is nothing to pad
    x = F.pad(images, (0, pad_w, 0, pad_h)) if any_size or pad_h or pad_w else images
    features = dict(zip(backbone.out_indices, backbone(x)))
    if neck is not None:
        features = neck(features)
    logits = [F.interpolate(head(features), size=x.shape[-2:], mode="bilinear", align_corners=False) for head in heads]
    if not any_size:
        return [y[..., :h, :w] for y in logits]
    # the same values as a new tensor: the view [..., :h, :w] is strided like the padded logits only when nothing was
    # padded, and torch.export fixes an export to the case it traced (measured: a guard that the padding is 0)
    rows, cols = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    return [y.index_select(-2, rows).index_select(-1, cols) for y in logits]


class Segmenter(nn.Module):
    """The evaluation model alone (what export writes): a normalised (N, 3, H, W) batch -> (N, classes, H, W) logits
    (:meth:`SegmentationTask.forward`; the test-time resize and softmax are the caller's)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, size_divisor: int, neck: nn.Module | None = None):
        super().__init__()
        self.backbone, self.head, self.size_divisor, self.neck = backbone, head, size_divisor, neck

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.backbone, [self.head], images, self.size_divisor, any_size=True, neck=self.neck)[0]
