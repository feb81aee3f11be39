"""Every detector on a CNN and a transformer backbone: one training step and one COCO evaluation on CPU;
the pyramid each detector gets; BatchNorm modes; checkpoint keys."""
from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import compose
from vtrain.tasks.detection.evaluation import CocoEvaluator
from vtrain.tasks.detection.module import DetectionTask

TINY_SWIN = dict(_target_="vtrain.backbones.SwinTransformer", img_size=64, embed_dim=32, depths=[1, 1, 2, 1],
                 num_heads=[1, 2, 4, 8], window_size=4, drop_path_rate=0.0)
TINY_VIT = dict(_target_="vtrain.backbones.VisionTransformer", img_size=64, patch_size=16, embed_dim=64, depth=1,
                num_heads=2, drop_path_rate=0.0)
RESNET50 = dict(_target_="vtrain.backbones.ResNet", depth=50, frozen_stages=1)
RESNET26 = dict(RESNET50, depth=26)  # the same bottleneck stages, fewer of them: a CNN for the detector x backbone grid
OPTIM = dict(_target_="torch.optim.AdamW", lr=1e-4, weight_decay=0.05)
SCHED = dict(_target_="vtrain.training.optim.multistep", milestones_epochs=[8, 11])
SMALL = dict(test_size=64, test_max_size=96)
# small parts: the pyramid's width for every detector; an R-CNN's box and mask heads and its RoI counts
SMALL_PARTS = ["task.detector.neck.out_channels=32"]
RCNN_SMALL = ["task.detector.box_head_dim=64", "+task.detector.model.rpn_pre_nms_top_n_train=100",
              "+task.detector.model.rpn_post_nms_top_n_train=50", "+task.detector.model.box_batch_size_per_image=32"]
# the query-based detectors at their quickstarts' widths (their transformers' defaults are the papers' 256 / 2048)
QUERY_SMALL = ["+task.detector.model.hidden_dim=32", "+task.detector.model.num_heads=2",
               "+task.detector.model.dim_feedforward=64", "+task.detector.model.num_queries=8"]
SMALL_BY_DETECTOR = {
    "mask_rcnn": SMALL_PARTS + RCNN_SMALL + ["task.detector.mask_head_dims=[32]"],
    "faster_rcnn": SMALL_PARTS + RCNN_SMALL,
    "cascade_mask_rcnn": SMALL_PARTS + ["task.detector.box_head_dim=64", "task.detector.box_head.conv_dim=32",
                                        "task.detector.mask_head_dims=[32]", "task.detector.batch_size_per_image=32",
                                        "task.detector.model.rpn_pre_nms_top_n_train=100",
                                        "task.detector.model.rpn_post_nms_top_n_train=50"],
    "retinanet": SMALL_PARTS, "fcos": SMALL_PARTS, "atss": SMALL_PARTS,
    "reppoints_v2": SMALL_PARTS + ["task.detector.model.head_options.feat_channels=32",
                                   "task.detector.model.head_options.point_feat_channels=16",
                                   "task.detector.model.head_options.corner_dim=32"],
    "detr": QUERY_SMALL + ["+task.detector.model.num_encoder_layers=1", "+task.detector.model.num_decoder_layers=2"],
    "deformable_detr": QUERY_SMALL + ["+task.detector.model.num_encoder_layers=1",
                                      "+task.detector.model.num_decoder_layers=2"],
    "sparse_rcnn": ["task.detector.neck.out_channels=32", "+task.detector.model.hidden_dim=32",
                    "+task.detector.model.num_heads=2", "+task.detector.model.dim_feedforward=64",
                    "+task.detector.model.dim_dynamic=8", "+task.detector.model.num_stages=2",
                    "task.detector.model.num_proposals=8"],
}
MASKS = ("mask_rcnn", "cascade_mask_rcnn")


pytestmark = pytest.mark.usefixtures("one_thread")


def detector_config(name: str, *overrides: str):
    """``task.detector`` of ``task/detector=<name> overrides...``, composed as the command line composes it."""
    return compose("task=detection", f"task/detector={name}", *overrides).task.detector


