"""The Python API (docs/python.md): its example script runs, vtrain.cli.run works outside @hydra.main, a run ends
with its summary, and ``import vtrain`` stays light."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
import subprocess
import sys

import pytest

import vtrain
from conftest import ROOT
from vtrain.config import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_python_api_example_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("python_api", ROOT / "scripts" / "python_api.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    records = example.main(str(tmp_path), steps=2, image_size=32, export=False)
    printed = capsys.readouterr().out
    run_dir = tmp_path / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["global_step"] == 2 and (run_dir / ".hydra" / "config.yaml").is_file()  # outside Hydra's app
    names = (tmp_path / "data" / "classes.txt").read_text().split()[1::2]
    assert f"classes: {', '.join(names)}" in printed
    assert len(records) == 4 and all(len(r["top_k"]) == 2 and r["top_k"][0]["name"] in names for r in records)
    assert f"  run directory    {run_dir}" in printed  # the run's summary


def test_run_outside_hydra_raises_what_the_command_line_prints(tmp_path):
    cfg = vtrain.compose("quickstart", [f"data.root={tmp_path / 'nowhere'}", f"output_dir={tmp_path / 'run'}"])
    from vtrain.cli import run

    with pytest.raises(ConfigError, match="no train/ folder.*write it with python scripts/make_synthetic.py imagenet --out"):
        run(cfg)


def test_import_vtrain_does_not_import_torch():
    code = "import sys, vtrain; print('torch' in sys.modules, 'compose' in dir(vtrain))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]  # the API's names are there, imported on first use


def test_metrics_json_names_an_existing_best_checkpoint_at_every_moment(imagenet_root, tmp_path, monkeypatch):
    """With save_top_k=1 each new best replaces the previous file: metrics.json names the new one before the old
    one is deleted."""
    import vtrain.training.callbacks.model_checkpoint
    from vtrain.cli import run

    named_after_removal = []
    remove = vtrain.training.callbacks.model_checkpoint.ModelCheckpoint._remove_checkpoint

    def checked_remove(self, trainer, filepath):
        remove(self, trainer, filepath)
        named = json.loads((tmp_path / "run" / "metrics.json").read_text())["best_checkpoint"]
        named_after_removal.append((Path(named).name, Path(named).is_file()))

    monkeypatch.setattr(vtrain.training.callbacks.model_checkpoint.ModelCheckpoint, "_remove_checkpoint", checked_remove)
    cfg = vtrain.compose("quickstart", [f"data.root={imagenet_root}", "backbone.img_size=32", "data.num_classes=4",
                                        "data.num_workers=0", "data.batch_size=8", "trainer.max_epochs=3",
                                        "trainer.limit_train_batches=2", "callbacks.progress_bar=null",
                                        # a new best at every validation: the latest step
                                        "callbacks.model_checkpoint.monitor=step", "callbacks.model_checkpoint.mode=max",
                                        "+trainer.enable_progress_bar=false", f"output_dir={tmp_path / 'run'}"])
    run(cfg)
    # epochs 1 and 2 replaced the best of the epoch before; right after each removal the file named is there
    assert named_after_removal == [("epoch001-step0000004.ckpt", True), ("epoch002-step0000006.ckpt", True)]
