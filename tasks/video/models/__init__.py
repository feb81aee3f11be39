"""Video backbones: ``forward_pooled(clips (N, C, T, H, W)) -> (N, num_features)`` (see ``base.VideoBackbone``)."""
from vtrain.tasks.video.models.base import VideoBackbone
from vtrain.tasks.video.models.framewise import FramewiseBackbone
from vtrain.tasks.video.models.i3d_resnet import I3DResNet
from vtrain.tasks.video.models.video_swin import VideoSwinTransformer

__all__ = ["VideoBackbone", "FramewiseBackbone", "I3DResNet", "VideoSwinTransformer"]
