"""COCO box and mask AP exactly as the official COCO API (pycocotools ``COCOeval``) computes it.

The ground truth is the annotation file itself (areas and crowd flags as written there); detections on
images without ground truth count as false positives (``COCOeval`` scores every image listed in the
file). Under DDP each rank converts its detections to COCO results, rank 0 gathers them, keeps each image
once (Lightning's ``DistributedSampler`` repeats images to give every rank the same count), writes the
COCO results JSON, runs ``COCOeval`` and sends the numbers to every rank.

Mask results carry no ``bbox``: given one, ``COCOeval`` would take the box area instead of the mask area
as the instance area and change APs/APm/APl (mmdet's ``CocoMetric`` drops it for the same reason).

``backend="faster_coco_eval"`` swaps in faster-coco-eval's C++ ``COCOeval_faster`` (for speed; the tests
check that it gives the same 12 numbers as pycocotools on crowd regions and images without ground truth).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as mask_utils

from vtrain.training.terminal import FILE_ONLY

log = logging.getLogger(__name__)

# The 12 numbers of COCOeval.summarize(), in its order.
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
BACKENDS = ("pycocotools", "faster_coco_eval")


def _coco_classes(backend: str):
    if backend == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise ValueError(f"unknown COCO evaluation backend {backend!r}: use one of {', '.join(BACKENDS)}")


def load_ground_truth(annotation_file: str | Path, backend: str = "pycocotools"):
    coco_cls, _ = _coco_classes(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        return coco_cls(str(annotation_file))


def to_coco_results(
    image_id: int, output: dict[str, torch.Tensor], category_ids: Sequence[int], mask_threshold: float = 0.5
) -> dict[str, list[dict]]:
    """One image's detections (torchvision's output dict, original image coordinates) as COCO results:
    ``{"bbox": [...], "segm": [...]}`` (``segm`` when the output has masks)."""
    labels = output["labels"].cpu()
    keep = (labels >= 1) & (labels <= len(category_ids))  # RetinaNet/FCOS may predict the unused label 0
    boxes, scores, labels = output["boxes"].cpu()[keep], output["scores"].cpu()[keep], labels[keep]
    categories = [category_ids[label - 1] for label in labels.tolist()]
    xywh = xyxy_to_xywh(boxes).tolist()
    score_list = scores.tolist()
    results = {
        "bbox": [
            {"image_id": image_id, "category_id": c, "bbox": b, "score": s} for c, b, s in zip(categories, xywh, score_list)
        ]
    }
    if "masks" in output:
        masks = (output["masks"].cpu()[keep][:, 0] > mask_threshold).numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0))) if len(masks) else []
        results["segm"] = [
            {"image_id": image_id, "category_id": c, "segmentation": {"size": r["size"], "counts": r["counts"].decode("ascii")},
             "score": s}
            for c, r, s in zip(categories, rles, score_list)
        ]
    return results


def xyxy_to_xywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> COCO's (x, y, width, height)."""
    return torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)


def records_to_coco_results(image_ids: Sequence[int], records: Sequence[dict[str, Any]]) -> dict[str, list[dict]]:
    """Prediction records (``DetectionTask.prediction_record``: XYXY boxes, category ids, RLE masks) as COCO results,
    what ``COCO.loadRes`` reads: ``{"bbox": [...]}`` and, when the records have masks, ``"segm"`` (a file each, as
    :func:`to_coco_results`: one file holding both would be read as boxes only)."""
    results: dict[str, list[dict]] = {"bbox": []}
    for image_id, record in zip(image_ids, records):
        instances = record["instances"]
        boxes = xyxy_to_xywh(torch.tensor([d["box"] for d in instances], dtype=torch.float32).reshape(-1, 4))
        for d, box in zip(instances, boxes.tolist()):
            results["bbox"].append({"image_id": image_id, "category_id": d["category_id"], "bbox": box,
                                    "score": d["score"]})
            if "mask" in d:
                results.setdefault("segm", []).append({"image_id": image_id, "category_id": d["category_id"],
                                                       "segmentation": d["mask"], "score": d["score"]})
    return results


