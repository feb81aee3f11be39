"""Reading weights from local files, safely, and loading them with a readable report; writing checkpoints atomically.

Files are never unpickled as arbitrary objects, whoever wrote them: ``.safetensors`` through safetensors, ``.npz``
(the official JAX releases, e.g. google-research/vision_transformer's ViT) through ``np.load(allow_pickle=False)``,
everything else through ``torch.load(weights_only=True)`` (:func:`read_checkpoint`), including the checkpoints Lightning
resumes from (:class:`CheckpointIO`). vtrain's own checkpoints hold tensors and plain values only (no class needs
allow-listing). Supported layouts: this framework's Lightning checkpoints (``state_dict`` with
``backbone.*``/``head.*`` keys), official releases (``{'model': sd}``), mmcv-style ``{'state_dict': sd}``, and
plain state dicts (timm, torchvision).
"""
from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from timm.models import clean_state_dict
from torch import nn

from vtrain.config import ConfigError
from vtrain.training.atomic import atomic_write
from vtrain.training.lightning_internals import is_local_path

log = logging.getLogger(__name__)


class RefusedCheckpoint(ConfigError):
    """A file whose pickle would build something other than tensors and plain values."""


def read_checkpoint(path: str | Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: pass an existing file as ckpt_path= / pretrained=")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - safetensors' errors for a cut or foreign file, as one line
            if _is_zip(path) or _is_pickle(path):
                raise ConfigError(f"cannot read checkpoint {path}: it is a torch.save file, not safetensors "
                                  f"({_first_line(e)}): rename it .pth") from e
            raise ConfigError(f"cannot read checkpoint {path} as safetensors ({_first_line(e)}): is it a complete "
                              "weights file?") from e
    if path.suffix == ".npz":
        return _read_npz(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap and _is_zip(path))
    except pickle.UnpicklingError as e:
        raise RefusedCheckpoint(
            f"refused checkpoint {path}: {_refusal(str(e))}; vtrain reads checkpoints with torch.load(weights_only=True) "
            "only and will not unpickle it"
        ) from None
    except Exception as e:  # noqa: BLE001 - turn any other reading failure into one readable line
        raise ConfigError(
            f"cannot read checkpoint {path} with weights_only=True ({_first_line(e)}): is it a complete weights file?"
        ) from e


def _read_npz(path: Path) -> dict[str, torch.Tensor]:
    """An official JAX release: a NumPy archive of arrays named by their flax parameter path joined with ``/``
    (google-research/vision_transformer vit_jax/checkpoint.py ``save`` / ``load``, which reads it with
    ``allow_pickle=False`` too: data, never code). The backbone's ``checkpoint_filter`` maps the names."""
    if not _is_zip(path):
        raise ConfigError(f"cannot read checkpoint {path}: it is not a NumPy .npz archive; is it a complete weights file?")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    except ValueError as e:  # an object array: only a pickle could build it
        raise RefusedCheckpoint(f"refused checkpoint {path}: {_first_line(e)}; vtrain reads .npz files as plain "
                                "arrays only (allow_pickle=False)") from None
    except Exception as e:  # noqa: BLE001 - a cut or foreign archive, as one line
        raise ConfigError(f"cannot read checkpoint {path} as .npz ({_first_line(e)}): is it a complete weights file?") from e


def _first_line(error: BaseException) -> str:
    lines = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()  # without terminal colour codes
    return lines[0] if lines else type(error).__name__


def _refusal(message: str) -> str:
    """What torch's weights-only unpickler refused, without its advice (which is to switch the check off)."""
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        return f"its pickle would call {found.group(1)}, which is not a tensor or a plain value"
    found = re.search(r"Unsupported operand (\d+)", message)
    if found:
        return f"its pickle uses an instruction the weights-only reader does not run (opcode {found.group(1)})"
    return "its pickle holds something other than tensors and plain values"


def _is_zip(path: Path) -> bool:
    """torch.save's format since 1.6 (the only one that can be memory-mapped)."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def _is_pickle(path: Path) -> bool:
    """torch.save's format before 1.6 (``_use_new_zipfile_serialization=False``): a pickle, protocol 2 or later."""
    with open(path, "rb") as f:
        start = f.read(2)
    return len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5


class CheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint reading and writing, made safe.

    Saving: atomically, next to the target (:func:`vtrain.training.atomic.atomic_write`), straight from ``torch.save``.
    Lightning's own save goes through a temporary file from ``tempfile.mkstemp()`` in ``$TMPDIR`` and moves it
    into place, which is a copy when ``$TMPDIR`` is another filesystem: a SIGKILL mid-copy leaves a truncated
    checkpoint. Loading: always :func:`read_checkpoint` (``weights_only=True``), whatever the caller asks or
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says. Remote (``s3://`` ...) paths keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or not is_local_path(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path: Any, map_location: Callable | None = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path, map_location=map_location)


def is_lightning_checkpoint(obj: dict[str, Any]) -> bool:
    return isinstance(obj, dict) and "state_dict" in obj and "pytorch-lightning_version" in obj


DESCRIPTION_KEY = "vtrain"  # the checkpoint entry in which vtrain describes the model (config, class names)
WEIGHT_EMA_KEY = "weight_ema"  # a run's average of the weights (callbacks/weight_ema.py): state_dict, evaluated


def description(obj: Any, path: str | Path) -> dict[str, Any]:
    """What a checkpoint says about its model (its ``DESCRIPTION_KEY`` entry): a mapping, empty for files that are
    not vtrain's; anything else is one line."""
    described = obj.get(DESCRIPTION_KEY) if is_lightning_checkpoint(obj) else None
    if described is not None and not isinstance(described, dict):
        raise ConfigError(f"{path}: its '{DESCRIPTION_KEY}' entry is a {type(described).__name__}, not a mapping: "
                          "is it a vtrain checkpoint? experiment=<name> composes the config instead")
    return described or {}


def unwrap_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, whatever container the releasing project used."""
    for key in ("state_dict", "model", "module", "model_ema"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    # timm's clean_state_dict: no DDP ("module.") or torch.compile ("_orig_mod.") wrapper prefixes
    return clean_state_dict({k: v for k, v in obj.items() if isinstance(v, torch.Tensor)})


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")


def load_matching(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str, what: str,
                  strict: bool = True) -> dict[str, list[str]]:
    """Load reference weights into ``module``.

    Every parameter and BatchNorm statistic of the module must come from the file, except those its
    ``init_only(key)`` names (added blocks, modules only feature maps need); buffers computed at construction
    (relative position indices, ``num_batches_tracked``) need not. A tensor missing from the file, or
    there with another shape, stops the run with one line (a checkpoint of another architecture would otherwise
    leave part of the model at its initialisation without a word), and so do blocks of the file past the module's
    last (:func:`_beyond_depth`: a deeper model's). ``strict=False`` (``pretrained_strict=false``) loads what fits
    and warns. Other tensors of the file the module has no place for are reported.
    """
    own = module.state_dict()
    init_only = getattr(module, "init_only", lambda key: False)
    mismatched = [k for k, v in state_dict.items() if k in own and own[k].shape != v.shape]
    usable = {k: v for k, v in state_dict.items() if k in own and k not in mismatched}
    if not usable:
        sample = ", ".join(list(state_dict)[:3]) or "no tensors"
        raise ConfigError(
            f"no tensor of {source} matches the {what} (file keys start: {sample}): is it a checkpoint of this architecture?"
        )
    learned = {n for n, _ in module.named_parameters()} | {
        n for n, _ in module.named_buffers() if n.endswith(("running_mean", "running_var"))}
    missing = [k for k in own if k in learned and k not in usable and not init_only(k)]
    unexpected = [k for k in state_dict if k not in own]
    deeper = _beyond_depth(unexpected, own)
    problems = []
    if missing:
        shapes = (f"; {len(mismatched)} with another shape, e.g. {mismatched[0]}: file "
                  f"{tuple(state_dict[mismatched[0]].shape)}, model {tuple(own[mismatched[0]].shape)}") if mismatched else ""
        problems.append(f"{len(missing)} of the {len(own)} {what} tensors do not come from {source} "
                        f"({_few(missing)}{shapes})")
    if deeper:
        problems.append(f"{len(deeper)} tensors of {source} are of blocks the {what} does not have ({_few(deeper)})")
    if problems:
        problem = "; ".join(problems)
        rest = " and leaves the rest at their initialisation" if missing else ""
        if strict:
            raise ConfigError(f"{problem}: is it a checkpoint of this {what}? pretrained_strict=false loads the "
                              f"{len(usable)} that fit{rest}")
        log.warning("%s: %s (pretrained_strict=false)", problem,
                    "they keep their initialisation" if missing else "they are left out")
    module.load_state_dict(usable, strict=False)
    log.info("loaded %d tensors of %s into the %s; %d of the file's have no place in it%s", len(usable), source, what,
             len(unexpected), f" ({_few(unexpected)})" if unexpected else "")
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def _beyond_depth(keys: list[str], own: dict[str, Any]) -> list[str]:
    """The ``keys`` of numbered blocks past the last of their sequence in ``own`` (``layers.2.blocks.6.*`` for a
    model whose ``layers.2.blocks`` ends at 5): the file is of a deeper model (Swin-S for Swin-T, ResNet-101 for
    ResNet-50), whose first blocks would load and leave a model that is neither."""
    prefixes = {".".join(parts[:i]) for parts in (k.split(".") for k in own) for i in range(1, len(parts))}
    deeper = []
    for key in keys:
        parts = key.split(".")
        for i, part in enumerate(parts[1:-1], 1):
            sequence = ".".join(parts[:i])
            if part.isdigit() and f"{sequence}.0" in prefixes and f"{sequence}.{part}" not in prefixes:
                deeper.append(key)
                break
    return deeper


def load_classifier(head: nn.Linear, classifier: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """A reference classifier into ``head`` when it fits; one that does not (another number of classes, e.g. an
    ImageNet-22K release for a 1000-class model without a class map) is a warning with both shapes (and ``hint``:
    what would make it fit), and ``head`` keeps its initialisation."""
    weight = classifier.get("weight")
    if weight is None:
        return
    if weight.shape != head.weight.shape:
        log.warning("the classifier of %s is %s, this model's %s: it starts from its initialisation%s", source,
                    tuple(weight.shape), tuple(head.weight.shape), hint)
        return
    load_matching(head, classifier, source, "classifier")


def split_reference(backbone: nn.Module, obj: dict[str, Any]) -> tuple[dict, dict]:
    """(backbone_sd, classifier_sd) of any supported checkpoint object."""
    sd = unwrap_state_dict(obj)
    if is_lightning_checkpoint(obj) or any(k.startswith("backbone.") for k in sd):
        # this framework's: the backbone's own filter still maps a classifier trunk's keys to feature maps' ones
        backbone_sd, _ = backbone.checkpoint_filter(
            {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")})
        head_sd = {k.removeprefix("head."): v for k, v in sd.items() if k.startswith("head.")}
        return backbone_sd, head_sd
    return backbone.checkpoint_filter(sd)


def load_backbone_weights(backbone: nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    backbone_sd, _ = split_reference(backbone, read_checkpoint(path))
    return load_matching(backbone, backbone_sd, str(path), "backbone", strict=strict)


def require_fit(module: nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """One line when a checkpoint of this framework is not of this experiment's model (another backbone or head),
    where ``load_state_dict`` would print every key."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in state_dict if k in own and own[k].shape != state_dict[k].shape]
    if missing or unexpected or mismatched:
        example = (missing or unexpected or mismatched)[0]
        raise ConfigError(
            f"checkpoint {path} is not of this experiment's model ({len(missing)} of its {len(own)} tensors missing, "
            f"{len(unexpected)} unexpected, {len(mismatched)} of another shape; e.g. {example}): use the experiment "
            "and backbone it was trained with"
        )


def _without_unbuilt_outputs(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A checkpoint written when backbones built output modules for all four levels holds those of levels no
    head read (never trained: they had no gradient); the backbone now builds only what its heads read, so they
    are dropped."""
    backbone, own = getattr(module, "backbone", None), module.state_dict()
    init_only = getattr(backbone, "init_only", None)
    if init_only is None:
        return state_dict
    unbuilt = [k for k in state_dict if k not in own and k.startswith("backbone.") and init_only(k[len("backbone."):])]
    if unbuilt:
        log.info("dropped %d tensors of backbone outputs no head reads (%s)", len(unbuilt), _few(unbuilt))
    return {k: v for k, v in state_dict.items() if k not in unbuilt}


def load_task_weights(module: nn.Module, path: str | Path, strict: bool = True) -> None:
    """Weights to evaluate: this framework's checkpoint (it must fit exactly; the average of its weights where the
    run validated that, ``WEIGHT_EMA_KEY``) or a reference release."""
    obj = read_checkpoint(path)
    if is_lightning_checkpoint(obj):
        average = obj.get(WEIGHT_EMA_KEY)
        use_average = bool(average and average.get("evaluated"))
        state_dict = _without_unbuilt_outputs(module, average["state_dict"] if use_average else unwrap_state_dict(obj))
        require_fit(module, state_dict, path)
        module.load_state_dict(state_dict)
        log.info("loaded %s (epoch %s, step %s%s)", path, obj.get("epoch"), obj.get("global_step"),
                 ", the average of its weights" if use_average else "")
        return
    module.load_pretrained(str(path), strict=strict)


def _step_of(path: Path) -> int:
    match = re.search(r"step(\d+)", path.name)
    return int(match.group(1)) if match else -1


def newest_valid_checkpoint(directory: str | Path) -> Path | None:
    """The most advanced readable checkpoint in ``directory`` (``ckpt_path=auto``).

    Candidates are ordered by training step (from the file, ``last.ckpt`` and preemption files included), then
    by modification time; a truncated or unreadable file, or one the weights-only reader refuses, is skipped with a
    one-line warning and the one before is taken.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    candidates = []
    for path in directory.glob("*.ckpt"):
        try:
            obj = read_checkpoint(path, mmap=True)  # memory-mapped: the tensors are not read
            step = int(obj.get("global_step", _step_of(path)))
        except RefusedCheckpoint as e:
            log.warning("skipping %s", e)
            continue
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
            log.warning("skipping unreadable checkpoint %s (%s)", path, _first_line(e.__cause__ or e))
            continue
        candidates.append((step, path.stat().st_mtime, path))
    return max(candidates)[2] if candidates else None
