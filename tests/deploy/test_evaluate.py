"""`corroprune evaluate`: every kind of artefact scored with the trials' own metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sweep.cli import main
from tests.deploy.conftest import foreign_onnx
from trainables.data.synth import write_synthetic

# INT8 against fp32 on the tiny trial's test split (two 32 px images, 2,048 pixels): measured
# 0.002 apart, the INT8 model agreeing with fp32 on 98.5 % of validation pixels. 0.02 leaves room
# for another CPU's rounding; published INT8 segmentation models lose 0-0.006 mIoU on real test
# sets, but a two-epoch model's near-tied logits flip more easily than a trained one's.
INT8_MIOU_TOLERANCE = 0.02


def _evaluate(capsys, *argv: str) -> tuple[int, str]:
    code = main(["evaluate", *argv, "--threads", "1"])
    return code, capsys.readouterr().out


def test_checkpoint_compact_and_onnx_score_the_same_and_int8_close(
    shipped, tmp_path: Path, capsys
) -> None:
    paths, result = shipped()
    scores = {}
    for name, path in paths.items():
        code, out = _evaluate(capsys, str(path), "--out", str(tmp_path / f"{name}.json"))
        assert code == 0 and "mIoU" in out and "severe" in out
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())
    dense = result["dense"]
    for name in ("pt", "compact", "onnx"):
        assert scores[name]["miou"] == pytest.approx(dense["test_miou"], abs=1e-9), name
        assert scores[name]["iou"] == pytest.approx(dense["test_iou"], abs=1e-9, nan_ok=True)
        assert scores[name]["miou_classes"] == dense["test_miou_classes"]
    assert abs(scores["int8"]["miou"] - scores["onnx"]["miou"]) <= INT8_MIOU_TOLERANCE
    assert scores["int8"]["runtime"] == "onnxruntime-int8" and scores["int8"]["images"] == 2
    assert scores["onnx"]["all_background_miou"] == pytest.approx(dense["test_all_background_miou"])


def test_a_foreign_onnx_is_scored_on_the_dataset_named(shipped, tmp_path: Path, capsys) -> None:
    paths, _ = shipped()
    root = write_synthetic(tmp_path / "set", train=2, test=2, size=32, classes=4, seed=3)
    foreign = foreign_onnx(paths, tmp_path)
    code, out = _evaluate(capsys, str(foreign), "--dataset", "folder", "--data-root", str(root))
    assert code == 0 and "on folder test (2 images)" in out
