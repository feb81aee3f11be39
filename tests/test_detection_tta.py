"""Multi-scale + flip testing for detection (tasks/detection/test_time_augmentation.py): mmdet v2's merges on hand
cases, one view equal to the plain test, and flip equivariance on a tiny Mask R-CNN."""
from __future__ import annotations

import pytest
import torch

from test_detection_cascade import _cascade
from test_detection_models import TINY_SWIN, _task
from vtrain.config import ConfigError
from vtrain.tasks.detection.test_time_augmentation import (
    View,
    average_boxes,
    average_masks,
    class_wise_nms,
    merge_detections,
    merge_proposals,
    multi_scale_flip_views,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_views_follow_mmdet_multi_scale_flip_aug_and_bad_values_say_what_is_wrong():
    assert multi_scale_flip_views([480, 800], True, 800) == (View(480, False), View(480, True), View(800, False), View(800, True))
    assert multi_scale_flip_views(None, True, 800) == (View(800, False), View(800, True))
    assert multi_scale_flip_views(None, False, 800) is None
    with pytest.raises(ConfigError, match=r"task.test_scales=\[\]: give the test short sides"):
        multi_scale_flip_views([], False, 800)
    for bad in (0, -600, 1.5):
        with pytest.raises(ConfigError, match=rf"{bad!r} is not a short side in pixels") as error:
            multi_scale_flip_views([800, bad], False, 800)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match=r"task.test_scales=800: give a list of short sides, e.g. \[800\]"):
        multi_scale_flip_views(800, False, 800)


def test_merges_against_a_hand_case():
    # original image 100 x 200 (H x W); view a: half size, not flipped; view b: full size, flipped (width 200)
    views, sizes, original = (View(50, False), View(100, True)), [(50, 100), (100, 200)], (100, 200)
    a = torch.tensor([[[10.0, 5, 30, 25]]]), torch.tensor([[0.6]])  # -> original: [20, 10, 60, 50]
    b = torch.tensor([[[130.0, 12, 175, 48]]]), torch.tensor([[0.8]])  # un-flipped: [25, 12, 70, 48]
    boxes, scores = average_boxes(views, [a, b], sizes, original)
    torch.testing.assert_close(boxes, torch.tensor([[[22.5, 11, 65, 49]]]))
    torch.testing.assert_close(scores, torch.tensor([[0.7]]))

    # merge_aug_proposals: concatenated, NMS at 0.7 whatever the view, the best count
    kept = merge_proposals([torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 60]]), torch.tensor([[0.0, 0, 10, 9.5]])],
                           [torch.tensor([0.5, 0.2]), torch.tensor([0.9])], 0.7, 2)
    torch.testing.assert_close(kept, torch.tensor([[0.0, 0, 10, 9.5], [50, 50, 60, 60]]))

    # merge_aug_masks: the flipped view's RoI masks mirrored back, then averaged
    masks = average_masks(views, [torch.tensor([[[[0.0, 1.0]]]]), torch.tensor([[[[1.0, 0.5]]]])])
    torch.testing.assert_close(masks, torch.tensor([[[[0.25, 1.0]]]]))

    # set prediction: each view's detections (original scale) un-flipped at width 100, concatenated,
    # class-wise NMS at 0.5, the best 2
    width_100 = (60, 100)
    plain = {"boxes": torch.tensor([[10.0, 10, 40, 40], [60, 30, 90, 50]]), "scores": torch.tensor([0.9, 0.3]),
             "labels": torch.tensor([1, 2])}
    flipped = {"boxes": torch.tensor([[60.0, 10, 90, 40], [5, 5, 20, 20]]), "scores": torch.tensor([0.8, 0.5]),
               "labels": torch.tensor([1, 1])}
    merged = merge_detections((View(60, False), View(60, True)), [plain, flipped], width_100,
                              class_wise_nms(0.5, 2))
    torch.testing.assert_close(merged["boxes"], torch.tensor([[10.0, 10, 40, 40], [80, 5, 95, 20]]))
    torch.testing.assert_close(merged["scores"], torch.tensor([0.9, 0.5]))
    assert merged["labels"].tolist() == [1, 1]


