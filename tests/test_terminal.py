"""What the terminal shows: the run's summary (wall time, throughput), plain output where stdout is not a terminal,
vtrain's own ``--help``, and a "did you mean" for a mistyped name."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from vtrain.config import ConfigError
from vtrain.training.callbacks.metrics_json import MetricsJSON
from vtrain.training.terminal import duration, summary_table


def test_summary_shows_wall_time_and_the_throughput_of_the_training_steps(tmp_path):
    record = {"monitor": "val/top1", "final": {"val/top1": 0.5, "val/top5": 0.75}, "best": {"val/top1": 0.625},
              "best_epoch": {"val/top1": 1}, "final_epoch": 2,
              "training": {"steps": 18, "seconds": 12.0, "samples": 18 * 32, "samples_per_second": 18 * 32 / 12.0,
                           "sample_name": "clips"}}
    rows = summary_table(record, tmp_path, wall_seconds=125.4).splitlines()
    assert rows[6:8] == ["  wall time      2 min 05 s",
                         "  throughput     48.0 clips/s  (576 clips in 18 training steps, 12.0 s; validation not counted)"]
    evaluated = summary_table({**record, "training": {}}, tmp_path, evaluated="x.ckpt", wall_seconds=3.04)
    assert "  wall time      3.0 s" in evaluated and "throughput" not in evaluated
    assert [duration(s) for s in (59.96, 60, 3599, 3600 * 2 + 7 * 60 + 59)] == ["60.0 s", "1 min 00 s", "59 min 59 s",
                                                                               "2 h 07 min"]


def test_metrics_json_times_the_training_steps_without_the_validations(tmp_path, monkeypatch):
    """Training from step 6 (a resumed run) to step 18 at 32 samples a step, 100 s after its start with 30 s of
    validation inside: 12 steps, 384 samples in 70 s."""
    clock = iter([1000.0, 1040.0, 1070.0, 1100.0])  # train start, validation start, its end, train end
    monkeypatch.setattr("vtrain.training.callbacks.metrics_json.time.monotonic", lambda: next(clock))
    metrics = MetricsJSON(str(tmp_path))
    trainer = SimpleNamespace(global_step=6, sanity_checking=False, callback_metrics={}, current_epoch=0,
                              state=SimpleNamespace(fn="fit"), checkpoint_callback=None, is_global_zero=True)
    module = SimpleNamespace(monitor="val/top1", training_steps=SimpleNamespace(batch_size=32), SAMPLES="images")
    metrics.on_train_start(trainer, module)
    metrics.on_validation_start(trainer, module)
    metrics.on_validation_end(trainer, module)
    trainer.global_step = 18
    metrics.on_train_end(trainer, module)
    assert metrics.payload["training"] == {"steps": 12, "seconds": 70.0, "samples": 384,
                                           "samples_per_second": pytest.approx(384 / 70), "sample_name": "images"}


@pytest.mark.parametrize("argv, line", [
    (["experiment=swin_t_imagnet"], "experiment=swin_t_imagnet: no experiment named swin_t_imagnet (did you mean "
                                    "experiment=swin_t_imagenet?); the choices are the files of conf/experiment/ "
                                    "(python -m vtrain --help lists them)"),
    (["-m", "trainer=cpu,ddpp"], "trainer=cpu,ddpp: no trainer named ddpp (did you mean trainer=ddp?); the choices are "
                                 "the files of conf/trainer/ (cpu, ddp, ddp_cpu, default, gpu)"),
    (["trainer.max_epoch=3"], "trainer.max_epoch=3: the config has no key trainer.max_epoch (did you mean "
                              "trainer.max_epochs? +trainer.max_epoch=... adds one)"),
    (["experiment=quickstart", "optm.lr=1", "--cfg", "job"], "optm.lr=1: the config has no key optm.lr (did you mean "
                                                             "optim.lr? +optm.lr=... adds one)"),
    (["task=segmentation", "data=ade20k", "task.head.chanels=8"],  # a key of the group the command line chose
     "task.head.chanels=8: the config has no key task.head.chanels (did you mean task.head.channels? "
     "+task.head.chanels=... adds one)"),
    (["experiment=quickstart", "task.mixup=null", "task.mixup.mixup_alpha=0.3"],
     "task.mixup.mixup_alpha=0.3: the config has no key task.mixup.mixup_alpha (task.mixup is null; "
     "+task.mixup.mixup_alpha=... adds one)"),
])
def test_a_mistyped_name_is_one_line_with_the_nearest_name(argv, line):
    from vtrain.config.names import check_command_line

    with pytest.raises(ConfigError) as error:
        check_command_line("train", argv)
    assert str(error.value) == line


def test_names_that_exist_pass_the_check():
    from vtrain.config.names import check_command_line

    for argv in (["-m", "experiment=quickstart", "optim.lr=1e-3,3e-3", "seed=0,1", "logger=[csv,wandb]"],
                 ["+extra.key=1", "~task.mixup", "hydra.run.dir=x", "task=segmentation", "task/head=fcn", "debug=null",
                  "--cfg", "job"],
                 ["-m", "hparams_search=quickstart_optuna", "backbone=glob(swin_*)", "data.root=x"]):
        check_command_line("train", argv)  # no error


def test_choices_of_config_folders_on_the_search_path_pass_the_check(tmp_path):
    """A config folder added with hydra.searchpath (a detector family from its folder alone) is read for choices
    too; a pkg:// entry, which the check cannot list, leaves the choices to Hydra."""
    from vtrain.config.names import check_command_line

    (tmp_path / "task" / "detector").mkdir(parents=True)
    (tmp_path / "task" / "detector" / "toy.yaml").write_text("_target_: x\n")
    check_command_line("train", [f"hydra.searchpath=[file://{tmp_path}]", "task=detection", "task/detector=toy"])
    with pytest.raises(ConfigError, match="no task/detector named toyy .did you mean task/detector=toy"):
        check_command_line("train", [f"hydra.searchpath=[file://{tmp_path}]", "task=detection", "task/detector=toyy"])
    check_command_line("train", ["hydra.searchpath=[pkg://elsewhere.conf]", "task=detection", "task/detector=toy"])


