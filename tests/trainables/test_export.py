"""Compact sparse export round trip, ONNX against onnxruntime, predictions on real frames."""

import csv
import json
from pathlib import Path

import pytest
import torch

from sweep.cli import main
from tests.conftest import NEA_SAMPLE
from trainables.checkpoint import save_checkpoint
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.export import export_compact, export_onnx, load_compact, verify_onnx
from trainables.models import build_model
from trainables.pruning.pruner import Pruner
from trainables.trial import model_from_checkpoint


def pruned_model(
    arch: str, encoder: str = "tu-test_resnet", sparsity: float = 0.9, granularity: str = "element"
):
    model, cfg, _ = pruned_with_masks(arch, encoder, sparsity, granularity)
    return model, cfg


def pruned_with_masks(arch: str, encoder: str, sparsity: float, granularity: str):
    cfg = TrialConfig.from_dict(
        {
            "data": {"dataset": "synthetic"},
            "model": {"arch": arch, "encoder": encoder, "encoder_weights": None},
            "pruning": {
                "pruner": "magnitude",
                "sparsity": sparsity,
                "steps": 1,
                "granularity": granularity,
            },
            "stages": {"prune_epochs": 1},
        }
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, 4).eval()
    pruner = Pruner(cfg.pruning, model, prune_epochs=1, iters_per_epoch=1)
    pruner.end_of_epoch(1)
    return model, cfg, pruner.masks.state_dict()


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn", "linknet", "manet"])
def test_channel_pruned_checkpoint_loads_slim_and_round_trips(arch: str, tmp_path: Path) -> None:
    """final.pt of a channel-pruned model loads with its channels cut out (fewer parameters,
    same outputs), and its compact export rebuilds the slim structure exactly."""
    masked, cfg, masks = pruned_with_masks(arch, "tu-test_resnet", 0.5, "channel")
    ckpt = tmp_path / "final.pt"
    save_checkpoint({"model": masked.state_dict(), "config": cfg.to_dict(), "masks": masks}, ckpt)
    slim, _ = model_from_checkpoint(ckpt)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in masked.parameters())
    export_compact(slim.eval(), cfg, tmp_path / "slim.safetensors")
    loaded, _ = load_compact(tmp_path / "slim.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = masked(x)
        torch.testing.assert_close(slim.eval()(x), expected, atol=1e-4, rtol=1e-4)
        assert torch.equal(loaded(x), slim(x))


def test_compact_file_with_a_foreign_channel_structure_is_refused(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    masked, cfg, masks = pruned_with_masks("linknet", "tu-test_resnet", 0.5, "channel")
    export_compact(masked, cfg, tmp_path / "m.safetensors")
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
        flat = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(flat, str(tmp_path / "bad.safetensors"), metadata={**meta, "channels": '{"x.y": 2}'})
    with pytest.raises(UserError, match="bad.safetensors does not fit"):
        load_compact(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn", "linknet", "manet"])
def test_compact_round_trip_gives_identical_outputs(arch: str, tmp_path: Path) -> None:
    model, cfg = pruned_model(arch)
    export_compact(model, cfg, tmp_path / "m.safetensors")
    loaded, loaded_cfg = load_compact(tmp_path / "m.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert loaded_cfg.model.arch == arch


def test_compact_file_is_small_at_90_percent(tmp_path: Path) -> None:
    model, cfg = pruned_model("unet", encoder="resnet18")
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    export_compact(model, cfg, tmp_path / "c32.safetensors")
    export_compact(model, cfg, tmp_path / "c16.safetensors", fp16=True)
    dense = (tmp_path / "dense.pt").stat().st_size
    assert (tmp_path / "c32.safetensors").stat().st_size <= 0.15 * dense
    assert (tmp_path / "c16.safetensors").stat().st_size <= 0.10 * dense
    loaded, _ = load_compact(tmp_path / "c16.safetensors")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-2)


def test_onnx_matches_torch(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model, _ = pruned_model("fpn", sparsity=0.5)
    export_onnx(model, tmp_path / "m.onnx", height=64, width=64)
    assert verify_onnx(model, tmp_path / "m.onnx", height=96, width=128) < 1e-3  # dynamic size


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


def test_export_command(tmp_path: Path, capsys) -> None:
    model, cfg = pruned_model("fpn", sparsity=0.9)
    ckpt = tmp_path / "final.pt"
    save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    assert (
        main(["export", str(ckpt), "--format", "compact", "--out", str(tmp_path / "m.safetensors")])
        == 0
    )
    assert "% of the" in capsys.readouterr().out
    assert (
        main(
            [
                "export",
                str(ckpt),
                "--format",
                "onnx",
                "--size",
                "64",
                "64",
                "--out",
                str(tmp_path / "m.onnx"),
            ]
        )
        == 0
    )
    assert "onnxruntime matches torch" in capsys.readouterr().out
    assert (
        main(["export", str(ckpt), "--format", "onnx", "--size", "60", "64", "--out", "x.onnx"])
        == 2
    )


def test_bench_infer_measures_each_model(tmp_path: Path, capsys) -> None:
    paths = []
    for sparsity in (0.2, 0.9):
        model, cfg = pruned_model("linknet", sparsity=sparsity)
        path = tmp_path / f"s{sparsity}.pt"
        save_checkpoint({"model": model.state_dict(), "config": cfg.to_dict()}, path)
        paths.append(str(path))
    out_json = tmp_path / "bench.json"
    argv = ["bench-infer", *paths, "--size", "64", "64", "--repeats", "2", "--threads", "1"]
    assert main([*argv, "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    assert "| s0.2.pt | linknet / tu-test_resnet |" in printed and "| s0.9.pt |" in printed
    rows = json.loads(out_json.read_text())
    assert rows[0]["params"] == rows[1]["params"] and rows[0]["gmacs"] == rows[1]["gmacs"] > 0
    assert rows[1]["nonzero_params"] < rows[0]["nonzero_params"]
    assert all(r["latency_ms"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert main(["bench-infer", str(tmp_path / "nope.pt")]) == 2
