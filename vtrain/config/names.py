"""The names a command line gives, checked before Hydra composes the config: a mistyped choice of a config group
(``experiment=swin_t_imagnet``) or a config key (``trainer.max_epoch=3``) is one line with the nearest existing
name, instead of Hydra's message and its list of search paths."""
from __future__ import annotations

import difflib
import sys
import textwrap
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vtrain.config.compose import CONFIG_DIR, compose_config
from vtrain.config.errors import ConfigError

MAX_LISTED = 12  # a group with more choices (the experiments, the backbones) is listed by --help, not in the line


def experiments_listed(width: int = 110) -> str:
    """The experiments (the files of ``conf/experiment/``), wrapped and indented: what ``--help`` lists
    (``${vtrain.experiments:}`` in ``conf/hydra/help/vtrain.yaml``)."""
    return textwrap.fill(", ".join(group_options("experiment") or []), width, initial_indent="  ",
                         subsequent_indent="  ")


OmegaConf.register_new_resolver("vtrain.experiments", experiments_listed, replace=True)


def nearest(name: str, names: Iterable[str]) -> str | None:
    """The existing name closest to a mistyped one (difflib's ratio of at least 0.6), if any."""
    near = difflib.get_close_matches(name, sorted(names), n=1)
    return near[0] if near else None


def unknown_key(cfg: DictConfig, key: str, value: str, config: str = "the config") -> ConfigError | None:
    """The line for ``key=value`` where ``cfg`` has no ``key`` (with the nearest key at the level where it departs
    from ``cfg``, or the null on the way), or None: ``cfg`` has it, or a level on the way is a list, an interpolation
    or a mandatory value (not for this check to say)."""
    node, path, parts = cfg, [], key.split(".")
    for depth, part in enumerate(parts):
        if node is None:  # a null group or value: nothing under it (Hydra refuses the key too)
            return ConfigError(f"{key}={value}: {config} has no key {key} ({'.'.join(path)} is null; +{key}=... "
                               "adds one)")
        if not isinstance(node, DictConfig):
            return None
        if part not in node.keys():
            near = nearest(part, [str(k) for k in node.keys()])
            if near is not None:  # the whole key where the rest of it exists under the nearest name
                whole = ".".join([*path, near, *parts[depth + 1:]])
                near = whole if OmegaConf.select(cfg, whole, default=None, throw_on_missing=False,
                                                 throw_on_resolution_failure=False) is not None else near
            hint = f"did you mean {near if '.' in near else '.'.join([*path, near])}? " if near else ""
            return ConfigError(f"{key}={value}: {config} has no key {key} ({hint}+{key}=... adds one)")
        if OmegaConf.is_interpolation(node, part):
            return None
        node, path = OmegaConf.select(node, part, throw_on_missing=False), [*path, part]
    return None


def group_options(group: str, roots: Sequence[Path] = ()) -> list[str] | None:
    """The choices of a config group of ``conf/`` and of the config folders ``roots`` added to Hydra's search path
    (its files' names), or None where ``group`` is a folder of none of them."""
    folders = [folder for folder in (Path(CONFIG_DIR) / group, *(root / group for root in roots)) if folder.is_dir()]
    return sorted({p.stem for folder in folders for p in folder.glob("*.yaml")}) if folders else None


def _search_path(overrides: Sequence[Any]) -> list[Path] | None:
    """The folders ``hydra.searchpath=[file://...]`` adds, or None where it names one this check cannot read (a
    ``pkg://`` package: the choices are then left to Hydra)."""
    roots: list[Path] = []
    for override in overrides:
        if override.key_or_group == "hydra.searchpath":
            for value in _values(override):
                if not (isinstance(value, str) and value.startswith("file://")):
                    return None
                roots.append(Path(value[len("file://"):]))
    return roots


def _values(override: Any) -> list[Any]:
    """The values an override gives, each point of a sweep (``a,b``, ``range(...)``); [] where they cannot be listed
    without the config (``glob(...)``)."""
    try:
        values = list(override.sweep_string_iterator()) if override.is_sweep_override() else [override.value()]
    except Exception:  # noqa: BLE001 - a glob over choices: Hydra expands it against the group
        return []
    return [item for value in values for item in (value if isinstance(value, list) else [value])]


def check_command_line(config_name: str, argv: Sequence[str] | None = None) -> None:
    """Raise a ``ConfigError`` for the first mistyped name of a ``python -m vtrain`` / ``vtrain.eval`` command line:
    a choice its group does not have, or a key the composed config does not have (``+key=`` adds one). Anything
    this check cannot read (a flag it does not know, Hydra's own groups, a glob) is left to Hydra."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main itself uses
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args, rest = get_args_parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    if args.help or args.hydra_help or args.info or args.shell_completion or args.config_path or args.config_dir:
        return
    try:
        overrides = OverridesParser.create().parse_overrides(
            [*args.overrides, *(a for a in rest if not a.startswith("-"))])
    except Exception:  # noqa: BLE001 - a syntax error: Hydra's message says where
        return
    roots = _search_path(overrides)
    if roots is None:
        return
    overrides = [o for o in overrides if o.key_or_group.split("/")[0].split(".")[0] != "hydra"]
    choices, keys = [], []
    for override in overrides:
        options = group_options(override.key_or_group, roots) if "." not in override.key_or_group else None
        if options is None:
            keys.append(override)
            continue
        values = [v for v in _values(override) if isinstance(v, str)]  # null: no choice
        for value in values:
            if value not in options:
                near = nearest(value, options)
                group = override.key_or_group
                listed = ", ".join(options) if len(options) <= MAX_LISTED else "python -m vtrain --help lists them"
                raise ConfigError(f"{override.input_line}: no {group} named {value}"
                                  f"{f' (did you mean {group}={near}?)' if near else ''}; the choices are the files "
                                  f"of conf/{group}/ ({listed})")
        if values and not override.is_sweep_override():
            choices.append(override.input_line)
        elif values:
            choices.append(f"{override.get_key_element()}={values[0]}")
    keys = [o for o in keys if not (o.is_add() or o.is_force_add() or o.is_delete())]  # ~key: Hydra's line is clear
    if not keys:
        return
    try:
        cfg = compose_config(args.config_name or config_name, choices)
    except Exception:  # noqa: BLE001 - the choices do not compose (task/head= without its task): Hydra says why
        return
    for override in keys:
        error = unknown_key(cfg, override.key_or_group, override.input_line.split("=", 1)[-1])
        if error is not None:
            raise error
