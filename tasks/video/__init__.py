"""Video classification (Kinetics-400 layout): video backbone -> pooled clip embedding -> linear classifier,
scored on whole videos by averaging the softmax of several clips and crops."""
from vtrain.tasks.video.module import VideoClassificationTask

__all__ = ["VideoClassificationTask"]
