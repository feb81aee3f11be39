"""mIoU, mAcc and aAcc as mmsegmentation computes them (``mmseg.core.evaluation.mean_iou``).

Per class, the intersection, the predicted area and the labelled area are summed over the whole
validation set (pixels labelled ``ignore_index`` left out); then

    IoU_c = I_c / (P_c + L_c - I_c)       Acc_c = I_c / L_c       aAcc = sum_c I_c / sum_c L_c

and mIoU / mAcc are the means over the classes whose denominator is not zero (mmseg's ``nanmean``).
This is not an average of per-image IoUs (torchmetrics' ``segmentation.MeanIoU``); it equals
torchmetrics' ``MulticlassJaccardIndex(ignore_index=255, average="macro")`` (tested). The four areas are
integer states summed across processes, so a DDP evaluation gives exactly the single-process numbers
(provided each image is seen once: see ``SegmentationDataModule.val_dataloader``). Values are fractions in [0, 1],
the scale of every metric vtrain logs (accuracy, COCO AP); the papers and mmseg's logs print them in percent.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric


class SegmentationMetrics(Metric):
    full_state_update = False

    def __init__(self, num_classes: int, ignore_index: int = 255):
        super().__init__()
        self.num_classes, self.ignore_index = num_classes, ignore_index
        for name in ("area_intersect", "area_pred", "area_label"):
            self.add_state(name, torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``: class indices; ``target``: labels of the same shape (``ignore_index`` skipped)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
        valid = target != self.ignore_index
        pred, target = pred[valid].long(), target[valid].long()
        k = self.num_classes
        self.area_intersect += torch.bincount(pred[pred == target], minlength=k)[:k]
        self.area_pred += torch.bincount(pred, minlength=k)[:k]
        self.area_label += torch.bincount(target, minlength=k)[:k]

    def per_class(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(IoU, Acc) per class, fractions; NaN where the class has no union / no labelled pixel."""
        intersect = self.area_intersect.double()
        union = (self.area_pred + self.area_label - self.area_intersect).double()
        label = self.area_label.double()
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=intersect.device)
        iou = torch.where(union > 0, intersect / union.clamp(min=1), nan)
        acc = torch.where(label > 0, intersect / label.clamp(min=1), nan)
        return iou, acc

    def compute(self) -> dict[str, torch.Tensor]:
        iou, acc = self.per_class()
        total = self.area_label.sum().clamp(min=1).double()
        return {
            "mIoU": iou.nanmean(),
            "mAcc": acc.nanmean(),
            "aAcc": self.area_intersect.sum().double() / total,
            "IoU": iou,
            "Acc": acc,
        }
