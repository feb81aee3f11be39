"""The private Lightning names vtrain relies on (vtrain/training/lightning_internals.py) still exist: after an upgrade this
fails first, naming what to re-check."""
from __future__ import annotations

import inspect

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loops import _FitLoop
from pytorch_lightning.utilities import CombinedLoader

from vtrain.training import lightning_internals


def test_the_private_names_vtrain_uses_exist():
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert hasattr(trainer._accelerator_connector, "cluster_environment")
    assert hasattr(trainer._signal_connector, "received_sigterm")
    assert isinstance(type(trainer._logger_connector).should_update_logs, property)  # step_values_are_read
    assert hasattr(trainer.fit_loop.epoch_loop.batch_progress, "is_last_batch")
    for name in ("_combined_loader_states_to_load", "_data_fetcher", "restarting"):
        assert hasattr(trainer.fit_loop, name), name
    assert callable(_FitLoop.setup_data) and hasattr(trainer.fit_loop.epoch_progress.current, "processed")
    assert callable(CombinedLoader._load_state_dicts)
    # rerun_validation_on_resume: the validation loop's progress, and the restart stage Lightning reads from it
    val_loop = trainer.fit_loop.epoch_loop.val_loop
    for tracker in (val_loop.batch_progress.total, val_loop.batch_progress.current):
        assert {"ready", "started", "processed", "completed"} <= set(vars(tracker)), tracker
    assert hasattr(val_loop.batch_progress, "is_last_batch") and hasattr(type(val_loop), "restarted_mid_evaluation")
    for name in ("_save_last_checkpoint", "_save_checkpoint", "_should_skip_saving_checkpoint",
                 "_should_save_on_train_epoch_end", "_monitor_candidates"):
        assert callable(getattr(ModelCheckpoint, name)), name
    # validation_follows_this_batch: the epoch loop's own decision; is_local_path: Lightning's checkpoint I/O's
    assert callable(trainer.fit_loop.epoch_loop._should_check_val_fx) and hasattr(trainer.fit_loop, "_data_fetcher")
    from lightning_fabric.utilities.cloud_io import _is_local_file_protocol

    assert _is_local_file_protocol("/tmp/x.ckpt") and not _is_local_file_protocol("s3://bucket/x.ckpt")
    # unrepeated_sampler: disjoint, in order, every sample once over the ranks
    shares = [list(lightning_internals.unrepeated_sampler(range(7), 3, rank)) for rank in range(3)]
    assert sorted(i for share in shares for i in share) == list(range(7)) and shares[0] == [0, 3, 6]
    # the override keeps the signature it replaces
    assert list(inspect.signature(ModelCheckpoint._save_last_checkpoint).parameters) == [
        "self", "trainer", "monitor_candidates"]


def test_the_installed_version_is_a_tested_one(caplog):
    lightning_internals.check_version()
    assert pl.__version__.startswith(lightning_internals.TESTED_VERSIONS) and not caplog.records


def test_precisions_are_the_ones_lightning_takes():
    """vtrain.config.validate lists Lightning's accepted precisions (its own list is private)."""
    from typing import get_args

    from lightning_fabric.plugins.precision.precision import _PRECISION_INPUT

    from vtrain.config.validate import PRECISIONS

    assert set(PRECISIONS) == {value for literal in get_args(_PRECISION_INPUT) for value in get_args(literal)}
