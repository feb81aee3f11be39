"""The LightningModule every task subclasses: optimizer, schedule and pretrained weights, written once."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from timm.scheduler.scheduler import Scheduler
from torch import nn

from vtrain import __version__
from vtrain.config import ConfigError
from vtrain.training.build import load
from vtrain.training.callbacks.non_finite import checked_grad_norm
from vtrain.training.lightning_internals import step_values_are_read
from vtrain.training.checkpoint import DESCRIPTION_KEY, load_backbone_weights
from vtrain.data.datamodule import DatasetInfo
from vtrain.training.optim import build_optimizer, build_scheduler, lr_scale_factor
from vtrain.training.steps import TrainingSteps, training_steps

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    """What a prediction keeps.

    Args:
        top_k: classes listed per image or video (classification).
        score_threshold: detections scoring below are left out (mmdetection's ``pred_score_thr``).
        max_detections: at most this many detections per image, the best first.
        mask_threshold: a detection's mask is where its probability exceeds this (COCO evaluation's 0.5).
        pictures: draw a picture of each prediction.
    """

    top_k: int = 5
    score_threshold: float = 0.3
    max_detections: int = 100
    mask_threshold: float = 0.5
    pictures: bool = True

    def __post_init__(self) -> None:
        if self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k}: use a whole number >= 1")
        if not 0.0 <= self.score_threshold <= 1.0:
            raise ConfigError(f"score_threshold={self.score_threshold}: use a score in [0, 1]")
        if self.max_detections < 1:
            raise ConfigError(f"max_detections={self.max_detections}: use a whole number >= 1")


def top_k(probabilities: torch.Tensor, names: Sequence[str], ids: Sequence | None, k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes: label, name, the dataset's id where it has one, and probability."""
    scores, labels = probabilities.float().cpu().topk(min(k, probabilities.numel()))
    return [{"label": int(label), "name": names[label] if label < len(names) else f"class_{label}",
             **({"id": ids[label]} if ids else {}), "score": float(score)}
            for score, label in zip(scores.tolist(), labels.tolist())]


class EpochLoss:
    """The running mean of one epoch's training loss, weighted by batch size (Lightning's ``on_epoch`` mean:
    float32 sums on the loss's device), tagged with its epoch so that a sum never runs into the next epoch whatever
    the order of the hooks that save, log and resume. Each process counts its own batches; rank 0's count is the
    one logged, as with Lightning's unsynced epoch mean, and the one its checkpoints keep."""

    CHECKPOINT_KEY = "vtrain_epoch_loss"

    def __init__(self) -> None:
        self.epoch: int | None = None
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, loss: torch.Tensor, batch_size: int, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.total, self.count = epoch, None, 0
        value = loss.float().mean() * batch_size
        self.total = value if self.total is None else self.total.to(value.device) + value
        self.count += batch_size

    def compute(self, epoch: int) -> torch.Tensor | None:
        """The epoch's mean, or None when no batch of ``epoch`` was counted."""
        return self.total / self.count if epoch == self.epoch and self.count else None

    def state_dict(self) -> dict[str, Any]:
        total = None if self.total is None else self.total.detach().cpu()
        return {"epoch": self.epoch, "total": total, "count": self.count}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        state = state or {}
        self.epoch, self.total, self.count = state.get("epoch"), state.get("total"), int(state.get("count", 0))


