"""Backbones: a classifier trunk, or NCHW maps at the requested levels of strides 4/8/16/32 (see ``base.Backbone``)."""
from vtrain.backbones.base import Backbone
from vtrain.backbones.hrnet import HRNet
from vtrain.backbones.lrnet import LRNet
from vtrain.backbones.resnet import ResNet
from vtrain.backbones.swin import SwinTransformer
from vtrain.backbones.vit import VisionTransformer

__all__ = ["Backbone", "HRNet", "LRNet", "ResNet", "SwinTransformer", "VisionTransformer"]