def _task(backbone: dict, detector: str, *overrides: str, **kw) -> DetectionTask:
    """A small ``detector`` on ``backbone``; ``overrides`` change its parts (``task/detector/nms=soft_nms``,
    ``+task.detector.model.box_score_thresh=0.0``), ``kw`` the task's own arguments."""
    small = SMALL_BY_DETECTOR.get(detector, SMALL_PARTS + (RCNN_SMALL if "rcnn" in detector else []))
    return DetectionTask(OmegaConf.create(backbone), OPTIM, SCHED, num_classes=2,
                         detector=detector_config(detector, *small, *overrides), **SMALL, **kw)


def _batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 80, generator=g), torch.rand(3, 72, 64, generator=g)]
    targets = []
    for image, boxes in zip(images, ([[8, 8, 40, 36], [44, 20, 76, 60]], [[10, 30, 50, 70]])):
        boxes = torch.tensor(boxes, dtype=torch.float32)
        masks = torch.zeros(len(boxes), *image.shape[-2:], dtype=torch.uint8)
        for m, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            m[y1:y2, x1:x2] = 1
        targets.append({"boxes": boxes, "labels": torch.tensor([1, 2][: len(boxes)]), "masks": masks})
    return images, targets


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    anns = [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [8, 8, 32, 28], "area": 896.0, "iscrowd": 0,
             "segmentation": [[8, 8, 40, 8, 40, 36, 8, 36]]}]
    data = {"images": [{"id": 1, "file_name": "1.jpg", "height": 64, "width": 80},
                       {"id": 2, "file_name": "2.jpg", "height": 72, "width": 64}],
            "annotations": anns, "categories": [{"id": 5, "name": "a"}, {"id": 9, "name": "b"}]}
    path = tmp_path_factory.mktemp("gt") / "instances.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("backbone", [RESNET26, TINY_SWIN, TINY_VIT], ids=["resnet26", "swin", "vit"])
@pytest.mark.parametrize("detector", list(SMALL_BY_DETECTOR))
def test_train_step_and_evaluation(backbone, detector, ground_truth):
    """Every detector family on every backbone kind (CNN, hierarchical transformer, plain ViT with its simple
    pyramid): a training step whose loss reaches every trainable parameter (plain DDP's condition) and a COCO
    evaluation of its detections in original image coordinates."""
    torch.manual_seed(0)
    task = _task(backbone, detector)
    images, targets = _batch()
    task.train()
    keys = ("boxes", "labels", "masks") if detector in MASKS else ("boxes", "labels")
    losses = task(images, [{k: t[k] for k in keys} for t in targets])
    if detector in MASKS:
        assert any(name.endswith("loss_mask") for name in losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    # DDP's condition: every trainable parameter is reached, backbone included (it is built with the levels the
    # detector's pyramid reads, nothing more); ResNet's frozen stem and first stage (frozen_stages=1) are not
    reached = {n for n, p in task.named_parameters() if p.grad is not None}
    assert reached == {n for n, p in task.named_parameters() if p.requires_grad}
    assert task.backbone.out_indices == task.spec.out_indices
    if backbone is RESNET26:
        assert "backbone.conv1.weight" not in reached and "backbone.layer2.0.conv1.weight" in reached

    task.eval()
    with torch.no_grad():
        outputs = task(images)
    for image, out in zip(images, outputs):  # detections in original image coordinates
        assert out["boxes"].shape[1] == 4
        if len(out["boxes"]):
            assert out["boxes"][:, 2].max() <= image.shape[-1] and out["boxes"][:, 3].max() <= image.shape[-2]
        if detector in MASKS:
            assert out["masks"].shape[-2:] == image.shape[-2:]
    evaluator = CocoEvaluator(ground_truth, [5, 9], ["a", "b"], task.spec.iou_types)
    evaluator.update([1, 2], outputs)
    summary = evaluator.compute()
    assert set(summary) >= set(task.spec.iou_types) and 0.0 <= summary["bbox"]["AP"] <= 1.0


def test_a_dilated_backbone_or_a_detector_name_is_refused_with_one_line():
    from vtrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"RetinaNet needs backbone outputs at strides \[8, 16, 32\], "
                                          r"ResNet gives \[8, 8, 8\]"):
        _task(dict(RESNET50, output_stride=8), "retinanet")
    with pytest.raises(ConfigError, match=r"task.detector is a config, not 'retinanet': pick one with task/detector="):
        DetectionTask(OmegaConf.create(TINY_SWIN), OPTIM, SCHED, num_classes=2, detector="retinanet")


