"""Predictions of a trained model on files or images: the run's own preprocessing (the data module's validation
transform), batched, on the CPU or a GPU; results as plain values and pictures.

The task decides what a prediction is (its ``predict_batch``, ``prediction_record`` and ``draw_prediction``), the
data module how a file becomes the model's input (its ``predict_set``); this module only runs them. Used by
``python -m vtrain.predict``, :class:`Predictor` (the Python API) and the pictures logged during training
(:class:`vtrain.inference.pictures.PredictionPictures`).
"""
from __future__ import annotations

import logging

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from vtrain.config import ConfigError
from vtrain.data.datamodule import CorruptFileError
from vtrain.training.build import datamodule_of, load
from vtrain.training.module import PredictOptions, TaskModule

log = logging.getLogger("vtrain")


@dataclass
class Prediction:
    """One input's prediction: where it came from, its record (plain values; a label map as a tensor) and its
    picture (uint8 (3, H, W), or None)."""

    source: str
    record: dict[str, Any]
    picture: torch.Tensor | None = None


def as_array(image: Any) -> np.ndarray:
    """A PIL image, a (3, H, W) tensor or an (H, W, 3) array as an RGB uint8 (H, W, 3) array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ConfigError(f"an image tensor is (3, H, W), not {tuple(image.shape)}")
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round()
        return image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[-1] == 3:
        return image.astype(np.uint8)
    raise ConfigError(f"cannot read {type(image).__name__} as an image: give a file path, a PIL image, a (3, H, W) "
                      "tensor or an (H, W, 3) array")


class Predictor:
    """Predictions of one model, with the preprocessing of the run that trained it.

        predictor = vtrain.Predictor("outputs/runs/2026-12-01/10-00-00", device="cuda", top_k=3)
        records = predictor(["cat.jpg", "dog.jpg"])     # one dict per image: plain values (a label map: a tensor)
        for p in predictor.predict(paths):              # with pictures: p.source, p.record, p.picture
            ...

    Args:
        model: a task module (``vtrain.load``, ``vtrain.build``), a run directory or a checkpoint file.
        experiment, overrides: for files that do not describe their model (official, timm, torchvision weights),
            and changes to the stored config (``task.test_size=1000``).
        device: ``auto`` (a GPU when there is one), ``cpu``, ``cuda``, ``cuda:1``.
        batch_size: inputs per forward pass; None: the data module's validation batch size.
        num_workers: processes reading and transforming the inputs.
        **options: :class:`PredictOptions` (``top_k``, ``score_threshold``, ``max_detections``, ...).
    """

    def __init__(self, model: Any, experiment: str | None = None, overrides: Sequence[str] = (),
                 device: str | torch.device = "auto", batch_size: int | None = None, num_workers: int = 0,
                 **options: Any):
        self.options = PredictOptions(**options)
        self.device = device_of(device)
        self.model = model if isinstance(model, TaskModule) else load(model, experiment, overrides)
        self.model.to(self.device).eval()
        self.datamodule = datamodule_of(self.model)
        self.batch_size = int(batch_size or getattr(self.datamodule, "val_batch_size", None) or 1)
        self.num_workers = num_workers
        self.skipped: list[str] = []  # the unreadable inputs the last predict(..., skip_unreadable=True) left out

    @property
    def class_names(self) -> list[str]:
        return self.model.label_names()

    def __call__(self, images: Any) -> list[dict[str, Any]]:
        """Records of ``images``: file paths (images or videos), PIL images, (3, H, W) tensors or (H, W, 3) arrays,
        one or a list."""
        return [p.record for p in self.predict(images, pictures=False)]

    def predict(self, images: Any, pictures: bool | None = None, skip_unreadable: bool = False
                ) -> Iterator[Prediction]:
        """Each input's :class:`Prediction`, in order, batch by batch. ``skip_unreadable``: a file that cannot be
        decoded is left out with a warning and listed in ``self.skipped`` (the others are predicted), as training
        skips and counts unreadable samples; otherwise it stops with one line naming it."""
        items = list(images) if isinstance(images, (list, tuple)) else [images]
        inputs = [str(i) if isinstance(i, (str, Path)) else as_array(i) for i in items]
        dataset = self.datamodule.predict_set(inputs)
        if skip_unreadable:
            dataset = SkipUnreadable(dataset)
        loader = DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers, collate_fn=list)
        draw = self.options.pictures if pictures is None else pictures
        self.skipped = []
        index = 0
        for batch in loader:
            readable = [item for item in batch if "unreadable" not in item]
            outputs = iter(self.model.predict_batch([item["input"] for item in readable]) if readable else [])
            for item in batch:
                index += 1
                if "unreadable" in item:
                    log.warning("skipped %s", item["unreadable"])
                    self.skipped.append(item["path"])
                    continue
                record = self.model.prediction_record(next(outputs), self.options)
                picture = self.model.draw_prediction(item["original"], record, self.options) if draw else None
                source = item["path"] if isinstance(items[index - 1], (str, Path)) else f"<image {index - 1}>"
                yield Prediction(source, record, picture)


class SkipUnreadable(Dataset):
    """A prediction set whose unreadable files come out as ``{"path", "unreadable": <the one-line reason>}``."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            return self.dataset[i]
        except CorruptFileError as e:
            return {"path": str(self.dataset.items[i]), "unreadable": str(e)}


def collect_inputs(spec: str | Iterable[str], extensions: Sequence[str]) -> list[str]:
    """Files named by ``spec``: a file, a folder (its files with one of ``extensions``, sorted, not recursive), a glob
    pattern, or a comma-separated list of those."""
    import glob

    parts = [s for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    files: list[str] = []
    for part in parts:
        path = Path(str(part).strip()).expanduser()
        if path.is_dir():
            files += sorted(str(p) for p in path.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        elif path.is_file():
            files.append(str(path))
        elif any(c in str(path) for c in "*?["):
            files += sorted(p for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        else:
            raise ConfigError(f"inputs={part}: no such file or folder; give an image, a video, a folder or a glob "
                              "pattern (quoted: inputs='photos/*.jpg')")
    if not files:
        raise ConfigError(f"inputs={spec}: no file with one of the extensions {', '.join(extensions)} found")
    return files


def device_of(name: str | torch.device) -> torch.device:
    if str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but no CUDA device is visible: use device=cpu")
    return device
