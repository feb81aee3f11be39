"""The classification training pipeline's own speed (``bench.loader=true``): whether the loader or the model
limits training."""
from __future__ import annotations

import time
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from vtrain.config import ConfigError
from vtrain.tools.bench.device import synchronize


def measure_loader(cfg: DictConfig, device: torch.device, batch_size: int, img_size: int) -> dict[str, Any]:
    """Images/s of the classification training pipeline: worker decode + augmentation, host-to-device copy,
    Mixup/CutMix on the batch (where the training step applies it)."""
    from timm.data import Mixup

    data_cfg = OmegaConf.merge(cfg.data, {"batch_size": batch_size, "img_size": img_size})
    datamodule = instantiate(data_cfg)
    if hasattr(datamodule, "check"):
        datamodule.check()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    if len(loader) == 0:
        raise ConfigError(f"data.root={data_cfg.root}: fewer training images than bench.batch_size={batch_size}")
    task = cfg.get("task") or {}
    mixup = None
    if task.get("mixup"):
        mixup = Mixup(**OmegaConf.to_container(task.mixup), label_smoothing=task.get("label_smoothing", 0.0),
                      num_classes=data_cfg.num_classes)
    batches = iter(loader)

    def next_batch() -> int:
        nonlocal batches
        try:
            images, targets = next(batches).batch  # a vtrain.data.datamodule.CountedBatch
        except StopIteration:
            batches = iter(loader)
            images, targets = next(batches).batch
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup is not None:
            n = images.shape[0] - images.shape[0] % 2
            images, targets = mixup(images[:n], targets[:n])
        return images.shape[0]

    for _ in range(cfg.bench.loader_warmup):
        next_batch()
    synchronize(device)
    start, images = time.perf_counter(), 0
    for _ in range(cfg.bench.loader_batches):
        images += next_batch()
    synchronize(device)
    return {"ips": images / (time.perf_counter() - start), "num_workers": data_cfg.num_workers,
            "augment": OmegaConf.to_container(data_cfg.augment), "mixup": mixup is not None}
