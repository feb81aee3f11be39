"""Loggers whose files outlive a resumed run."""
from __future__ import annotations

import csv
import io
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment

from vtrain.training.atomic import atomic_write


class CSVLogger(pl.loggers.CSVLogger):
    """Lightning's ``CSVLogger``, appending to the ``metrics.csv`` it finds (a resumed run's earlier rows).

    Lightning's writer deletes an existing ``metrics.csv`` in its directory, and the run directory is that
    directory (``conf/logger/csv.yaml``), so a run resumed with ``ckpt_path=auto`` would lose every row written
    before the interruption. Here the rows are kept: new rows are appended under the file's header, a metric
    name the file has no column for rewrites it (atomically) with the wider header, and a row cut short by a
    kill mid-append is dropped, so the file stays one valid CSV table.
    """

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingMetricsWriter(log_dir=self.log_dir)
        return self._experiment


class AppendingMetricsWriter(ExperimentWriter):
    """Lightning's CSV experiment writer, continuing an existing ``metrics.csv`` instead of deleting it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        path = Path(self.metrics_file_path)
        if path.is_file():
            _drop_torn_row(path)
        if path.is_file():
            with open(path, newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])  # appended rows follow the file's columns

    def _check_log_dir_exists(self) -> None:
        pass  # Lightning warns here and deletes metrics.csv

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with open(self.metrics_file_path, newline="") as f:
            rows = list(csv.DictReader(f))
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.metrics_file_path, lambda f: f.write(text.getvalue().encode()))


def _drop_torn_row(path: Path) -> None:
    """Cut a file that does not end with a newline back to its last complete line; remove it if none is."""
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return
    end = data.rfind(b"\n") + 1
    if end == 0:
        path.unlink()
        return
    with open(path, "rb+") as f:
        f.truncate(end)


class WandbLogger(pl.loggers.WandbLogger):
    """Lightning's ``WandbLogger`` without the warning every run printed: Lightning passes ``anonymous=None`` to
    ``wandb.init`` when the option is not set, and wandb warns that the setting "has no effect" for any value
    given, ``None`` included. Here the key is passed only when ``anonymous`` is set."""

    def __init__(self, *args, anonymous: bool | None = None, **kwargs) -> None:
        super().__init__(*args, anonymous=anonymous, **kwargs)
        if anonymous is None:
            self._wandb_init.pop("anonymous", None)
