"""R-CNN heads: vtrain's RPN / RoI-head classes compute what torchvision's do with the defaults, and each of
mmdetection v2's settings (task/detector/rcnn=mmdet) against a hand-computed or reference case."""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork
from torchvision.ops import roi_align

from conftest import ROOT
from test_detection_models import TINY_SWIN, _batch, _task
from vtrain.tasks.detection.roi_heads import (
    DetectionRPN, LowQualityMatcher, PyramidRoIAlign, RCNNSettings, box_losses,
)

pytestmark = pytest.mark.usefixtures("one_thread")
MMDET = OmegaConf.load(ROOT / "conf" / "task" / "detector" / "rcnn" / "mmdet.yaml")


def torchvision_heads(heads) -> RoIHeads:
    return RoIHeads(heads.box_roi_pool, heads.box_head, heads.box_predictor, heads.proposal_matcher.high_threshold,
                    heads.proposal_matcher.low_threshold, heads.fg_bg_sampler.batch_size_per_image,
                    heads.fg_bg_sampler.positive_fraction, heads.box_coder.weights, heads.score_thresh,
                    heads.nms_thresh, heads.detections_per_img, mask_roi_pool=heads.mask_roi_pool,
                    mask_head=heads.mask_head, mask_predictor=heads.mask_predictor)


def test_the_default_heads_compute_what_torchvisions_do():
    """Mask R-CNN with task/detector/rcnn=torchvision, two_fc, nms: the RoI heads' training losses (same random sampling) and
    detections equal torchvision's RoIHeads on the same modules; the RPN's losses equal torchvision's."""
    torch.manual_seed(0)
    task = _task(TINY_SWIN, "mask_rcnn", "+task.detector.model.box_score_thresh=0.0")
    detector = task.detector
    images, targets = _batch()
    image_list, targets = detector.transform(images, targets)
    features = detector.backbone(image_list.tensors)
    ours, theirs = detector.roi_heads, torchvision_heads(detector.roi_heads)
    rpn = detector.rpn
    reference_rpn = RegionProposalNetwork(rpn.anchor_generator, rpn.head, 0.7, 0.3, 256, 0.5,
                                          dict(rpn._pre_nms_top_n), dict(rpn._post_nms_top_n), rpn.nms_thresh)
    for module in (task, theirs, reference_rpn):
        module.train()
    proposals = None
    for rpn_module in (rpn, reference_rpn):
        torch.manual_seed(1)
        proposals, rpn_losses = rpn_module(image_list, features, targets)
        if rpn_module is rpn:
            expected_rpn = rpn_losses
    assert all(torch.equal(expected_rpn[k], rpn_losses[k]) for k in rpn_losses)
    proposals = [p.detach() for p in proposals]
    results = []
    for heads in (ours, theirs):
        torch.manual_seed(2)
        results.append(heads(features, proposals, image_list.image_sizes, targets)[1])
    assert results[0].keys() == results[1].keys() == {"loss_classifier", "loss_box_reg", "loss_mask"}
    assert all(torch.allclose(results[0][k], results[1][k]) for k in results[0])
    for heads in (ours, theirs):
        heads.eval()
    with torch.no_grad():
        mine, reference = (h(features, proposals, image_list.image_sizes)[0] for h in (ours, theirs))
    for a, b in zip(mine, reference):
        assert len(a["boxes"]) > 10
        assert all(torch.equal(a[k], b[k]) for k in ("boxes", "labels", "scores", "masks"))


