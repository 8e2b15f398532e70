"""IoU from a confusion matrix accumulated over a whole split (two steps: count, then reduce once)."""

from __future__ import annotations

import math

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
    """IoU = TP / (TP + FP + FN) per class; NaN for a class absent from both truth and prediction."""
    cm = cm.double()
    tp = cm.diag()
    denom = cm.sum(0) + cm.sum(1) - tp
    iou = torch.where(denom > 0, tp / denom.clamp(min=1), torch.full_like(tp, float("nan")))
    return iou.tolist()


def nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else float("nan")


def summarize(cm: torch.Tensor) -> dict[str, float | list[float]]:
    """mIoU over all classes and over corrosion classes (all but class 0), plus per-class IoU."""
    iou = iou_per_class(cm)
    # Predicting background everywhere: IoU of class 0 is its pixel share, every other class 0.
    background_share = float(cm[0].sum()) / max(float(cm.sum()), 1.0)
    return {
        "miou": nanmean(iou),
        "miou_corrosion": nanmean(iou[1:]),
        "iou": iou,
        "all_background_miou": background_share / cm.shape[0],
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

    def compute(self) -> dict[str, float | list[float]]:
        return summarize(self.cm.cpu())
