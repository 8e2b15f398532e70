"""Inference cost side by side: each model in its own process, ONNX files on ONNX Runtime."""

import json
from pathlib import Path

from deploy.bench_infer import measure, table
from sweep.cli import main
from tests.deploy.conftest import pruned_model
from trainables.checkpoint import save_checkpoint


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
    assert "| s0.2.pt | torch | linknet / tu-test_resnet |" in printed and "| s0.9.pt |" in printed
    rows = json.loads(out_json.read_text())
    assert rows[0]["params"] == rows[1]["params"] and rows[0]["gmacs"] == rows[1]["gmacs"] > 0
    assert rows[1]["nonzero_params"] < rows[0]["nonzero_params"]
    assert all(r["latency_ms"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    assert main(["bench-infer", str(tmp_path / "nope.pt")]) == 2


def test_onnx_models_are_measured_on_onnx_runtime(shipped) -> None:
    paths, _ = shipped()
    costs = [measure(paths[name], 32, 32, 2, 1, "cpu") for name in ("onnx", "int8")]
    assert [c.runtime for c in costs] == ["onnxruntime", "onnxruntime-int8"]
    assert all(c.gmacs is None and c.latency_ms > 0 and c.params > 0 for c in costs)
    assert costs[1].file_mib < 0.35 * costs[0].file_mib
    printed = table(costs)
    assert "| m.int8.onnx | onnxruntime-int8 | fpn / tu-test_resnet |" in printed
    assert "| n/a |" in printed