def test_aligned_roi_align_equals_torchvisions_roi_align_and_the_hand_computed_bins():
    """A 56-pixel box maps to P2 (stride 4; the FPN paper's Eq. 1, mmdet's finest_scale 56 alike): the pyramid's
    aligned RoIAlign equals roi_align(aligned=True, sampling_ratio=0) there; on a map whose value is its x
    coordinate, bin i holds x1/4 - 1/2 + (i + 1/2) * bin width (aligned) and half a pixel more without alignment."""
    g = torch.Generator().manual_seed(0)
    features = OrderedDict((str(level), torch.rand(1, 3, 64 // 2**level, 64 // 2**level, generator=g))
                           for level in range(4))
    box = torch.tensor([[16.0, 16.0, 72.0, 72.0]])
    aligned = PyramidRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=0, aligned=True)
    pooled = aligned(features, [box], [(256, 256)])
    rois = torch.cat([torch.zeros(1, 1), box], dim=1)
    assert torch.allclose(pooled, roi_align(features["0"], rois, 7, 0.25, sampling_ratio=0, aligned=True))
    assert not torch.allclose(pooled, roi_align(features["0"], rois, 7, 0.25, sampling_ratio=2, aligned=False))

    ramp = OrderedDict((str(level), torch.arange(64 // 2**level, dtype=torch.float).expand(1, 1, 64 // 2**level, -1)
                        .contiguous()) for level in range(4))
    bins = 16 / 4 - 0.5 + (torch.arange(7) + 0.5) * (56 / 4 / 7)
    assert torch.allclose(aligned(ramp, [box], [(256, 256)])[0, 0, 3], bins)
    unaligned = PyramidRoIAlign(["0", "1", "2", "3"], 7, sampling_ratio=2, aligned=False)
    assert torch.allclose(unaligned(ramp, [box], [(256, 256)])[0, 0, 3], bins + 0.5)


def test_l1_box_losses_by_hand():
    """Two sampled RoIs, one positive of class 1: its class-1 deltas (0.5, -1, 2, 0) against (0, 0, 1, 1) give
    L1 0.5 + 1 + 1 + 1 = 3.5 over 2 sampled RoIs; torchvision's smooth L1 (beta 1/9) gives 3.5 - 4/18 over 2."""
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    deltas = torch.tensor([[9.0, 9.0, 9.0, 9.0, 0.5, -1.0, 2.0, 0.0], [7.0] * 8])
    labels, targets = torch.tensor([1, 0]), torch.tensor([[0.0, 0.0, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]])
    classification, l1 = box_losses(logits, deltas, labels, targets, beta=0.0)
    assert l1.item() == pytest.approx(3.5 / 2)
    assert classification.item() == pytest.approx((math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2)
    assert box_losses(logits, deltas, labels, targets, beta=1 / 9)[1].item() == pytest.approx((3.5 - 4 / 18) / 2)

    rpn = DetectionRPN(None, None, 0.7, 0.3, 256, 0.5, {"training": 1, "testing": 1}, {"training": 1, "testing": 1},
                       0.7, box_loss_beta=0.0)  # every anchor sampled: 3 < 256
    objectness = torch.tensor([[0.0], [1.0], [-1.0]])
    anchor_deltas = torch.tensor([[0.5, -1.0, 2.0, 0.0], [3.0, 3.0, 3.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
    _, rpn_l1 = rpn.compute_loss(objectness, anchor_deltas, [torch.tensor([1.0, 0.0, 0.0])],
                                 [torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0] * 4, [0.0] * 4])])
    assert rpn_l1.item() == pytest.approx(3.5 / 3)


def test_rpn_low_quality_matches_at_min_pos_iou_by_hand():
    """IoU of 3 ground truths (rows) with 4 anchors; positive >= 0.7, negative < 0.3. mmdet (min_pos_iou 0.3) drops
    ground truth 0's 0.25 match and gives anchor 1 to ground truth 1 (whose best it is); torchvision keeps the
    0.25 match and gives anchor 1 to its own best ground truth, 2."""
    iou = torch.tensor([[0.25, 0.10, 0.00, 0.00],
                        [0.20, 0.40, 0.40, 0.05],
                        [0.00, 0.45, 0.00, 0.80]])
    assert LowQualityMatcher(0.7, 0.3, min_pos_iou=0.3)(iou).tolist() == [-1, 1, 1, 2]
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(iou).tolist() == [0, 2, 1, 2]
    assert LowQualityMatcher(0.7, 0.3, min_pos_iou=0.0)(iou).tolist() == [0, 1, 1, 2]


def test_mmdet_settings_and_initialisation():
    """task/detector/rcnn=mmdet builds the aligned, adaptive RoIAlign, L1 losses, the min_pos_iou matcher, and mmdet's
    initialisation: Xavier-uniform FPN convs and fc layers (std sqrt(2 / (fan_in + fan_out)), inside the uniform
    bound), N(0, 0.01) classifier, N(0, 0.001) regressor, zero biases; the RPN head is N(0, 0.01) in both."""
    torch.manual_seed(0)
    task = _task(TINY_SWIN, "mask_rcnn", "task/detector/rcnn=mmdet")
    detector = task.detector
    assert detector.roi_heads.box_roi_pool.aligned and detector.roi_heads.box_roi_pool.sampling_ratio == 0
    assert detector.roi_heads.mask_roi_pool.aligned and detector.roi_heads.mask_roi_pool.output_size == (14, 14)
    assert detector.rpn.box_loss_beta == 0.0 and detector.roi_heads.box_loss_beta == 0.0
    assert detector.rpn.proposal_matcher.min_pos_iou == 0.3
    assert RCNNSettings().is_torchvision and not OmegaConf.to_object(MMDET) == RCNNSettings()

    def check_xavier(weight):
        fan_out, fan_in = weight.shape[0], weight[0].numel()
        fan_out *= weight[0, 0].numel()
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert weight.abs().max() <= bound
        assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)

    fpn_convs = [m for m in detector.backbone.fpn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(fpn_convs) == 8
    for conv in fpn_convs:
        check_xavier(conv.weight)
        assert not conv.bias.any()
    heads = detector.roi_heads
    for fc in (heads.box_head.fc6, heads.box_head.fc7):
        check_xavier(fc.weight)
        assert not fc.bias.any()
    assert heads.box_predictor.cls_score.weight.std().item() == pytest.approx(0.01, rel=0.1)
    assert heads.box_predictor.bbox_pred.weight.std().item() == pytest.approx(0.001, rel=0.1)
    assert detector.rpn.head.conv[0][0].weight.std().item() == pytest.approx(0.01, rel=0.05)
    images, targets = _batch()
    task.train()
    losses = task(images, targets)
    assert torch.isfinite(sum(losses.values()))


def test_parts_another_detector_has_are_refused_in_one_line():
    """A detector config lists its own parts: an R-CNN part named for RetinaNet is no part of it (Hydra says so),
    the learned duplicate removal needs RoI features, and a key left from another choice of a part (Hydra keeps it
    when the choice switches) is one line naming it."""
    from hydra.errors import ConfigCompositionException

    from test_detection_models import detector_config
    from vtrain.config import ConfigError

    for part in ("box_head=relation", "rcnn=mmdet"):
        with pytest.raises(ConfigCompositionException, match=f"Could not override 'task/detector/{part.split('=')[0]}'"):
            detector_config("retinanet", f"task/detector/{part}")
    with pytest.raises(ConfigError, match="task/detector/nms=learned needs R-CNN RoI features, RetinaNet has none"):
        _task(TINY_SWIN, "retinanet", "task/detector/nms=learned", "task.detector.nms.feature_dim=64")
    with pytest.raises(ConfigError, match=r"task.detector is a config, not 'soft_nms': pick one with task/detector="):
        from vtrain.tasks.detection.detector import build_spec

        build_spec("soft_nms")
    with pytest.raises(ConfigError, match=r"task.detector.box_head.num_heads: torchvision.models.detection.faster_rcnn."
                                          r"TwoMLPHead does not take it .* drop it with ~task.detector.box_head.num_heads"):
        _task(TINY_SWIN, "faster_rcnn", "+task.detector.box_head.num_heads=16")
    with pytest.raises(ConfigError, match=r"task.detector.nms.sigma: vtrain.tasks.detection.relation.LearnedNMS does "
                                          r"not take it"):
        _task(TINY_SWIN, "faster_rcnn", "task/detector/nms=learned", "+task.detector.nms.sigma=0.6")
    # what the quickstart sets for its Mask R-CNN, left when the detector switches: every stray key in one line
    with pytest.raises(ConfigError, match=r"OneStageSpec does not take it .*: drop them with "
                                          r"~task.detector.box_head_dim ~task.detector.mask_head_dims$"):
        from vtrain.tasks.detection.detector import build_spec

        build_spec(detector_config("retinanet", "+task.detector.box_head_dim=64", "+task.detector.mask_head_dims=[8]"))
