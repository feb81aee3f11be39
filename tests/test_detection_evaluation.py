"""The COCO evaluator gives pycocotools' COCOeval numbers: crowd regions, images without ground truth,
both iou types, all 12 numbers; faster-coco-eval as a backend gives the same numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from vtrain.tasks.detection.evaluation import STAT_NAMES, CocoEvaluator, to_coco_results

H = W = 200
CATEGORIES = [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}]  # labels 1, 2


def _rect_mask(x1, y1, x2, y2) -> np.ndarray:
    m = np.zeros((H, W), dtype=np.uint8)
    m[int(y1):int(y2), int(x1):int(x2)] = 1
    return m


def _detected_mask(x1, y1, x2, y2) -> np.ndarray:
    """A detection's mask: the left 3/4 of its box, so that mask and box scores differ."""
    return _rect_mask(x1, y1, x1 + 0.75 * (x2 - x1), y2)


def _rle(m: np.ndarray) -> dict:
    r = mask_utils.encode(np.asfortranarray(m))
    return {"size": r["size"], "counts": r["counts"].decode("ascii")}


@pytest.fixture(scope="module")
def ground_truth(tmp_path_factory):
    """Image 1: a small and a medium instance and a crowd region; image 2: nothing; image 3: a large
    instance (RLE) and a medium polygon."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0,
         "segmentation": [[10, 10, 30, 10, 30, 30, 10, 30]]},
        {"id": 2, "image_id": 1, "category_id": 7, "bbox": [60, 60, 50, 40], "area": 2000.0, "iscrowd": 0,
         "segmentation": [[60, 60, 110, 60, 110, 100, 60, 100]]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [120, 120, 70, 70], "area": 4900.0, "iscrowd": 1,
         "segmentation": _rle(_rect_mask(120, 120, 190, 190))},
        {"id": 4, "image_id": 3, "category_id": 7, "bbox": [20, 20, 150, 150], "area": 22500.0, "iscrowd": 0,
         "segmentation": _rle(_rect_mask(20, 20, 170, 170))},
        {"id": 5, "image_id": 3, "category_id": 3, "bbox": [5, 175, 60, 20], "area": 1200.0, "iscrowd": 0,
         "segmentation": [[5, 175, 65, 175, 65, 195, 5, 195]]},
    ]
    data = {
        "images": [{"id": i, "file_name": f"{i}.jpg", "height": H, "width": W} for i in (1, 2, 3)],
        "annotations": anns,
        "categories": CATEGORIES,
    }
    path = tmp_path_factory.mktemp("coco_gt") / "instances_val.json"
    path.write_text(json.dumps(data))
    return path


# Detections per image as (x1, y1, x2, y2, label, score): good, shifted, wrong-class, on the crowd
# region (ignored, not a false positive), and on image 2 (no ground truth: false positives).
DETECTIONS = {
    1: [(11, 9, 31, 29, 1, 0.9), (62, 58, 112, 104, 2, 0.8), (60, 60, 110, 100, 1, 0.3), (125, 125, 160, 160, 1, 0.7),
        (0, 150, 40, 199, 2, 0.6)],
    2: [(50, 50, 90, 90, 1, 0.95), (10, 10, 20, 30, 2, 0.2)],
    3: [(25, 18, 175, 165, 2, 0.85), (5, 170, 60, 195, 1, 0.5), (100, 100, 150, 150, 2, 0.4)],
}


def _outputs(image_id: int) -> dict[str, torch.Tensor]:
    """What torchvision's Mask R-CNN returns for the image: boxes, labels, scores, (N, 1, H, W) mask probabilities."""
    dets = DETECTIONS[image_id]
    masks = torch.stack([torch.from_numpy(_detected_mask(*d[:4])).float() * 0.9 for d in dets])[:, None]
    return {
        "boxes": torch.tensor([d[:4] for d in dets], dtype=torch.float32),
        "labels": torch.tensor([d[4] for d in dets]),
        "scores": torch.tensor([d[5] for d in dets]),
        "masks": masks,
    }


def _reference_results(iou_type: str) -> list[dict]:
    """The same detections written by hand in the COCO results format."""
    out = []
    for image_id, dets in DETECTIONS.items():
        for x1, y1, x2, y2, label, score in dets:
            entry = {"image_id": image_id, "category_id": CATEGORIES[label - 1]["id"], "score": score}
            if iou_type == "bbox":
                entry["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            else:
                entry["segmentation"] = _rle(_detected_mask(x1, y1, x2, y2))
            out.append(entry)
    return out


def _pycocotools_stats(gt_path, iou_type: str) -> np.ndarray:
    gt = COCO(str(gt_path))
    coco_eval = COCOeval(gt, gt.loadRes(_reference_results(iou_type)), iou_type)
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval.stats


@pytest.mark.parametrize("backend", ["pycocotools", "faster_coco_eval"])
def test_evaluator_equals_cocoeval(ground_truth, tmp_path, backend):
    evaluator = CocoEvaluator(ground_truth, [3, 7], ["cat", "dog"], ("bbox", "segm"), backend=backend)
    evaluator.update([3, 1], [_outputs(3), _outputs(1)])
    evaluator.update([2], [_outputs(2)])
    summary = evaluator.compute(tmp_path)
    assert summary["num_images"] == 3
    for iou_type in ("bbox", "segm"):
        reference = _pycocotools_stats(ground_truth, iou_type)
        ours = np.array([summary[iou_type][name] for name in STAT_NAMES])
        np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-12, err_msg=f"{backend} {iou_type}")
        # the hand-made case exercises every area range with real (not -1, not 0/1) values
        assert 0.2 < summary[iou_type]["AP"] < 0.9
        assert all(v > -1 for v in ours)
    # box and mask numbers differ: the mask AP is computed on masks, not on boxes
    assert summary["segm"]["AP"] < summary["bbox"]["AP"] - 0.05
    written = json.loads((tmp_path / "detections_segm.json").read_text())
    assert len(written) == sum(len(d) for d in DETECTIONS.values())
    assert all("bbox" not in r for r in written)  # a bbox would make COCOeval use the box area for segm
    assert len(json.loads((tmp_path / "detections_bbox.json").read_text())) == len(written)