def test_pyramids_and_keys():
    """R-CNN: P2-P6 (P6 max-pooled); RetinaNet: P3-P7 with P6 from C5; FCOS: P6 from P5; the maps are named by the
    backbone's levels. The backbone's parameters appear once, under ``backbone.*``."""
    x = torch.rand(1, 3, 64, 64)
    shapes = {}
    for detector in ("mask_rcnn", "retinanet", "fcos"):
        task = _task(TINY_SWIN, detector)
        pyramid = task.detector.backbone
        shapes[detector] = {k: tuple(v.shape[-2:]) for k, v in pyramid(x).items()}
        keys = list(task.state_dict())
        assert not any(k.startswith("detector.backbone.body") for k in keys)
        assert sum(k.startswith("backbone.") for k in keys) == len(task.backbone.state_dict())
    assert shapes["mask_rcnn"] == {"0": (16, 16), "1": (8, 8), "2": (4, 4), "3": (2, 2), "pool": (1, 1)}
    assert shapes["retinanet"] == {"1": (8, 8), "2": (4, 4), "3": (2, 2), "p6": (1, 1), "p7": (1, 1)}
    # tiny Swin's C5 has 256 channels; RetinaNet's P6 still reads C5 (256 in), FCOS's reads P5 (32 in)
    assert _task(TINY_SWIN, "retinanet").detector.backbone.fpn.extra_blocks.p6.in_channels == 256
    assert _task(TINY_SWIN, "fcos").detector.backbone.fpn.extra_blocks.p6.in_channels == 32


def test_batch_norm_modes():
    frozen = _task(RESNET50, "faster_rcnn", batch_norm="frozen")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.backbone.modules())
    eval_mode = _task(RESNET50, "faster_rcnn", batch_norm="eval").train()
    norms = [m for m in eval_mode.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms) and all(m.weight.requires_grad for m in norms[-3:])
    sync = _task(RESNET50, "faster_rcnn", batch_norm="sync")
    assert any(isinstance(m, nn.SyncBatchNorm) for m in sync.backbone.modules())


def test_the_anchor_generators_of_the_configs_are_torchvisions():
    """The configs write torchvision's default anchor generators out as parts (so that a config can swap them): the
    anchors are the ones torchvision builds when it is given none."""
    from torchvision.models.detection import faster_rcnn, fcos, retinanet

    references = {"mask_rcnn": faster_rcnn._default_anchorgen(), "faster_rcnn": faster_rcnn._default_anchorgen(),
                  "retinanet": retinanet._default_anchorgen(),
                  "fcos": fcos.AnchorGenerator(((8,), (16,), (32,), (64,), (128,)), ((1.0,),) * 5)}
    for detector, reference in references.items():
        built = _task(TINY_SWIN, detector).detector
        anchors = built.rpn.anchor_generator if hasattr(built, "rpn") else built.anchor_generator
        assert len(anchors.cell_anchors) == 5, detector
        assert all(torch.equal(a, b) for a, b in zip(anchors.cell_anchors, reference.cell_anchors)), detector


def test_a_resnext_faster_rcnn_is_torchvisions():
    """ResNeXt under a detector: Faster R-CNN X101-64x4d-FPN has exactly torchvision's parameters (its
    ``resnet_fpn_backbone`` on the same ResNeXt, trainable BatchNorm as in mmdet's configs; torchvision has no
    32x4d, whose trunk equals timm's in tests/test_backbones.py)."""
    name = "resnext101_64x4d"
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    with torch.device("meta"):
        ours = DetectionTask(compose(f"backbone={name}").backbone, OPTIM, SCHED, num_classes=80,
                             detector=detector_config("faster_rcnn"))
        reference = FasterRCNN(resnet_fpn_backbone(backbone_name=name, weights=None, norm_layer=nn.BatchNorm2d,
                                                   trainable_layers=5), num_classes=81)
    count = sum(p.numel() for p in reference.parameters())
    assert sum(p.numel() for p in ours.parameters()) == count
    assert count == 99_655_396
