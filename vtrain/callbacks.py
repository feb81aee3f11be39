"""Callbacks every task shares."""
from __future__ import annotations

import json
import math
import signal
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import RichModelSummary, RichProgressBar
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from vtrain.atomic import atomic_write_text
from vtrain.data import CorruptFileError
from vtrain.lightning_internals import cluster_environment, rerun_validation_on_resume, stop_after_this_batch


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class MetricsJSON(pl.Callback):
    """Writes ``metrics.json`` in the run directory: the last and the best value of every logged metric.

    "Best" follows each metric's direction: the module's ``monitor_mode`` for its monitored metric, ``min``
    for names containing ``loss``, ``max`` otherwise (accuracies, AP, IoU). The file is rewritten after each
    validation, atomically, so a run stopped at any point leaves a complete file. ``final_epoch`` is the epoch of
    the last validation, ``best_epoch`` each metric's best one (0-based, as checkpoint names count). Its
    ``best_checkpoint`` names a file that exists at every moment: :class:`ModelCheckpoint` rewrites it after
    writing a new best and before removing the old one.
    """

    def __init__(self, dirpath: str, filename: str = "metrics.json"):
        self.path = Path(dirpath) / filename
        self.final: dict[str, Any] = {}
        self.best: dict[str, Any] = {}
        self.best_epoch: dict[str, int] = {}
        self.validated_step: int | None = None  # global step of the last validation
        self.validated_epoch: int | None = None
        self.best_checkpoint: str | None = None
        self.payload: dict[str, Any] | None = None  # the file's content

    def _direction(self, name: str, pl_module: pl.LightningModule) -> str:
        if name == getattr(pl_module, "monitor", None):
            return getattr(pl_module, "monitor_mode", "max")
        return "min" if "loss" in name else "max"

    def _collect(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for name, value in trainer.callback_metrics.items():
            value = _plain(value)
            if not isinstance(value, (int, float)) or math.isnan(value):
                continue
            self.final[name] = value
            if name.startswith("lr-") or name.endswith(("_step", "skipped_samples")):
                continue  # a learning rate, a single step's value or a count has no "best"
            better = max if self._direction(name, pl_module) == "max" else min
            if name not in self.best or better(value, self.best[name]) != self.best[name]:
                self.best[name] = value
                self.best_epoch[name] = trainer.current_epoch

    @rank_zero_only
    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._collect(trainer, pl_module)
        self.payload = {
            "stage": stage,
            "epoch": trainer.current_epoch,
            "final_epoch": self.validated_epoch,
            "global_step": trainer.global_step,
            "monitor": getattr(pl_module, "monitor", None),
            "final": self.final,
            "best": self.best,
            "best_epoch": self.best_epoch,
            **{k: _plain(v) for k, v in getattr(pl_module, "summary_metrics", {}).items()},
        }
        ckpt = trainer.checkpoint_callback
        self.record_best_checkpoint(getattr(ckpt, "best_model_path", "") if ckpt is not None else "")

    @rank_zero_only
    def record_best_checkpoint(self, path: str) -> None:
        """(Re)write the file with ``path`` as the best checkpoint when that file exists, else the last one that did."""
        if path and Path(path).is_file():
            self.best_checkpoint = path
        if self.payload is None:
            return
        if self.best_checkpoint:
            self.payload["best_checkpoint"] = self.best_checkpoint
        atomic_write_text(self.path, json.dumps(self.payload, indent=2, sort_keys=True))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_step, self.validated_epoch = trainer.global_step, trainer.current_epoch
            self._write(trainer, pl_module, "validate" if trainer.state.fn == "validate" else "fit")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._write(trainer, pl_module, "fit")

    def state_dict(self) -> dict[str, Any]:
        # "final" too: a run resumed after its last validation still reports it
        return {"final": self.final, "best": self.best, "best_epoch": self.best_epoch,
                "validated_step": self.validated_step, "validated_epoch": self.validated_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.final = dict(state_dict.get("final", {}))
        self.best = dict(state_dict.get("best", {}))
        self.best_epoch = dict(state_dict.get("best_epoch", {}))
        self.validated_step = state_dict.get("validated_step")
        self.validated_epoch = state_dict.get("validated_epoch")


class ModelCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's ``ModelCheckpoint``, with ``last.ckpt`` always the newest state.

    Lightning 2.6 rewrites ``last.ckpt`` after a validation (or at a training epoch's end) only when a top-k
    checkpoint was written at the same step (``_last_global_step_saved == trainer.global_step`` in
    ``on_validation_end`` / ``on_train_epoch_end``), and at the end of training only when nothing was ever saved.
    With ``save_top_k=1`` a validation that is not the best so far leaves ``last.ckpt`` at the best epoch, and a
    run resumed with ``ckpt_path=auto`` after a crash would redo everything since. Here each of those moments, and
    the end of training, rewrites ``last.ckpt`` unless it already holds the current step. And a run resumed from
    another file than ``last.ckpt`` (it was truncated, or refused) overwrites ``last.ckpt``, where Lightning
    would leave it and write ``last-v1.ckpt`` beside it.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._last_written_step: int | None = None

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, torch.Tensor]) -> None:
        if self.save_last is True:  # the directory is this run's: its last.ckpt is this run's to replace
            self.last_model_path = self.format_checkpoint_name(monitor_candidates, self.CHECKPOINT_NAME_LAST)
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_step = trainer.global_step

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        # a new best exists now: metrics.json names it before _remove_checkpoint deletes the previous one
        for callback in trainer.callbacks:
            if isinstance(callback, MetricsJSON):
                callback.record_best_checkpoint(self.best_model_path)

    def _refresh_last(self, trainer: pl.Trainer) -> None:
        if self.save_last is True and trainer.global_step > 0 and self._last_written_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if due:
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if due:
            self._refresh_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not trainer.fast_dev_run and not trainer.interrupted:  # steps after the last validation, if any
            self._refresh_last(trainer)


class Preemption(pl.Callback):
    """SIGTERM or SIGUSR1 (what SLURM and most schedulers send before a time limit or a preemption): finish the
    current batch, save ``last.ckpt`` (atomically: :class:`vtrain.checkpoint.CheckpointIO`), and exit.

    Under SLURM, Lightning's ``SLURMEnvironment`` (auto-requeue on, the default) handles SIGUSR1 itself: it saves
    ``hpc_ckpt_*.ckpt`` in the run directory, requeues the job, and the requeued job resumes from it; this
    callback then only covers SIGTERM. Elsewhere the process exits with status 143 (128 + SIGTERM), which
    launchers read as "terminated", after the checkpoint is safely on disk; ``ckpt_path=auto`` resumes it.

    A signal during a validation stops it after its current batch; the checkpoint is then written so that the
    resumed run runs that validation again, whole, before it trains on
    (:func:`vtrain.lightning_internals.rerun_validation_on_resume`): its metrics, ``metrics.json``'s best and the
    top-k checkpoint are those of a run never stopped.
    """

    exit_code = 143

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.plugins.environments import SLURMEnvironment

        environment = cluster_environment(trainer)
        if not (isinstance(environment, SLURMEnvironment) and environment.auto_requeue):
            previous = signal.getsignal(signal.SIGUSR1)

            def on_sigusr1(signum, frame):
                stop_after_this_batch(trainer)
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGUSR1, on_sigusr1)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        from pytorch_lightning.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.checkpoint_callback is None:
            return
        path = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        during = ""
        if trainer.validating and trainer.state.fn == TrainerFn.FITTING:
            rerun_validation_on_resume(trainer)
            during = " during a validation, which the resumed run runs again"
        trainer.save_checkpoint(path)
        rank_zero_info(f"preempted at step {trainer.global_step}{during}: saved {path}; resume with ckpt_path=auto")
        exception.code = self.exit_code


