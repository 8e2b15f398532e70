"""The command line: bad input gives one clear line and a non-zero exit, never a traceback."""

from pathlib import Path

import pytest
import torch

from sweep.cli import main
from trainables.data.synth import write_synthetic


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--preset", "nope", "--out", "X"], "unknown preset 'nope'"),
        (["train", "--model", "deeplab", "--out", "X"], "model.arch"),
        (["train", "--set", "optim.max_lrr=1", "--out", "X"], "unknown config key 'optim.max_lrr'"),
        (["train", "--dataset", "sscs", "--out", "X"], "needs --data-root"),
        (
            ["train", "--dataset", "sscs", "--data-root", "/nonexistent", "--out", "X"],
            "data root not found",
        ),
        (["data", "check", "/nonexistent", "--format", "folder"], "data root not found"),
        (["sweep", "--preset", "demo", "--models", "vgg", "--out", "X"], "sweep.models"),
        (
            ["sweep", "--preset", "demo", "--sparsities", "0.5,half", "--out", "X"],
            "expected numbers",
        ),
        (["tune", "--from", "/nonexistent", "--out", "X"], "not a sweep folder"),
        (["evaluate", "/nonexistent/final.pt"], "model file not found: /nonexistent/final.pt"),
        (["evaluate", "model.h5"], "model.h5: unknown model file type '.h5'"),
        (["predict", "/nonexistent.onnx", "a.png", "--out", "X"], "model file not found"),
        (["bench-infer", "/nonexistent.pt"], "model file not found: /nonexistent.pt"),
        (
            ["export", "/nonexistent.pt", "--format", "onnx-int8", "--out", "X/m.onnx"],
            "model file not found",
        ),
        (
            ["export", "m.pt", "--format", "compact", "--out", "X/m.onnx"],
            "--format compact writes a .safetensors file",
        ),
        (
            ["export", "m.pt", "--format", "onnx", "--calibration-images", "8", "--out", "X.onnx"],
            "--calibration-images: only for --format onnx-int8",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys, tmp_path: Path, argv: list[str], message: str
) -> None:
    argv = [a.replace("X", str(tmp_path / "out")) for a in argv]
    code, _, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("corroprune: error: ") and message in err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "final.json").exists()


def test_corrupt_warm_start_checkpoint_is_named(capsys, tmp_path: Path) -> None:
    bad = tmp_path / "dense.pt"
    bad.write_bytes(b"\x00garbage")
    code, _, err = _run(
        capsys,
        "train",
        "--preset",
        "demo",
        "--pruner",
        "agp",
        "--sparsity",
        "0.5",
        "--from",
        str(bad),
        "--set",
        "data.synthetic.train=6",
        "--out",
        str(tmp_path / "o"),
    )
    assert code == 2 and "dense.pt" in err and "Traceback" not in err


def test_data_commands(capsys, tmp_path: Path) -> None:
    code, out, _ = _run(
        capsys,
        "data",
        "synth",
        str(tmp_path / "s"),
        "--train",
        "4",
        "--test",
        "2",
        "--size",
        "32",
        "--seed",
        "1",
    )
    assert code == 0 and (tmp_path / "s" / "train" / "images" / "00003.png").exists()
    code, out, _ = _run(capsys, "data", "check", str(tmp_path / "s"), "--format", "folder")
    assert code == 0 and "valid" in out
    code, out, _ = _run(capsys, "data", "stats", str(tmp_path / "s"), "--format", "folder")
    assert code == 0 and "severe" in out and "percent" in out
    (tmp_path / "s" / "test" / "masks" / "00000.png").unlink()
    code, out, err = _run(capsys, "data", "check", str(tmp_path / "s"), "--format", "folder")
    assert code == 1 and "00000.png: image without mask" in out and "1 problem" in err


def test_train_command_writes_the_run_folder(capsys, tmp_path: Path) -> None:
    root = write_synthetic(tmp_path / "data", train=6, test=2, size=64, classes=4, seed=0)
    sets = [
        "stages.train_epochs=1",
        "data.crop_size=64",
        "model.encoder=tu-test_resnet",
        "runtime.progress=false",
        "optim.half_cycle_iters=4",
    ]
    argv = [
        "train",
        "--preset",
        "demo",
        "--dataset",
        "folder",
        "--data-root",
        str(root),
        "--set",
        "data.num_classes=4",
        "--model",
        "linknet",
        "--out",
        str(tmp_path / "run"),
    ]
    for s in sets:
        argv += ["--set", s]
    code, out, _ = _run(capsys, *argv)
    assert code == 0, out
    assert "dense test mIoU" in out and "predicting all background would score" in out
    assert (tmp_path / "run" / "final.json").exists()
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()  # finished: not needed
    state = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert {"model", "config", "dense_test"} <= set(state)
