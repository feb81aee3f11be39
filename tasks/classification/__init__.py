"""Image classification (ImageNet-1K layout): backbone -> pooled embedding -> linear classifier."""
from vtrain.tasks.classification.module import ClassificationTask

__all__ = ["ClassificationTask"]