class SkippedSamples(pl.Callback):
    """Shows how many samples the data module skipped as unreadable (``data.skip_corrupt``; :mod:`vtrain.data`):
    ``train/skipped_samples`` (over the run, in the progress bar at every step) and ``val/skipped_samples`` (in
    each validation, summed over the processes); both land in ``metrics.csv`` and ``metrics.json``. A validation
    none of whose samples could be read stops the run with one line, before a missing metric would."""

    @staticmethod
    def _datamodule(trainer: pl.Trainer):
        datamodule = trainer.datamodule
        return datamodule if datamodule is not None and hasattr(datamodule, "skipped") else None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        datamodule = self._datamodule(trainer)
        if datamodule is not None:
            pl_module.log("train/skipped_samples", float(datamodule.skipped_in_training), on_step=True,
                          on_epoch=False, prog_bar=True, batch_size=1)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        datamodule = self._datamodule(trainer)
        if datamodule is None or trainer.sanity_checking:
            return
        samples, skipped = datamodule.skipped("val")
        if samples and skipped == samples:
            raise CorruptFileError(f"none of the {samples} validation samples of {datamodule.root} could be read "
                                   "(the log names each file): fix the validation set")
        pl_module.log("val/skipped_samples", float(skipped), prog_bar=True, reduce_fx="sum", sync_dist=True,
                      batch_size=1)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` can skip a step on the device: the fused Adam, AdamW and SGD kernels leave
    parameters and state untouched where ``optimizer.found_inf`` is 1 (the mechanism of torch's grad scaler),
    so no value has to come back to the host. Fused SGD leaves a momentum buffer uninitialised when it skips
    the step that creates it, so SGD with momentum qualifies once every buffer exists."""
    if not optimizer.param_groups or not all(group.get("fused") for group in optimizer.param_groups):
        return False
    if isinstance(optimizer, torch.optim.Adam):  # AdamW included
        return True
    if isinstance(optimizer, torch.optim.SGD):
        params = [p for group in optimizer.param_groups for p in group["params"]]
        momentum = any(group["momentum"] for group in optimizer.param_groups)
        return not momentum or all("momentum_buffer" in optimizer.state.get(p, {}) for p in params)
    return False


class NonFiniteGuard(pl.Callback):
    """Skip an optimizer step whose gradients are not finite, count it, and stop after ``max_skipped``.

    With a fused optimizer (the default on CUDA, :func:`vtrain.optim.build_optimizer`) the skip is decided on
    the device (:func:`skips_on_device`) and the count is read back every ``trainer.log_every_n_steps`` steps
    and at the end: no host synchronisation per step, and a run with too many bad steps stops at the next
    read, naming the last bad step. Otherwise the check reads one value per step and clears the gradients of
    a bad step. With ``16-mixed`` precision the grad scaler already skips such steps, so this stands aside.
    ``skip_on_device=False`` forces the per-step check.
    """

    def __init__(self, max_skipped: int = 20, skip_on_device: bool = True):
        self.max_skipped = max_skipped
        self.skip_on_device = skip_on_device
        self.skipped = 0
        self._pending: torch.Tensor | None = None  # device path: bad steps not read yet, and the last one
        self._last_bad: torch.Tensor | None = None
        self._on_device: set[int] = set()  # optimizers found to skip on the device (it stays true once it is)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        if str(trainer.precision).startswith("16"):
            return
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        bad = ~torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())
        if self.skip_on_device and (id(optimizer) in self._on_device or skips_on_device(optimizer)):
            self._on_device.add(id(optimizer))
            optimizer.found_inf = bad.float()
            if self._pending is None:
                self._pending = torch.zeros((), dtype=torch.long, device=bad.device)
                self._last_bad = torch.full((), -1, dtype=torch.long, device=bad.device)
            self._pending += bad
            self._last_bad = torch.where(bad, trainer.global_step, self._last_bad)
            return
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        if not bad:
            return
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None  # optimizers leave parameters without a gradient untouched
        self._record(trainer, pl_module, 1, trainer.global_step)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._pending is not None and trainer.global_step % max(trainer.log_every_n_steps, 1) == 0:
            self._read(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._read(trainer, None)  # nothing can be logged any more

    def _read(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None) -> None:
        """Bring the device counters to the host (the device path's only synchronisation)."""
        if self._pending is None:
            return
        new, last = int(self._pending), int(self._last_bad)
        self._pending.zero_()
        if new:
            self._record(trainer, pl_module, new, last)

    def _record(self, trainer: pl.Trainer, pl_module: pl.LightningModule | None, new: int, last: int) -> None:
        self.skipped += new
        if pl_module is not None:
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False)
        rank_zero_warn(f"non-finite loss or gradient at step {last}: step skipped ({self.skipped} so far)")
        if self.skipped > self.max_skipped:
            checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
            raise FloatingPointError(
                f"{self.skipped} steps with non-finite loss or gradient, the last at step {last} "
                f"(limit callbacks.nonfinite_guard.max_skipped={self.max_skipped}); last good checkpoint: {checkpoint}"
            )

    def state_dict(self) -> dict[str, Any]:
        pending = int(self._pending) if self._pending is not None else 0
        return {"skipped": self.skipped + pending}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class ChannelsLast(pl.Callback):
    """Train a convolutional model in channels_last memory format (NHWC), the layout cuDNN's convolutions are
    fastest in. ``enabled='auto'``: on CUDA, for models whose weights are mostly k x k convolutions
    (:func:`vtrain.profiling.prefers_channels_last`: ResNets, GCNet, NL/DNL; not transformers or LR-Net).

    The conversion happens in ``setup``: before the model moves to its device and before the optimizer and
    its state exist, so parameters, gradients and optimizer state share one layout.
    """

    def __init__(self, enabled: bool | str = "auto"):
        self.enabled = enabled
        self.active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from pytorch_lightning.accelerators import CUDAAccelerator

        from vtrain.profiling import prefers_channels_last

        if self.enabled == "auto":
            self.active = isinstance(trainer.accelerator, CUDAAccelerator) and prefers_channels_last(pl_module)
        else:
            self.active = bool(self.enabled)
        if self.active:
            pl_module.to(memory_format=torch.channels_last)


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged values every ``metrics_every`` training steps instead
    of after every batch: on a GPU each read of a logged tensor waits for the device, which would put a host
    synchronisation in every step. Default: ``trainer.log_every_n_steps`` on an accelerator, every step on the
    CPU (where a read costs nothing). The bar itself moves every batch; validation and the end of an epoch
    always show fresh values."""

    def __init__(self, metrics_every: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.metrics_every = metrics_every
        self._metrics: dict[str, Any] | None = None
        self._metrics_step = -1

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        every = self.metrics_every
        if every is None:
            every = 1 if trainer.strategy.root_device.type == "cpu" else trainer.log_every_n_steps
        due = self._metrics is None or trainer.global_step - self._metrics_step >= max(every, 1)
        if due or not trainer.training or trainer.sanity_checking:
            self._metrics = super().get_metrics(trainer, pl_module)
            self._metrics_step = trainer.global_step
        return self._metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = None  # the epoch's values, read now
        super().on_train_epoch_end(trainer, pl_module)


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column and total: Lightning counts FLOPs only for a
    module with an ``example_input_array``, which no vtrain task has, and printed 0 for every model
    (``vtrain.tools.bench`` measures MACs). :func:`vtrain.trainer.build_trainer` puts it in place of Lightning's."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        from pytorch_lightning.utilities.model_summary import get_formatted_model_size, get_human_readable_count
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for name, _ in columns:
            table.add_column(name if name else " ", justify="right" if name == "Params" else "left")
        for row in zip(*(values for _, values in columns)):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        console.print(f"Params: {get_human_readable_count(int(trainable_parameters))} trainable, "
                      f"{get_human_readable_count(int(total_parameters))} in all ({get_formatted_model_size(model_size)} MB)")


class PredictionPictures(pl.Callback):
    """A few validation inputs' predictions as pictures, logged to TensorBoard and wandb every ``every_n_epochs``
    validations: the pictures ``python -m vtrain.predict`` draws (boxes and masks with names and scores, the
    segmentation overlay with its legend, the top-5 bars, a video's frames). Inactive unless one of the run's loggers
    keeps images (``logger=tensorboard`` or ``logger=wandb``; the CSV logger does not).

    Args:
        every_n_epochs: epochs between two sets of pictures (logged at the first validation of epochs 0, N, 2N...).
        num_images: the first validation files drawn, the same ones each time.
        score_threshold, max_detections, top_k: what a picture shows (:class:`vtrain.prediction.PredictOptions`).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4, score_threshold: float = 0.3,
                 max_detections: int = 20, top_k: int = 5):
        from vtrain.prediction import PredictOptions

        self.every_n_epochs, self.num_images = max(1, every_n_epochs), num_images
        self.options = PredictOptions(top_k=top_k, score_threshold=score_threshold, max_detections=max_detections)
        self._logged_epoch: int | None = None

    @staticmethod
    def image_loggers(trainer: pl.Trainer) -> list[Any]:
        from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

        return [logger for logger in trainer.loggers if isinstance(logger, (TensorBoardLogger, WandbLogger))]

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or not self.image_loggers(trainer):
            return
        epoch = trainer.current_epoch
        if epoch % self.every_n_epochs or epoch == self._logged_epoch or trainer.datamodule is None:
            return
        self._logged_epoch = epoch
        self.log_pictures(trainer, pl_module)

    def pictures(self, datamodule: Any, pl_module: pl.LightningModule) -> list[tuple[str, torch.Tensor]]:
        """(file name, picture) of the first ``num_images`` validation files, the model in eval mode."""
        dataset = datamodule.predict_set(datamodule.example_files(self.num_images))
        items = [dataset[i] for i in range(len(dataset))]
        training = pl_module.training
        pl_module.eval()
        try:
            outputs = pl_module.predict_batch([item["input"] for item in items])
        finally:
            pl_module.train(training)
        return [(Path(item["path"]).name,
                 pl_module.draw_prediction(item["original"], pl_module.prediction_record(output, self.options),
                                           self.options))
                for item, output in zip(items, outputs)]

    def log_pictures(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger

        pictures = self.pictures(trainer.datamodule, pl_module)
        for logger in self.image_loggers(trainer):
            if isinstance(logger, TensorBoardLogger):
                for k, (name, picture) in enumerate(pictures):
                    logger.experiment.add_image(f"predictions/{k}", picture, global_step=trainer.global_step,
                                                dataformats="CHW")
            else:  # wandb
                logger.log_image(key="predictions", images=[p.permute(1, 2, 0).numpy() for _, p in pictures],
                                 caption=[name for name, _ in pictures])
