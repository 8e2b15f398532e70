"""The sweep on a real local Ray: end to end with a base model that fails and then recovers (a
seed added on the re-run), and a killed driver's re-run with other resources. Cluster behaviour (a crashed trial resuming on
another node included): test_cluster_sim.py."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.report import build_report
from sweep.grid import SweepConfig, expand
from sweep.tune import SweepRequest, run_sweep
from tests.conftest import tiny_config
from trainables.checkpoint import read_jsonl
from trainables.config import TrialConfig
from trainables.provenance import code_version
from trainables.trial import run_trial

TINY_SWEEP = {
    "datasets": ["synthetic"],
    "models": ["fpn", "linknet"],
    "pruners": ["agp"],
    "sparsities": [0.5],
    "cpus_per_trial": 1,
    "gpus_per_trial": 1,
    "max_concurrent": 2,
}


def _template() -> dict:
    return tiny_config(
        stages={"train_epochs": 1, "prune_epochs": 2, "finetune_epochs": 1}, runtime={"threads": 1}
    )


def test_sweep_end_to_end_and_a_base_model_that_recovers(
    local_ray, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CORROPRUNE_CACHE", "relative-cache")  # Ray runs trials elsewhere
    sweep = SweepConfig.from_dict({**TINY_SWEEP, "max_failures": 0})
    request = SweepRequest("tiny", sweep, _template(), tmp_path, {})
    # A dense checkpoint that cannot be read: stage 1 for fpn fails, linknet's trials go on.
    bad = tmp_path / "trials" / "synthetic-fpn-dense-seed0" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "last.pt").write_bytes(b"corrupt")
    status = run_sweep(request)  # asks for 1 GPU per trial: falls back to 0 on this machine
    assert list((tmp_path / "relative-cache" / "synthetic").iterdir())  # generated where meant
    assert [f["trial"] for f in status["failed_base_models"]] == ["synthetic-fpn-dense-seed0"]
    assert status["dropped_combinations"] == ["synthetic-fpn-agp-s0.5-seed0"]
    assert status["pruned"] == {"synthetic-linknet-agp-s0.5-seed0": None}
    error = (tmp_path / "trials" / "synthetic-fpn-dense-seed0" / "error.txt").read_text()
    assert "cannot load checkpoint" in error
    printed = capsys.readouterr().out
    assert "finished synthetic-linknet-agp-s0.5" in printed and "best test mIoU" in printed

    # The base recovers (the bad file is gone): a re-run gives it all its combinations and runs
    # nothing that finished; a second seed added on the way trains its own bases and combinations.
    (bad / "last.pt").unlink()
    finished = tmp_path / "trials" / "synthetic-linknet-agp-s0.5-seed0" / "final.json"
    stamp = finished.stat().st_mtime_ns
    two_seeds = SweepConfig.from_dict({**TINY_SWEEP, "max_failures": 0, "seeds": [0, 1]})
    status = run_sweep(SweepRequest("tiny", two_seeds, _template(), tmp_path, {}))
    assert status["failed_base_models"] == [] and status["dropped_combinations"] == []
    names = {f"synthetic-{m}-{{}}-seed{s}" for m in ("fpn", "linknet") for s in (0, 1)}
    assert set(status["dense"]) == {n.format("dense") for n in names}
    assert status["pruned"] == {n.format("agp-s0.5"): None for n in names}
    assert all(err is None for err in status["dense"].values())
    assert finished.stat().st_mtime_ns == stamp
    printed = capsys.readouterr().out
    assert "[stage2-prune] 4 trials: 1 finished earlier, 3 to run" in printed
    assert "finished synthetic-fpn-agp-s0.5-seed0" in printed and "done 4/4" in printed
    assert "predicting all background would score" in printed
    for name in [*status["dense"], *status["pruned"]]:
        trial = tmp_path / "trials" / name
        assert (trial / "final.json").exists() and (trial / "config.yaml").exists()
        assert (
            not (trial / "checkpoints" / "last.pt").exists() and not (trial / "error.txt").exists()
        )
        env = json.loads((trial / "env.json").read_text())
        assert env["node_ip"] and env["trial_gpus"] == 0.0 and env["versions"]["ray"]
        assert env["code_version"] == code_version()
    pruned = tmp_path / "trials" / "synthetic-fpn-agp-s0.5-seed0"
    stages = [r["stage"] for r in read_jsonl(pruned / "metrics.jsonl")]
    assert stages == ["prune", "prune", "finetune"]  # warm-started from the stage-1 model
    final = json.loads((pruned / "final.json").read_text())
    dense = json.loads(
        (tmp_path / "trials" / "synthetic-fpn-dense-seed0" / "final.json").read_text()
    )
    assert final["dense"] == dense["dense"]
    assert final["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "sweep.yaml").exists() and (tmp_path / "sweep_status.json").exists()
    labels = (tmp_path / "label_distribution.csv").read_text().splitlines()
    assert labels[0] == "dataset,split,class_id,class_name,pixels,percent" and len(labels) == 9
    seed1 = tmp_path / "trials" / "synthetic-linknet-agp-s0.5-seed1"
    assert yaml.safe_load((seed1 / "config.yaml").read_text())["seed"] == 1
    warm = json.loads((seed1 / "final.json").read_text())["warm_start"]
    assert warm.endswith("synthetic-linknet-dense-seed1/checkpoints/dense.pt")

    # Two seeds: one summary row per combination with n = 2 and an interval; claims show n.
    build_report(tmp_path)
    summary = pd.read_parquet(tmp_path / "report" / "summary.parquet").set_index(
        ["model", "pruner", "target_sparsity"]
    )
    for model in ("fpn", "linknet"):
        row = summary.loc[(model, "agp", 0.5)]
        assert row["n"] == 2 and row["seeds"] == "0,1"
        assert row["test_miou_ci_low"] <= row["test_miou_mean"] <= row["test_miou_ci_high"]
        assert row["iou_drop_ci_low"] <= row["iou_drop_mean"] <= row["iou_drop_ci_high"]
        assert summary.loc[(model, "none", 0.0), "n"] == 2
    page = (tmp_path / "report" / "dashboard.html").read_text()
    assert "<th>seeds</th>" in page and "LP and AGP keep IoU" in page
    assert "Combinations over seeds" in page


def _sweep_cmd(preset: Path, out: Path, address: str) -> list[str]:
    return [
        *(sys.executable, "-m", "sweep.cli", "sweep", "--preset", str(preset), "--out", str(out)),
        *("--address", address),
    ]


def test_killed_driver_rerun_with_other_resources_finishes_the_rest(
    local_ray, tmp_path: Path
) -> None:
    """The driver dies, the cluster stays (as on a cluster's head): the command again finishes
    the rest. The dense base is trained beforehand, here, as a finished stage 1 (the driver
    killed in stage 2 is what is tested; stage 1 runs end to end in the test above)."""
    address = local_ray.get_runtime_context().gcs_address
    preset = tmp_path / "tiny.yaml"
    sweep = {**TINY_SWEEP, "models": ["linknet"], "gpus_per_trial": 0}
    preset.write_text(yaml.safe_dump({"trial": _template(), "sweep": sweep}))
    out = tmp_path / "run"
    (dense,), _ = expand(SweepConfig.from_dict(sweep), _template(), out, {})
    run_trial(TrialConfig.from_dict(dense.config), Path(dense.out_dir))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    driver = subprocess.Popen(
        _sweep_cmd(preset, out, address),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    dense_final = out / "trials" / "synthetic-linknet-dense-seed0" / "final.json"
    stage2 = out / "stage2-prune"
    deadline = time.monotonic() + 120
    while not stage2.exists() and time.monotonic() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert stage2.exists(), driver.communicate()[0] if driver.poll() is not None else "timeout"
    time.sleep(float(os.environ.get("CORROPRUNE_TEST_KILL_DELAY", "3")))
    os.killpg(driver.pid, signal.SIGKILL)  # the driver dies with stage 2 unfinished
    driver.wait()
    assert dense_final.exists()
    stamp = dense_final.stat().st_mtime_ns
    # Resumed with other resources (as after an out-of-memory): accepted, since they change no result.
    resources = ["--max-concurrent", "3", "--cpus-per-trial", "2"]
    rerun = subprocess.run(
        [*_sweep_cmd(preset, out, address), *resources],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert dense_final.stat().st_mtime_ns == stamp  # the finished base model was not re-run
    status = json.loads((out / "sweep_status.json").read_text())
    assert status["pruned"] == {"synthetic-linknet-agp-s0.5-seed0": None}
    records = read_jsonl(out / "trials" / "synthetic-linknet-agp-s0.5-seed0" / "metrics.jsonl")
    assert [r["global_epoch"] for r in records] == [1, 2, 3]
