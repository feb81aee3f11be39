"""Preemption, automatic resume past broken checkpoints, and non-finite steps."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from conftest import ROOT, TINY_CLS, run_forked, run_in_process, start_forked
from vtrain.config import ConfigError
from vtrain.training.callbacks.non_finite import NonFiniteGuard, any_non_finite
from vtrain.training.checkpoint import newest_valid_checkpoint


def test_newest_valid_checkpoint_skips_truncated_files(tmp_path):
    torch.save({"global_step": 6, "state_dict": {}}, tmp_path / "epoch000-step0000006.ckpt")
    torch.save({"global_step": 12, "state_dict": {"w": torch.zeros(1000)}}, tmp_path / "last.ckpt")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "epoch002-step0000018.ckpt").write_bytes(data[: len(data) // 2])  # a crash while saving
    assert newest_valid_checkpoint(tmp_path).name == "last.ckpt"
    (tmp_path / "last.ckpt").write_bytes(b"")
    assert newest_valid_checkpoint(tmp_path).name == "epoch000-step0000006.ckpt"
    assert newest_valid_checkpoint(tmp_path / "missing") is None


def test_sigusr1_saves_a_checkpoint_and_auto_resume_continues(imagenet_root, tmp_path):
    run = tmp_path / "run"
    args = [*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "callbacks.model_checkpoint.save_top_k=-1"]
    proc = start_forked(*args, "trainer.max_epochs=500")
    deadline = time.time() + 300
    while not list((run / "checkpoints").glob("epoch*.ckpt")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(signal.SIGUSR1)
    output = "".join(proc.communicate(timeout=300))
    assert proc.returncode == 143, output[-3000:]
    saved = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    step, epoch = saved["global_step"], saved["epoch"]
    assert 6 <= step < 500 * 6 and "preempted at step" in output

    broken = run / "checkpoints" / "epoch499-step0003000.ckpt"  # newer by name and step, but truncated
    broken.write_bytes((run / "checkpoints" / "last.ckpt").read_bytes()[:1000])
    result = run_forked(*args, f"trainer.max_epochs={epoch + 2}", "ckpt_path=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epoch"] == epoch + 2 and metrics["global_step"] > step
    assert "skipping unreadable checkpoint" in result.stderr + result.stdout


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
    "sgd_momentum_fused": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.1, fused=True),
}


class _NaNAt(pl.LightningModule):
    def __init__(self, bad_steps, optimizer="sgd"):
        super().__init__()
        torch.manual_seed(0)
        self.layer, self.bad_steps, self.optimizer = nn.Linear(4, 1), set(bad_steps), optimizer

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        return loss * float("nan") if self.global_step in self.bad_steps else loss

    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer](self.parameters())

    def train_dataloader(self):
        data = torch.randn(16, 4, generator=torch.Generator().manual_seed(0))
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data), batch_size=2)


def _fit(module, guard, **trainer_kwargs):
    trainer = pl.Trainer(max_steps=6, callbacks=[guard], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", **trainer_kwargs)
    trainer.fit(module)
    return trainer


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("bad_step", [0, 2])
def test_nonfinite_step_is_skipped_and_counted(optimizer, bad_step):
    """Fused optimizers skip on the device (no host sync per step); the others by clearing the gradients. Both
    end with the same weights."""
    module, guard = _NaNAt([bad_step], optimizer), NonFiniteGuard(max_skipped=3)
    trainer = _fit(module, guard)
    assert guard.skipped == 1 and trainer.global_step == 6
    assert all(torch.isfinite(p).all() for p in module.parameters())
    per_step = _NaNAt([bad_step], optimizer)
    _fit(per_step, NonFiniteGuard(max_skipped=3, skip_on_device=False))
    for ours, reference in zip(module.parameters(), per_step.parameters()):
        torch.testing.assert_close(ours, reference, rtol=0, atol=0)
    # the fused ones took the device path (fused SGD only once its momentum buffers exist: a bad first step is
    # cleared on the host, else the kernel would leave the new buffers uninitialised and the weights differ)
    assert (guard._pending is not None) == optimizer.endswith("fused")


@pytest.mark.parametrize("optimizer", ["sgd", "adamw_fused"])
def test_too_many_nonfinite_steps_stop_with_the_step_named(optimizer):
    with pytest.raises(FloatingPointError, match=r"the last at step 3 .*max_skipped=1\); last good checkpoint: none yet"):
        _fit(_NaNAt(bad_steps=[1, 3], optimizer=optimizer), NonFiniteGuard(max_skipped=1), log_every_n_steps=1)


def test_any_non_finite_finds_an_inf_or_nan_in_any_tensor_and_changes_no_value():
    tensors = [torch.randn(5), torch.randn(3, dtype=torch.bfloat16), torch.randn(4, 4).t(),  # mixed dtypes, a view
               torch.tensor([1e30, -1e30, 1e-45, -0.0])]  # finite, although their 2-norm overflows to inf

    def bits(t):
        return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)

    before = [bits(t).clone() for t in tensors]
    assert not any_non_finite(tensors) and not torch.isfinite(torch.nn.utils.get_total_norm(tensors))
    assert all(torch.equal(bits(t), b) for t, b in zip(tensors, before))  # bit for bit: -0.0 and the denormal
    for index, where, bad in ((1, (2,), float("inf")), (2, (1, 0), float("nan")), (3, (0,), float("-inf"))):
        kept = tensors[index][where].item()
        tensors[index][where] = bad
        assert any_non_finite(tensors).item() is True, (index, bad)
        tensors[index][where] = kept
        assert any_non_finite(tensors).item() is False


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# Mixup, drop path and RandAugment on, so that every source of randomness is exercised; a checkpoint every 2 of
# the 6 steps of an epoch, so that kills land mid-epoch as well as at an epoch's end.
RESUMABLE = [*TINY_CLS, "trainer.max_epochs=3", "trainer.deterministic=true",
             "callbacks.model_checkpoint.every_n_train_steps=2", "backbone.drop_path_rate=0.1",
             "task.mixup={mixup_alpha:0.8,cutmix_alpha:1.0,switch_prob:0.5}",
             "data.augment.auto_augment=rand-m9-mstd0.5-inc1"]


@pytest.fixture(scope="session")  # once per worker: pytest-xdist interleaves modules, a module fixture is remade
def uninterrupted(imagenet_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted")
    result = run_forked(*RESUMABLE, f"data.root={imagenet_root}", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run


def _assert_ends_like(run, reference):
    final, expected = _weights(run / "checkpoints" / "last.ckpt"), _weights(reference / "checkpoints" / "last.ckpt")
    assert final.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(final[key], expected[key], rtol=0, atol=0, msg=key)
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, reference))
    assert got["global_step"] == want["global_step"] == 18
    for key in ("val/top1", "val/top5", "val/loss"):
        assert got["final"][key] == want["final"][key]


@pytest.fixture
def busy_cpu():
    """A busy-loop process beside the test, as on a shared CI machine: kill moments that only a slow run
    reaches (during validation, between a step and its checkpoint, at an epoch's end) are then reached here."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    yield
    proc.kill()
    proc.wait()


# One chain of kills, each resumed: after the first epoch's checkpoint (written after its validation); after an
# epoch's last batch, before its validation (a checkpoint written there resumed past the validation); mid-epoch,
# right after a checkpoint; after a step, before its checkpoint (that step is redone); before the last validation
# (the end of the run); in the last validation, after the last checkpoint.
MOMENTS = [("on_train_batch_start", 6), ("on_validation_start", 12), ("on_train_batch_start", 14),
           ("on_train_batch_end", 16), ("on_validation_start", 18), ("on_validation_batch_end", 18)]


@pytest.mark.xdist_group("uninterrupted")  # one worker computes the fixture (make test: --dist loadgroup)
def test_resume_is_exact_from_every_moment_a_kill_can_land(imagenet_root, tmp_path, uninterrupted):
    """SIGKILL at named moments, one after another, each resumed with ckpt_path=auto: the run ends with the
    weights and validation metrics of the uninterrupted one. The first two are moments a busy machine found: after
    the first epoch's checkpoint (written at the epoch's end, after its validation: Lightning defers it until the
    monitored metric exists), where the resumed run trained its second epoch on the first epoch's order; and after
    an epoch's last batch, before that epoch's validation (a checkpoint written there resumed past the validation,
    never run, with the epochs counted one short: resuming the finished run again trained one more epoch; none is
    written there now). The log is the uninterrupted run's, row for row; the finished run resumed once more is a
    no-op that says so and changes no file."""
    run = tmp_path / "killed"
    args = [*RESUMABLE, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "ckpt_path=auto"]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    for hook, step in MOMENTS:
        result = run_forked(*args, "+callbacks.kill._target_=kill_switch.KillAt", f"+callbacks.kill.hook={hook}",
                         f"+callbacks.kill.step={step}", env=env)
        assert result.returncode == -signal.SIGKILL, (hook, step, result.stderr[-3000:])
    result = run_forked(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_ends_like(run, uninterrupted)
    assert _log_rows(run) == _log_rows(uninterrupted)

    files = {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    files.update({name: (run / name).read_bytes() for name in ("metrics.json", "metrics.csv")})
    result = run_forked(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "is the end of a finished run (step 18): nothing to train" in result.stdout + result.stderr
    assert {p.name: p.read_bytes() for p in (run / "checkpoints").iterdir()} == {
        k: v for k, v in files.items() if k.endswith(".ckpt")}
    assert all((run / name).read_bytes() == files[name] for name in ("metrics.json", "metrics.csv"))


def _log_rows(run) -> list[tuple]:
    """metrics.csv's rows that a resume must not drop or repeat: each validation and each epoch's training loss, with
    its value (the mean over the whole epoch, the batches before a kill included)."""
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [(row["epoch"], row["step"], "val" if row.get("val/top1") else f"train_epoch {row['train/loss_epoch']}")
                for row in csv.DictReader(f) if row.get("val/top1") or row.get("train/loss_epoch")]


def _validated_epochs(run) -> list[int]:
    import csv

    with open(run / "metrics.csv", newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f) if row.get("val/top1")]


@pytest.mark.xdist_group("uninterrupted")  # one worker computes the fixture (make test: --dist loadgroup)
def test_sigterm_during_a_validation_reruns_it_after_resume(imagenet_root, tmp_path, uninterrupted):
    """SIGTERM in epoch 0's validation, after the first of its two batches (not the last validation; the signal is
    sent from inside the run at that hook, so the moment does not depend on timing). The run saves and exits 143;
    resumed with ckpt_path=auto it runs that validation again, whole, and ends as the uninterrupted run: every
    epoch validated once, metrics.json's best and final, the top-k checkpoint and last.ckpt. The preemption
    checkpoint used to resume past that validation (Lightning read it as saved after it), so epoch 0 was never
    validated and the best val/top1 was epoch 2's."""
    run = tmp_path / "preempted"
    args = [*RESUMABLE, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "ckpt_path=auto"]
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = run_forked(*args, "+callbacks.kill._target_=kill_switch.KillAt", "+callbacks.kill.hook=on_validation_batch_end",
                     "+callbacks.kill.step=6", "+callbacks.kill.signal=SIGTERM", env=env)
    assert result.returncode == 143, result.stderr[-3000:]
    said = "preempted at step 6 during a validation, which the resumed run runs again"
    assert said in result.stdout + result.stderr and said in (run / "vtrain.log").read_text()  # console and log file
    result = run_forked(*args)
    assert result.returncode == 0, result.stderr[-3000:]

    assert _validated_epochs(run) == _validated_epochs(uninterrupted) == [0, 1, 2]
    assert _log_rows(run) == _log_rows(uninterrupted)  # the interrupted epoch's train/loss_epoch row too
    got, want = (json.loads((d / "metrics.json").read_text()) for d in (run, uninterrupted))
    # (measured: the preempted validation is the uninterrupted run's best val/top1, best_epoch 0)
    for key in ("best", "best_epoch", "final", "global_step", "epoch"):
        assert got[key] == want[key], key
    top_k = sorted(p.name for p in (run / "checkpoints").glob("epoch*.ckpt"))
    assert top_k == sorted(p.name for p in (uninterrupted / "checkpoints").glob("epoch*.ckpt"))
    assert got["best_checkpoint"] == str(run / "checkpoints" / top_k[0])
    for name in (*top_k, "last.ckpt"):
        final, expected = _weights(run / "checkpoints" / name), _weights(uninterrupted / "checkpoints" / name)
        for key in expected:
            torch.testing.assert_close(final[key], expected[key], rtol=0, atol=0, msg=f"{name}: {key}")


@pytest.mark.xdist_group("uninterrupted")  # one worker computes the fixture (make test: --dist loadgroup)
def test_killed_at_random_moments_under_load_resumes_exactly(imagenet_root, tmp_path, uninterrupted, busy_cpu):
    """SIGKILL at random moments (mid-epoch included) with a busy process beside the run, resume with
    ckpt_path=auto each time: same weights and validation metrics as a run never interrupted."""
    import random as pyrandom

    run, kills, rng = tmp_path / "killed", 0, pyrandom.Random(0)
    args = [*RESUMABLE, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "ckpt_path=auto"]
    for _ in range(12):
        proc, started = start_forked(*args), time.time()
        before = {p.name: p.stat().st_mtime for p in (run / "checkpoints").glob("*.ckpt")} if run.exists() else {}
        deadline = started + 240
        # wait for a new checkpoint, then a random moment of the rest of the run, in proportion to the machine's
        # speed: measured on 2 idle cores, a run lasts about 2.2 s, its first checkpoint (step 2 of 18) written at
        # about 1.3 s, the rest lasting two thirds of that
        while proc.poll() is None and time.time() < deadline:
            now = {p.name: p.stat().st_mtime for p in (run / "checkpoints").glob("*.ckpt")} if run.exists() else {}
            if now != before:
                time.sleep(rng.uniform(0.0, 0.25) * (time.time() - started))
                break
            time.sleep(0.1)
        if proc.poll() is None and kills < 2:
            proc.kill()
            kills += 1
        proc.wait(timeout=300)
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and kills >= 1
    _assert_ends_like(run, uninterrupted)


def test_a_sample_is_seeded_on_the_host_only_with_the_draws_of_a_full_seed(monkeypatch):
    """Each sample's augmentation is seeded by (seed, epoch, index): python, numpy and torch's CPU generator get what
    ``torch.manual_seed`` would give them, and no accelerator is touched (for each uninitialised one, torch formats
    the caller's stack: 0.1-0.3 ms a sample). The model's seed before each batch reaches the GPUs when the model is on
    one."""
    import random

    import numpy as np

    from vtrain.data.samplers import derived_seed, seed_all, seed_sample

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist(), torch.randint(0, 9, (2,)).tolist()

    torch.manual_seed(derived_seed(7, 2, 11, 1)), random.seed(derived_seed(7, 2, 11, 1))
    np.random.seed(derived_seed(7, 2, 11, 1))
    full = draws()
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: seeded.append(seed))
    seed_sample(7, 2, 11)
    assert draws() == full and seeded == []
    seed_sample(7, 2, 12)
    assert draws() != full
    seed_all(5, torch.device("cpu"))
    assert seeded == [] and torch.initial_seed() == 5
    seed_all(6, torch.device("cuda"))
    assert seeded == [6] and torch.initial_seed() == 6


def test_channels_last_trains_a_cnn_in_nhwc(imagenet_root, tmp_path):
    """Forced on (auto turns it on only on CUDA): a ResNet trains with NHWC weights and saves them."""
    from vtrain.profiling import prefers_channels_last
    from vtrain.backbones import ResNet, SwinTransformer

    assert prefers_channels_last(ResNet(depth=50)) and not prefers_channels_last(SwinTransformer())
    run = tmp_path / "run"
    run_in_process("backbone=resnet26", "data.num_classes=4", f"data.root={imagenet_root}", "data.img_size=32",
                   "data.batch_size=8", "data.num_workers=0", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
                   "trainer.limit_val_batches=1", "task.mixup=null", "callbacks.progress_bar=null",
                   "callbacks.channels_last.enabled=true", f"hydra.run.dir={run}")
    weight = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"][
        "backbone.layer1.0.conv2.weight"]
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_progress_bar_reads_logged_values_at_intervals_only(monkeypatch):
    """Each read of a logged tensor is a host synchronisation on a GPU: the bar reads every 3 steps here, plus
    validation and epoch ends, not after each of the 8 batches of an epoch."""
    from pytorch_lightning.callbacks import RichProgressBar

    from vtrain.training.callbacks.display import ProgressBar

    reads = []
    original = RichProgressBar.get_metrics
    monkeypatch.setattr(RichProgressBar, "get_metrics", lambda self, trainer, module: reads.append(
        (trainer.global_step, trainer.training)) or original(self, trainer, module))

    class Logged(_NaNAt):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            self.log("train/loss", loss, prog_bar=True)
            return loss

    bar = ProgressBar(metrics_every=3, plain=False)  # the live bar, also where stdout is not a terminal
    trainer = pl.Trainer(max_steps=16, callbacks=[bar], logger=False, limit_val_batches=0,
                         enable_checkpointing=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Logged(bad_steps=[]))
    train_reads = [step for step, training in reads if training]
    assert trainer.global_step == 16 and len(train_reads) < 16 / 2
    assert all(b - a >= 3 or b == 8 or b == 16 for a, b in zip(train_reads, train_reads[1:])), train_reads


def test_a_second_run_in_the_same_run_directory_stops_with_one_line(imagenet_root, tmp_path):
    """The first run holds the directory; a second stops before writing anything there, naming the first; once
    the first is killed (SIGKILL: no clean-up), the directory is free again, and a new run (not a resume) there is
    one line instead of appending to the first run's log and writing checkpoints beside its own."""
    run = tmp_path / "run"
    args = [*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}"]
    first = start_forked(*args, "trainer.max_epochs=500")
    try:
        deadline = time.time() + 300
        while not (run / "metrics.json").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        config = (run / ".hydra" / "config.yaml").read_text()
        second = run_forked(*args, "trainer.max_epochs=1", "optim.lr=0.5")
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr[-2000:]
        assert lines[0].startswith(f"error: run directory {run} is in use by pid {first.pid} ")
        assert (run / ".hydra" / "config.yaml").read_text() == config  # the first run's config, untouched
    finally:
        first.kill()
        first.wait()
    log = (run / "metrics.csv").read_bytes()
    again = run_forked(*args, "trainer.max_epochs=1")
    lines = [line for line in again.stderr.splitlines() if line.strip()]
    assert again.returncode == 2 and len(lines) == 1, again.stderr[-2000:]
    assert lines[0] == (f"error: {run} holds a run already (metrics.json, checkpoints): resume it with "
                        "ckpt_path=auto, or start the new run in another directory (hydra.run.dir=... / output_dir=...)")
    assert (run / "metrics.csv").read_bytes() == log


def test_evaluation_with_no_checkpoint_is_one_line(imagenet_root, tmp_path):
    """python -m vtrain.eval ckpt_path=auto in a directory without a checkpoint evaluated random weights and exited
    0; it is one line (exit status 2 on the command line)."""
    with pytest.raises(ConfigError) as error:
        run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={tmp_path}", "ckpt_path=auto",
                       "mode=eval")
    assert str(error.value) == ("nothing to evaluate: give the weights as ckpt_path=<checkpoint file>, or "
                                f"ckpt_path=auto in a run directory that has a checkpoint ({tmp_path}/checkpoints has none)")
    assert not (tmp_path / "metrics.json").exists()


