"""Video backbones: ``forward_pooled(clips (N, C, T, H, W)) -> (N, num_features)`` (see ``base.VideoBackbone``)."""
from tasks.video.models.base import VideoBackbone
from tasks.video.models.framewise import FramewiseBackbone
from tasks.video.models.i3d_resnet import I3DResNet
from tasks.video.models.video_swin import VideoSwinTransformer

__all__ = ["VideoBackbone", "FramewiseBackbone", "I3DResNet", "VideoSwinTransformer"]
