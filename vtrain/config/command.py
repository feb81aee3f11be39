"""The one way a command ends on bad input (one line on stderr, exit status 2), the check of a Hydra command line's
names, and the ``key=value`` commands (predict, export)."""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from vtrain.config import ConfigError
from vtrain.config.names import check_command_line, nearest


def fail(error: ConfigError) -> None:
    """One line on stderr and exit 2; in a sweep, raise, so that the other points still run and the sweep's
    summary reports this one."""
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        raise error
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def check_hydra_command_line(config_name: str, argv: list[str] | None = None) -> None:
    """Before a Hydra app (``python -m vtrain``, ``vtrain.eval``) composes its config: a mistyped experiment, group
    choice or key ends it through :func:`fail`, with the nearest name (:func:`vtrain.config.names.check_command_line`)."""
    try:
        check_command_line(config_name, argv)
    except ConfigError as e:
        fail(e)


def key_value_command(doc: str, options: set[str], run: Callable[[dict[str, str], list[str]], Any],
                      argv: list[str] | None = None) -> None:
    """A ``python -m vtrain.<tool> key=value ...`` command (predict, export): ``doc`` on ``--help`` or no argument;
    the arguments named in ``options`` go to ``run`` as its options, the others as overrides of the model's config;
    bad input ends it through :func:`fail`."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(doc)
        return
    try:
        run(*split_key_values(argv, options))
    except ConfigError as e:
        fail(e)


def split_key_values(argv: list[str], options: set[str]) -> tuple[dict[str, str], list[str]]:
    """``key=value`` arguments: the command's ``options``, and the overrides of the model's config."""
    known, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"{arg!r} is not key=value: see --help")
        if key in options:
            known[key] = value
        elif "." not in key and not key.startswith(("+", "~")):  # an option's name, mistyped: not ignored
            near = nearest(key, options)
            raise ConfigError(f"{key}={value}: no such option{f' (did you mean {near}?)' if near else ''}; the "
                              f"options are {', '.join(sorted(options))}, and a change to the model's config is "
                              "<group>.<key>=value")
        else:
            overrides.append(arg)
    return known, overrides


def run_or_exit(run: Callable[[DictConfig], Any], cfg: DictConfig) -> None:
    """``run(cfg)``, a ``ConfigError`` ending it through :func:`fail`."""
    try:
        run(cfg)
    except ConfigError as e:
        fail(e)