@pytest.fixture(scope="module")
def mask_rcnn():
    torch.manual_seed(0)
    return _task(TINY_SWIN, "mask_rcnn", "+task.detector.model.box_score_thresh=0.0").eval()


@pytest.fixture(scope="module")
def image():
    return torch.rand(3, 64, 80, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_one_view_at_the_test_size_is_the_plain_test(mask_rcnn, image):
    plain = mask_rcnn([image])[0]
    mask_rcnn.test_views = multi_scale_flip_views([64], False, 64)
    try:
        one = mask_rcnn([image])[0]
    finally:
        mask_rcnn.test_views = None
    assert len(plain["boxes"]) > 10 and plain.keys() == one.keys()
    for key in plain:
        assert torch.equal(plain[key], one[key]), key


@torch.no_grad()
def test_flip_testing_an_image_and_its_mirror_gives_mirrored_detections(mask_rcnn, image):
    mask_rcnn.test_views = multi_scale_flip_views([48, 64], True, 64)
    try:
        found, mirrored = mask_rcnn([image, image.flip(-1)])
    finally:
        mask_rcnn.test_views = None
    width = image.shape[-1]
    assert len(found["boxes"]) > 10
    back = mirrored["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + torch.tensor([width, 0, width, 0])
    torch.testing.assert_close(back, found["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(mirrored["scores"], found["scores"], atol=1e-5, rtol=0)
    assert torch.equal(mirrored["labels"], found["labels"])
    assert (mirrored["masks"].flip(-1) - found["masks"]).abs().mean() < 0.02


@torch.no_grad()
def test_cascade_mask_rcnn_one_view_is_the_plain_test_and_flip_testing_is_mirrored(image):
    torch.manual_seed(0)
    cascade = _cascade(TINY_SWIN, "task.detector.score_thresh=0.0").eval()
    plain = cascade([image])[0]
    cascade.test_views = multi_scale_flip_views([64], False, 64)
    one = cascade([image])[0]
    assert len(plain["boxes"]) > 10 and all(torch.equal(plain[key], one[key]) for key in plain)
    cascade.test_views = multi_scale_flip_views([48, 64], True, 64)
    found, mirrored = cascade([image, image.flip(-1)])
    assert len(found["boxes"]) > 10 and torch.equal(mirrored["labels"], found["labels"])
    torch.testing.assert_close(mirrored["scores"], found["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mirrored["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + 80.0 * torch.tensor([1.0, 0, 1, 0]),
                               found["boxes"], atol=1e-3, rtol=0)


@torch.no_grad()
def test_fcos_merges_the_views_candidates_with_its_own_nms_and_flip_testing_is_mirrored():
    torch.manual_seed(0)
    fcos = _task(TINY_SWIN, "fcos", "+task.detector.model.score_thresh=0.0", "+task.detector.model.detections_per_img=50")
    fcos.eval()
    image = torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(0))
    fcos.detector.transform.min_size, fcos.detector.transform.max_size = (128,), 320
    plain = fcos([image])[0]
    fcos.test_views = multi_scale_flip_views([128], False, 128)
    assert all(torch.equal(plain[key], value) for key, value in fcos([image])[0].items())
    fcos.test_views = multi_scale_flip_views([128, 160], True, 128)
    with fcos.detector.all_candidates():
        candidates = fcos.detector([image])[0]
    found, mirrored = fcos([image, image.flip(-1)])
    assert len(found["boxes"]) == 50 < len(candidates["boxes"])  # the views' candidates, NMSed, the best 50
    torch.testing.assert_close(mirrored["scores"], found["scores"], atol=1e-5, rtol=0)
    torch.testing.assert_close(mirrored["boxes"][:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1, -1, 1]) + 160.0 * torch.tensor([1.0, 0, 1, 0]),
                               found["boxes"], atol=1e-3, rtol=0)
