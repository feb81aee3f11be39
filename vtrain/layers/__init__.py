"""Blocks that backbones and heads share."""
from vtrain.layers.global_context import GlobalContextBlock
from vtrain.layers.non_local import DisentangledNonLocalBlock, NonLocalBlock

__all__ = ["GlobalContextBlock", "NonLocalBlock", "DisentangledNonLocalBlock"]
