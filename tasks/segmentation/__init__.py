"""Semantic segmentation (ADE20K layout): backbone -> UperNet / FCN / NL / GC / DNL head -> per-pixel classes."""
from vtrain.tasks.segmentation.module import SegmentationTask

__all__ = ["SegmentationTask"]
