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


def test_miou_averages_every_model_over_the_classes_in_the_split_truth() -> None:
    # Four classes (SSCS-like); this split has no pixel of class 2.
    target = torch.tensor([0, 0, 0, 0, 1, 1, 3, 3])
    predicts_2 = torch.tensor([0, 0, 0, 2, 1, 1, 3, 0])
    never_2 = torch.tensor([0, 0, 0, 0, 1, 1, 3, 0])
    a = summarize(confusion_matrix(predicts_2, target, num_classes=4))
    b = summarize(confusion_matrix(never_2, target, num_classes=4))
    # a: class 0 TP 3, FP 1 (a 3 called 0), FN 1 (a 0 called 2) -> 3/5; class 1 -> 1;
    #    class 2 TP 0, FP 1, FN 0 -> 0 (a false alarm, listed); class 3 TP 1, FN 1 -> 1/2
    # b: class 0 TP 4, FP 1 -> 4/5; class 1 -> 1; class 2 nothing -> NaN; class 3 -> 1/2
    assert a["iou"] == [3 / 5, 1.0, 0.0, 1 / 2]
    assert b["iou"][:2] == [4 / 5, 1.0] and math.isnan(b["iou"][2]) and b["iou"][3] == 1 / 2
    assert a["miou_classes"] == b["miou_classes"] == [0, 1, 3]
    assert math.isclose(a["miou"], (3 / 5 + 1 + 1 / 2) / 3)
    assert math.isclose(b["miou"], (4 / 5 + 1 + 1 / 2) / 3)
    assert math.isclose(a["miou_corrosion"], (1 + 1 / 2) / 2)
    assert math.isclose(b["miou_corrosion"], (1 + 1 / 2) / 2)
    # All background: class 0 IoU = its pixel share 4/8, classes 1 and 3 score 0, class 2 out.
    assert math.isclose(a["all_background_miou"], (4 / 8) / 3)
    assert b["all_background_miou"] == a["all_background_miou"]


def test_a_split_without_background_leaves_it_out_of_the_mean_and_the_baseline() -> None:
    target = torch.tensor([1, 1, 2, 2])
    cm = confusion_matrix(torch.tensor([0, 1, 2, 2]), target, num_classes=3)
    result = summarize(cm)
    assert result["miou_classes"] == [1, 2]
    assert result["iou"][0] == 0.0  # predicted, absent from the truth: listed, not averaged
    assert math.isclose(result["miou"], (1 / 2 + 1) / 2)
    assert result["miou_corrosion"] == result["miou"]
    assert result["all_background_miou"] == 0.0


def test_a_split_without_labelled_pixels_has_no_mean() -> None:
    cm = confusion_matrix(torch.tensor([0, 1]), torch.tensor([255, 255]), num_classes=2)
    result = summarize(cm)
    assert result["miou_classes"] == []
    assert math.isnan(result["miou"]) and math.isnan(result["all_background_miou"])
