"""The sweep's INT8 step on a finished tiny trial: the record, idempotence, a refusal recorded,
bad input, and the Ray entry that runs it after the trial (called here without Ray)."""

from __future__ import annotations

import functools
import json
import math
import shutil
from pathlib import Path

import pytest

from analysis.collect import load_run, missing_notes
from deploy import export
from deploy.artefacts import load_artefact
from sweep import deploy_step
from sweep.deploy_step import deploy_int8, needs_int8, read_record, record_path
from tests.conftest import tiny_config
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.trial import run_trial

# A dense trial of one epoch at 32 px, timed with 2 repeats: the INT8 step takes seconds.
QUICK = tiny_config(
    data={"crop_size": 32, "synthetic": {"train": 8, "test": 2, "size": 32}},
    stages={"train_epochs": 1},
    runtime={"latency_repeats": 2},
)
NAME = "synthetic-fpn-dense-seed0"


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory):
    """`finished()`: a run folder with one finished trial (no INT8 record); made on first call,
    inside a test, so with the threads the conftest pins. Copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("run")

    @functools.cache
    def make() -> Path:
        run_trial(TrialConfig.from_dict(QUICK), run_dir / "trials" / NAME)
        return run_dir

    return make


def _copy(finished, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(finished(), run_dir)
    return run_dir / "trials" / NAME


def test_int8_record_of_a_finished_trial(finished, tmp_path: Path, monkeypatch) -> None:
    """Scored on the test split close to the trial's own fp32 mIoU, timed as the trial timed
    fp32 (threads, size, repeats), both files beside it; a second call changes nothing."""
    trial = _copy(finished, tmp_path)
    assert needs_int8(trial)
    record = deploy_int8(trial)
    final = json.loads((trial / "final.json").read_text())
    assert record["status"] == "exported" and record["reason"] is None
    assert record["test_miou"] == pytest.approx(final["dense"]["test_miou"], abs=0.05)
    assert record["test_images"] == 2 and record["agreement"] >= export.MIN_INT8_AGREEMENT
    assert record["threads"] == final["inference"]["threads"]
    assert record["size"] == final["inference"]["size"] == [32, 32]
    assert (
        record["repeats"] == 2 and record["latency_ms"] > 0 and record["fp32_onnx_latency_ms"] > 0
    )
    assert record["cpu"] and record["file_mib"] < record["fp32_onnx_file_mib"]
    deploy = trial / "deploy"
    assert load_artefact(deploy / "model.int8.onnx").kind == "onnx-int8"
    assert load_artefact(deploy / "model.onnx").kind == "onnx"
    assert sorted(p.name for p in deploy.iterdir()) == [
        "int8.json",
        "model.int8.onnx",
        "model.onnx",
    ]
    assert read_record(trial) == record and not needs_int8(trial)

    stamp = record_path(trial).stat().st_mtime_ns
    monkeypatch.setattr(deploy_step, "_export", lambda *a: pytest.fail("exported again"))
    assert deploy_int8(trial) == record  # a re-run of the sweep skips it
    assert record_path(trial).stat().st_mtime_ns == stamp

    run = load_run(trial.parent.parent)
    row = run.results.set_index("trial").loc[NAME]
    assert row["int8_status"] == "exported" and row["int8_test_miou"] == record["test_miou"]
    assert row["int8_latency_ms"] == record["latency_ms"]
    assert row["onnx_latency_ms"] == record["fp32_onnx_latency_ms"]


def test_a_refused_export_is_recorded_not_raised(finished, tmp_path: Path, monkeypatch) -> None:
    trial = _copy(finished, tmp_path)
    monkeypatch.setattr(export, "MIN_INT8_AGREEMENT", 1.01)  # no INT8 model agrees enough
    record = deploy_int8(trial)
    assert record["status"] == "refused" and "agrees with fp32 on only" in record["reason"]
    assert "test_miou" not in record and not (trial / "deploy" / "model.int8.onnx").exists()
    assert read_record(trial) == record  # recorded: a re-run does not try again
    run = load_run(trial.parent.parent)
    row = run.results.set_index("trial").loc[NAME]
    assert row["int8_status"] == "refused" and math.isnan(row["int8_test_miou"])
    assert any(n.startswith(f"INT8 export refused: {NAME}: INT8 model") for n in missing_notes(run))


def test_only_a_finished_trial_is_deployed(finished, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="trial folder not found"):
        deploy_int8(tmp_path / "nope")
    trial = _copy(finished, tmp_path)
    (trial / "checkpoints" / "final.pt").unlink()
    with pytest.raises(UserError, match=r"has final.json but no checkpoints/final.pt"):
        deploy_int8(trial)
    (trial / "final.json").unlink()  # a trial still running
    assert not needs_int8(trial)
    with pytest.raises(UserError, match="is not a finished trial: no readable final.json"):
        deploy_int8(trial)
    assert not (trial / "deploy").exists()  # nothing written


def test_an_unreadable_record_is_made_again(tmp_path: Path) -> None:
    record_path(tmp_path).parent.mkdir()
    record_path(tmp_path).write_text('{"format": "corroprune-int8-v1", "stat')  # torn
    (tmp_path / "final.json").write_text("{}")
    assert read_record(tmp_path) is None and needs_int8(tmp_path)


def test_the_ray_entry_never_fails_a_trial_for_its_int8_step(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    """`train_and_deploy` (called without Ray, its trial already finished): the INT8 step after
    the trial; a refusal is printed, any other failure a warning, and neither is raised."""
    import trainables.ray_entry
    from sweep.tune import train_and_deploy

    trained: list[str] = []
    monkeypatch.setattr(trainables.ray_entry, "train_trial", lambda c: trained.append("trained"))
    config = {"trial": {"name": NAME, "out_dir": str(tmp_path / NAME)}}
    refused = {"status": "refused", "reason": "INT8 model of x agrees with fp32 on only 50.0%"}
    monkeypatch.setattr(deploy_step, "deploy_int8", lambda out: refused)
    train_and_deploy(config)
    assert trained == ["trained"]
    assert f"INT8 export of {NAME} refused: INT8 model of x" in capsys.readouterr().out

    def broken(out: Path) -> dict:
        raise MemoryError("onnxruntime ran out of memory")

    monkeypatch.setattr(deploy_step, "deploy_int8", broken)
    train_and_deploy(config)  # no exception: the trial's results stand
    err = capsys.readouterr().err
    assert f"the INT8 step of {NAME} failed (MemoryError: onnxruntime ran out" in err
    assert "run the sweep again to retry it" in err
