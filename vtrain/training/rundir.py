"""One run at a time in a run directory.

Two runs given the same ``hydra.run.dir`` would mix their configs, metrics and checkpoints without a word. The
first takes an exclusive lock on ``<run dir>/.lock`` (``flock``: released by the kernel when the process ends,
SIGKILL included, so a crashed run never leaves a stale lock) before Hydra writes anything there; a second run
stops with one line naming the first. DDP worker processes, which Lightning starts with the same command line,
join the run that holds the lock instead of taking it.
"""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from vtrain.config import ConfigError
from vtrain.config.command import fail

# Set by launchers for the processes of one run beyond its first (Lightning's DDP workers, torchrun, srun).
_RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")


def is_first_process() -> bool:
    return all(os.environ.get(name, "0") == "0" for name in _RANK_VARIABLES)


class RunDirectoryLock:
    """An exclusive lock on ``directory``, held until :meth:`release` or the end of the process."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / ".lock"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(self._fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(self._fd)
            raise ConfigError(f"run directory {self.path.parent} is in use by {holder}: give this run another "
                              "hydra.run.dir, or wait for that one to end") from None
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})\n".encode())

    def release(self) -> None:
        os.close(self._fd)  # closing drops the lock; the file stays, unlocked


class LockRunDirectory(Callback):
    """Hydra callback: lock ``hydra.run.dir`` before Hydra writes its config and log there (single runs; a sweep's
    points are locked by :func:`vtrain.cli.run`, each in its own directory)."""

    def __init__(self) -> None:
        self.lock: RunDirectoryLock | None = None

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if is_first_process():
            try:
                self.lock = RunDirectoryLock(config.hydra.run.dir)
            except ConfigError as e:
                fail(e)
