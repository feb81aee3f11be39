"""Cascade (Mask) R-CNN with mmdetection v2's CascadeRoIHead semantics (tasks/detection/cascade.py): each stage's
targets at its own IoU, the GIoU box loss and its normaliser, the refinement between stages, the test-time average of
the stages' logits and masks, sizes against the Swin paper's, and a training step that reaches every parameter."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from conftest import compose
from test_detection_models import OPTIM, SCHED, SMALL, TINY_SWIN, _batch
from vtrain.profiling import count_params
from vtrain.tasks.detection.cascade import CascadeRoIHeads, CascadeStage, ConvFCBoxHead
from vtrain.tasks.detection.module import DetectionTask

pytestmark = pytest.mark.usefixtures("one_thread")

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
# IoU with GT: 1.0, 0.65, 0.55, 0.3 (the same left, top and width; heights 10, 6.5, 5.5, 3)
PROPOSALS = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 6.5], [0.0, 0.0, 10.0, 5.5], [0.0, 0.0, 10.0, 3.0]])


def _heads(num_classes=2, stages=3, **kwargs) -> CascadeRoIHeads:
    torch.manual_seed(0)
    made = [CascadeStage(ConvFCBoxHead(4, num_convs=0, num_fcs=1, fc_dim=8, roi_size=2), num_classes,
                         kwargs.pop("class_agnostic", False)) for _ in range(stages)]
    options = dict(iou_thresholds=[0.5, 0.6, 0.7][:stages], loss_weights=[1.0, 0.5, 0.25][:stages],
                   target_stds=[[0.1, 0.1, 0.2, 0.2], [0.05, 0.05, 0.1, 0.1], [0.033, 0.033, 0.067, 0.067]][:stages])
    return CascadeRoIHeads(None, made, **{**options, **kwargs})


def test_each_stage_labels_its_proposals_at_its_own_iou():
    """mmdet's MaxIoUAssigner(pos = neg = min_pos = t, no low-quality matches) per stage, the ground truth added as a
    proposal of its own (positive, flagged so the refinement drops it)."""
    heads = _heads()
    expected = {0: [2, 2, 2, 0, 2], 1: [2, 2, 0, 0, 2], 2: [2, 0, 0, 0, 2]}
    for stage, labels in expected.items():
        rois, got, matched, is_gt = heads.sample(stage, [PROPOSALS], [GT], [torch.tensor([2])])
        assert torch.equal(rois[0], torch.cat([PROPOSALS, GT]))  # few enough to be all sampled, in order
        assert got[0].tolist() == labels, stage
        assert is_gt[0].tolist() == [False] * 4 + [True] and matched[0].tolist() == [0] * 5


def test_the_giou_loss_is_ten_times_its_sum_over_positives_per_sampled_roi():
    """reg_decoded_bbox + GIoULoss(loss_weight=10) with mmdet's avg_factor (all sampled RoIs): with zero deltas the
    predicted boxes are the RoIs, so the loss is 10 * sum(1 - GIoU(roi, gt)) / N, GIoU worked out by hand."""
    heads = _heads()
    stage = heads.stages[0]
    rois = [torch.tensor([[0.0, 0.0, 10.0, 6.5], [20.0, 20.0, 30.0, 30.0], [0.0, 0.0, 10.0, 5.5]])]
    label = torch.tensor([2, 0, 1])
    deltas = torch.zeros(3, 8)
    loss = heads.stage_box_loss(0, stage, deltas, rois, label, [torch.tensor([0, 0, 0])], [GT])
    # a box inside the ground truth: GIoU = IoU (the enclosing box is the ground truth itself)
    assert loss.item() == pytest.approx(10 * ((1 - 0.65) + (1 - 0.55)) / 3, rel=1e-6)
    shifted = [torch.tensor([[5.0, 0.0, 15.0, 10.0]])]  # IoU 50/150, enclosing 15 x 10: GIoU = 1/3 - 0/150
    loss = heads.stage_box_loss(0, stage, torch.zeros(1, 8), shifted, torch.tensor([1]), [torch.tensor([0])], [GT])
    assert loss.item() == pytest.approx(10 * (1 - 1 / 3), rel=1e-6)


def test_refinement_moves_each_roi_by_its_label_deltas_and_clips_to_the_image():
    """mmdet's regress_by_class with max_shape: a delta of 1 on x with stage 0's std 0.1 moves a 10-wide RoI by
    1 px; the label's own 4 deltas are read; the result is clipped to the image."""
    heads = _heads()
    stage = heads.stages[0]
    rois = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])]
    deltas = torch.zeros(2, 8)
    deltas[0, 4] = 1.0  # class 2's dx for the first RoI
    deltas[1, 0] = 10.0  # class 1's dx for the second: 10 px to the right, past the 55-wide image
    refined = heads.refine(0, stage, deltas, rois, torch.tensor([2, 1]), [(40, 55)])[0]
    torch.testing.assert_close(refined, torch.tensor([[1.0, 0.0, 11.0, 10.0], [55.0, 40.0, 55.0, 40.0]]))


