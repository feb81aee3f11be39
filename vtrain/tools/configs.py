"""The config tree as the tools use it: a config of ``conf/`` composed by name, and a tool's Hydra entry point
that ends a bad command line with one line."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vtrain import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """A config of ``conf/`` composed with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def run_or_exit(run: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
    """``run(cfg)``; a ``ConfigError`` prints its line on stderr and exits with status 2 (in a sweep it is
    raised, and Hydra reports the point)."""
    try:
        run(cfg)
    except ConfigError as e:
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
