"""Inflating 2D weights into 3D ones (I3D, Carreira & Zisserman, CVPR 2017, Sec. 2.3).

"Bootstrapping" 3D filters from 2D ones: the 2D kernel is repeated N times along time
and divided by N, so that on a video of one repeated frame the 3D layer gives the
2D layer's response (away from the temporal zero padding). Video Swin (Sec. 3.3)
initialises its patch embedding the same way.
"""
from __future__ import annotations

import torch


def inflate_conv_weight(weight: torch.Tensor, time: int) -> torch.Tensor:
    """(O, I, kh, kw) -> (O, I, time, kh, kw), repeated over time and divided by ``time``."""
    return weight.unsqueeze(2).repeat(1, 1, time, 1, 1) / time


def inflate_state_dict(state_dict: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inflate every 4-D tensor whose counterpart in ``own`` (the 3D model's state dict) is the 5-D version of it;
    every other tensor is returned unchanged (norms, linear layers, and weights already 3D)."""
    out = {}
    for key, value in state_dict.items():
        target = own.get(key)
        if (
            target is not None
            and value.ndim == 4
            and target.ndim == 5
            and target.shape[:2] == value.shape[:2]
            and target.shape[3:] == value.shape[2:]
        ):
            value = inflate_conv_weight(value, target.shape[2])
        out[key] = value
    return out
