"""Faster R-CNN C4 and DC5 (detectron2's) and the GIoU box loss of the "+" models (DETR Table 1): the C4 head is the
backbone's own stage 5 on the pooled RoIs, the sizes are detectron2's, both train, and the GIoU term is torchvision's
``generalized_box_iou_loss`` on the decoded boxes."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from timm.models.resnet import Bottleneck
from timm.models.resnet import ResNet as TimmResNet
from torch import nn
from torchvision.models import resnet50, resnet101
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import generalized_box_iou_loss, roi_align

from conftest import compose
from test_detection_models import OPTIM, SCHED, SMALL, _batch, detector_config
from vtrain.profiling import count_params
from vtrain.tasks.detection.module import DetectionTask
from vtrain.tasks.detection.roi_heads import box_losses, box_regression_loss
from vtrain.training.build import build_task

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_RESNET = dict(_target_="vtrain.backbones.ResNet", depth=26)  # 2-2-2-2 bottlenecks, the full widths
FEW_ROIS = ["task.detector.model.rpn_pre_nms_top_n_train=60", "task.detector.model.rpn_post_nms_top_n_train=30",
            "task.detector.model.rpn_pre_nms_top_n_test=60", "task.detector.model.rpn_post_nms_top_n_test=4",
            "+task.detector.model.box_batch_size_per_image=4"]


def _task(detector: str, *overrides: str, num_classes: int = 2, batch_norm: str = "train", **backbone) -> DetectionTask:
    return DetectionTask(OmegaConf.create({**TINY_RESNET, **backbone}), OPTIM, SCHED, num_classes=num_classes,
                         detector=detector_config(detector, *overrides), batch_norm=batch_norm, **SMALL)


def test_giou_box_loss_is_torchvisions_on_the_decoded_boxes():
    """A hand case (a 2x2 box against the same box moved by one pixel each way: IoU 1/7, enclosing box 9, union 7,
    GIoU 1/7 - 2/9) and random deltas on random RoIs: the GIoU loss of the deltas equals torchvision's
    ``generalized_box_iou_loss`` on the boxes decoded against their RoI; in the R-CNN's box loss it is weighted and
    summed over the positives over all sampled RoIs (detectron2's ``box_reg_loss``)."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    roi = torch.tensor([[4.0, 6.0, 20.0, 14.0]])
    predicted, truth = torch.tensor([[10.0, 10.0, 12.0, 12.0]]), torch.tensor([[11.0, 11.0, 13.0, 13.0]])
    deltas, target = coder.encode_single(predicted, roi), coder.encode_single(truth, roi)
    assert box_regression_loss(deltas, target, coder, "giou", 0.0).item() == pytest.approx(1 - (1 / 7 - 2 / 9), abs=1e-5)

    g = torch.Generator().manual_seed(0)
    corner = torch.rand(6, 2, generator=g) * 50
    rois = torch.cat([corner, corner + 5 + torch.rand(6, 2, generator=g) * 40], 1)
    gt = rois + torch.randn(6, 4, generator=g) * 3
    deltas = torch.randn(6, 4, generator=g) * 0.3
    expected = generalized_box_iou_loss(coder.decode_single(deltas, rois), gt, reduction="sum")
    got = box_regression_loss(deltas, coder.encode_single(gt, rois), coder, "giou", 0.0)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)

    # the R-CNN's box loss: 3 classes with background; rows 0, 2, 5 positive; 6 sampled RoIs
    labels = torch.tensor([1, 0, 2, 0, 0, 1])
    per_class = torch.randn(6, 3, 4, generator=g) * 0.3
    per_class[torch.arange(6), labels] = deltas
    logits = torch.randn(6, 3, generator=g)
    positive = labels > 0
    _, box = box_losses(logits, per_class.reshape(6, 12), labels, coder.encode_single(gt, rois), 0.0, coder, "giou", 10.0)
    reference = generalized_box_iou_loss(coder.decode_single(deltas, rois)[positive], gt[positive], reduction="sum")
    assert box.item() == pytest.approx(10.0 * reference.item() / 6, rel=1e-5)


