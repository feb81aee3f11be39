"""The Python API (docs/python.md): its example script runs, vtrain.cli.run works outside @hydra.main, a run ends
with its summary, and ``import vtrain`` stays light."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

import vtrain
from conftest import ROOT
from vtrain import ConfigError

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
