"""A task and its data from a composed config, and from a run directory or checkpoint (``vtrain.build``,
``vtrain.load``): below the task module, which loads through it, and below prediction, which uses it."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from vtrain.config import ConfigError
from vtrain.config.compose import compose, plain_config
from vtrain.config.names import unknown_key
from vtrain.config.stored import read_config_file, trusted_config, with_current_names
from vtrain.config.validate import check_values
from vtrain.training.checkpoint import (
    description,
    load_task_weights,
    newest_valid_checkpoint,
    read_checkpoint,
)

log = logging.getLogger("vtrain")


def build_task(cfg: DictConfig) -> Any:
    """The task module of a composed config: ``cfg.task`` with the run's optimiser and schedule (a task config
    names its other inputs itself, the backbone among them: ``backbone: ${backbone}``)."""
    module = instantiate(cfg.task, optim=cfg.optim, sched=cfg.sched, _recursive_=False)
    module.run_config = plain_config(cfg)
    return module


def build(cfg: DictConfig) -> tuple[Any, Any]:
    """The task module and the data module of a composed config, as the command line builds them (nothing is read
    from the dataset until the data module's ``setup``)."""
    check_values(cfg)
    return build_task(cfg), instantiate(cfg.data)


def checkpoint_of_run(run_dir: str | Path) -> Path:
    """The checkpoint a run directory is used through: its best (``metrics.json``'s ``best_checkpoint``), else
    ``checkpoints/last.ckpt``, else its newest readable one."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        best = json.loads(metrics.read_text()).get("best_checkpoint")
        best = Path(best) if isinstance(best, str) and best else None
        # metrics.json is data too: only a file inside the run directory is followed
        if best is not None and best.is_file() and _inside(best, run_dir):
            return best
        if best is not None and _inside(run_dir / "checkpoints" / best.name, run_dir):  # a run directory moved
            return run_dir / "checkpoints" / best.name
    if (run_dir / "checkpoints" / "last.ckpt").is_file():
        return run_dir / "checkpoints" / "last.ckpt"
    found = newest_valid_checkpoint(run_dir / "checkpoints")
    if found is None:
        raise ConfigError(f"run={run_dir} has no checkpoint (checkpoints/*.ckpt): pass a run directory of a run that "
                          "saved one, or ckpt_path=<file>")
    return found


def _inside(path: Path, directory: Path) -> bool:
    """``path`` is a file within ``directory`` once links are followed."""
    return path.is_file() and path.resolve().is_relative_to(directory.resolve())


def model_config(source: str | Path, experiment: str | None = None, overrides: Sequence[str] = ()
                 ) -> tuple[DictConfig, Path, dict[str, Any]]:
    """(config, checkpoint file, what the checkpoint says about the model) for a run directory or a checkpoint.

    The config is the one the checkpoint stores, or the run directory's ``.hydra/config.yaml`` for checkpoints
    written before vtrain stored it; ``experiment=`` composes a config instead (official, timm or torchvision weight
    files, which describe nothing). ``overrides`` (``key=value``) change it either way.
    """
    source = Path(source)
    if not source.exists():
        raise ConfigError(f"{source} does not exist: pass a run directory or a checkpoint file")
    path = checkpoint_of_run(source) if source.is_dir() else source
    described = description(read_checkpoint(path, mmap=True), path)
    if experiment:
        cfg = compose(experiment, overrides)
    else:
        run_config = (source if source.is_dir() else path.parent.parent) / ".hydra" / "config.yaml"
        if described.get("config") is not None:
            stored = trusted_config(described["config"], path)  # data: it does not choose what runs
        elif run_config.is_file():
            stored = read_config_file(run_config)
        else:
            raise ConfigError(f"{path} does not say which model it holds (not a vtrain checkpoint, or one written "
                              "before checkpoints stored their config): add experiment=<the experiment it was "
                              "trained with>")
        cfg = with_overrides(with_current_names(stored), overrides)
    with open_dict(cfg):
        cfg.mode, cfg.ckpt_path, cfg.pretrained = "eval", None, None
        cfg.output_dir = str(source if source.is_dir() else path.parent)
    return cfg, path, described


def with_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with ``key=value`` overrides as the command line takes them: a key it does not have is one line (with
    the nearest key it has) unless written ``+key=value``, which adds it."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ConfigError(f"{override!r} is not key=value")
        add, key = key.startswith("+"), key.lstrip("+")
        if not add and (error := unknown_key(cfg, key, value, "the model's config")) is not None:
            raise error
        with open_dict(cfg):
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([f"{key}={value}"]))
    return cfg


def load(source: str | Path, experiment: str | None = None, overrides: Sequence[str] = (),
         map_location: Any = "cpu", strict: bool = True, eval_mode: bool = True) -> Any:
    """The model of a run directory (its best checkpoint) or of a checkpoint file, weights loaded, in eval mode;
    ``model.class_names`` names its labels and ``model.run_config`` is its config. Checkpoints are read with
    ``torch.load(weights_only=True)`` only. Official, timm and torchvision files need ``experiment=``."""
    cfg, path, described = model_config(source, experiment, overrides)
    check_values(cfg)
    module = build_task(cfg)
    load_task_weights(module, path, strict=strict)
    if described.get("class_names"):
        module.class_names, module.class_ids = _checked_names(described, cfg, path)
    else:
        module.class_names, module.class_ids = _dataset_classes(cfg)
    if map_location is not None:
        module = module.to(map_location if not callable(map_location) else "cpu")
    return module.eval() if eval_mode else module


def _checked_names(described: dict[str, Any], cfg: DictConfig, path: Path) -> tuple[list[str], list | None]:
    """A checkpoint's class names and ids, one per class of its model, or one line."""
    names, ids = described["class_names"], described.get("class_ids")
    count = OmegaConf.select(cfg, "data.num_classes", default=None)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{path}: its class_names is not a list of names")
    if count is not None and len(names) != int(count):
        raise ConfigError(f"{path}: its class_names has {len(names)} names for its {count} classes: is the file "
                          "whole? experiment=<name> with the dataset at hand names them from the data instead")
    if ids is not None and (not isinstance(ids, list) or len(ids) != len(names)):
        raise ConfigError(f"{path}: its class_ids does not give one id per class ({len(names)})")
    return names, ids


def _dataset_classes(cfg: DictConfig) -> tuple[list[str] | None, list | None]:
    """The data module's names and ids when a checkpoint stores none (a reference release): its dataset's, where the
    data is at hand (ImageNet-1K's from timm's table without it)."""
    try:
        datamodule = instantiate(cfg.data)
        ids = datamodule.class_ids
        return [str(n) for n in datamodule.class_names], None if ids is None else list(ids)
    except Exception as e:  # noqa: BLE001 - no dataset here: labels keep generic names
        log.info("no class names for this model (%s): labels are named class_<i>",
                 (str(e).splitlines() or [type(e).__name__])[0])
        return None, None


def datamodule_of(module: Any) -> Any:
    """The data module of a loaded or built task, from the config it carries (its preprocessing for predictions)."""
    if module.run_config is None:
        raise ConfigError(f"this {type(module).__name__} carries no config: build it with vtrain.build or vtrain.load")
    cfg = OmegaConf.create(module.run_config)
    return instantiate(cfg.data)
