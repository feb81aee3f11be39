"""Shared test plumbing: running the CLI in a subprocess, composing configs, tiny synthetic datasets."""
from __future__ import annotations

import copy
import functools
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# The suite never downloads a recipe's reference checkpoint (tests/test_weights_download.py serves its own): a test
# that runs a recipe whose weights are missing gets the one-line message, also in its CLI subprocesses.
os.environ["VTRAIN_DOWNLOAD_WEIGHTS"] = "false"

# Two cores: under pytest-xdist (`make test` runs two workers) one intra-op thread per worker keeps
# them from thrashing; CLI subprocesses get OMP_NUM_THREADS=1 below.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

# The longest single tests (seconds on two shared cores, `pytest --durations`), handed out first: pytest-xdist gives
# tests to the workers in collection order, and a two-minute test collected late runs alone at the end while the
# other worker idles. The rest keep their order.
LONGEST_FIRST = (
    "test_quickstart.py::test_quickstart_learns_far_above_chance",  # 45-65 s
    "test_video.py::test_quickstart_video_learns_the_motion_not_the_frames",  # 50-60 s
    "test_reliability.py::test_resume_is_exact_from_every_moment_a_kill_can_land",  # 60-80 s
    "test_detection_relation.py::test_quickstart_relation_learns_under_ddp",  # 40-50 s
    "test_detection_cascade.py::test_quickstart_cascade_learns_under_ddp",  # 65-80 s
    "test_reliability.py::test_killed_at_random_moments_under_load_resumes_exactly",  # 20-45 s
)
# Tests that trace a model with dynamo (torch.compile, torch.export) in the worker's own process, handed out last:
# where a trace comes before a process's first backward pass, torch's autograd engine starts threads of its own at
# that pass, and a child forked from the process afterwards cannot run a backward pass ("Unable to handle
# autograd's threading in combination with fork-based multiprocessing"); start_forked then starts a new
# interpreter instead. Handed out last, they come after a worker's first training step.
DYNAMO_LAST = (
    "test_export.py::test_exported_model_gives_the_task_models_outputs",
    "test_cli.py::test_compile_traces_the_backbone_and_keeps_checkpoint_keys",
)


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        if any(name in item.nodeid for name in DYNAMO_LAST):
            return len(LONGEST_FIRST) + 1
        return next((i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable


# A CPU-sized classification run on the tiny dataset below: a small Swin at 32x32, one epoch.
TINY_CLS = [
    "experiment=quickstart",
    "backbone.img_size=32",
    "data.num_classes=4",
    "data.batch_size=8",
    "data.num_workers=0",
    "trainer.max_epochs=1",
    "callbacks.progress_bar=null",
]


@pytest.fixture(scope="module")
def one_thread():
    """Small ops on two shared, busy cores run many times faster on one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_cli(*args: str, module: str = "vtrain", cwd: Path | None = None, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m <module> args...`` in a subprocess; output captured as text. ``env`` adds variables, and removes
    those it gives as None."""
    return subprocess.run(_cli_command(module, args), cwd=cwd or ROOT, env=_cli_environment(env),
                          capture_output=True, text=True, timeout=timeout)


def _cli_command(module: str, args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _cli_environment(env: dict | None) -> dict[str, str]:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true",
                "HYDRA_FULL_ERROR": "0", **(env or {})}
    return {name: value for name, value in full_env.items() if value is not None}


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_forked(*args: str, module: str = "vtrain", cwd: Path | None = None, timeout: float = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """What :func:`run_cli` gives (``python -m <module> args...``: its exit status, a signal's as a negative one, its
    output as text) from a process forked from this one (:func:`start_forked`)."""
    proc = start_forked(*args, module=module, cwd=cwd, env=env)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def start_forked(*args: str, module: str = "vtrain", cwd: Path | None = None, env: dict | None = None) -> Forked:
    """``python -m <module> args...`` started in a process forked from this one rather than a new interpreter, which
    spends about 7 s importing torch, Lightning, timm and torchvision first; a handle like ``subprocess.Popen``'s,
    its output captured. The child is a process of its own (a kill, a signal and an exit are its own) and runs the
    module as ``-m`` does, with the environment, signal handlers, torch's thread count and deterministic switch a
    fresh start has; warnings print under the suite's filters (pyproject.toml). Under DDP the child is rank 0 and
    Lightning starts the other ranks as new interpreters from its ``sys.argv`` (``python -m <module>.__main__
    args...``), as from a command line. Not for what happens while importing or what a run prints beside its own
    lines (third-party noise): :func:`run_cli` starts a new interpreter.

    Where this process traced a model with dynamo (torch.compile, torch.export) before its first backward pass,
    torch's autograd engine refuses a backward pass in any child forked from it: the command then runs in a new
    interpreter instead (see DYNAMO_LAST)."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    if not _forked_children_can_backpropagate():
        popen = subprocess.Popen(_cli_command(module, args), cwd=cwd or ROOT, env=_cli_environment(env),
                                 stdout=out, stderr=err)
        return Forked(popen.pid, [module, *args], out, err, popen)
    sys.stdout.flush(), sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            os.environ.clear()
            os.environ.update(_cli_environment(env))
            os.chdir(cwd or ROOT)
            for number in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
                signal.signal(number, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            warnings.showwarning = _print_warning  # printed, where pytest would record them
            torch.set_num_threads(1)
            torch.use_deterministic_algorithms(False)
            from hydra.core.global_hydra import GlobalHydra

            GlobalHydra.instance().clear()
            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exit_:  # as the interpreter exits: a number as it is, None 0, a message 1
            code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
            if code == 1 and not isinstance(exit_.code, int):
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    return Forked(pid, [module, *args], out, err)


class Forked:
    """The handle :func:`start_forked` gives: ``pid``, ``args``, ``returncode`` (a signal's as a negative number)
    and ``poll``, ``wait``, ``send_signal``, ``kill`` and ``communicate`` as ``subprocess.Popen`` has them."""

    def __init__(self, pid: int, args: list[str], out, err, popen: subprocess.Popen | None = None):
        self.pid, self.args, self._out, self._err, self._popen = pid, args, out, err, popen
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._popen is not None:
                self.returncode = self._popen.poll()
            elif (waited := os.waitpid(self.pid, os.WNOHANG)) != (0, 0):
                self.returncode = os.waitstatus_to_exitcode(waited[1])
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return self.returncode

    def send_signal(self, number: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, number)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Waits for the end; the output, as text."""
        self.wait(timeout)
        texts = []
        for file in (self._out, self._err):
            file.seek(0)
            texts.append(file.read().decode(errors="replace"))
            file.close()
        return texts[0], texts[1]


_FORKED_BACKWARD_REFUSED = False


def _forked_children_can_backpropagate() -> bool:
    """Whether a child forked from this process can run a backward pass: a one-element one, tried in a child."""
    global _FORKED_BACKWARD_REFUSED
    if not _FORKED_BACKWARD_REFUSED:  # once refused, refused for the life of this process
        pid = os.fork()
        if pid == 0:
            try:
                torch.ones(1, requires_grad=True).sum().backward()
                os._exit(0)
            except BaseException:
                os._exit(1)
        _FORKED_BACKWARD_REFUSED = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0
    return not _FORKED_BACKWARD_REFUSED


def run_in_process(*args: str) -> float | None:
    """What ``python -m vtrain args...`` runs, in this process (``vtrain.cli.run`` outside Hydra's app: bad input
    raises the ``ConfigError`` whose message the command line prints as its one line). ``hydra.run.dir=`` is
    the run directory, as on the command line. For tests that need neither a process of their own (a kill, a
    signal, DDP) nor the command line's output."""
    import vtrain
    from vtrain.cli import run

    overrides = [f"output_dir={a.split('=', 1)[1]}" if a.startswith("hydra.run.dir=") else a for a in args]
    return run(vtrain.compose(None, overrides))


def compose(*overrides: str):
    """The config ``python -m vtrain overrides...`` would run with, without Hydra's runtime: a copy of its own, the
    same overrides composed once per test process (the recipe, config and stored-config tests compose every
    experiment)."""
    return copy.deepcopy(_composed(overrides))


@functools.lru_cache(maxsize=None)
def _composed(overrides: tuple[str, ...]):
    from vtrain.config.compose import compose_config

    return compose_config("train", list(overrides))


@pytest.fixture(scope="session")
def imagenet_root(tmp_path_factory) -> Path:
    """4 classes x 12 training / 4 validation images of 32x32, in the ImageNet folder layout."""
    from vtrain.tasks.classification.synthetic import write

    root = tmp_path_factory.mktemp("imagenet")
    write(root, seed=0, num_classes=4, train_per_class=12, val_per_class=4, size=32)
    return root