@pytest.mark.xdist_group("uninterrupted")  # one worker computes the fixture (make test: --dist loadgroup)
def test_resuming_past_max_epochs_is_one_line(imagenet_root, tmp_path, uninterrupted):
    """Lightning's MisconfigurationException (a traceback) for a checkpoint at a later epoch than max_epochs."""
    last = uninterrupted / "checkpoints" / "last.ckpt"
    with pytest.raises(ConfigError) as error:
        run_in_process(*RESUMABLE, f"data.root={imagenet_root}", f"hydra.run.dir={tmp_path}", f"ckpt_path={last}",
                       "trainer.max_epochs=1")
    assert str(error.value) == (f"ckpt_path={last} is at epoch 2, past trainer.max_epochs=1: give "
                                "trainer.max_epochs=3 or more to resume it")


def test_the_bar_shows_skipped_samples_only_once_some_were_skipped():
    """A counter of 0 is noise on every line of the bar; once a sample is skipped it shows, and its 0 stays in
    metrics.csv / metrics.json (logged either way)."""
    from vtrain.training.callbacks.display import ProgressBar

    counts = iter([0.0, 0.0, 2.0])

    class Counting(_NaNAt):
        def training_step(self, batch, batch_idx):
            self.log("train/skipped_samples", next(counts, 2.0), prog_bar=True, on_step=True, on_epoch=False)
            return super().training_step(batch, batch_idx)

    bar = ProgressBar(metrics_every=1)
    shown = []
    trainer = pl.Trainer(max_steps=3, callbacks=[bar], logger=False, limit_val_batches=0, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu")
    module = Counting(bad_steps=[])
    module.on_train_batch_end = lambda *args: shown.append(dict(bar.get_metrics(trainer, module)))
    trainer.fit(module)
    assert ["train/skipped_samples" in metrics for metrics in shown] == [False, False, True]


def test_clipping_by_norm_takes_the_nonfinite_checks_norm_and_trains_as_lightnings_own(imagenet_root, tmp_path):
    """The non-finite check hands its gradient norm to the clipping (one pass over the gradients): the same
    weights as Lightning's clipping without the check, and other weights than no clipping (it clipped)."""
    args = [*TINY_CLS, f"data.root={imagenet_root}", "trainer.max_epochs=-1", "trainer.max_steps=3",
            "trainer.limit_val_batches=0", "trainer.deterministic=true"]
    runs = {"shared": ["trainer.gradient_clip_val=0.05"],
            "lightning": ["trainer.gradient_clip_val=0.05", "callbacks.nonfinite_guard=null"],
            "unclipped": ["trainer.gradient_clip_val=null"]}
    for name, overrides in runs.items():
        run_in_process(*args, *overrides, f"hydra.run.dir={tmp_path / name}")
    weights = {name: _weights(tmp_path / name / "checkpoints" / "last.ckpt") for name in runs}
    for key, value in weights["shared"].items():
        torch.testing.assert_close(value, weights["lightning"][key], rtol=0, atol=0)
    assert any(not torch.equal(value, weights["unclipped"][key]) for key, value in weights["shared"].items())
