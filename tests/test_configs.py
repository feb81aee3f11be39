"""Every experiment composes and instantiates (model, data module, trainer) without running; a bad value is one
line before anything starts."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from conftest import CONF, ROOT, TINY_CLS, compose, run_forked, run_in_process
from vtrain.config import ConfigError
from vtrain.training.build import build_task
from vtrain.config.validate import check_pretrained, check_values, validate

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
CORES = os.cpu_count() or 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_instantiates_and_passes_the_value_checks(experiment, tmp_path):
    """Each experiment, composed once as the command line composes it: its data module, task (every constructor, on
    the meta device) and trainer (on this machine's CPU) are built; its values pass the checks, and the reference
    checkpoint it starts from does once it is in the weights directory (a missing one is a one-line error:
    tests/test_recipes.py)."""
    cfg = compose(f"experiment={experiment}")
    cfg.output_dir = str(tmp_path)  # as hydra.run.dir=... would
    datamodule = instantiate(cfg.data)
    assert hasattr(datamodule, "check") and datamodule.batch_size > 0
    with torch.device("meta"):  # every constructor runs; no weights are initialised (the sizes: test_backbones)
        module = build_task(cfg)
    assert sum(p.numel() for p in module.parameters()) > 0
    assert module.monitor == cfg.task.monitor
    # the recipe's trainer on one CPU process, as trainer=cpu runs it (the recipes name GPUs and DDP)
    trainer = instantiate(cfg.trainer, accelerator="cpu", devices=1, num_nodes=1, strategy="auto", logger=False,
                          enable_checkpointing=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs

    cfg.paths.weights_dir = str(tmp_path)  # as paths.weights_dir=... would: the recipe's pretrained interpolates it
    check_values(cfg)
    if cfg.task.get("linear_probe"):  # a linear evaluation is given its pre-training run's checkpoint
        cfg.pretrained = str(tmp_path / "pretraining_last.ckpt")
    if cfg.pretrained:  # where the recipe puts it under the weights directory (a release's folder, e.g. imagenet21k/)
        start = tmp_path / Path(cfg.pretrained).relative_to(tmp_path)
        start.parent.mkdir(parents=True, exist_ok=True)
        start.write_bytes(b"")
    check_pretrained(cfg)


def test_swin_t_imagenet_is_the_paper_recipe():
    cfg = compose("experiment=swin_t_imagenet")
    assert cfg.backbone._target_.endswith("SwinTransformer") and cfg.backbone.drop_path_rate == 0.2
    assert (cfg.optim.lr, cfg.optim.base_batch_size, cfg.optim.weight_decay) == (5e-4, 512, 0.05)
    assert tuple(cfg.optim.betas) == (0.9, 0.999) and cfg.optim.eps == 1e-8
    assert (cfg.sched._target_, cfg.sched.warmup_epochs, cfg.sched.warmup_lr, cfg.sched.min_lr) == ("vtrain.training.optim.cosine", 20, 5e-7, 5e-6)
    assert cfg.trainer.max_epochs == 300 and cfg.trainer.gradient_clip_val == 5.0
    assert cfg.data.augment.auto_augment == "rand-m9-mstd0.5-inc1" and cfg.data.augment.re_prob == 0.25
    assert cfg.data.augment.re_mode == "pixel" and cfg.data.augment.interpolation == "bicubic"
    assert (cfg.task.mixup.mixup_alpha, cfg.task.mixup.cutmix_alpha, cfg.task.mixup.switch_prob) == (0.8, 1.0, 0.5)
    assert cfg.task.label_smoothing == 0.1 and cfg.data.eval_crop_pct == 0.875
    assert [compose(f"experiment=swin_{v}_imagenet").backbone.drop_path_rate for v in "sb"] == [0.3, 0.5]


def test_command_line_overrides_any_key():
    cfg = compose("experiment=swin_t_imagenet", "backbone=resnet50", "optim.lr=2e-3", "trainer.devices=8")
    assert cfg.backbone._target_.endswith("ResNet") and cfg.optim.lr == 2e-3 and cfg.trainer.devices == 8


def test_cfg_job_prints_the_composed_config():
    result = run_forked("experiment=swin_t_imagenet", "--cfg", "job")
    assert result.returncode == 0, result.stderr
    assert "rand-m9-mstd0.5-inc1" in result.stdout and "drop_path_rate: 0.2" in result.stdout


def test_config_error_raised_in_a_constructor_is_one_line(tmp_path):
    """Hydra wraps exceptions from constructors; the CLI still prints our one line and exits 2."""
    from vtrain.tasks.segmentation.synthetic import write

    write(tmp_path / "ade", seed=0, train=2, val=1)
    result = run_forked("task=segmentation", "data=ade20k", "task.head=fcn", f"hydra.run.dir={tmp_path / 'run'}",
                     f"data.root={tmp_path / 'ade'}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: ") and "a decode head is a config, not 'fcn': pick one with task/head=" in lines[0]


# (override, what the message says is wrong). END_TO_END runs the CLI, on data it would otherwise train on; the
# others call validate() on the config the CLI would compose (the same override parser: optim.lr=abc is 'abc'), which
# raises before it would look at the data module.
BAD_VALUES = [
    ("optim.lr=abc", "optim.lr='abc' is not a number > 0"),
    ("optim.lr=-1", "optim.lr=-1 is not a number > 0"),
    ("optim.lr=nan", "optim.lr=nan is not a number > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay=-0.1 is not a number >= 0"),
    ("optim.weight_decay=true", "optim.weight_decay=True is not a number >= 0"),
    ("data.batch_size=0", "data.batch_size=0 is not a whole number > 0"),
    ("data.batch_size=2.5", "data.batch_size=2.5 is not a whole number > 0"),
    ("+data.val_batch_size=0", "data.val_batch_size=0 is not a whole number > 0"),
    ("data.num_workers=-1", "data.num_workers=-1 is not a whole number >= 0"),
    ("data.max_skipped_fraction=5", "data.max_skipped_fraction=5 is not a fraction from 0 to 1"),
    ("trainer.max_epochs=-2", "trainer.max_epochs=-2 is not a whole number >= 0, or -1 for no limit"),
    ("trainer.max_steps=null", "trainer.max_steps=null is not a whole number >= 0, or -1 for no limit"),
    ("trainer.precision=fp16", "trainer.precision='fp16' is not a precision Lightning knows"),
    ("trainer.devices=0", "trainer.devices=0 is not a number of processes on the CPU"),
    (f"trainer.devices={CORES + 1}",
     f"trainer.devices={CORES + 1} would start {CORES + 1} processes on the CPU but this machine has {CORES} core(s)"),
]
END_TO_END = f"trainer.devices={CORES + 1}"


@pytest.mark.parametrize("override, message", BAD_VALUES, ids=[o for o, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_before_anything_starts(override, message, request, tmp_path):
    key = override.lstrip("+").split("=")[0]
    if override == END_TO_END:
        run = tmp_path / "run"
        imagenet_root = request.getfixturevalue("imagenet_root")
        result = run_forked(*TINY_CLS, f"data.root={imagenet_root}", f"hydra.run.dir={run}", override)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
        error = lines[0]
        assert error.startswith(f"error: {key}=")
        assert not (run / "checkpoints").exists() and not (run / "metrics.json").exists()
    else:
        with pytest.raises(ConfigError) as raised:
            validate(compose(*TINY_CLS, override), datamodule=None)
        error = str(raised.value)
        assert error.startswith(f"{key}=") and "\n" not in error
    assert message in error and ": use " in error  # what is wrong, then how to fix it


@pytest.mark.parametrize("override", [
    "trainer.max_epochs=-1", "trainer.max_epochs=null", "trainer.max_steps=0", "trainer.precision=16",
    "trainer.precision=bf16", "optim.lr=1", "optim.weight_decay=0", "+data.val_batch_size=null",
    "trainer.devices=auto", f"trainer.devices={CORES}",
])
def test_valid_edge_values_pass(override):
    validate(compose(*TINY_CLS, override), datamodule=None)


def test_a_value_the_data_module_computes_with_is_checked_before_it_is_built(imagenet_root, tmp_path):
    with pytest.raises(ConfigError) as raised:
        run_in_process(*TINY_CLS, f"data.root={imagenet_root}", "data.num_workers=abc", f"hydra.run.dir={tmp_path}")
    assert str(raised.value).startswith("data.num_workers='abc' is not a whole number >= 0")


def test_every_package_installs_under_vtrain(monkeypatch):
    """setup.py's discovery finds every package of vtrain/ and of tasks/ (as vtrain.tasks): a new folder is installed
    without being listed anywhere."""
    import runpy

    import vtrain.tasks

    monkeypatch.chdir(ROOT)  # setuptools finds packages from the project's root, as pip runs setup.py
    packages = set(runpy.run_path(str(ROOT / "setup.py"), run_name="setup")["PACKAGES"])
    expected = {".".join(("vtrain", *p.parent.relative_to(ROOT / "vtrain").parts)) for p in (ROOT / "vtrain").rglob("__init__.py")}
    expected |= {".".join(("vtrain.tasks", *p.parent.relative_to(ROOT / "tasks").parts))
                 for p in (ROOT / "tasks").rglob("__init__.py")}
    assert packages == expected and "vtrain.training.callbacks" in packages and "vtrain.tasks.video.models" in packages
    assert Path(vtrain.tasks.__file__).parent == ROOT / "tasks"


def test_keys_an_experiment_set_for_another_choice_are_named_in_one_line(imagenet_root, tmp_path):
    """experiment=quickstart backbone=resnet26 keeps the quickstart's Swin keys: one line naming each, not Hydra's
    traceback."""
    result = run_forked("experiment=quickstart", "backbone=resnet26", f"data.root={imagenet_root}", "data.num_classes=4",
                     f"hydra.run.dir={tmp_path}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("error: backbone: ResNet.__init__() got an unexpected keyword argument 'img_size'")
    assert lines[0].endswith("drop them with ~backbone.img_size ~backbone.embed_dim ~backbone.depths "
                             "~backbone.num_heads ~backbone.window_size")
