"""The config tree: where it is, a config of ``conf/`` composed by name, and the one way a Hydra entry point
(training, evaluation, the tools) ends on bad input: one line on stderr, exit status 2."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vtrain import ConfigError

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "conf")


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """A config of ``conf/`` composed with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def fail(error: ConfigError) -> None:
    """One line on stderr and exit 2; in a sweep, raise, so that the other points still run and the sweep's
    summary reports this one."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def run_or_exit(run: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
    """``run(cfg)``, a ``ConfigError`` ending it through :func:`fail`."""
    try:
        run(cfg)
    except ConfigError as e:
        fail(e)
