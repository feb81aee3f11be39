"""Every use of Lightning's private API, in one module.

vtrain needs a few things Lightning has no public API for. Each is a function here, with what it relies on, so
that upgrading Lightning means reading this file and running ``tests/test_lightning_internals.py`` (which checks
that each private name still exists). Tested with pytorch-lightning ``TESTED_VERSIONS``; another version gets a
warning naming this file, once.

Besides these functions, :class:`vtrain.training.callbacks.model_checkpoint.ModelCheckpoint` overrides ``ModelCheckpoint``'s private
``_save_last_checkpoint``, ``_save_checkpoint`` and ``_monitor_candidates`` (which reads the values a save may name)
and calls ``_should_skip_saving_checkpoint`` and ``_should_save_on_train_epoch_end`` (the rule for when ``last.ckpt``
is written lives only there).
"""
from __future__ import annotations

import logging
from typing import Any

import pytorch_lightning as pl

log = logging.getLogger(__name__)

TESTED_VERSIONS = ("2.6",)


def check_version() -> None:
    """A warning when the installed Lightning is not one these functions were tested with."""
    if not pl.__version__.startswith(TESTED_VERSIONS):
        log.warning("pytorch-lightning %s: vtrain's uses of its private API (vtrain/training/lightning_internals.py) were "
                    "tested with %s; run tests/test_lightning_internals.py", pl.__version__, ", ".join(TESTED_VERSIONS))


def cluster_environment(trainer: pl.Trainer):
    """The cluster environment Lightning detected (SLURM, torchelastic, ...): ``trainer._accelerator_connector``."""
    return trainer._accelerator_connector.cluster_environment


def stop_after_this_batch(trainer: pl.Trainer) -> None:
    """Make Lightning stop after the current batch as on SIGTERM (it then raises ``SIGTERMException``):
    ``trainer._signal_connector.received_sigterm``."""
    trainer._signal_connector.received_sigterm = True


def rerun_validation_on_resume(trainer: pl.Trainer) -> None:
    """Make a checkpoint saved now, in the middle of a validation of ``fit``, resume by running that validation again
    from its first batch.

    Left as it is, the validation loop's progress (``fit_loop.epoch_loop.val_loop.batch_progress``) says that the
    batches seen so far are done, and the training loop's that its last batch is done: Lightning reads that as a
    checkpoint saved after the validation (``RestartStage.RESTARTED_ON_LAST``) and skips it on resume, so the
    epoch's metrics, its best and top-k checkpoints, are never computed. Set back to "inside the first batch"
    (started, not processed), it is Lightning's ``restarted_mid_evaluation``, which runs the validation before
    training goes on; the batches already seen count for nothing (their metric states are not in the checkpoint).
    """
    progress = trainer.fit_loop.epoch_loop.val_loop.batch_progress
    seen = progress.current.completed
    for tracker in (progress.total, progress.current):
        tracker.completed = tracker.processed = tracker.completed - seen
        tracker.started = tracker.ready = tracker.completed + 1
    progress.is_last_batch = False


def validation_follows_this_batch(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end``: whether a validation runs right after this batch (the epoch's end, or a
    ``val_check_interval``), as Lightning decides it right after the hook
    (``fit_loop.epoch_loop._should_check_val_fx``)."""
    if not trainer.enable_validation:
        return False
    return bool(trainer.fit_loop.epoch_loop._should_check_val_fx(trainer.fit_loop._data_fetcher))


def is_local_path(path: Any) -> bool:
    """A path on this machine (not ``s3://`` and the like), as Lightning's checkpoint I/O tells them apart
    (``lightning_fabric.utilities.cloud_io._is_local_file_protocol``)."""
    from lightning_fabric.utilities.cloud_io import _is_local_file_protocol

    return _is_local_file_protocol(path)


def hand_over_train_loader_state(trainer: pl.Trainer) -> None:
    """On resume, give the training loader the position the checkpoint saved, and rebuild its iterator.

    Lightning builds the training loader and its iterator before a resumed run trains. A checkpoint written at an
    epoch's end, after its validation (the first epoch's checkpoints wait for the monitored metric), leaves that
    iterator at the wrong place: Lightning then does not count the run as restarting (``_FitLoop.restarting``),
    never hands the loader its saved state (``fit_loop._combined_loader_states_to_load``), and, as it is resuming,
    does not call ``iter()`` for the next epoch either: that epoch drew the iterator built at set-up, when the
    sampler still said epoch 0, and replayed the first epoch's order. (vtrain's tasks never build the loader
    earlier than Lightning: :mod:`vtrain.training.steps` counts the steps their schedule needs.)

    So: every sampler is told the epoch that is about to run, the saved position is handed over (a finished epoch's
    position means the next epoch's start: :meth:`vtrain.data.samplers.EpochSeededIterator.load_state_dict`), and
    the iterator is rebuilt. Call from ``on_train_start``, before the first batch.
    """
    fit_loop = trainer.fit_loop
    loader, states = fit_loop._combined_loader, fit_loop._combined_loader_states_to_load
    if not states or loader is None or fit_loop._data_fetcher is None:
        return
    for dataloader in loader.flattened:
        sampler = getattr(dataloader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(fit_loop.epoch_progress.current.processed)
    loader._load_state_dicts(states)
    fit_loop._combined_loader_states_to_load = []  # handed over (Lightning releases them so too)
    iter(fit_loop._data_fetcher)  # rebuild the iterator that was made before the state arrived


def unrepeated_sampler(dataset: Any, num_replicas: int, rank: int) -> Any:
    """Each rank a disjoint share of ``dataset``, in order, none repeated (Lightning's ``UnrepeatedDistributedSampler``
    in ``pytorch_lightning.overrides.distributed``, which it uses for prediction): a dataset-level metric then counts
    every sample once, where ``DistributedSampler`` pads the ranks with repeats."""
    from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSampler

    return UnrepeatedDistributedSampler(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)


def step_values_are_read(trainer: pl.Trainer) -> bool:
    """In ``on_train_batch_end``: whether anything reads the values logged for this training step (``on_step``): the
    loggers, which write them every ``log_every_n_steps`` optimizer steps and when the run is stopping (every step
    under ``fast_dev_run``; ``trainer._logger_connector.should_update_logs``, the test Lightning's own
    ``LearningRateMonitor`` makes), a validation that follows, an epoch's end (its checkpoint, the bar's line) or
    the end of training (``metrics.json`` takes the latest value of every logged name at a validation and at the
    end; an epoch's last batch is ``fit_loop.epoch_loop.batch_progress.is_last_batch``)."""
    return (bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs
            or validation_follows_this_batch(trainer) or 0 <= trainer.max_steps <= trainer.global_step
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
