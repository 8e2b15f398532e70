"""IoU from a confusion matrix accumulated over a whole split (two steps: count, then reduce once)."""

from __future__ import annotations

import math
from typing import Any

import torch


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """Counts (C, C), rows = ground truth, columns = prediction; ignored pixels are skipped."""
    keep = target != ignore_index  # (N, H, W)
    t = target[keep].long()
    p = pred[keep].long()
    idx = t * num_classes + p
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def iou_per_class(cm: torch.Tensor) -> list[float]:
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both truth and prediction,
    0 for a class absent from the truth but predicted somewhere."""
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou.tolist()


def present_classes(cm: torch.Tensor) -> list[int]:
    """Classes with ground-truth pixels in the split: the classes every mIoU on it averages over.

    They depend on the truth alone, so every model scored on the split (and the all-background
    baseline) is averaged over the same classes, whatever it predicts."""
    return torch.nonzero(cm.sum(1) > 0).flatten().tolist()


def mean_over(values: list[float], classes: list[int]) -> float:
    """Mean of `values` at `classes`; NaN when `classes` is empty."""
    picked = [values[c] for c in classes]
    return sum(picked) / len(picked) if picked else math.nan


def all_background(cm: torch.Tensor) -> torch.Tensor:
    """The confusion matrix (C, C) of a model that predicts class 0 for every pixel."""
    out = torch.zeros_like(cm)
    out[:, 0] = cm.sum(1)
    return out


def summarize(cm: torch.Tensor) -> dict[str, Any]:
    """Per-class IoU of every class, and mIoU over the classes present in the split's ground
    truth (`miou_classes`): over all of them and over the corrosion ones (all but class 0).

    A class absent from the truth is left out of both means for every model: its IoU is 0 when
    the model predicts it (listed in `iou`, so the false alarm stays visible) and NaN otherwise.
    `all_background_miou` is the same mean for a model predicting background everywhere."""
    iou = iou_per_class(cm)
    classes = present_classes(cm)
    baseline = iou_per_class(all_background(cm))
    return {
        "miou": mean_over(iou, classes),
        "miou_corrosion": mean_over(iou, [c for c in classes if c != 0]),
        "iou": iou,
        "miou_classes": classes,
        "all_background_miou": mean_over(baseline, classes),
    }


class ConfusionMeter:
    """Accumulates a confusion matrix on the device; read it once at the end of the split."""

    def __init__(
        self, num_classes: int, device: torch.device | str = "cpu", ignore_index: int = 255
    ):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.cm = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        pred = logits.argmax(1)  # (N, H, W)
        self.cm += confusion_matrix(pred, target, self.num_classes, self.ignore_index)

    def compute(self) -> dict[str, Any]:
        return summarize(self.cm.cpu())
