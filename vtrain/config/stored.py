"""A config read from a file vtrain did not just compose (a checkpoint's ``vtrain.config``, a run directory's
``.hydra/config.yaml``) is data: before anything is built from it, every ``_target_`` in it must be one that
vtrain's own config tree (``conf/``) names, and every interpolation that calls a resolver (``${oc.env:...}``,
``${oc.decode:...}``, a resolver registered by any imported package) must be one written in that tree.

Hydra's ``instantiate`` calls whatever a ``_target_`` names, and its block-list stops ``os.system`` but not
``numpy.savetxt``, ``shutil.copyfile`` or ``torch.load`` with its weights-only check off: a checkpoint or a run directory from
someone else would choose what runs. The allow-list is derived from the installed tree, never kept by hand, so a
new config file is trusted as soon as it exists and a stored value nothing in the tree could produce is refused
with one line naming its key. A config of your own classes (``backbone._target_=mypkg.MyNet`` on the command line)
is loaded by composing it again: ``experiment=<name>`` and the same overrides.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vtrain.config import ConfigError
from vtrain.config.compose import CONFIG_DIR

# ${a.b}, ${..a}, ${a[0]}: a reference to another value of the same config (reads nothing else)
_NODE_REFERENCE = re.compile(r"\$\{\.*[A-Za-z_][\w\-]*(?:(?:\.[\w\-]+)|(?:\[\d+\]))*\}")


@functools.cache
def config_tree_values() -> tuple[frozenset[str], frozenset[str]]:
    """(every ``_target_``, every string that calls a resolver) written in the installed ``conf/`` tree."""
    import yaml

    targets: set[str] = set()
    resolver_calls: set[str] = set()
    for file in sorted(Path(CONFIG_DIR).rglob("*.yaml")):
        for path, value in _paths(yaml.safe_load(file.read_text()) or {}):
            if path.rsplit(".", 1)[-1] == "_target_" and isinstance(value, str):
                targets.add(value)
            elif isinstance(value, str) and _calls_resolver(value):
                resolver_calls.add(value)
    return frozenset(targets), frozenset(resolver_calls)


def _paths(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(full key path, value) of every leaf, for messages."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if not isinstance(key, str):
                raise ConfigError(f"key {path + '.' if path else ''}{key!r} is not a string")
            yield from _paths(value, f"{path}.{key}" if path else key)
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            yield from _paths(value, f"{path}[{i}]")
    else:
        yield path, node


def _calls_resolver(value: str) -> bool:
    """True when ``value`` holds an interpolation other than references to values of the same config."""
    return "${" in _NODE_REFERENCE.sub("", value) if "${" in value else False


# Classes renamed since a stored config may have been written: old ``_target_`` -> the one the config tree names now.
RENAMED_TARGETS = {
    # one data module for every segmentation layout (ADE20K, Cityscapes, PASCAL-Context)
    "vtrain.tasks.segmentation.data.ADE20KDataModule": "vtrain.tasks.segmentation.data.SegmentationDataModule",
}


def _current_targets(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {k: RENAMED_TARGETS.get(v, v) if k == "_target_" and isinstance(v, str) else _current_targets(v)
                for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_current_targets(v) for v in node]
    return node


def trusted_config(stored: Any, source: str | Path) -> DictConfig:
    """``stored`` (a plain mapping read from ``source``) as a config to build from, once every ``_target_`` and
    every resolver call in it is one of vtrain's config tree; anything else is a :class:`ConfigError` naming the
    key and the value. A target of :data:`RENAMED_TARGETS` is read as its current name."""
    if not isinstance(stored, Mapping):
        raise ConfigError(f"{source}: its config is a {type(stored).__name__}, not a mapping: is it a vtrain "
                          "checkpoint? experiment=<name> composes the config instead")
    targets, resolver_calls = config_tree_values()
    stored = _current_targets(stored)
    try:
        leaves = list(_paths(stored))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    for path, value in leaves:
        if path.rsplit(".", 1)[-1] == "_target_":
            if value not in targets:
                raise ConfigError(
                    f"{source}: refused {path}={value!r}: no config of vtrain's config tree names it, and a stored "
                    "config does not choose what runs (your own class? compose the config again: experiment=<name> "
                    "with the overrides it was trained with)")
        elif not isinstance(value, (str, int, float, bool, type(None))):
            raise ConfigError(f"{source}: refused {path}: a {type(value).__name__} is not a config value")
        elif isinstance(value, str) and _calls_resolver(value) and value not in resolver_calls:
            raise ConfigError(
                f"{source}: refused {path}={value!r}: a stored config may refer to its own values (${{a.b}}) but "
                "not call resolvers that read the environment or files")
    return OmegaConf.create(dict(stored))


def read_config_file(path: str | Path) -> DictConfig:
    """A run directory's ``.hydra/config.yaml`` as a trusted config (:func:`trusted_config`); YAML it cannot read
    (a Python tag, a syntax error) is one line."""
    import yaml

    try:  # OmegaConf's loader is YAML's safe loader: a Python tag is an error, never a call
        stored = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot read {path} as plain YAML ({first}): a config holds plain values only") from None
    return trusted_config(stored, path)


# Keys renamed since a stored config may have been written: (the mapping's path, old key, new key). A config read
# from a file has them renamed before it is built, so older checkpoints load.
RENAMED_KEYS = (
    ("task.head", "in_index", "out_indices"),  # one name for the backbone outputs a head reads (timm's)
    ("task.aux_head", "in_index", "out_indices"),
    ("task.detector", "levels", "out_indices"),
)


def with_current_names(cfg: DictConfig) -> DictConfig:
    """``cfg`` with the keys of :data:`RENAMED_KEYS` under their current names."""
    for path, old, new in RENAMED_KEYS:
        node = OmegaConf.select(cfg, path, default=None)
        if isinstance(node, DictConfig) and old in node and new not in node:
            with open_dict(node):
                node[new] = node.pop(old)
    return cfg
