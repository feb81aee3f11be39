"""The config tree: where it is, a config of ``conf/`` composed by name, and the one way a Hydra entry point
(training, evaluation, the tools) ends on bad input: one line on stderr, exit status 2."""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def compose_config(config_name: str, overrides: list[str]) -> DictConfig:
    """A config of ``conf/`` composed with overrides, inside a running Hydra app or outside one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain values (what a checkpoint stores), interpolations resolved; a top-level key that cannot
    be resolved here (``output_dir`` outside a Hydra run) keeps its interpolation."""
    plain: dict[str, Any] = {}
    for key in cfg:
        try:
            value = OmegaConf.select(cfg, str(key), throw_on_resolution_failure=True)
            plain[key] = OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) \
                else value
        except Exception:  # noqa: BLE001 - a resolver that needs Hydra's runtime
            plain[key] = OmegaConf.to_container(cfg, resolve=False)[key]
    return plain


def default_run_dir(cfg: DictConfig) -> Path:
    """Where a run outside ``python -m vtrain`` writes: ``<paths.output_root>/runs/<date>/<time>``, the pattern of
    ``conf/hydra/default.yaml``."""
    import datetime

    now = datetime.datetime.now()
    root = OmegaConf.select(cfg, "paths.output_root", default="outputs")
    return Path(root) / "runs" / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")


def ensure_output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, given one where it is Hydra's and no Hydra run is going on (a config composed in Python)."""
    try:
        output_dir = cfg.get("output_dir")
    except Exception:  # noqa: BLE001 - ${hydra:runtime.output_dir} outside a Hydra run
        output_dir = None
    if output_dir is None:
        with open_dict(cfg):
            cfg.output_dir = str(default_run_dir(cfg))
        output_dir = cfg.output_dir
    return Path(output_dir)


def compose(experiment: str | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The config ``python -m vtrain experiment=<experiment> <overrides>`` runs with. Its ``output_dir`` (Hydra's run
    directory on the command line) is ``outputs/runs/<date>/<time>`` unless an override sets it."""
    cfg = compose_config("train", ([f"experiment={experiment}"] if experiment else []) + list(overrides))
    ensure_output_dir(cfg)
    return cfg
