"""Any 2D backbone of the zoo applied to every frame, its pooled embeddings averaged over time.

The segmental consensus of TSN (Wang et al., ECCV 2016, Sec. 3.1, average consensus): the
2D model sees frames independently, so it can only use what a single frame shows, never the
order of the frames. The 2D backbone is built as a classifier's trunk: exactly the ImageNet
classifier's network, so ImageNet checkpoints load through its own ``checkpoint_filter``.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from hydra.utils import instantiate
from vtrain.tasks.video.models.base import VideoBackbone


class FramewiseBackbone(VideoBackbone):
    """Args: image_backbone: a ``conf/backbone/*.yaml`` config (``_target_`` and its arguments)."""

    def __init__(self, image_backbone: Mapping[str, Any]):
        super().__init__()
        self.image_backbone = instantiate(image_backbone)  # a classifier's trunk
        self.num_features = self.image_backbone.num_features

    def forward_pooled(self, clips: torch.Tensor) -> torch.Tensor:
        n, c, t, h, w = clips.shape
        frames = clips.transpose(1, 2).reshape(n * t, c, h, w)
        return self.image_backbone.forward_pooled(frames).view(n, t, -1).mean(dim=1)

    def init_only(self, key: str) -> bool:
        return key.startswith("image_backbone.") and self.image_backbone.init_only(key.removeprefix("image_backbone."))

    def checkpoint_filter(self, state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        if any(k.startswith("image_backbone.") for k in state_dict):  # a checkpoint of this video model
            return dict(state_dict), {}
        backbone, classifier = self.image_backbone.checkpoint_filter(state_dict)
        return {f"image_backbone.{k}": v for k, v in backbone.items()}, classifier