def _load_results(gt, results: list[dict], backend: str):
    """``gt.loadRes`` on copies (it writes area/id/bbox into the dicts); pycocotools cannot load an empty list."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return gt.loadRes([dict(r) for r in results])
    coco_cls, _ = _coco_classes(backend)
    empty = coco_cls()
    empty.dataset = {"images": list(gt.dataset["images"]), "categories": list(gt.dataset["categories"]), "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        empty.createIndex()
    return empty


def evaluate(
    gt, results: list[dict], iou_type: str, image_ids: Iterable[int] | None = None, backend: str = "pycocotools"
) -> tuple[dict[str, float], Any, str]:
    """``COCOeval(gt, results, iou_type)``: the 12 summary numbers, the evaluator and its printed summary.

    ``image_ids``: restrict to these images (the images that were run); every image of ``gt`` otherwise.
    """
    _, eval_cls = _coco_classes(backend)
    coco_eval = eval_cls(gt, _load_results(gt, results, backend), iou_type)
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(image_ids)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    stats = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
    return stats, coco_eval, printed.getvalue()


def per_category_ap(coco_eval, category_names: Sequence[str]) -> dict[str, float]:
    """AP (IoU 0.50:0.95, all areas, 100 detections) of each category, as ``summarize`` averages it."""
    precision = coco_eval.eval["precision"]  # [IoU thresholds, recall points, categories, areas, max dets]
    out = {}
    for k, name in enumerate(category_names):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        out[name] = float(p.mean()) if p.size else -1.0
    return out


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CocoEvaluator:
    """Collects one validation epoch's detections and scores them with ``COCOeval``.

    Args:
        annotation_file: the ground-truth file of the evaluated split.
        category_ids: ``category_ids[label - 1]`` is the COCO id of label ``label``.
        category_names: for the per-category AP.
        iou_types: ``("bbox",)`` or ``("bbox", "segm")``.
        backend: ``pycocotools`` (the official API) or ``faster_coco_eval``.
    """

    def __init__(
        self,
        annotation_file: str | Path,
        category_ids: Sequence[int],
        category_names: Sequence[str],
        iou_types: Sequence[str],
        backend: str = "pycocotools",
        mask_threshold: float = 0.5,
    ):
        _coco_classes(backend)  # fail early on a bad name
        self.annotation_file, self.backend = Path(annotation_file), backend
        self.category_ids, self.category_names = list(category_ids), list(category_names)
        self.iou_types, self.mask_threshold = tuple(iou_types), mask_threshold
        self._gt = None
        self.results: dict[int, dict[str, list[dict]]] = {}

    def reset(self) -> None:
        self.results = {}

    def update(self, image_ids: Sequence[int], outputs: Sequence[dict[str, torch.Tensor]]) -> None:
        for image_id, output in zip(image_ids, outputs):
            self.results[int(image_id)] = to_coco_results(int(image_id), output, self.category_ids, self.mask_threshold)

    def _gathered(self) -> dict[int, dict[str, list[dict]]] | None:
        """Every rank's results on rank 0, each image once (None on other ranks)."""
        if not _distributed():
            return self.results
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(self.results, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        merged: dict[int, dict[str, list[dict]]] = {}
        for part in parts:
            for image_id, results in part.items():
                merged.setdefault(image_id, results)  # a padded duplicate gives the same detections
        return merged

    def compute(self, results_dir: str | Path | None = None) -> dict[str, Any]:
        """``{"bbox": {AP: ..., ...}, "segm": {...}, "per_category": {...}, "num_images": n}`` on every rank.

        Writes ``detections_<iou type>.json`` (COCO results format) to ``results_dir``.
        """
        merged = self._gathered()
        summary = self._evaluate(merged, results_dir) if merged is not None else None
        if _distributed():
            box = [summary]
            dist.broadcast_object_list(box, src=0)
            summary = box[0]
        return summary

    def _evaluate(self, merged: dict[int, dict[str, list[dict]]], results_dir: str | Path | None) -> dict[str, Any]:
        if self._gt is None:
            self._gt = load_ground_truth(self.annotation_file, self.backend)
        all_ids = set(self._gt.getImgIds())
        image_ids = sorted(merged)
        if len(image_ids) < len(all_ids):
            log.warning("COCO evaluation on %d of the %d images of %s (the others were not run)",
                        len(image_ids), len(all_ids), self.annotation_file)
        summary: dict[str, Any] = {"num_images": len(image_ids), "per_category": {}}
        for iou_type in self.iou_types:
            results = [r for image_id in image_ids for r in merged[image_id].get(iou_type, [])]
            if results_dir is not None:
                path = Path(results_dir) / f"detections_{iou_type}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(results))
                os.replace(tmp, path)
            restrict = image_ids if len(image_ids) < len(all_ids) else None
            stats, coco_eval, printed = evaluate(self._gt, results, iou_type, restrict, self.backend)
            # the full table to the run's log file; the terminal gets the one line below
            log.info("COCO %s (%d detections on %d images):\n%s", iou_type, len(results), len(image_ids), printed,
                     extra=FILE_ONLY)
            summary[iou_type] = stats
            summary["per_category"][iou_type] = per_category_ap(coco_eval, self.category_names)
        log.info("COCO AP on %d images: %s", len(image_ids), " | ".join(
            f"{t} AP {summary[t]['AP']:.3f} AP50 {summary[t]['AP50']:.3f} AP75 {summary[t]['AP75']:.3f}"
            for t in self.iou_types))
        return summary
