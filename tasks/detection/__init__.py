"""Object detection and instance segmentation (COCO layout): any backbone under a detector built from the parts of
its config (R-CNN family: Mask / Faster R-CNN, Relation Networks' heads; one-stage: RetinaNet, FCOS, ATSS; DETR),
scored by the official COCO API."""
from vtrain.tasks.detection.module import DetectionTask

__all__ = ["DetectionTask"]
