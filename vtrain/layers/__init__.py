"""Blocks that backbones and heads share."""
from vtrain.layers.global_context import GlobalContextBlock
from vtrain.layers.local_relation import LocalRelation2d
from vtrain.layers.non_local import DisentangledNonLocalBlock, NonLocalBlock

__all__ = ["GlobalContextBlock", "LocalRelation2d", "NonLocalBlock", "DisentangledNonLocalBlock"]
