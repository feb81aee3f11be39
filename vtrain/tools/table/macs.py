"""The MACs a table reports for a model: a task model's evaluation forward (:func:`task_macs`; a detector's counted
the way the detection papers count it, :func:`detector_macs`), and counts that follow a paper where it counts
otherwise than :func:`vtrain.profiling.count_macs` (:func:`lrnet_paper_macs`; vtrain's models are not changed to
match)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet

from vtrain.layers.local_relation import LocalRelation2d
from vtrain.tasks.detection.cascade import CascadeRoIHeads
from vtrain.tasks.detection.reppoints import RepPointsDetector
from vtrain.tasks.detection.sparse_rcnn import SparseRCNN
from vtrain.profiling import count_macs, flop_counter


def task_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of a task model's evaluation forward on one input of ``input_shape`` (C, H, W, or C, T, H, W): a
    torchvision detector's by :func:`detector_macs`, any other model's (DETR's included) by counting its forward."""
    detector = getattr(module, "detector", None)
    if isinstance(detector, (FasterRCNN, RetinaNet, FCOS, RepPointsDetector)):
        return detector_macs(detector, tuple(input_shape)[-3:])
    if isinstance(detector, SparseRCNN):
        return sparse_rcnn_macs(detector, tuple(input_shape)[-3:])
    return count_macs(detector if detector is not None else module, (1, *input_shape))


def lrnet_paper_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """``count_macs`` plus what the LR-Net paper's FLOPs also count in each local relation layer, per output
    position: the geometry-prior MLP on each of the k*k offsets and the relation logits (one per group and
    offset): see vtrain.backbones.lrnet's module docstring."""
    extra = 0

    def add(layer: LocalRelation2d, inputs, output: torch.Tensor) -> None:
        nonlocal extra
        positions = output.shape[0] * output.shape[-2] * output.shape[-1]
        mlp = sum(linear.in_features * linear.out_features for linear in layer.geometry_prior if isinstance(linear, nn.Linear))
        extra += positions * layer.kernel_size**2 * (mlp + layer.groups)

    hooks = [m.register_forward_hook(add) for m in model.modules() if isinstance(m, LocalRelation2d)]
    try:
        total = count_macs(model, input_shape)
    finally:
        for hook in hooks:
            hook.remove()
    return total + extra


def detector_macs(detector: nn.Module, image_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one test image of ``image_shape`` (C, H, W, as the detector pads it), counted as
    :mod:`vtrain.profiling` counts (matrix products and convolutions; RoIAlign, NMS and box decoding are not):
    the backbone, FPN and dense head(s) on the image; for an R-CNN, a deformable RoI pool's offset fc and the box
    head (relation modules included) on the RPN's test-time proposal count (``rpn_post_nms_top_n_test``: the RoIs
    it sees at most), the mask head on ``detections_per_img`` boxes and a learned duplicate removal on the first
    ``first_n`` RoIs of every class; for a cascade, each stage's box head on those RoIs and each stage's mask head on
    those boxes. Works on the meta device."""
    device = next(detector.parameters()).device
    with flop_counter() as counter:
        maps = detector.backbone(torch.zeros(1, *image_shape, device=device))
        features = list(maps.values())
        if not isinstance(detector, FasterRCNN):
            detector.head(features)
            return counter.get_total_flops() // 2
        rpn_levels = getattr(detector.rpn, "levels", None)  # an RPN on some maps only (the C4 base: C4)
        detector.rpn.head([maps[name] for name in rpn_levels] if rpn_levels else features)
        heads = detector.roi_heads
        channels = maps[heads.box_roi_pool.featmap_names[0]].shape[1]  # what the RoI pools read
        num_rois = detector.rpn._post_nms_top_n["testing"]
        if isinstance(heads, CascadeRoIHeads):  # every stage on the RoIs, every mask head on the detections
            pooled = torch.zeros(num_rois, channels, *heads.box_roi_pool.output_size, device=device)
            for stage in heads.stages:
                stage(pooled)
            if heads.has_mask():
                masks = torch.zeros(heads.detections_per_img, channels, *heads.mask_roi_pool.output_size, device=device)
                for mask_stage in heads.mask_stages:
                    mask_stage(masks)
            return counter.get_total_flops() // 2
        corner = torch.arange(num_rois, device=device, dtype=torch.float32)[:, None] % 100
        boxes = torch.cat([corner, corner, corner + 32, corner + 32], dim=1)
        pooled = torch.zeros(num_rois, channels, *heads.box_roi_pool.output_size, device=device)
        if hasattr(heads.box_roi_pool, "offsets"):  # a deformable RoI pool's offset fc, on the RoIs pooled plainly
            heads.box_roi_pool.offsets(pooled)
        box_features = heads.box_head(pooled, [boxes]) if heads.relates_objects else heads.box_head(pooled)
        class_logits, _ = heads.box_predictor(box_features)
        if heads.learns_duplicate_removal:
            num_classes = class_logits.shape[1]
            heads.duplicate_removal.rescore(class_logits.softmax(-1), boxes[:, None].expand(-1, num_classes, 4),
                                            box_features, torch.arange(1, num_classes, device=device))
        if heads.has_mask():
            masks = torch.zeros(heads.detections_per_img, channels, *heads.mask_roi_pool.output_size, device=device)
            heads.mask_predictor(heads.mask_head(masks))
    return counter.get_total_flops() // 2


def sparse_rcnn_macs(detector: SparseRCNN, image_shape: Sequence[int]) -> int:
    """Multiply-accumulates of Sparse R-CNN on one test image of ``image_shape`` (C, H, W), counted as
    :func:`detector_macs` counts (RoIAlign and box decoding are not): the backbone and FPN on the image, every stage
    on its ``num_proposals`` pooled RoIs. Works on the meta device (where RoIAlign's routing of boxes to levels
    cannot run)."""
    device = next(detector.parameters()).device
    channels, size = detector.neck.out_channels, detector.pooler.output_size
    with flop_counter() as counter:
        detector.neck(torch.zeros(1, *image_shape, device=device))
        rois = torch.zeros(detector.num_proposals, size[0] * size[1], channels, device=device)
        proposal_features = torch.zeros(1, detector.num_proposals, channels, device=device)
        for stage in detector.stages:
            stage.predict(rois, proposal_features)
    return counter.get_total_flops() // 2
