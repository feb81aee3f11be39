"""The one contract between a backbone and every task head (timm's ``features_only`` / ``out_indices`` way).

A task asks a backbone, when it builds it, for what its heads read:

* ``out_indices=None`` (the default), a classifier: ``forward_pooled(x)`` returns the ``(N, num_features)``
  embedding a linear classifier sees (ResNet: global average of C5; Swin: final norm then average; ViT: the
  class token after the final norm). The model is then exactly the reference classifier's trunk (same
  parameters, same keys as timm / the official release).
* ``out_indices=(1, 2, 3)`` (any subset of 0..3, output ``i`` at stride ``4 * 2**i`` in a standard backbone):
  ``forward(x)`` returns those NCHW maps, in that order, and ``feature_info`` describes them as timm's does
  (``feature_info.channels()``, ``.reduction()``, ``.out_indices()``). Heads name the outputs they read by the
  same indices (a segmentation head's ``out_indices``, a detector's), and the task builds the backbone with
  those. Modules only some output needs (Swin's per-output norms, a ViT pyramid branch) are built for the
  requested outputs only, and stages past the deepest one not at all, so every parameter of a backbone feeds its
  outputs: nothing is left without a gradient under DDP.

Besides, a backbone names in ``no_weight_decay()`` the parameters (relative to itself) that the recipes
exclude from weight decay beyond the generic rule (1-D tensors and biases), and converts in
``checkpoint_filter(state_dict)`` a reference classification checkpoint (official release, timm, torchvision)
into its own keys, splitting off the classifier's ``weight``/``bias``.

What a backbone family knows about its configurations is asked of its class, before anything is built:
``check_input_size(cfg, img_size)`` refuses an input size its classifier cannot take (``vtrain.config.validate``).
A new family answers it in its own file.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from vtrain.config import ConfigError

OUT_INDICES = (0, 1, 2, 3)


class FeatureMap(NamedTuple):
    """One output of ``forward``: its index (0..3), channels and reduction (stride) from the input."""

    index: int
    channels: int
    reduction: int


class FeatureInfo(list):
    """What ``forward`` returns, one :class:`FeatureMap` per output in order, asked as timm's ``feature_info`` is:
    ``channels()``, ``reduction()`` (each output's, or output ``i``'s), ``out_indices()``."""

    def channels(self, i: int | None = None) -> list[int] | int:
        return [m.channels for m in self] if i is None else self[i].channels

    def reduction(self, i: int | None = None) -> list[int] | int:
        return [m.reduction for m in self] if i is None else self[i].reduction

    def out_indices(self) -> list[int]:
        return [m.index for m in self]


def parse_out_indices(out_indices: Sequence[int] | int | None) -> tuple[int, ...] | None:
    """``out_indices`` as a sorted tuple of distinct indices, or None for a classifier."""
    if out_indices is None:
        return None
    indices = (out_indices,) if isinstance(out_indices, int) else tuple(out_indices)
    if not indices or any(i not in OUT_INDICES for i in indices) or len(set(indices)) != len(indices):
        raise ConfigError(f"out_indices={list(indices)}: name distinct backbone outputs among {list(OUT_INDICES)} "
                          "(0 = stride 4 ... 3 = stride 32)")
    return tuple(sorted(indices))


class WeightContract:
    """What the optimiser and the weight loading ask of any backbone, image or video (defaults: nothing special)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (relative to the backbone) the recipes exclude from weight decay beyond 1-D tensors."""
        return set()

    def init_only(self, key: str) -> bool:
        """Whether state-dict ``key`` is one no reference release has (an added block, a module only feature maps
        need), so that it starts from its initialisation when reference weights are loaded, not missing."""
        return False

    def checkpoint_filter(
        self, state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return ``(backbone_state_dict, classifier_state_dict)`` from a reference checkpoint."""
        return dict(state_dict), {}


class Backbone(WeightContract, nn.Module):
    out_indices: tuple[int, ...] | None = None
    feature_info: FeatureInfo
    num_features: int
    grad_checkpointing: bool = False

    def _set_out_indices(self, out_indices: Sequence[int] | int | None, channels: Sequence[int],
                         reductions: Sequence[int]) -> None:
        """Record what was asked for; ``channels`` and ``reductions`` are the four stages' (C2..C5)."""
        self.out_indices = parse_out_indices(out_indices)
        self.feature_info = FeatureInfo(FeatureMap(i, int(channels[i]), int(reductions[i]))
                                        for i in self.out_indices or ())

    @property
    def num_stages(self) -> int:
        """Stages that run: up to the deepest requested level (all four for a classifier)."""
        return max(self.out_indices) + 1 if self.out_indices else len(OUT_INDICES)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _require_out_indices(self) -> tuple[int, ...]:
        if self.out_indices is None:
            raise ConfigError(f"{type(self).__name__} was built as a classifier (out_indices=None): build it with "
                              "out_indices=(...) for feature maps")
        return self.out_indices

    # ----------------------------------------------------------------- frozen stages (mmdet's ``frozen_stages``)
    def _frozen_modules(self) -> list[nn.Module]:
        """The modules of the first ``frozen_stages`` stages, as the family numbers them (none by default)."""
        return []

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze the stem and the first ``frozen_stages`` stages (-1: none; 0: the stem): no gradient, and
        evaluation mode whatever :meth:`train` is asked (their BatchNorm statistics stay)."""
        self.frozen_stages = frozen_stages
        for module in self._frozen_modules():
            module.requires_grad_(False)

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's name and
        semantics): activation memory of one block per stage, at the cost of a second forward. BatchNorm
        layers see the recomputation too (their running statistics update twice per step)."""
        self.grad_checkpointing = enable

    @classmethod
    def check_input_size(cls, cfg: Mapping, img_size: int) -> None:
        """Raise a one-line ``ConfigError`` when the classifier's trunk that ``cfg`` builds cannot take
        ``img_size`` x ``img_size`` inputs. Default: any size."""

    @classmethod
    def _arguments(cls, cfg: Mapping) -> dict[str, Any]:
        """The constructor's arguments a config builds with: its values, else the defaults."""
        parameters = list(inspect.signature(cls.__init__).parameters.values())[1:]
        return {p.name: cfg.get(p.name, p.default) for p in parameters}


def require_reductions(backbone: Backbone, needed: Sequence[int], who: str,
                       fix: str = "use a backbone without dilation (e.g. output_stride=32)") -> None:
    """One line when a backbone cannot give the strides a head is built for (a dilated "-D8" ResNet under a
    detector's pyramid)."""
    got = backbone.feature_info.reduction()
    if got != list(needed):
        raise ConfigError(f"{who} needs backbone outputs at strides {list(needed)}, {type(backbone).__name__} "
                          f"gives {got}: {fix}")


class Classifier(nn.Module):
    """Backbone (a classifier's trunk, image or video) -> pooled embedding -> linear classifier: with a reference
    backbone exactly the reference classifier, with the classification tasks' keys (``backbone.*``, ``head.*``). It is
    also what their export writes (``head``: the task's own classifier; its dropout is the identity in evaluation)."""

    def __init__(self, backbone: nn.Module, num_classes: int = 1000, head: nn.Linear | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head if head is not None else nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone.forward_pooled(x))
