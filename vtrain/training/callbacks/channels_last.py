"""channels_last memory format for the models that prefer it."""
from __future__ import annotations

import pytorch_lightning as pl
import torch

from vtrain.profiling import prefers_channels_last


class ChannelsLast(pl.Callback):
    """Train a convolutional model in channels_last memory format (NHWC), the layout cuDNN's convolutions are
    fastest in. ``enabled='auto'``: on CUDA, for models whose weights are mostly k x k convolutions
    (:func:`vtrain.profiling.prefers_channels_last`: ResNets, GCNet, NL/DNL; not transformers or LR-Net).

    The conversion happens in ``setup``: before the model moves to its device and before the optimizer and
    its state exist, so parameters, gradients and optimizer state share one layout.
    """

    def __init__(self, enabled: bool | str = "auto"):
        self.enabled = enabled
        self.active = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from pytorch_lightning.accelerators import CUDAAccelerator

        if self.enabled == "auto":
            self.active = isinstance(trainer.accelerator, CUDAAccelerator) and prefers_channels_last(pl_module)
        else:
            self.active = bool(self.enabled)
        if self.active:
            pl_module.to(memory_format=torch.channels_last)