class TaskModule(pl.LightningModule):
    """Base of every task's LightningModule.

    A subclass builds ``self.backbone`` (a :class:`vtrain.backbones.base.Backbone`) and its head(s), and
    implements ``training_step`` / ``validation_step``. It passes ``monitor`` / ``monitor_mode`` (the metric that
    picks the best checkpoint) and may fill ``summary_metrics`` (e.g. per-class IoU) which ``metrics.json`` records.

    What it needs of the data and the run is given to it, not fetched from the trainer: :meth:`use_dataset` (the
    dataset's :class:`~vtrain.data.datamodule.DatasetInfo`) and ``training_steps`` (the run's
    :class:`~vtrain.training.steps.TrainingSteps`), both set by the command line before ``fit``. A module fitted
    by a Lightning ``Trainer`` of one's own gets both from the trainer's data module instead (:meth:`setup`,
    :meth:`configure_optimizers`).

    Every checkpoint it is saved in describes it (:meth:`on_save_checkpoint`): the composed config it was built
    from and the names of its classes, plain values only, so that :meth:`load_from_checkpoint`, ``python -m
    vtrain.predict`` and ``vtrain.load`` need the file alone. For predictions a task implements
    :meth:`predict_batch`, :meth:`prediction_record` and :meth:`draw_prediction`; for export, :meth:`export_module`.
    """

    CHECKPOINT_KEY = DESCRIPTION_KEY  # the checkpoint entry that describes the model
    SAMPLES = "images"  # what one sample of the task's data is, as the run's summary counts them (images/s)

    def __init__(self, optim: Mapping[str, Any], sched: Mapping[str, Any], monitor: str = "val/loss",
                 monitor_mode: str = "min"):
        super().__init__()
        if monitor_mode not in ("min", "max"):
            raise ConfigError(f"task.monitor_mode={monitor_mode!r}: use min or max")
        self.monitor, self.monitor_mode = monitor, monitor_mode
        self.optim_cfg = dict(optim)
        self.sched_cfg = dict(sched)
        self.summary_metrics: dict[str, Any] = {}
        self.run_config: dict[str, Any] | None = None  # the composed config (plain), set by build_task
        self.class_names: list[str] | None = None  # a name per label; from the data module when not given
        self.class_ids: list | None = None  # the dataset's own identifiers (wnids, COCO category ids)
        self.dataset_info: DatasetInfo | None = None  # use_dataset
        self.training_steps: TrainingSteps | None = None  # the run's length, given before fit
        self.epoch_loss = EpochLoss()  # train/loss_epoch, kept in checkpoints (log_train_loss)
        self._step_terms: dict[str, torch.Tensor] = {}  # this batch's loss terms (log_train_terms)
        self._step_loss: torch.Tensor | None = None  # the last batch's loss (log_train_loss), for the bar
        self._step_loss_pending = False  # ... and not logged yet (log_step_values)

    # ----------------------------------------------------------------- model
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone (:meth:`vtrain.backbones.base.Backbone.set_grad_checkpointing`)."""
        setter = getattr(self.backbone, "set_grad_checkpointing", None)
        if setter is None:
            raise ConfigError(f"grad_checkpointing: {type(self.backbone).__name__} does not support it; "
                              "the 2D backbones (ResNet, LR-Net, Swin, ViT) do")
        setter(enable)

    def compile_backbone(self, **kwargs: Any) -> None:
        """``torch.compile`` the backbone's entry points in place (``forward``, which dense heads call, and
        ``forward_pooled``, which classifiers call): parameter names, hence checkpoints, do not change."""
        compiled = []
        for name in ("forward", "forward_pooled"):
            method = getattr(self.backbone, name, None)
            if method is not None:
                setattr(self.backbone, name, torch.compile(method, **kwargs))
                compiled.append(name)
        log.info("torch.compile(%s) of the backbone's %s", kwargs or "", ", ".join(compiled))

    # ----------------------------------------------------------------- what the data and the run tell the task
    def use_dataset(self, info: DatasetInfo) -> None:
        """The dataset this task trains and evaluates on; a task checks here that it fits (one line if not), before
        any worker or DDP process starts. Class names from a checkpoint stay."""
        self.dataset_info = info
        if self.class_names is None:
            self.class_names = list(info.class_names)
            self.class_ids = None if info.class_ids is None else list(info.class_ids)

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self.trainer is not None else None
        if self.dataset_info is None and datamodule is not None and hasattr(datamodule, "info"):
            self.use_dataset(datamodule.info())  # fitted outside the command line: from the trainer's data module

    # ----------------------------------------------------------------- logging
    def log_train_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        """``train/loss_step`` and ``train/loss_epoch``, the mean over the epoch's samples at its end, as
        Lightning's ``on_epoch=True`` mean computes it, but counted in :class:`EpochLoss`, which checkpoints keep
        (Lightning's epoch accumulators are not in them: an epoch resumed after a kill or a preemption logged the
        mean of the batches after the resume, or no row at all).

        ``train/loss_step`` is logged with the loss's terms (:meth:`log_step_values`); the progress bar shows
        it at every step it reads, from :meth:`bar_step_values`, without ``self.log``'s cost."""
        self._step_loss, self._step_loss_pending = loss.detach(), True
        self.epoch_loss.update(self._step_loss, batch_size, self.current_epoch)

    def log_train_terms(self, terms: Mapping[str, torch.Tensor]) -> None:
        """The loss's terms (``train/<name>``, not on the bar), logged with ``train/loss_step``
        (:meth:`log_step_values`)."""
        self._step_terms = {f"train/{name}": value.detach() for name, value in terms.items()}

    def bar_step_values(self) -> dict[str, torch.Tensor]:
        """What the progress bar shows of the current training step beside what was logged
        (:class:`~vtrain.training.callbacks.display.ProgressBar` reads it at its own interval): the loss."""
        return {} if self._step_loss is None else {"train/loss_step": self._step_loss}

    def log_step_values(self) -> None:
        """Log this training step's loss and terms, once: at the end of the batch where anything reads the step's
        values (:func:`~vtrain.training.lightning_internals.step_values_are_read`: the loggers every
        ``log_every_n_steps``, a validation, an epoch's end, the end of training), and before a checkpoint is
        saved mid-epoch (:class:`~vtrain.training.callbacks.model_checkpoint.ModelCheckpoint`, whose monitor or
        file name may name one). Not at every step: a ``self.log`` call costs 0.5-1 ms of Python on a CPU
        (Lightning moves its record of the value to the value's device at each call), and a detector's terms are
        3 to 20 of them."""
        terms, self._step_terms = self._step_terms, {}
        if self._step_loss_pending:
            self._step_loss_pending = False
            self.log_dict(self.bar_step_values(), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        if terms:
            self.log_dict(terms, on_step=True, on_epoch=False, batch_size=1)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if step_values_are_read(self.trainer):
            self.log_step_values()
        self._step_terms, self._step_loss_pending = {}, False  # a step's values are logged at its end or not at all

    def on_train_epoch_end(self) -> None:
        mean = self.epoch_loss.compute(self.current_epoch)
        if mean is not None:
            self.log("train/loss_epoch", mean, prog_bar=True, on_step=False, on_epoch=True)

    # ----------------------------------------------------------------- optimisation
    def configure_optimizers(self):
        steps = self.training_steps
        if steps is None:  # fitted outside the command line: counted for this trainer (not kept for the next fit)
            steps = training_steps(self.trainer, self.trainer.datamodule)
        optimizer = build_optimizer(self, self.optim_cfg, steps.batch_size)
        scheduler = build_scheduler(
            optimizer,
            self.sched_cfg,
            total_steps=steps.total,
            steps_per_epoch=steps.per_epoch,
            lr_scale=lr_scale_factor(self.optim_cfg, steps.batch_size),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def lr_scheduler_step(self, scheduler: Scheduler, metric: Any) -> None:
        # timm schedulers are stepped by update count: resuming at global_step N gives the lr of step N exactly.
        scheduler.step_update(num_updates=self.global_step)

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        # Clipping by norm takes the norm the non-finite check has just computed over the same gradients
        # (the same value as clip_grad_norm_'s): one pass over them instead of two.
        norm = checked_grad_norm(optimizer)
        if norm is None or not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grads_with_norm_(params, gradient_clip_val, norm)

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Lightning zeroes the gradients inside the next step's closure, after that step's forward pass: a step's
        # gradients would stay alive through the next forward, one model's worth of memory more than a plain
        # loop holds at its peak. They are freed as soon as the step has used them (the closure's zero_grad then
        # finds none). Accumulation is unaffected: this runs only at the step that ends an accumulation.
        optimizer.step(closure=optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    # ----------------------------------------------------------------- what a checkpoint says about the model
    def label_names(self) -> list[str]:
        """A name per label: the checkpoint's or the dataset's (:meth:`use_dataset`), else ``class_<i>``."""
        num_classes = self.run_config["data"].get("num_classes") if self.run_config else None
        return self.class_names or [f"class_{i}" for i in range(num_classes or 0)]

    def description(self) -> dict[str, Any]:
        """What a checkpoint stores beside the weights: plain values only (``torch.load(weights_only=True)`` reads
        them with no allow-listed class)."""
        names = self.label_names()
        return {"version": __version__, "config": self.run_config, "class_names": names or None,
                "class_ids": self.class_ids}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[self.CHECKPOINT_KEY] = self.description()
        checkpoint[EpochLoss.CHECKPOINT_KEY] = self.epoch_loss.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.epoch_loss.load_state_dict(checkpoint.get(EpochLoss.CHECKPOINT_KEY))
        described = checkpoint.get(self.CHECKPOINT_KEY) or {}
        self.class_names = self.class_names or described.get("class_names")
        self.class_ids = self.class_ids or described.get("class_ids")

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None, hparams_file: Any = None,
                             strict: bool | None = None, weights_only: bool | None = True, **kwargs: Any):
        """The task a vtrain checkpoint describes, built from the config it stores (``weights_only=True``, always:
        :func:`vtrain.training.checkpoint.read_checkpoint`) with its weights; ``kwargs`` replace task arguments
        (``test_size=1000``), as Lightning's ``load_from_checkpoint`` does with hyper-parameters."""

        module = load(checkpoint_path, overrides=[f"task.{k}={v}" for k, v in kwargs.items()],
                      map_location=map_location, strict=strict is not False, eval_mode=False)
        if not isinstance(module, cls):
            raise ConfigError(f"{checkpoint_path} holds a {type(module).__name__}, not a {cls.__name__}: load it "
                              f"with {type(module).__name__}.load_from_checkpoint or vtrain.load")
        return module

    # ----------------------------------------------------------------- predictions and export
    @torch.no_grad()
    def predict_batch(self, inputs: list[Any]) -> list[dict[str, torch.Tensor]]:
        """The validation path's outputs for model inputs made by the data module's ``predict_set``, one per input."""
        raise NotImplementedError(f"{type(self).__name__} does not predict")

    def prediction_record(self, output: dict[str, torch.Tensor], options: "PredictOptions") -> dict[str, Any]:
        """One output as plain values (what ``python -m vtrain.predict`` writes as JSON); a label map stays a tensor."""
        raise NotImplementedError(f"{type(self).__name__} does not predict")

    def truth_record(self, truth: Any) -> dict[str, Any] | None:
        """A file's ground truth (the data module's ``example_truths``) as a record :meth:`draw_prediction` draws;
        None: the task draws no ground truth."""
        return None

    def draw_prediction(self, original: Any, record: dict[str, Any], options: "PredictOptions") -> torch.Tensor:
        """A picture of one prediction on its input (``original``: the decoded file), uint8 (3, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} does not draw its predictions")

    def results_files(self, sources: Sequence[str], records: Sequence[dict[str, Any]], datamodule: Any
                      ) -> dict[str, Any]:
        """The predictions of ``sources`` in the dataset's own results format, as files beside the records
        (``{file name: JSON value}``; none unless the task's benchmark has one). ``datamodule``: the run's (its
        data need not be there)."""
        return {}

    def export_module(self) -> nn.Module:
        """A plain ``nn.Module`` of the evaluation model: a normalised batch in, logits (or maps) out."""
        raise ConfigError(f"{type(self).__name__} cannot be exported")

    export_output = "logits"  # what export_module returns, in words (export's model.json)
    export_dynamic_axes: dict[int, str] = {0: "batch"}  # the input's axes an exported model takes at any size

    def export_preprocessing(self, datamodule: Any) -> dict[str, Any]:
        """What the caller of an exported model does to an image first (export's ``model.json``): the run's data
        module's :meth:`~vtrain.data.datamodule.DataModule.preprocessing`."""
        return datamodule.preprocessing()

    def example_input(self, batch: int, size: tuple[int, int] | None = None) -> torch.Tensor:
        """A normalised batch of what :meth:`export_module` takes, at the validation input's size (``size``: (H, W)
        instead): what export traces and checks with."""
        raise ConfigError(f"{type(self).__name__} cannot be exported")

    # ----------------------------------------------------------------- weights
    def load_pretrained(self, path: str, strict: bool = True) -> None:
        """Load reference weights (official/timm/torchvision/this framework) into the backbone; ``strict``: every
        backbone tensor must come from the file (:func:`vtrain.training.checkpoint.load_matching`)."""

        load_backbone_weights(self.backbone, path, strict=strict)


