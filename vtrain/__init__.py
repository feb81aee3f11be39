"""vtrain: compose a backbone, a task head and a Lightning trainer from Hydra configs.

The Python API (docs/python.md): :func:`compose`, :func:`build`, :func:`load`, :class:`Predictor`, ``vtrain.cli.run``.
They are imported on first use, so that ``import vtrain`` (and ``python -m vtrain``) stays fast.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"
__all__ = ["ConfigError", "__version__", "compose", "build", "load", "Predictor"]

from vtrain.config.errors import ConfigError  # noqa: E402 - the error every layer raises, re-exported for users

# name -> the module that defines it
_LAZY = {"compose": "vtrain.config.compose", "build": "vtrain.training.build", "load": "vtrain.training.build",
         "Predictor": "vtrain.inference.predictor"}
_SUBMODULES = {"cli", "config", "data", "training", "inference", "backbones", "layers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"vtrain.{name}")
    raise AttributeError(f"module 'vtrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBMODULES])
