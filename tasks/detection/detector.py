"""What every detector config builds, and the checks and counts they share.

``task.detector`` is a file of ``conf/task/detector/`` (``task/detector=mask_rcnn``) whose parts (neck, anchor
generator, heads, duplicate removal, R-CNN settings) are ``_target_`` objects, instantiated recursively: any part is
swapped from a config (``task/detector/nms=soft_nms``, ``task.detector.model.rpn_anchor_generator={_target_: ...}``).
It instantiates to a :class:`DetectorSpec`, which builds the detector on the task's backbone. A family is its
module(s) (:mod:`rcnn`, :mod:`one_stage`, :mod:`detr`, :mod:`deformable_detr`, :mod:`sparse_rcnn`, :mod:`pix2seq`) and its config files; the task holds none of its keys.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from torch import nn

from vtrain.backbones.base import Backbone
from vtrain.config import ConfigError
from vtrain.config.validate import keys_not_taken


@runtime_checkable
class DetectorSpec(Protocol):
    """A detector config, instantiated: how one detector is put on a backbone.

    Forward contract of what :meth:`build` returns (torchvision's): ``detector(images, targets)`` with ``images`` a
    list of (3, H, W) tensors in [0, 1] and, in training, ``targets`` a list of ``{"boxes": (N, 4) XYXY pixels,
    "labels": (N,) 1..K, "masks": (N, H, W)}`` -> a dict of losses; in evaluation ``detector(images)`` -> one
    ``{"boxes", "labels", "scores"[, "masks"]}`` per image, in its original coordinates.
    """

    out_indices: tuple[int, ...]  # the backbone outputs it reads (0 = stride 4): what the task builds the backbone with
    iou_types: tuple[str, ...]  # what COCO evaluates of its output: ("bbox",) or ("bbox", "segm")

    def build(self, backbone: Backbone, num_classes: int, transform: Mapping[str, Any]) -> nn.Module:
        """The detector on ``backbone`` (built with these ``out_indices``); ``num_classes`` counts the categories
        and the background; ``transform``: the test-time resize and the normalisation (``min_size``, ``max_size``,
        ``image_mean``, ``image_std``), which every detector does inside, torchvision's way."""

    def load_release(self, task: nn.Module, path: str, strict: bool) -> bool:
        """Load a whole-detector release into ``task`` and return True, if ``path`` is one this detector reads;
        False: the file holds backbone weights."""


def build_spec(config: Mapping[str, Any]) -> DetectorSpec:
    """``task.detector`` instantiated (recursively: its parts are objects), after one line for every key a part does
    not take (Hydra merges a part's keys, so a key an experiment set for one choice stays when
    ``task/detector/<part>=...`` switches it; a ``_partial_`` part would find out only when called)."""
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ConfigError(f"task.detector is a config, not {config!r}: pick one with task/detector=<name> "
                          "(mask_rcnn, faster_rcnn, retinanet, fcos, atss, detr, deformable_detr, sparse_rcnn, pix2seq: the files of conf/task/detector/)")
    _check_arguments(config, "task.detector")
    try:
        spec = instantiate(config, _convert_="all")  # plain lists and dicts for every part (torchvision checks types)
    except InstantiationException as e:  # a part's own one-line error, out of Hydra's wrapping
        if isinstance(e.__cause__, ConfigError):
            raise e.__cause__ from None
        raise
    if not isinstance(spec, DetectorSpec):
        raise ConfigError(f"task.detector ({config['_target_']}) is not a detector config: it has no "
                          "out_indices / iou_types / build (tasks/detection/detector.py, DetectorSpec)")
    return spec


def _stray_keys(config: Mapping[str, Any], path: str) -> list[tuple[str, str]]:
    """(key path, class) of every key a part's class does not take (a ``_partial_`` part is called later, with the
    rest of its arguments, so Hydra would not find out now)."""
    stray = [found for key, value in config.items() if isinstance(value, Mapping)
             for found in _stray_keys(value, f"{path}.{key}")]
    return stray + [(f"{path}.{k}", config["_target_"]) for k in keys_not_taken(config)]


def _check_arguments(config: Mapping[str, Any], path: str) -> None:
    stray = _stray_keys(config, path)
    if stray:
        raise ConfigError(f"{stray[0][0]}: {stray[0][1]} does not take it (a key set for another choice?): drop "
                          f"{'it' if len(stray) == 1 else 'them'} with {' '.join('~' + key for key, _ in stray)}")


def torchvision_transform(transform: Mapping[str, Any]) -> dict[str, Any]:
    """The task's transform as torchvision's detectors take it: no resize in training (the data pipeline did it)."""
    return {**transform, "image_mean": list(transform["image_mean"]), "image_std": list(transform["image_std"]),
            "_skip_resize": True}
