"""The sweep on a real local Ray: end to end, a crashed trial resumes, a killed driver's re-run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from sweep.grid import SweepConfig, expand
from sweep.tune import SweepRequest, run_stage, run_sweep
from tests.conftest import tiny_config
from trainables.checkpoint import read_jsonl

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


def test_sweep_end_to_end_on_local_ray(local_ray, tmp_path: Path, capsys) -> None:
    request = SweepRequest("tiny", SweepConfig.from_dict(TINY_SWEEP), _template(), tmp_path, {})
    status = run_sweep(request)  # asks for 1 GPU per trial: falls back to 0 on this machine
    assert status["failed_base_models"] == [] and status["dropped_combinations"] == []
    assert set(status["dense"]) == {"synthetic-fpn-dense", "synthetic-linknet-dense"}
    assert set(status["pruned"]) == {"synthetic-fpn-agp-s0.5", "synthetic-linknet-agp-s0.5"}
    assert all(err is None for stage in ("dense", "pruned") for err in status[stage].values())
    for name in [*status["dense"], *status["pruned"]]:
        trial = tmp_path / "trials" / name
        assert (trial / "final.json").exists() and (trial / "config.yaml").exists()
        env = json.loads((trial / "env.json").read_text())
        assert env["node_ip"] and env["trial_gpus"] == 0.0 and env["versions"]["ray"]
    stages = [
        r["stage"]
        for r in read_jsonl(tmp_path / "trials" / "synthetic-fpn-agp-s0.5" / "metrics.jsonl")
    ]
    assert stages == ["prune", "prune", "finetune"]  # warm-started from the stage-1 model
    final = json.loads((tmp_path / "trials" / "synthetic-fpn-agp-s0.5" / "final.json").read_text())
    dense = json.loads((tmp_path / "trials" / "synthetic-fpn-dense" / "final.json").read_text())
    assert final["dense"] == dense["dense"]
    assert final["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert (tmp_path / "sweep.yaml").exists() and (tmp_path / "sweep_status.json").exists()
    printed = capsys.readouterr().out
    assert "finished synthetic-linknet-agp-s0.5" in printed and "best test mIoU" in printed
    assert "predicting all background would score" in printed
    labels = (tmp_path / "label_distribution.csv").read_text().splitlines()
    assert labels[0] == "dataset,split,class_id,class_name,pixels,percent" and len(labels) == 9


def test_crashed_trial_resumes_from_its_own_checkpoint(local_ray, tmp_path: Path) -> None:
    sweep = SweepConfig.from_dict({**TINY_SWEEP, "models": ["linknet"], "max_failures": 1})
    dense, _ = expand(sweep, tiny_config(stages={"train_epochs": 3}), tmp_path, {})
    spec = {**dense[0].as_param(), "fault_after_epoch": 2}
    outcome = run_stage("crash", [spec], tmp_path, sweep, gpus=0)
    assert outcome == {"synthetic-linknet-dense": None}
    trial = tmp_path / "trials" / "synthetic-linknet-dense"
    assert (trial / "injected_fault.done").exists()  # it did crash once
    epochs = [r["epoch"] for r in read_jsonl(trial / "metrics.jsonl")]
    assert epochs == [1, 2, 3]  # continued at epoch 3: nothing repeated, nothing lost
    assert not (trial / "error.txt").exists()


def test_a_failed_base_model_drops_only_its_combinations(local_ray, tmp_path: Path) -> None:
    sweep = SweepConfig.from_dict({**TINY_SWEEP, "max_failures": 0})
    template = _template()
    request = SweepRequest("tiny", sweep, template, tmp_path, {})
    # A dense checkpoint that cannot be read: stage 1 for fpn "finishes" from a corrupt state.
    bad = tmp_path / "trials" / "synthetic-fpn-dense" / "checkpoints"
    bad.mkdir(parents=True)
    (bad / "last.pt").write_bytes(b"corrupt")
    status = run_sweep(request)
    assert [f["trial"] for f in status["failed_base_models"]] == ["synthetic-fpn-dense"]
    assert status["failed_base_models"][0]["reason"]
    assert status["dropped_combinations"] == ["synthetic-fpn-agp-s0.5"]
    assert status["pruned"] == {"synthetic-linknet-agp-s0.5": None}
    error = (tmp_path / "trials" / "synthetic-fpn-dense" / "error.txt").read_text()
    assert "cannot load checkpoint" in error


def _sweep_cmd(preset: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "sweep.cli", "sweep", "--preset", str(preset), "--out", str(out)]


def test_killed_driver_rerun_finishes_without_rerunning_finished_trials(tmp_path: Path) -> None:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "trial": _template(),
                "sweep": {**TINY_SWEEP, "models": ["linknet"], "sparsities": [0.2, 0.5]},
            }
        )
    )
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    driver = subprocess.Popen(
        _sweep_cmd(preset, out),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    dense_final = out / "trials" / "synthetic-linknet-dense" / "final.json"
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
    rerun = subprocess.run(
        _sweep_cmd(preset, out), env=env, capture_output=True, text=True, timeout=240
    )
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert dense_final.stat().st_mtime_ns == stamp  # the finished base model was not re-run
    status = json.loads((out / "sweep_status.json").read_text())
    assert set(status["pruned"]) == {"synthetic-linknet-agp-s0.2", "synthetic-linknet-agp-s0.5"}
    assert all(e is None for e in status["pruned"].values())
    records = read_jsonl(out / "trials" / "synthetic-linknet-agp-s0.5" / "metrics.jsonl")
    assert [r["global_epoch"] for r in records] == [1, 2, 3]


@pytest.fixture
def two_node_cluster(tmp_path: Path):
    """A head and a worker node started with `ray start`, each with one CPU and its own resource."""
    ray_bin = Path(sys.executable).with_name("ray")
    port = 6391
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    head = [
        str(ray_bin),
        "start",
        "--head",
        f"--port={port}",
        "--num-cpus=1",
        "--num-gpus=0",
        "--resources",
        '{"node_head": 1}',
        "--include-dashboard=false",
        "--disable-usage-stats",
    ]
    worker = [
        str(ray_bin),
        "start",
        f"--address=127.0.0.1:{port}",
        "--num-cpus=1",
        "--num-gpus=0",
        "--resources",
        '{"node_worker": 1}',
    ]
    try:
        subprocess.run(head, env=env, check=True, capture_output=True, timeout=90)
        subprocess.run(worker, env=env, check=True, capture_output=True, timeout=90)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=60)


def test_sweep_on_a_two_node_ray_cluster(two_node_cluster: str, tmp_path: Path, local_ray) -> None:
    local_ray.shutdown()  # this test's driver talks to the two-node cluster instead
    preset = tmp_path / "tiny.yaml"
    sweep = {**TINY_SWEEP, "pruners": ["agp"], "sparsities": [0.5], "gpus_per_trial": 0}
    preset.write_text(yaml.safe_dump({"trial": _template(), "sweep": sweep}))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [*_sweep_cmd(preset, out), "--address", two_node_cluster]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    nodes = {}
    for trial in sorted((out / "trials").iterdir()):
        env_json = json.loads((trial / "env.json").read_text())
        nodes[trial.name] = env_json["node_id"]
    assert len(nodes) == 4
    dense_nodes = {nodes["synthetic-fpn-dense"], nodes["synthetic-linknet-dense"]}
    assert len(dense_nodes) == 2  # two 1-CPU trials at once: one on each node