def test_test_time_scores_are_the_softmax_of_the_stages_mean_logits():
    """mmdet's simple_test: the stages' raw logits averaged, then soft-maxed; boxes from the last stage."""
    heads = _heads(score_thresh=0.0)
    biases = [torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, -2.0, 4.0])]
    for stage, bias in zip(heads.stages, biases):
        torch.nn.init.zeros_(stage.cls_score.weight)
        stage.cls_score.bias.data = bias
        torch.nn.init.zeros_(stage.bbox_pred.weight)
        torch.nn.init.zeros_(stage.bbox_pred.bias)
    heads.box_roi_pool = lambda features, rois, shapes: torch.zeros(sum(len(r) for r in rois), 4, 2, 2)
    heads.eval()
    result = heads({}, [GT.clone()], [(20, 20)])[0][0]
    expected = torch.softmax(torch.stack(biases).mean(0), 0)  # [1/3, 0, 1]
    assert sorted(result["scores"].tolist()) == pytest.approx(sorted(expected[1:].tolist()))
    assert torch.equal(result["boxes"], GT.expand(2, 4))


def _cascade(backbone=TINY_SWIN, *overrides):
    detector = compose("task=detection", "task/detector=cascade_mask_rcnn", "task.detector.neck.out_channels=32",
                       "task.detector.box_head.conv_dim=16", "task.detector.box_head_dim=32",
                       "task.detector.mask_head_dims=[16]", "task.detector.batch_size_per_image=32",
                       "task.detector.model.rpn_pre_nms_top_n_train=100",
                       "task.detector.model.rpn_post_nms_top_n_train=50", *overrides).task.detector
    return DetectionTask(OmegaConf.create(backbone), OPTIM, SCHED, num_classes=2, detector=detector, **SMALL)


def test_a_training_step_reaches_every_parameter_and_evaluation_gives_masks():
    torch.manual_seed(0)
    task = _cascade()
    images, targets = _batch()
    task.train()
    losses = task(images, targets)
    assert {f"s{i}.loss_{k}" for i in range(3) for k in ("cls", "bbox", "mask")} <= set(losses)
    loss = sum(losses.values())
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    reached = {n for n, p in task.named_parameters() if p.grad is not None}
    assert reached == {n for n, p in task.named_parameters() if p.requires_grad}
    task.eval()
    with torch.no_grad():
        outputs = task(images)
    for image, out in zip(images, outputs):
        assert set(out) == {"boxes", "labels", "scores", "masks"} and out["masks"].shape[-2:] == image.shape[-2:]


@pytest.mark.parametrize("backbone, measured, paper", [("swin_t", 85_629_804, 86), ("resnet50", 82_231_538, 82)])
def test_sizes_are_the_swin_papers(backbone, measured, paper):
    """Swin Table 2(b) (arXiv v2): Cascade Mask R-CNN with R-50 82M, Swin-T 86M parameters (80 COCO categories)."""
    cfg = compose("task=detection", "task/detector=cascade_mask_rcnn", f"backbone={backbone}")
    with torch.device("meta"):
        task = DetectionTask(cfg.task.backbone, OPTIM, SCHED, num_classes=80, detector=cfg.task.detector)
    assert count_params(task) == measured and round(measured / 1e6) == paper


@pytest.mark.slow
def test_quickstart_cascade_learns_under_ddp(tmp_path_factory):
    """quickstart_cascade (the quickstart's Swin, the Swin recipes' three-stage cascade at CPU widths) on 2 CPU
    processes with plain DDP (a parameter without a gradient would stop it), 4 epochs on 96 synthetic images; COCO AP
    by the evaluator. Measured (2 shared cores, about 65 s of CPU time): val/bbox_AP 0.000 after the first epoch,
    0.093 after the fourth (AP50 0.204, segm AP 0.079); the full quickstart (192 images, 8 epochs): 0.468 / 0.470."""
    import csv
    import json

    from conftest import run_forked
    from vtrain.tasks.detection.synthetic import write

    root, run_dir = tmp_path_factory.mktemp("coco"), tmp_path_factory.mktemp("run")
    write(root, seed=0, train_images=96, val_images=15)
    result = run_forked("experiment=quickstart_cascade", f"data.root={root}", "trainer=ddp_cpu", "trainer.max_epochs=4",
                     "data.num_workers=0", "callbacks.progress_bar=null", f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["coco_num_images"] == 15 and metrics["global_step"] == 4 * 11
    first_epoch = next(r for r in csv.DictReader((run_dir / "metrics.csv").open()) if r["val/bbox_AP"])
    assert float(first_epoch["val/bbox_AP"]) < 0.01
    final = metrics["final"]
    assert final["val/bbox_AP"] > 0.04 and final["val/bbox_AP50"] > 0.1 and final["val/segm_AP"] > 0.03, final
