"""End to end through ``python -m vtrain``: fit, evaluate, resume, DDP on CPU, sweeps, loggers."""
from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import ROOT, TINY_CLS, compose, run_cli, run_forked, run_in_process
from vtrain.training.build import build_task


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _lr_by_step(run_dir: Path) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as f:
        return {int(r["step"]): float(r["lr-AdamW/pg1"]) for r in csv.DictReader(f) if r.get("lr-AdamW/pg1")}


# session scope: pytest-xdist interleaves modules on a worker, and a module fixture is made again after each switch
@pytest.fixture(scope="session")
def fitted(imagenet_root, tmp_path_factory) -> Path:
    """3 epochs of 6 steps, a checkpoint after every epoch."""
    run = tmp_path_factory.mktemp("fit") / "run"
    result = run_cli(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "trainer.max_epochs=3",
                     "sched.warmup_epochs=1", "callbacks.model_checkpoint.save_top_k=-1", "trainer.log_every_n_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    (run.parent / "terminal.txt").write_text(result.stdout + result.stderr)
    return run


@pytest.mark.xdist_group("tiny_fit")  # one worker computes the fixture once (make test: --dist loadgroup)
def test_fit_ends_with_a_summary_and_without_third_party_noise(fitted):
    terminal = (fitted.parent / "terminal.txt").read_text()
    metrics = _metrics(fitted)
    summary = terminal[terminal.index("── training summary"):].splitlines()
    best_epoch = metrics["best_epoch"]["val/top1"]
    final = metrics["final"]
    assert summary[1:6] == [
        f"  run directory    {fitted}",
        "  monitored        val/top1 (higher is better)",
        f"  final            {final['val/top1']:.4f}  (epoch 2, counted from 0)",
        f"  best             {metrics['best']['val/top1']:.4f}  (epoch {best_epoch})",
        f"  also             val/loss {final['val/loss']:.4f}  val/top5 {final['val/top5']:.4f}",
    ]
    assert re.fullmatch(r"  wall time        \d+\.\d s", summary[6]), summary[6]
    # 3 epochs of 6 steps of 8 images
    assert re.fullmatch(r"  throughput       \d+\.\d images/s  \(144 images in 18 training steps, \d+\.\d s; "
                        r"validation not counted\)", summary[7]), summary[7]
    assert summary[8] == \
        f"  best checkpoint  {fitted / 'checkpoints' / f'epoch{best_epoch:03d}-step{6 * (best_epoch + 1):07d}.ckpt'}"
    for noise in ("litlogger", "set_vital", "LeafSpec", "FLOPs", "exists and is not empty"):
        assert noise not in terminal, noise


@pytest.mark.xdist_group("tiny_fit")
def test_fit_writes_metrics_checkpoints_and_logs(fitted):
    metrics = _metrics(fitted)
    assert (metrics["epoch"], metrics["global_step"], metrics["monitor"]) == (3, 18, "val/top1")
    for key in ("val/top1", "val/top5", "val/loss"):
        assert 0 <= metrics["final"][key] and key in metrics["best"]
    assert metrics["best"]["val/top1"] >= metrics["final"]["val/top1"]
    assert metrics["final"]["val/top5"] == 1.0  # 4 classes: the true one is always in the top 5
    names = sorted(p.name for p in (fitted / "checkpoints").iterdir())
    assert names == ["epoch000-step0000006.ckpt", "epoch001-step0000012.ckpt", "epoch002-step0000018.ckpt", "last.ckpt"]
    assert (fitted / ".hydra" / "config.yaml").is_file() and (fitted / "metrics.csv").is_file()


@pytest.mark.xdist_group("tiny_fit")
def test_eval_of_a_checkpoint_reproduces_the_validation(fitted, imagenet_root, tmp_path):
    run = tmp_path / "eval"
    ckpt = fitted / "checkpoints" / "epoch002-step0000018.ckpt"
    result = run_forked(*TINY_CLS, f"data.root={imagenet_root}", f"ckpt_path={ckpt}", f"hydra.run.dir={run}",
                     module="vtrain.eval")
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated, trained = _metrics(run), _metrics(fitted)
    assert evaluated["stage"] == "validate"
    assert evaluated["final"]["val/top1"] == pytest.approx(trained["final"]["val/top1"])
    assert evaluated["final"]["val/loss"] == pytest.approx(trained["final"]["val/loss"], rel=1e-5)


@pytest.mark.xdist_group("tiny_fit")
def test_resume_continues_at_the_right_step_with_the_same_schedule(fitted, imagenet_root, tmp_path):
    run = tmp_path / "resumed"
    run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "trainer.max_epochs=3",
                   "sched.warmup_epochs=1", "trainer.log_every_n_steps=1",
                   f"ckpt_path={fitted / 'checkpoints' / 'epoch000-step0000006.ckpt'}")
    metrics = _metrics(run)
    assert (metrics["epoch"], metrics["global_step"]) == (3, 18)
    resumed, uninterrupted = _lr_by_step(run), _lr_by_step(fitted)
    assert min(resumed) == 6 and max(resumed) == 17  # no step of the first epoch was run again
    assert resumed == pytest.approx({s: uninterrupted[s] for s in resumed}, rel=1e-9)
    assert len(set(uninterrupted.values())) > 10  # the schedule really moves (warm-up, then cosine)


def test_ddp_on_cpu_writes_one_run_directory(imagenet_root, tmp_path):
    result = run_forked(*TINY_CLS, f"data.root={imagenet_root}", "hydra.run.dir=run", "trainer=ddp_cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no stray per-rank directories
    metrics = _metrics(tmp_path / "run")
    assert metrics["global_step"] == 3  # 48 images / (8 per device x 2 devices)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


def test_multirun_runs_each_point_once(imagenet_root, tmp_path):
    """Under DDP too (a sweep's points each start their processes); the single-process sweep is
    test_sweeps.py's."""
    result = run_forked("-m", *TINY_CLS, f"data.root={imagenet_root}", "trainer=ddp_cpu", "optim.lr=1e-3,3e-3",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    points = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert points == ["0", "1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    lrs = []
    for point in points:
        assert _metrics(tmp_path / "sweep" / point)["global_step"] > 0
        lrs.append((tmp_path / "sweep" / point / ".hydra" / "overrides.yaml").read_text())
    assert "optim.lr=0.001" in lrs[0] and "optim.lr=0.003" in lrs[1]
    assert result.stdout.count("`Trainer.fit` stopped") + result.stderr.count("`Trainer.fit` stopped") == 2


def test_wandb_logger_works_offline_quietly_logs_the_config_and_never_the_key(imagenet_root, tmp_path):
    """Offline, wandb says nothing (its banner and sync hint came with colour codes even into a pipe, and a warning
    about a setting no one set)."""
    run, key = tmp_path / "run", "0123456789abcdef0123456789abcdef01234567"
    result = run_cli(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "logger=wandb",
                     env={"WANDB_API_KEY": key, "WANDB_SILENT": None})
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    assert "\x1b[" not in terminal and "wandb sync" not in terminal and "── training summary" in terminal
    assert "wandb:" not in terminal, terminal  # Lightning's anonymous=None made wandb warn at every start
    records = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(records) == 1
    assert b"base_batch_size" in records[0].read_bytes()  # the composed config is logged
    for path in run.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_debug_configs_run(imagenet_root, tmp_path):
    """``debug=fast``: one batch each way, nothing written; ``debug=overfit``: a few fixed batches, the training
    loss falls (Lightning swaps in its own sampler: the seeded dataset takes its plain indices)."""
    run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={tmp_path / 'fast'}", "debug=fast")
    assert not (tmp_path / "fast" / "checkpoints").exists()
    run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={tmp_path / 'overfit'}", "debug=overfit",
                   "trainer.overfit_batches=2", "trainer.max_epochs=8", "task.mixup=null",
                   "data.augment.auto_augment=null", "data.augment.re_prob=0", "trainer.log_every_n_steps=1")
    with open(tmp_path / "overfit" / "metrics.csv") as f:
        losses = [float(r["train/loss_epoch"]) for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert len(losses) == 8 and losses[-1] < 0.5 * losses[0], losses


def test_compile_traces_the_backbone_and_keeps_checkpoint_keys(imagenet_root, tmp_path, caplog):
    """``compile=...`` compiles the backbone in place (here the aot_eager backend: dynamo and AOT autograd without
    inductor's C++ build, which takes a minute on a CPU): graphs are captured, outputs and gradients are the
    eager ones, and checkpoints keep the plain parameter names."""
    import torch
    from torch._dynamo.utils import counters

    from conftest import compose

    cfg = compose(*TINY_CLS, f"data.root={imagenet_root}", f"output_dir={tmp_path}")
    torch.manual_seed(0)
    eager = build_task(cfg)
    compiled = build_task(cfg)
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_backbone(backend="aot_eager")
    counters.clear()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(compiled(x), eager(x))
    compiled(x).sum().backward(), eager(x).sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1
    torch.testing.assert_close(compiled.backbone.patch_embed.proj.weight.grad, eager.backbone.patch_embed.proj.weight.grad)
    assert list(compiled.state_dict()) == list(eager.state_dict())

    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="vtrain")
    run_in_process(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", "compile={backend:aot_eager}",
                   "trainer.limit_train_batches=2", "trainer.limit_val_batches=1")
    assert "torch.compile({'backend': 'aot_eager'}) of the backbone's forward, forward_pooled" in caplog.text
    keys = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert "backbone.patch_embed.proj.weight" in keys and not any("_orig_mod" in k for k in keys)


def test_evaluation_of_a_gpu_recipe_runs_on_the_cpu_when_there_is_no_gpu(monkeypatch):
    """python -m vtrain.eval experiment=<a recipe with trainer=ddp> failed on a CPU-only machine; it evaluates on the
    CPU unless the command line chose a trainer."""
    import torch

    from vtrain.cli import evaluate_on_available_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose("experiment=swin_t_imagenet")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.strategy == "ddp"
    evaluate_on_available_device(cfg, ["experiment=swin_t_imagenet", "ckpt_path=x.pth"])
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.devices == 1 and cfg.trainer.get("strategy") != "ddp"
    chosen = compose("experiment=swin_t_imagenet", "trainer=gpu")
    evaluate_on_available_device(chosen, ["experiment=swin_t_imagenet", "trainer=gpu"])
    assert chosen.trainer.accelerator == "gpu"  # asked for: validate() then says no CUDA device is visible


def test_what_a_stored_config_says_about_its_model_is_read_from_it():
    """``eval ckpt_path=FILE`` takes the model's keys from the checkpoint's config: task, data and the groups the
    task's config holds (found in the stored config, not named in the code)."""
    from vtrain.cli import model_keys
    from vtrain.config.compose import plain_config

    def keys(experiment):
        return model_keys(OmegaConf.create(plain_config(compose(f"experiment={experiment}"))))

    assert keys("quickstart") == ["task", "data", "backbone"]
    assert keys("quickstart_video") == ["task", "data", "video_backbone"]


def test_every_synthetic_layout_an_experiment_names_has_a_writer():
    """scripts/make_synthetic.py finds each task's writers by their kind; every experiment's ``synthetic`` is one."""
    import runpy

    writers = runpy.run_path(str(ROOT / "scripts" / "make_synthetic.py"))["WRITERS"]
    assert sorted(writers) == ["ade20k", "cityscapes", "coco", "imagenet", "kinetics", "pascal_context", "ssv2"]
    named = {compose(f"experiment={p.stem}").get("synthetic") for p in (ROOT / "conf" / "experiment").glob("quick*.yaml")}
    assert named - {None} <= set(writers) and len(named - {None}) >= 3
