"""Object detection and instance segmentation (COCO layout): any backbone -> FPN -> torchvision's
Mask R-CNN, Faster R-CNN, RetinaNet or FCOS, scored by the official COCO API."""
from vtrain.tasks.detection.module import DetectionTask

__all__ = ["DetectionTask"]
