"""vtrain: compose a backbone, a task head and a Lightning trainer from Hydra configs.

The Python API (docs/python.md): :func:`compose`, :func:`build`, :func:`load`, :class:`Predictor`, ``vtrain.cli.run``.
They are imported on first use, so that ``import vtrain`` (and ``python -m vtrain``) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"


class ConfigError(ValueError):
    """Bad input found before training starts; the message is one line saying what and how to fix it."""


# name -> the module that defines it
_LAZY = {"compose": "vtrain.api", "build": "vtrain.api", "load": "vtrain.api", "Predictor": "vtrain.prediction"}
_SUBMODULES = {"api", "cli", "export", "prediction", "visualize", "checkpoint", "config", "module"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vtrain.{name}")
    raise AttributeError(f"module 'vtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBMODULES])