def test_the_c4_head_is_the_backbones_stage_5_on_the_pooled_rois():
    """Weights round-trip through the task's state dict (stage 5 only as ``backbone.layer4.*``: no copy in the head),
    and the detector's trunk and box head equal timm's ResNet-26, loaded with the same weights, run by hand: C4 of the
    image, RoIAlignV2 14x14 at 1/16 on it, layer4 on each RoI, the average over its 7x7 positions."""
    torch.manual_seed(0)
    task = _task("faster_rcnn_c4", *FEW_ROIS)
    state = task.state_dict()
    assert not any(".box_head." in key for key in state) and "backbone.layer4.1.conv3.weight" in state
    state = {key: torch.randn_like(value) if key.startswith("backbone.layer4.") and value.is_floating_point()
             else value for key, value in state.items()}
    for key in [k for k in state if k.endswith("running_var")]:
        state[key] = state[key].abs() + 0.5
    task.load_state_dict(state)
    task.eval()

    reference = TimmResNet(block=Bottleneck, layers=(2, 2, 2, 2), num_classes=0).eval()
    reference.load_state_dict({k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")})
    images = torch.rand(1, 3, 64, 96)
    boxes = [torch.tensor([[4.0, 6.0, 40.0, 50.0], [30.0, 10.0, 90.0, 60.0]])]
    with torch.no_grad():
        c4 = reference.layer3(reference.layer2(reference.layer1(reference.maxpool(reference.act1(reference.bn1(
            reference.conv1(images)))))))
        pooled = roi_align(c4, boxes, 14, spatial_scale=1 / 16, sampling_ratio=0, aligned=True)
        expected = reference.layer4(pooled).mean(dim=(2, 3))
        detector = task.detector
        features = detector.backbone(images)
        heads = detector.roi_heads
        got = heads.box_head(heads.box_roi_pool(features, boxes, [(64, 96)]))
    assert list(features) == ["2"] and torch.allclose(features["2"], c4, atol=1e-5)
    assert got.shape == (2, 2048) and torch.allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("detector, backbone", [("faster_rcnn_c4", {}), ("faster_rcnn_dc5", {"output_stride": 16})],
                         ids=["c4", "dc5"])
def test_two_training_steps_move_every_part(detector, backbone):
    """Two SGD steps on a synthetic image (ResNet-26): finite losses, and the RPN, the box head (C4: the backbone's
    stage 5) and the predictor all move; evaluation gives detections in the image."""
    torch.manual_seed(0)
    # stage 5 on a 14x14 RoI costs 0.6 GMACs: 8x8 RoIs here (the head's equality to stage 5 is tested at 14x14 above)
    extra = ["task.detector.box_head_dim=32"] if detector == "faster_rcnn_dc5" else ["task.detector.roi_size=8"]
    task = _task(detector, *FEW_ROIS, *extra, **backbone)
    head = "backbone.layer4.1.conv3.weight" if detector == "faster_rcnn_c4" else "detector.roi_heads.box_head.fc6.weight"
    watched = [head, "detector.rpn.head.conv.0.0.weight", "detector.roi_heads.box_predictor.bbox_pred.weight",
               "backbone.layer3.0.conv1.weight"]
    parameters = dict(task.named_parameters())
    before = {name: parameters[name].detach().clone() for name in watched}
    optimizer = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9)
    images, targets = _batch()
    images, targets = images[:1], [{k: v for k, v in targets[0].items() if k != "masks"}]  # one image, two boxes
    task.train()
    for _ in range(2):
        losses = task.detector(images, targets)
        assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
        assert all(torch.isfinite(v) for v in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    assert all(not torch.equal(before[name], parameters[name]) for name in watched)
    task.eval()
    with torch.no_grad():
        result = task.detector(images)[0]
    assert len(result["boxes"]) and (result["boxes"][:, 2] <= 80).all() and (result["boxes"][:, 3] <= 64).all()


def test_relation_networks_c4_base_reads_c4_in_the_rpn_and_the_reduced_dilated_c5_in_the_box_head():
    """The official C4 base (relation_rcnn/symbols/resnet_v1_101_rcnn.py): the RPN's 512-channel 3x3 conv and 12
    anchors per position on C4 alone, RoIs pooled 7x7 from ReLU(1x1 conv to 256 of the dilated C5); its losses are
    finite and reach the neck's conv and the RPN."""
    torch.manual_seed(0)
    task = _task("faster_rcnn_c4_2fc", *FEW_ROIS, "task.detector.box_head_dim=32", output_stride=16)
    detector = task.detector
    images, targets = _batch()
    with torch.no_grad():
        features = detector.backbone(torch.rand(1, 3, 64, 80))
        c4, c5 = task.backbone(torch.rand(1, 3, 64, 80))
    assert list(features) == ["2", "3"] and features["3"].shape == (1, 256, 4, 5) and c5.shape[-2:] == (4, 5)
    assert detector.rpn.levels == ["2"] and detector.roi_heads.box_roi_pool.featmap_names == ["3"]
    assert detector.rpn.head.conv[0][0].weight.shape == (512, 1024, 3, 3)
    assert detector.rpn.head.cls_logits.weight.shape == (12, 512, 1, 1)
    task.train()
    losses = detector(images, [{k: v for k, v in t.items() if k != "masks"} for t in targets])
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert detector.backbone.reduce.weight.grad.abs().sum() > 0 and detector.rpn.head.conv[0][0].weight.grad.abs().sum() > 0


def test_a_c4_head_needs_a_resnet_at_stride_32_and_dc5_a_dilated_c5():
    swin = dict(_target_="vtrain.backbones.SwinTransformer", img_size=64, embed_dim=32, depths=[1, 1, 1, 1],
                num_heads=[1, 1, 1, 1], window_size=4)
    with pytest.raises(Exception, match="runs a ResNet's stage 5 on each RoI"):
        DetectionTask(OmegaConf.create(swin), OPTIM, SCHED, num_classes=2, detector=detector_config("faster_rcnn_c4"),
                      **SMALL)
    with pytest.raises(Exception, match=r"needs backbone outputs at strides \[16\].*output_stride=16"):
        _task("faster_rcnn_dc5")


def test_sizes_of_the_experiments_are_their_references():
    """The table rows' models, built as the tables build them (the experiment's task on the meta device, 80
    categories). R50-C4 (FrozenBN: no BatchNorm parameters, as detectron2's) is detectron2's model, rebuilt here from
    torchvision's ResNet-50 trunk, StandardRPNHead's layers (a 3x3 conv keeping the 1024 channels, 15 objectness and
    60 delta outputs) and FastRCNNOutputLayers (2048 -> 81 scores, 2048 -> 80 x 4 deltas), plus the background's box
    row torchvision's predictor has (2048 x 4 + 4); R50-DC5 is DETR Table 1's 166M; Relation Networks' C4 base is
    the official symbol's layers (resnet_v1_101_rcnn.py: R-101 trunk with BatchNorm affine, rpn_conv_3x3 1024 -> 512,
    conv_new_1 2048 -> 256, fc_new_1 256 x 7 x 7 -> 1024, fc_new_2) with torchvision's sigmoid RPN scores (12, not
    24 outputs) and class-specific deltas (81 x 4, not 2 x 4)."""
    def trunk_params(model: nn.Module, batch_norm: bool) -> int:
        norms = sum(count_params(m) for m in model.modules() if isinstance(m, nn.BatchNorm2d))
        return count_params(model) - count_params(model.fc) - (0 if batch_norm else norms)

    with torch.device("meta"):
        c4, dc5, relation_c4 = (build_task(compose(f"experiment={name}")) for name in (
            "faster_rcnn_r50_c4_coco_1x", "faster_rcnn_r50_dc5_coco_3x", "r101_c4_2fc_softnms_coco_1x"))
        detectron2_c4 = trunk_params(resnet50(), False) + count_params(RPNHead(1024, 15)) + count_params(
            nn.Linear(2048, 81)) + count_params(nn.Linear(2048, 320))
        official_c4 = trunk_params(resnet101(), True) + sum(count_params(layer) for layer in (
            nn.Conv2d(1024, 512, 3), nn.Conv2d(512, 12, 1), nn.Conv2d(512, 48, 1), nn.Conv2d(2048, 256, 1),
            nn.Linear(256 * 49, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 81), nn.Linear(1024, 81 * 4)))
    assert not any(".bn" in name for name, _ in c4.named_parameters())
    assert count_params(c4) == detectron2_c4 + 2048 * 4 + 4 == 33_799_840
    assert count_params(dc5) == 165_585_568  # DETR Table 1: 166M
    assert count_params(relation_c4) == official_c4 == 62_085_393  # paper 58.3M (docs/detection.md)
