"""One loader for every artefact: each kind runs on its runtime and knows what it predicts; every
bad file is one clear line and exit 2."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.artefacts import load_artefact
from deploy.export import dataset_images
from sweep.cli import main
from tests.deploy.conftest import foreign_onnx, pruned_with_masks
from trainables.checkpoint import save_checkpoint
from trainables.config import TrialConfig
from trainables.data import build_datasets
from trainables.errors import UserError
from trainables.pruning.surgery import Cut, channel_structure, slim

KINDS = {
    "pt": ("checkpoint", "torch"),
    "compact": ("compact", "torch"),
    "onnx": ("onnx", "onnxruntime"),
    "int8": ("onnx-int8", "onnxruntime-int8"),
}


def test_every_kind_runs_a_batch_and_knows_its_classes_and_config(shipped) -> None:
    paths, _ = shipped()
    trial_cfg = TrialConfig.from_dict(load_artefact(paths["pt"]).cfg.to_dict())
    images = dataset_images(build_datasets(trial_cfg.data, seed=0).test, 2)  # as predict does
    batch = torch.from_numpy(np.concatenate(images))  # (2, 3, 32, 32)
    logits = {}
    for name, (kind, runtime) in KINDS.items():
        artefact = load_artefact(paths[name], threads=1)
        assert (artefact.kind, artefact.runtime) == (kind, runtime)
        assert artefact.class_names == ("good", "fair", "poor", "severe")
        assert artefact.cfg == trial_cfg  # an .onnx alone knows its dataset (its metadata)
        logits[name] = artefact(batch)
        assert logits[name].shape == (2, 4, 32, 32) and logits[name].dtype == np.float32
        np.testing.assert_array_equal(artefact(batch.numpy()), logits[name])  # numpy in, same out
    np.testing.assert_array_equal(logits["compact"], logits["pt"])
    np.testing.assert_allclose(logits["onnx"], logits["pt"], atol=1e-4, rtol=1e-4)
    same = (logits["int8"].argmax(1) == logits["onnx"].argmax(1)).mean()
    assert same > 0.9 and not np.array_equal(logits["int8"], logits["onnx"])  # quantised, close


def test_foreign_onnx_takes_its_class_count_from_its_output(shipped, tmp_path: Path) -> None:
    paths, _ = shipped()
    artefact = load_artefact(foreign_onnx(paths, tmp_path))
    assert artefact.cfg is None and artefact.kind == "onnx" and artefact.num_classes == 4


def _bad_files(paths: dict[str, Path], tmp_path: Path) -> dict[str, list[str]]:
    (tmp_path / "model.h5").write_bytes(b"x")
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07 not a protobuf")
    foreign = foreign_onnx(paths, tmp_path)
    return {
        "model file not found: ": ["evaluate", str(tmp_path / "nope.pt")],
        "unknown model file type '.h5'; expected .pt": ["evaluate", str(tmp_path / "model.h5")],
        "cannot load ONNX model": ["evaluate", str(tmp_path / "broken.onnx")],
        "carries no corroprune metadata (no trial config): give --dataset": [
            "evaluate",
            str(foreign),
        ],
        "predicts 4 classes (good, fair, poor, severe), but dataset 'nea' has 3": [
            "evaluate",
            str(paths["onnx"]),
            "--dataset",
            "nea",
        ],
        "ONNX models run on the CPU here": [
            "predict",
            str(paths["onnx"]),
            "x.png",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "p"),
        ],
    }


def test_bad_model_files_are_one_line_and_exit_2(shipped, tmp_path: Path, capsys) -> None:
    paths, _ = shipped()
    for message, argv in _bad_files(paths, tmp_path).items():
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("corroprune: error: "), (argv, err)
        assert message in err and "Traceback" not in err, (message, err)
        assert err.count("\n") == 1


def test_missing_onnxruntime_is_named(shipped, monkeypatch, capsys) -> None:
    paths, _ = shipped()
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` fails
    assert main(["evaluate", str(paths["onnx"])]) == 2
    assert "need onnxruntime, which is not installed: pip install" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["fpn", "manet"])  # GroupNorm groups; the attention's buffer
def test_a_checkpoint_of_a_slim_model_loads_as_that_model(arch: str, tmp_path: Path) -> None:
    """final.pt and last.pt of a trial that fine-tuned slim hold the slim weights and the
    structure ("slim"): the architecture is rebuilt from it, the weights load unchanged."""
    masked, cfg, masks = pruned_with_masks(arch, "tu-test_resnet", 0.5, "coupled")
    model = slim(copy.deepcopy(masked), cfg, masks).eval()
    cut = Cut(channel_structure(model, cfg), 0.5, 1, 1, 1)  # counts: only the trial reads them
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "slim": cut.to_dict()}
    save_checkpoint(state, tmp_path / "final.pt")
    artefact = load_artefact(tmp_path / "final.pt")
    assert artefact.kind == "checkpoint"
    assert sum(p.numel() for p in artefact.model.parameters()) == sum(
        p.numel() for p in model.parameters()
    )
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_array_equal(artefact(x), model(x).numpy())
    foreign = {**cut.to_dict(), "structure": {"decoder.nope": 2}}
    save_checkpoint({**state, "slim": foreign}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="bad.pt: its slim model does not fit"):
        load_artefact(tmp_path / "bad.pt")
