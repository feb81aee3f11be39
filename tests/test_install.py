"""``scripts/compile_imports.py``, which ``make install`` runs after ``pip install --no-compile``."""
from __future__ import annotations

import importlib.util
import runpy

import pytest

from conftest import ROOT

SCRIPT = runpy.run_path(str(ROOT / "scripts" / "compile_imports.py"))


@pytest.mark.parametrize("name", SCRIPT["FEATURES"])
def test_each_lazily_imported_module_it_compiles_is_installed(name):
    """A renamed or removed module would only be named among the install's output, and left to compile at every
    start under PYTHONDONTWRITEBYTECODE."""
    assert importlib.util.find_spec(name) is not None, name


def test_it_refuses_in_one_line_where_nothing_would_be_written(monkeypatch, capsys):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    assert SCRIPT["main"]() == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["compile_imports: PYTHONDONTWRITEBYTECODE is set, nothing would be written; run it with "
                     "PYTHONDONTWRITEBYTECODE= (empty)"]
