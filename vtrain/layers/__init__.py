"""Blocks that backbones and heads share."""
from vtrain.layers.deform_conv import DeformableConv2d
from vtrain.layers.global_context import GlobalContextBlock, SimplifiedNonLocalBlock
from vtrain.layers.local_relation import LocalRelation2d
from vtrain.layers.ms_deform_attn import MSDeformAttn
from vtrain.layers.non_local import DisentangledNonLocalBlock, GatedNonLocalBlock, NonLocalBlock

__all__ = ["DeformableConv2d", "GlobalContextBlock", "LocalRelation2d", "MSDeformAttn", "NonLocalBlock", "DisentangledNonLocalBlock",
           "GatedNonLocalBlock", "SimplifiedNonLocalBlock"]