def test_crowd_and_empty_images_follow_cocoeval(ground_truth, tmp_path):
    """The detection on the crowd region is ignored and those on image 2 are false positives: dropping them
    changes nothing resp. raises the AP, as pycocotools says."""
    full = CocoEvaluator(ground_truth, [3, 7], ["cat", "dog"], ("bbox",))
    full.update([1, 2, 3], [_outputs(i) for i in (1, 2, 3)])
    ap = full.compute()["bbox"]["AP"]

    def without(image_id: int, index: int) -> dict:
        o = _outputs(image_id)
        keep = torch.arange(len(o["scores"])) != index
        return {k: v[keep] for k, v in o.items()}

    no_crowd_hit = CocoEvaluator(ground_truth, [3, 7], ["cat", "dog"], ("bbox",))
    no_crowd_hit.update([1, 2, 3], [without(1, 3), _outputs(2), _outputs(3)])
    assert no_crowd_hit.compute()["bbox"]["AP"] == pytest.approx(ap, abs=1e-12)

    no_false_positive = CocoEvaluator(ground_truth, [3, 7], ["cat", "dog"], ("bbox",))
    no_false_positive.update([1, 2, 3], [_outputs(1), without(2, 0), _outputs(3)])
    assert no_false_positive.compute()["bbox"]["AP"] > ap + 0.01


def test_no_detections_and_label_zero(ground_truth):
    """An epoch with no detection scores 0 (pycocotools itself cannot load an empty result list);
    label 0 (RetinaNet's / FCOS's unused background logit) maps to no category."""
    evaluator = CocoEvaluator(ground_truth, [3, 7], ["cat", "dog"], ("bbox",))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long), "scores": torch.zeros(0)}
    evaluator.update([1, 2, 3], [empty] * 3)
    assert evaluator.compute()["bbox"]["AP"] == 0.0
    out = {"boxes": torch.tensor([[0.0, 0, 5, 5], [1, 1, 9, 9]]), "labels": torch.tensor([0, 2]),
           "scores": torch.tensor([0.9, 0.8])}
    results = to_coco_results(1, out, [3, 7])["bbox"]
    assert [(r["category_id"], r["bbox"]) for r in results] == [(7, [1.0, 1.0, 8.0, 8.0])]


def test_predictions_as_coco_results_give_the_evaluators_ap(ground_truth, tmp_path, one_thread):
    """What ``python -m vtrain.predict`` writes beside the instance JSON (``detections_bbox.json``,
    ``detections_segm.json``): pycocotools' ``loadRes`` reads it, and COCOeval on it gives the AP the evaluator
    gives on the same outputs; image ids come from the annotation file by file name."""
    import vtrain
    from vtrain.tasks.detection.module import coco_image_ids
    from vtrain.training.module import PredictOptions

    task, _ = vtrain.build(vtrain.compose("quickstart_det", [
        "backbone.embed_dim=16", "backbone.depths=[1,1,1,1]", "backbone.num_heads=[1,1,2,2]", "backbone.window_size=4",
        "task.detector.neck.out_channels=16", f"output_dir={tmp_path}"]))
    task.class_names, task.class_ids = ["cat", "dog"], [3, 7]
    options = PredictOptions(score_threshold=0.0, max_detections=100)
    order = [3, 1, 2]
    records = [task.prediction_record(_outputs(i), options) for i in order]

    class Data:  # the run's data module: what results_files reads of it
        val_annotation_file = ground_truth

    files = task.results_files([f"photos/{i}.jpg" for i in order], records, Data())
    assert sorted(files) == ["detections_bbox.json", "detections_segm.json"]
    evaluator = CocoEvaluator(ground_truth, [3, 7], ["cat", "dog"], ("bbox", "segm"))
    evaluator.update(order, [_outputs(i) for i in order])
    summary = evaluator.compute()
    gt = COCO(str(ground_truth))
    for iou_type in ("bbox", "segm"):
        (tmp_path / f"{iou_type}.json").write_text(json.dumps(files[f"detections_{iou_type}.json"]))
        coco_eval = COCOeval(gt, gt.loadRes(str(tmp_path / f"{iou_type}.json")), iou_type)
        coco_eval.evaluate(), coco_eval.accumulate(), coco_eval.summarize()
        assert 0.2 < coco_eval.stats[0] < 0.9
        np.testing.assert_allclose(coco_eval.stats, [summary[iou_type][n] for n in STAT_NAMES], rtol=0, atol=1e-12)
    first = files["detections_bbox.json"][0]  # image 3's best: (25, 18, 175, 165) XYXY
    assert first["image_id"] == 3 and first["category_id"] == 7 and first["bbox"] == [25, 18, 150, 147]
    # files the annotation file does not list: COCO's numbered names, else positions
    assert coco_image_ids(["a/000000397133.jpg", "b/12.png"], ground_truth) == [397133, 12]
    assert coco_image_ids(["a/1.jpg", "cat.jpg"], None) == [1, 2]
