"""Self-supervised pre-training (MoBY, Xie et al., arXiv:2105.04553) on ImageNet-layout images, labels unused."""
from vtrain.tasks.selfsup.moby import MoBYTask

__all__ = ["MoBYTask"]
