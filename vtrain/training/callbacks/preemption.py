"""SIGTERM/SIGUSR1 (a scheduler's preemption): a checkpoint at the next batch, then a clean exit."""
from __future__ import annotations

import signal
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info

from vtrain.training.lightning_internals import (
    cluster_environment,
    rerun_validation_on_resume,
    stop_after_this_batch,
)


class Preemption(pl.Callback):
    """SIGTERM or SIGUSR1 (what SLURM and most schedulers send before a time limit or a preemption): finish the
    current batch, save ``last.ckpt`` (atomically: :class:`vtrain.training.checkpoint.CheckpointIO`), and exit.

    Under SLURM, Lightning's ``SLURMEnvironment`` (auto-requeue on, the default) handles SIGUSR1 itself: it saves
    ``hpc_ckpt_*.ckpt`` in the run directory, requeues the job, and the requeued job resumes from it; this
    callback then only covers SIGTERM. Elsewhere the process exits with status 143 (128 + SIGTERM), which
    launchers read as "terminated", after the checkpoint is safely on disk; ``ckpt_path=auto`` resumes it.

    A signal during a validation stops it after its current batch; the checkpoint is then written so that the
    resumed run runs that validation again, whole, before it trains on
    (:func:`vtrain.training.lightning_internals.rerun_validation_on_resume`): its metrics, ``metrics.json``'s best and the
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
