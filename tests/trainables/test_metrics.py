"""IoU from an accumulated confusion matrix, against a hand-computed case."""

import math

import torch

from trainables.metrics import ConfusionMeter, confusion_matrix, iou_per_class, summarize


def test_iou_matches_hand_computation() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 0]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm = confusion_matrix(pred, target, num_classes=3)
    # class 0: TP 2 (0,0),(1,3); FP 1 (1,1); FN 1 (0,1) -> 2/4
    # class 1: TP 2; FP 1 (0,1); FN 0 -> 2/3
    # class 2: TP 1; FP 0 (the ignored pixel does not count); FN 1 -> 1/2
    assert cm.sum() == 7
    iou = iou_per_class(cm)
    assert iou == [0.5, 2 / 3, 0.5]
    result = summarize(cm)
    assert math.isclose(result["miou"], (0.5 + 2 / 3 + 0.5) / 3)
    assert math.isclose(result["miou_corrosion"], (2 / 3 + 0.5) / 2)
    assert math.isclose(result["all_background_miou"], (3 / 7) / 3)  # 3 of 7 pixels are class 0


def test_meter_accumulates_over_batches_like_one_big_batch() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, 8, 8, generator=g)
    target = torch.randint(0, 4, (6, 8, 8), generator=g)
    whole = ConfusionMeter(4)
    whole.update(logits, target)
    split = ConfusionMeter(4)
    for i in range(0, 6, 2):
        split.update(logits[i : i + 2], target[i : i + 2])
    assert torch.equal(whole.cm, split.cm)
    assert whole.compute() == split.compute()


def test_absent_class_is_nan_and_left_out_of_the_mean() -> None:
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), num_classes=3)
    iou = iou_per_class(cm)
    assert iou[:2] == [1.0, 1.0] and math.isnan(iou[2])
    assert summarize(cm)["miou"] == 1.0
