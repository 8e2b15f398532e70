"""Predictions for inspectors from any artefact: overlays, masks and corroded area per class."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sweep.cli import main
from tests.conftest import NEA_SAMPLE
from tests.deploy.conftest import pruned_model
from trainables.checkpoint import save_checkpoint
from trainables.data.synth import write_synthetic


@pytest.mark.skipif(not NEA_SAMPLE.is_dir(), reason="real NEA frames not present")
def test_predict_on_real_frames_with_a_corrupt_image(tmp_path: Path, capsys) -> None:
    model, cfg = pruned_model("linknet", sparsity=0.5)
    ckpt = tmp_path / "final.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    frames = sorted(NEA_SAMPLE.glob("*.jpg"))[:2]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    code = main(
        [
            "predict",
            str(ckpt),
            *map(str, frames),
            str(bad),
            "--out",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
        ]
    )
    out = capsys.readouterr()
    assert code == 1 and "broken.jpg" in out.out and "Traceback" not in out.err
    for frame in frames:
        assert (tmp_path / "pred" / f"{frame.stem}_overlay.png").exists()
        assert (tmp_path / "pred" / f"{frame.stem}_mask.png").exists()
    rows = list(csv.DictReader((tmp_path / "pred" / "areas.csv").open()))
    assert len(rows) == 2 and rows[0]["height"] == "720" and rows[0]["width"] == "1280"
    shares = [float(rows[0][f"area_pct_{n}"]) for n in ("good", "fair", "poor", "severe")]
    assert sum(shares) == pytest.approx(100, abs=0.01)
    summary = json.loads((tmp_path / "pred" / "areas.json").read_text())
    assert summary["failed"][0]["image"].endswith("broken.jpg")


def test_onnx_and_int8_predict_as_the_checkpoint_does(shipped, tmp_path: Path, capsys) -> None:
    """Images of 40 px (padded to 64 inside, cropped back): the fp32 ONNX model's masks are the
    checkpoint's, the INT8 model's nearly."""
    paths, _ = shipped()
    images = write_synthetic(tmp_path / "set", train=2, test=2, size=40, classes=4, seed=5)
    images = images / "test" / "images"
    masks = {}
    for name in ("pt", "onnx", "int8"):
        argv = ["predict", str(paths[name]), str(images), "--out", str(tmp_path / name)]
        assert main([*argv, "--threads", "1"]) == 0, capsys.readouterr().err
        found = sorted((tmp_path / name).glob("*_mask.png"))
        masks[name] = np.stack([np.asarray(Image.open(p)) for p in found])  # (K, H, W)
    assert masks["pt"].shape == (2, 40, 40)
    np.testing.assert_array_equal(masks["onnx"], masks["pt"])
    assert (masks["int8"] == masks["pt"]).mean() > 0.9
    assert "2 image(s) predicted" in capsys.readouterr().out
