"""The one contract between a backbone and every task head.

A backbone is an ``nn.Module`` that

* returns, from ``forward(x)``, four NCHW feature maps at strides 4, 8, 16, 32
  (``out_strides``) with ``out_channels[i]`` channels each: detection, segmentation
  and any other dense head use these and nothing else;
* returns, from ``forward_pooled(x)``, the ``(N, num_features)`` embedding that a
  classifier's linear layer sees (ResNet: global average of C5; Swin: final norm
  then average; ViT: the class token after the final norm);
* names, in ``no_weight_decay()``, the parameters (relative to itself) that the
  recipes exclude from weight decay beyond the generic rule (1-D tensors and
  biases): position tables, class tokens, ...;
* converts, in ``checkpoint_filter(state_dict)``, a reference classification
  checkpoint (official release, timm, torchvision) into its own keys, splitting off
  the classifier's ``weight``/``bias`` when present.

Modules only dense heads need (ViT's simple feature pyramid, Swin's per-stage output
norms) exist only when the backbone is built with ``dense=True``: a classification
model is then exactly the reference architecture (same parameter count, same keys),
and no parameter is left without a gradient under DDP. A dense head that reads only some levels leaves
the modules of the others (``level_modules``) without one; :meth:`vtrain.module.TaskModule.unused_parameters`
names them so that DDP is told to look for them.
"""
from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    out_channels: tuple[int, int, int, int]
    out_strides: tuple[int, int, int, int] = (4, 8, 16, 32)
    num_features: int
    grad_checkpointing: bool = False

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        return set()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them (timm's name and
        semantics): activation memory of one block per stage, at the cost of a second forward. BatchNorm
        layers see the recomputation too (their running statistics update twice per step)."""
        self.grad_checkpointing = enable

    def level_modules(self, level: int) -> list[nn.Module]:
        """The modules only output ``level`` of ``forward`` goes through (Swin's output norm, a ViT pyramid
        branch): a head that does not read that level leaves their parameters without a gradient."""
        return []

    def checkpoint_filter(
        self, state_dict: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Return ``(backbone_state_dict, classifier_state_dict)`` from a reference checkpoint."""
        return dict(state_dict), {}