@pytest.mark.parametrize("module", ["vtrain", "vtrain.eval"])
def test_the_commands_check_their_names_before_hydra(module, monkeypatch, capsys):
    import runpy
    import sys

    monkeypatch.setattr(sys, "argv", [module, "ckpt_path=x.ckpt", "optim.lrr=1"])
    with pytest.raises(SystemExit) as ended:
        runpy.run_module(module, run_name="__main__")
    assert ended.value.code == 2
    assert capsys.readouterr().err == ("error: optim.lrr=1: the config has no key optim.lrr (did you mean optim.lr? "
                                       "+optim.lrr=... adds one)\n")


def test_help_starts_with_vtrains_usage_and_experiments_without_importing_torch():
    """``python -m vtrain --help``: vtrain's commands, the experiments of conf/experiment/ and where the docs are,
    then Hydra's groups; answered before the training stack (torch) is imported."""
    import subprocess
    import sys

    from conftest import CONF

    code = ("import runpy, sys\nsys.argv = ['vtrain', '--help']\ntry:\n    runpy.run_module('vtrain', run_name='__main__')\n"
            "except SystemExit:\n    pass\nprint('torch imported:', 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("vtrain: ") and lines[-1] == "torch imported: False", result.stderr[-2000:]
    usage = result.stdout[:result.stdout.index("== Configuration groups ==")]
    for command in ("python -m vtrain experiment=NAME", "python -m vtrain.eval", "python -m vtrain.predict",
                    "python -m vtrain.export", "python -m vtrain.tools.table", "python -m vtrain.tools.bench", "docs/"):
        assert command in usage, command
    experiments = usage[usage.index("Experiments"):usage.index("Docs:")]
    listed = experiments[experiments.index("):") + 2:].replace(",", " ").split()
    assert listed == sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_the_progress_bar_is_plain_lines_where_stdout_is_not_a_terminal(capsys):
    """Into a file or a pipe (pytest's capture here) the bar is a line per epoch with the epoch's values, no escape
    codes; a count of skipped samples that is 0 is not shown."""
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from vtrain.training.callbacks.display import ProgressBar

    class Fitted(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.tensor(1.0))

        def training_step(self, batch, batch_idx):
            loss = (self.weight * batch).pow(2).mean()
            self.log("train/loss", loss, prog_bar=True)
            self.log("train/skipped_samples", 0.0, prog_bar=True)
            return loss

        def validation_step(self, batch, batch_idx):
            self.log("val/value", self.weight.detach(), prog_bar=True)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.25)  # loss w^2, w -= 0.25 * 2w: w 1 -> 0.5 -> 0.25

    ones = DataLoader(torch.ones(2, 1), batch_size=2)
    trainer = pl.Trainer(max_epochs=2, callbacks=[ProgressBar()], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
                         log_every_n_steps=1)
    trainer.fit(Fitted(), ones, ones)
    out = capsys.readouterr().out
    assert "\x1b[" not in out and "skipped" not in out
    lines = [line for line in out.splitlines() if line.startswith("epoch")]
    assert lines == ["epoch 0/1  step 1  train/loss 1  val/value 0.5",  # the loss before the step, w after it
                     "epoch 1/1  step 2  train/loss 0.25  val/value 0.25"]


def test_the_bar_shows_each_steps_loss_which_is_logged_only_where_read(imagenet_root):
    """``train/loss_step`` costs no ``self.log`` call at a step nothing reads (0.5-1 ms of Lightning's Python on a
    CPU); the bar still shows every step's own loss, and the end of training has the last one."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    from conftest import TINY_CLS, compose
    from vtrain.training.build import build_task
    from vtrain.training.callbacks.display import ProgressBar

    cfg = compose(*TINY_CLS, f"data.root={imagenet_root}")
    datamodule = instantiate(cfg.data)
    module = build_task(cfg)
    module.use_dataset(datamodule.info())
    bar, seen = ProgressBar(plain=True), []

    class Reader(pl.Callback):  # after the bar, before the module's own on_train_batch_end
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((bar.get_metrics(trainer, pl_module).get("train/loss_step"), float(outputs["loss"]),
                         "train/loss_step" in trainer.callback_metrics))

    trainer = pl.Trainer(max_steps=4, callbacks=[bar, Reader()], logger=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0, log_every_n_steps=50)
    trainer.fit(module, datamodule=datamodule)
    assert len(seen) == 4 and len({loss for _, loss, _ in seen}) == 4
    assert [shown for shown, _, _ in seen] == pytest.approx([loss for _, loss, _ in seen], rel=1e-6)
    assert not any(logged for _, _, logged in seen)  # nothing logged it before the end of training
    assert float(trainer.callback_metrics["train/loss_step"]) == pytest.approx(seen[-1][1], rel=1e-6)
