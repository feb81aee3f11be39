"""What the terminal shows during a run: the progress bar and the model summary."""
from __future__ import annotations

import sys
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichModelSummary, RichProgressBar


class ProgressBar(RichProgressBar):
    """Lightning's rich progress bar, reading the logged values every ``metrics_every`` training steps instead
    of after every batch: on a GPU each read of a logged tensor waits for the device, which would put a host
    synchronisation in every step. Default: ``trainer.log_every_n_steps`` on an accelerator, every step on the
    CPU (where a read costs nothing). The bar itself moves every batch; validation and the end of an epoch
    always show fresh values. A count of skipped samples shows only once it is above 0
    (:class:`~vtrain.training.callbacks.skipped_samples.SkippedSamples`).

    Where stdout is not a terminal (a log file, a pipe, a batch job's output) the bar is ``plain``: one line of
    text per epoch, after its validation, instead of a live bar that such a file would only get the last frame of,
    wrapped (``vtrain.eval`` prints Lightning's table of the validation's values either way)."""

    def __init__(self, metrics_every: int | None = None, plain: bool | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.metrics_every = metrics_every
        self.plain = plain  # None: when stdout is not a terminal
        self._metrics: dict[str, Any] | None = None
        self._metrics_step = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.plain is None:
            self.plain = not sys.stdout.isatty()
        if self.plain:
            self.disable()  # the live bar; the lines below take its place

    def _print_line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, what: str) -> None:
        if self.plain and trainer.is_global_zero and not trainer.sanity_checking:
            values = "  ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                               for name, value in self.get_metrics(trainer, pl_module).items()
                               if name != "v_num")  # the logger's version: the run directory says which run
            print(f"{what}  step {trainer.global_step}  {values}".rstrip(), flush=True)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        every = self.metrics_every
        if every is None:
            every = 1 if trainer.strategy.root_device.type == "cpu" else trainer.log_every_n_steps
        due = self._metrics is None or trainer.global_step - self._metrics_step >= max(every, 1)
        if due or not trainer.training or trainer.sanity_checking:
            metrics = super().get_metrics(trainer, pl_module)
            if trainer.training and not trainer.sanity_checking:  # this step's loss, logged only where read
                step_values = getattr(pl_module, "bar_step_values", dict)()
                metrics.update({name: float(value) for name, value in step_values.items()})
            self._metrics = {name: value for name, value in metrics.items()
                             if not (name.endswith("skipped_samples") and _is_zero(value))}
            self._metrics_step = trainer.global_step
        return self._metrics

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._metrics = None  # the epoch's values, read now
        super().on_train_epoch_end(trainer, pl_module)
        last = trainer.max_epochs - 1 if trainer.max_epochs not in (None, -1) else "?"
        self._print_line(trainer, pl_module, f"epoch {trainer.current_epoch}/{last}")


def _is_zero(value: Any) -> bool:
    try:
        return float(value) == 0
    except (TypeError, ValueError):
        return False


class ModelSummary(RichModelSummary):
    """Lightning's rich model summary without its FLOPs column and total: Lightning counts FLOPs only for a
    module with an ``example_input_array``, which no vtrain task has, and printed 0 for every model
    (``vtrain.tools.bench`` measures MACs). :func:`vtrain.training.trainer.build_trainer` puts it in place of Lightning's."""

    @staticmethod
    def summarize(summary_data: list[tuple[str, list[str]]], total_parameters: int, trainable_parameters: int,
                  model_size: float, total_training_modes: dict[str, int], total_flops: int = 0,
                  **summarize_kwargs: Any) -> None:
        from pytorch_lightning.utilities.model_summary import (
            get_formatted_model_size,
            get_human_readable_count,
        )
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
