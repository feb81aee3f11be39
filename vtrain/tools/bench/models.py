"""What the bench measures: a backbone's classifier, timm's twin of it, another backbone or any module, each a
:class:`Candidate` (a name, how to build it, its settings)."""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig
from torch import nn

from vtrain.backbones.base import Classifier
from vtrain.config import ConfigError
from vtrain.config.compose import compose_config
from vtrain.profiling import count_macs, count_params, prefers_channels_last
from vtrain.tools.bench.twins import timm_twin


def build_classifier(backbone_cfg: Mapping, num_classes: int = 1000) -> Classifier:
    """An image or video backbone built as a classifier's trunk (its default) with a linear classifier."""
    return Classifier(instantiate(backbone_cfg), num_classes)


def model_size(build: Callable[[], nn.Module], sample_shape: tuple[int, ...]) -> tuple[int, int]:
    """Parameters and multiply-accumulates of one sample, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = build()
    return count_params(model), count_macs(model, (1, *sample_shape))


def timm_reference(backbone_cfg: Mapping) -> tuple[str, dict] | None:
    """``(timm model name, create_model kwargs)`` of timm's own model of this backbone's architecture
    (:func:`vtrain.tools.bench.twins.timm_twin`), or None where timm has none."""
    return timm_twin(backbone_cfg)


def _create_timm(name: str, kwargs: dict, num_classes: int) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)


@dataclass(frozen=True)
class Settings:
    precision: str = "fp32"       # fp32 | bf16 (autocast)
    channels_last: bool = False
    compile: bool = False


@dataclass
class Candidate:
    """One model to measure: a name, how to build it (on the current default device) and its settings."""

    name: str
    build: Callable[[], nn.Module]
    settings: Settings
    classifier: bool = True  # classification loss on logits; otherwise the mean square of the output


def module_name(module_cfg: Mapping) -> str:
    args = ",".join(f"{k}={v}" for k, v in module_cfg.items() if k != "_target_")
    return f"{str(module_cfg['_target_']).rsplit('.', 1)[-1]}({args})"


def backbone_choice() -> str:
    if HydraConfig.initialized():
        return HydraConfig.get().runtime.choices.get("backbone", "backbone")
    return "backbone"


def _is_cnn(candidate: Candidate) -> bool:
    with torch.device("meta"):
        return prefers_channels_last(candidate.build())


def candidates(cfg: DictConfig) -> tuple[list[Candidate], tuple[int, ...], str | None]:
    """Ours first, then the reference (if any); the per-sample input shape; a note when no reference exists."""
    bench = cfg.bench
    if bench.precision not in ("fp32", "bf16"):
        raise ConfigError(f"bench.precision={bench.precision!r}: use fp32 or bf16")
    if bench.reference_settings not in ("same", "timm_defaults"):
        raise ConfigError(f"bench.reference_settings={bench.reference_settings!r}: use same or timm_defaults")
    num_classes = bench.num_classes
    if bench.module is not None:
        if bench.input_shape is None:
            raise ConfigError("bench.module needs bench.input_shape=[C,H,W] (per sample)")
        shape = tuple(bench.input_shape)
        ours = Candidate(module_name(bench.module), lambda: instantiate(bench.module), Settings(), classifier=False)
    else:
        shape = tuple(bench.input_shape) if bench.input_shape is not None else (3, bench.img_size, bench.img_size)
        check = getattr(get_class(cfg.backbone._target_), "check_input_size", None)
        if check is not None and len(shape) == 3 and shape[1] == shape[2]:
            check(cfg.backbone, shape[1])
        ours = Candidate(f"vtrain:{backbone_choice()}", lambda: build_classifier(cfg.backbone, num_classes),
                         Settings())
    channels_last = _is_cnn(ours) if bench.channels_last == "auto" else bool(bench.channels_last)
    ours.settings = Settings(bench.precision, channels_last, bool(bench.compile))
    found = [ours]

    reference = bench.reference
    if reference is None:
        return found, shape, None
    if isinstance(reference, (Mapping, DictConfig)) and "_target_" in reference:
        ref = Candidate(module_name(reference), lambda: instantiate(reference), ours.settings, ours.classifier)
    elif reference == "timm":
        if bench.module is not None:
            raise ConfigError("bench.reference=timm compares backbones; for bench.module give a module config")
        twin = timm_reference(cfg.backbone)
        if twin is None:
            return found, shape, f"timm has no model of the architecture of backbone={backbone_choice()}"
        name, kwargs = twin
        ref = Candidate(f"timm:{name}", lambda: _create_timm(name, kwargs, num_classes), ours.settings)
    else:
        try:
            other = compose_config("bench", [f"backbone={reference}"]).backbone
        except hydra.errors.MissingConfigException:
            raise ConfigError(f"bench.reference={reference}: use timm, a conf/backbone/ name or a module config "
                              "({_target_: ...})") from None
        ref = Candidate(f"vtrain:{reference}", lambda: build_classifier(other, num_classes), ours.settings)
        ref.settings = replace(ours.settings, channels_last=_is_cnn(ref) if bench.channels_last == "auto"
                               else channels_last)
    if bench.reference_settings == "timm_defaults":
        ref.settings = Settings()
    found.append(ref)
    return found, shape, None
