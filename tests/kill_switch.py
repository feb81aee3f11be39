"""A callback that signals its own process at one named moment of training, so that a test can stop a run
exactly where a busy machine's timing might (after a checkpoint, during validation, before a step) and check
that ``ckpt_path=auto`` resumes exactly from there. Added from the command line::

    PYTHONPATH=tests python -m vtrain ... +callbacks.kill._target_=kill_switch.KillAt \
        +callbacks.kill.hook=on_validation_start +callbacks.kill.step=12

``signal`` is SIGKILL unless given (``+callbacks.kill.signal=SIGTERM``: a scheduler's preemption, which the
run handles). The signal is sent to the process itself from its main thread, so Python runs its handler before
the hook returns: the moment does not depend on timing.
"""
from __future__ import annotations

import os
import signal as signals

import pytorch_lightning as pl

# Lightning calls every checkpoint callback after the others, so at a batch's end this fires before that step's
# checkpoint is written; at the next hook (the next batch's start, or the validation that ends an epoch) after.
HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_validation_start", "on_validation_batch_end",
         "on_validation_end", "on_train_epoch_end")


class KillAt(pl.Callback):
    def __init__(self, hook: str, step: int, signal: str = "SIGKILL"):
        if hook not in HOOKS:
            raise ValueError(f"hook={hook!r}: one of {HOOKS}")
        self.hook, self.step, self.signal = hook, int(step), signals.Signals[signal]
        self.sent = False

    def _at(self, hook: str, trainer: pl.Trainer) -> None:
        if hook == self.hook and trainer.global_step == self.step and not trainer.sanity_checking and not self.sent:
            self.sent = True  # once: a handled signal lets the run go on to the end of the batch
            os.kill(os.getpid(), self.signal)

    def on_train_batch_start(self, trainer, *args):
        self._at("on_train_batch_start", trainer)

    def on_train_batch_end(self, trainer, *args):
        self._at("on_train_batch_end", trainer)

    def on_validation_start(self, trainer, *args):
        self._at("on_validation_start", trainer)

    def on_validation_batch_end(self, trainer, *args):
        self._at("on_validation_batch_end", trainer)

    def on_validation_end(self, trainer, *args):
        self._at("on_validation_end", trainer)

    def on_train_epoch_end(self, trainer, *args):
        self._at("on_train_epoch_end", trainer)
