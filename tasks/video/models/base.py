"""The contract between a video backbone and the video classification head.

A video backbone is an ``nn.Module`` that

* returns, from ``forward_pooled(clips)``, the ``(N, num_features)`` embedding of
  ``(N, C, T, H, W)`` clips that the classifier's linear layer sees;
* names, in ``no_weight_decay()``, the parameters (relative to itself) that the
  recipes exclude from weight decay beyond 1-D tensors and biases;
* converts, in ``checkpoint_filter(state_dict)``, a reference checkpoint into its own
  keys, returning ``(backbone_state_dict, classifier_state_dict)``: a checkpoint of
  the same video architecture loads as is, a 2D ImageNet checkpoint is inflated
  (I3D, Carreira & Zisserman, CVPR 2017, Sec. 2.3; Video Swin, Liu et al.,
  CVPR 2022, Sec. 3.3).

Video models have no four-level NCHW pyramid, so they do not implement the 2D
``vtrain.backbones.base.Backbone`` contract; ``FramewiseBackbone`` adapts any 2D one.
"""
from __future__ import annotations

import torch
from torch import nn

from vtrain.backbones.base import WeightContract


class VideoBackbone(WeightContract, nn.Module):
    num_features: int

    def forward_pooled(self, clips: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError
