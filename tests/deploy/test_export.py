"""Compact sparse export round trip, ONNX against onnxruntime, static INT8, the export command."""

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from deploy import export
from deploy.artefacts import load_compact, model_from_checkpoint
from deploy.export import export_compact, export_onnx, logits_match, verify_onnx
from sweep.cli import main
from tests.deploy.conftest import foreign_onnx, pruned_model, pruned_with_masks
from trainables.checkpoint import save_checkpoint
from trainables.errors import UserError


@pytest.mark.parametrize("granularity", ["channel", "coupled"])
@pytest.mark.parametrize("arch", ["unet", "unetplusplus", "fpn", "linknet", "manet"])
def test_channel_pruned_checkpoint_loads_slim_and_round_trips(
    arch: str, granularity: str, tmp_path: Path
) -> None:
    """final.pt of a channel- or coupled-pruned model loads with its channels cut out (fewer
    parameters, same outputs), and its compact export rebuilds the slim structure exactly."""
    masked, cfg, masks = pruned_with_masks(arch, "tu-test_resnet", 0.5, granularity)
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
    model, cfg = pruned_model("fpn", sparsity=0.5)
    assert export_onnx(model, cfg, tmp_path / "m.onnx", height=64, width=64) < 1e-3
    assert verify_onnx(model, tmp_path / "m.onnx", height=96, width=128) < 1e-3  # dynamic size


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


def _initializers(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def test_int8_export_is_static_s8s8_qdq_with_per_channel_weights(shipped) -> None:
    paths, _ = shipped()
    int8 = onnx.load(str(paths["int8"]))
    inits = _initializers(int8)
    producers = {out: node for node in int8.graph.node for out in node.output}
    convs = [node for node in int8.graph.node if node.op_type == "Conv"]
    assert convs
    for conv in convs:  # weight: an INT8 initializer through DequantizeLinear, a scale per channel
        dq = producers[conv.input[1]]
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert dq.op_type == "DequantizeLinear" and weight.data_type == onnx.TensorProto.INT8
        assert list(scale.dims) == [weight.dims[0]]
        activation = producers[conv.input[0]]  # the input: quantised to INT8 (S8S8) as well
        assert activation.op_type == "DequantizeLinear"
        assert inits[activation.input[2]].data_type == onnx.TensorProto.INT8
    meta = {p.key: p.value for p in int8.metadata_props}
    fp32_meta = {p.key: p.value for p in onnx.load(str(paths["onnx"])).metadata_props}
    assert meta["corroprune.precision"] == "int8" and fp32_meta["corroprune.precision"] == "fp32"
    assert meta["corroprune.config"] == fp32_meta["corroprune.config"]
    assert paths["int8"].stat().st_size < 0.35 * paths["onnx"].stat().st_size


def test_int8_export_below_the_agreement_floor_writes_nothing(
    shipped, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """From the fp32 ONNX file (its stored config finds the calibration data); refused after
    quantising, the previous file at --out stays as it was and no temporary file is left."""
    paths, _ = shipped()
    monkeypatch.setattr(export, "MIN_INT8_AGREEMENT", 1.01)
    out = tmp_path / "m.int8.onnx"
    out.write_bytes(b"the previous export")
    argv = ["export", str(paths["onnx"]), "--format", "onnx-int8", "--calibration-images", "2"]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "agrees with fp32 on only" in err and f"not written to {out}" in err
    assert out.read_bytes() == b"the previous export" and list(tmp_path.iterdir()) == [out]


def test_export_refuses_what_it_cannot_make(shipped, tmp_path: Path, capsys) -> None:
    paths, _ = shipped()
    foreign = foreign_onnx(paths, tmp_path)
    pt, onnx_file, int8 = str(paths["pt"]), str(paths["onnx"]), str(paths["int8"])
    compact, onnx_out = str(tmp_path / "m.safetensors"), str(tmp_path / "x.onnx")
    cases = {
        "--format onnx writes a .onnx file": [pt, "--format", "onnx", "--out", compact],
        "--data-root: only for --format onnx-int8": [
            *(pt, "--format", "compact", "--data-root", str(tmp_path), "--out", compact)
        ],
        "is an ONNX model: this needs the torch weights": [
            *(onnx_file, "--format", "compact", "--out", compact)
        ],
        "is already an INT8 model": [int8, "--format", "onnx-int8", "--out", onnx_out],
        "carries no corroprune config": [str(foreign), "--format", "onnx-int8", "--out", onnx_out],
    }
    for message, argv in cases.items():
        assert main(["export", *argv]) == 2, message
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (message, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.onnx"]


def test_onnx_check_scales_with_the_logits() -> None:
    """Rounding grows with the activations: a difference of 0.2 on logits of 1,000 is rounding
    (a random-weight U-Net-ResNet-101 was refused for 0.22), on logits of 1 it is a wrong model."""
    expected = np.array([1000.0, 0.0, -3.0], dtype=np.float32)
    assert logits_match(expected + np.array([0.0, 0.2, 0.0], dtype=np.float32), expected)
    assert not logits_match(expected + np.array([0.0, 5.0, 0.0], dtype=np.float32), expected)
    small = np.array([1.0, 0.0, -0.5], dtype=np.float32)
    assert logits_match(small + 5e-4, small)
    assert not logits_match(small + np.array([0.0, 0.2, 0.0], dtype=np.float32), small)
