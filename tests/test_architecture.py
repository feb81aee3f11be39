"""The layers of vtrain (docs/architecture.md) hold: import-linter's contracts of pyproject.toml over vtrain/ and tasks/
together, as they install (tasks/ as vtrain.tasks). A planted upward import, a planted circle and a task importing
another each break a contract."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def installed_layout(destination: Path) -> Path:
    """vtrain/ with tasks/ as vtrain/tasks/, as the package installs: the tree import-linter reads."""
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "vtrain", destination / "vtrain", ignore=ignore)
    shutil.copytree(ROOT / "tasks", destination / "vtrain" / "tasks", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")
    return destination


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    linter = Path(sys.executable).parent / "lint-imports"
    env = {**os.environ, "PYTHONPATH": str(tree)}  # the copy, not the installed package, is what it reads
    return subprocess.run([str(linter), "--no-cache", "pyproject.toml"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_layer_contracts_hold():
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        result = lint_imports(installed_layout(Path(directory)))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "Contracts: 3 kept, 0 broken." in result.stdout
    analysed = int(result.stdout.split("Analyzed ")[1].split(" files")[0])
    python_files = len(list((ROOT / "vtrain").rglob("*.py"))) + len(list((ROOT / "tasks").rglob("*.py")))
    assert analysed == python_files  # every module of vtrain/ and tasks/ was read


@pytest.mark.parametrize("planted, broken", [
    # the lowest layer reaching up to the commands: an upward import (and a circle, cli -> config -> cli)
    (("config/errors.py", "import vtrain.cli  # planted\n"), "vtrain's layers: each imports only those below it"),
    # two modules of one layer importing each other (training.module imports training.optim)
    (("training/optim.py", "from vtrain.training import module  # planted\n"), "no import circle, at any depth"),
    # one task importing another
    (("tasks/video/module.py", "import vtrain.tasks.classification.module  # planted\n"),
     "a task never imports another task"),
    # a function-level import dodges nothing: it is an import all the same
    (("data/samplers.py", "def planted():\n    from vtrain.training import trainer\n"),
     "vtrain's layers: each imports only those below it"),
])
def test_a_planted_import_breaks_its_contract(tmp_path, planted, broken):
    tree = installed_layout(tmp_path)
    file, line = planted
    with open(tree / "vtrain" / file, "a") as f:
        f.write("\n" + line)
    result = lint_imports(tree)
    assert result.returncode == 1
    assert f"{broken} BROKEN" in result.stdout, result.stdout[-3000:]  # an upward import closing a circle breaks two
