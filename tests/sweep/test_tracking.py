"""MLflow runs and TensorBoard files mirrored from a fake RUN_DIR: complete, resumable, never
duplicated; the Tune callback's hooks; clear errors for a missing extra or a bad URI. No Ray trials."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sweep.cli import main
from sweep.tracking import (
    TENSORBOARD,
    log_run,
    open_tracking,
    read_trial,
    trial_folders,
    write_tensorboard,
)
from tests.analysis.fake_run import ERRORED, write_fake_run
from trainables.checkpoint import read_jsonl

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402

DENSE, PRUNED = "synthetic-unet-dense", "synthetic-unet-lp-s0.9"


def _fake_run(root: Path) -> Path:
    """Three trials: a dense base and a pruned one finished, a pruned one errored."""
    run_dir = write_fake_run(root, ("synthetic",), ("unet",), ("lp", "mp"), (0.9,))
    sweep = yaml.safe_load((run_dir / "sweep.yaml").read_text())
    (run_dir / "sweep.yaml").write_text(yaml.safe_dump({**sweep, "code_version": "0.1.0+abc"}))
    for trial in trial_folders(run_dir):
        env = json.loads((trial / "env.json").read_text())
        (trial / "env.json").write_text(json.dumps({**env, "code_version": "0.1.0+abc"}))
    assert {p.name for p in trial_folders(run_dir)} == {DENSE, PRUNED, ERRORED}
    return run_dir


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One database for the module: making one costs seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def synced(tmp_path_factory: pytest.TempPathFactory, uri: str) -> tuple[Path, str]:
    run_dir = _fake_run(tmp_path_factory.mktemp("synced") / "run")
    return run_dir, log_run(run_dir, uri)


def _nested(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.info.run_name: run for run in runs}


def _history(client: MlflowClient, run_id: str, key: str = "val_miou") -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _curve(trial_dir: Path, key: str = "val_miou") -> list[tuple[int, float]]:
    return [(r["global_epoch"], r[key]) for r in read_jsonl(trial_dir / "metrics.jsonl")]


def _same(points: list[tuple[int, float]], expected: list[tuple[int, float]]) -> bool:
    """Same steps, same values (event files store float32)."""
    steps, values = zip(*points, strict=True) if points else ((), ())
    want_steps, want_values = zip(*expected, strict=True) if expected else ((), ())
    return steps == want_steps and list(values) == pytest.approx(want_values, rel=1e-6)


def _append(trial_dir: Path, records: list[dict]) -> None:
    with open(trial_dir / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def test_log_run_makes_a_parent_run_and_one_nested_run_per_trial(
    synced: tuple[Path, str], uri: str
) -> None:
    run_dir, parent_id = synced
    client = MlflowClient(uri)
    parent = client.get_run(parent_id)
    assert parent.info.run_name == "run" and parent.info.status == "FINISHED"
    assert parent.data.tags["corroprune.run_dir"] == str(run_dir.resolve())
    assert parent.data.tags["code_version"] == "0.1.0+abc"
    assert parent.data.params["sweep.pruners"] == '["lp", "mp"]'
    assert parent.data.params["trial.optim.batch_size"] == "4"

    nested = _nested(client, parent_id)
    assert set(nested) == {DENSE, PRUNED, ERRORED}
    for name, run in nested.items():
        trial_dir = run_dir / "trials" / name
        assert run.data.tags["corroprune.trial"] == name
        assert run.data.tags["node"] == "10.0.0.1" and run.data.tags["code_version"] == "0.1.0+abc"
        assert _same(_history(client, run.info.run_id), _curve(trial_dir))
        assert len(_history(client, run.info.run_id, "val_iou_3")) == len(_curve(trial_dir))
        assert run.data.params["model"] == "unet" and run.data.params["optim.momentum"] == "0.5"

    dense, pruned, errored = nested[DENSE], nested[PRUNED], nested[ERRORED]
    assert dense.data.params["pruner"] == "none" and dense.data.params["target_sparsity"] == "0.0"
    assert pruned.data.params["pruner"] == "lp" and pruned.data.params["granularity"] == "element"
    assert pruned.data.params["target_sparsity"] == "0.9" and pruned.data.params["seed"] == "0"
    final = json.loads((run_dir / "trials" / PRUNED / "final.json").read_text())
    assert pruned.data.metrics["pruned_test_miou"] == pytest.approx(final["pruned"]["test_miou"])
    assert pruned.data.metrics["dense_test_miou"] == pytest.approx(final["dense"]["test_miou"])
    assert pruned.data.metrics["pruned_test_iou_severe"] == pytest.approx(
        final["pruned"]["test_iou"][3]
    )
    assert pruned.info.status == "FINISHED" and pruned.data.tags["status"] == "finished"
    assert pruned.data.tags["stage"] == "finetune" and dense.data.tags["stage"] == "train"
    assert errored.info.status == "FAILED" and errored.data.tags["status"] == "errored"
    assert errored.data.tags["error"] == "RuntimeError: CUDA out of memory"
    assert "pruned_test_miou" not in errored.data.metrics


def test_syncing_again_through_the_cli_duplicates_nothing(
    synced: tuple[Path, str], uri: str, capsys: pytest.CaptureFixture
) -> None:
    run_dir, parent_id = synced
    client = MlflowClient(uri)
    before = {name: run.info.run_id for name, run in _nested(client, parent_id).items()}
    lengths = {name: len(_history(client, rid)) for name, rid in before.items()}

    assert main(["track", str(run_dir), "--mlflow", uri, "--no-tensorboard"]) == 0
    assert parent_id in capsys.readouterr().out
    after = {name: run.info.run_id for name, run in _nested(client, parent_id).items()}
    assert after == before
    assert {name: len(_history(client, rid)) for name, rid in after.items()} == lengths
    assert len(client.get_metric_history(after[PRUNED], "pruned_test_miou")) == 1
    experiment = client.get_run(parent_id).info.experiment_id
    parents = client.search_runs([experiment], f"tags.`corroprune.run_dir` = '{run_dir}'")
    assert [r.info.run_id for r in parents] == [parent_id]


def test_a_resumed_trial_extends_its_run_and_rewritten_epochs_replace_it(
    tmp_path: Path, uri: str
) -> None:
    run_dir = _fake_run(tmp_path / "run")
    client = MlflowClient(uri)
    parent_id = log_run(run_dir, uri)
    trial = run_dir / "trials" / ERRORED
    first = _nested(client, parent_id)[ERRORED].info.run_id
    records = read_jsonl(trial / "metrics.jsonl")

    # Resumed and finished: two more epochs, error.txt gone, final.json written.
    more = [{**records[-1], "global_epoch": g, "val_miou": 0.5} for g in (8, 9)]
    _append(trial, more)
    (trial / "error.txt").unlink()
    final = json.loads((run_dir / "trials" / PRUNED / "final.json").read_text())
    (trial / "final.json").write_text(json.dumps(final))
    log_run(run_dir, uri)
    run = _nested(client, parent_id)[ERRORED]
    assert run.info.run_id == first
    assert _same(_history(client, first), _curve(trial))
    assert [step for step, _ in _history(client, first)] == list(range(1, 10))
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert "pruned_test_miou" in run.data.metrics

    # Epochs 3.. re-run with other values (a crash after the record, before the checkpoint).
    rerun = [{**r, "val_miou": 0.01 * r["global_epoch"]} for r in records[2:]]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    _append(trial, rerun)
    log_run(run_dir, uri)
    nested = _nested(client, parent_id)
    assert nested[ERRORED].info.run_id != first
    assert client.get_run(first).info.lifecycle_stage == "deleted"
    assert _same(_history(client, nested[ERRORED].info.run_id), _curve(trial))
    assert len(nested) == 3


def _event_scalars(folder: Path, key: str = "val_miou") -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(key)]


def test_tensorboard_files_are_named_by_trial_and_never_duplicate_a_step(tmp_path: Path) -> None:
    run_dir = _fake_run(tmp_path / "run")
    root = write_tensorboard(run_dir)
    assert root == run_dir.resolve() / TENSORBOARD
    assert {p.name for p in root.iterdir()} == {DENSE, PRUNED, ERRORED}
    for trial in trial_folders(run_dir):
        assert _same(_event_scalars(root / trial.name), _curve(trial))
    files = sorted(p.name for p in (root / PRUNED).glob("events.out.tfevents.*"))

    write_tensorboard(run_dir)  # up to date: nothing written
    assert sorted(p.name for p in (root / PRUNED).glob("events.out.tfevents.*")) == files

    trial = run_dir / "trials" / PRUNED
    records = read_jsonl(trial / "metrics.jsonl")
    _append(trial, [{**records[-1], "global_epoch": 8, "val_miou": 0.5}])
    write_tensorboard(run_dir)  # one more step, in a second file
    assert _same(_event_scalars(root / PRUNED), _curve(trial))
    assert len(list((root / PRUNED).glob("events.out.tfevents.*"))) == 2

    rerun = [{**r, "val_miou": 0.01 * r["global_epoch"]} for r in records[2:]]
    (trial / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    _append(trial, rerun)
    write_tensorboard(run_dir)  # re-run epochs: written again, one file
    assert _same(_event_scalars(root / PRUNED), _curve(trial))
    assert len(list((root / PRUNED).glob("events.out.tfevents.*"))) == 1


def test_the_tune_callback_syncs_trials_as_they_report_and_end(tmp_path: Path, uri: str) -> None:
    run_dir = _fake_run(tmp_path / "run")
    trial_dir = run_dir / "trials" / PRUNED
    records = read_jsonl(trial_dir / "metrics.jsonl")
    (trial_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:3]))
    (trial_dir / "final.json").rename(tmp_path / "final.json")  # still running
    (run_dir / "report").mkdir()
    (run_dir / "report" / "dashboard.html").write_text("<html>report</html>")

    tracker = open_tracking(run_dir, uri, tensorboard=True)
    (callback,) = tracker.callbacks()
    trial = SimpleNamespace(config={"trial": {"name": PRUNED, "out_dir": str(trial_dir)}})
    callback.on_trial_result(iteration=3, trials=[trial], trial=trial, result={})
    client = MlflowClient(uri)
    parent_id = tracker.mlflow.parent.info.run_id
    run = _nested(client, parent_id)[PRUNED]
    assert run.info.status == "RUNNING" and len(_history(client, run.info.run_id)) == 3
    assert len(_event_scalars(run_dir / TENSORBOARD / PRUNED)) == 3

    _append(trial_dir, records[3:])
    (tmp_path / "final.json").rename(trial_dir / "final.json")
    callback.on_trial_complete(iteration=7, trials=[trial], trial=trial)
    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED" and "pruned_test_miou" in run.data.metrics
    assert _same(_history(client, run.info.run_id), _curve(trial_dir))
    assert _same(_event_scalars(run_dir / TENSORBOARD / PRUNED), _curve(trial_dir))

    tracker.finish()  # trials no callback saw (finished by an earlier run) are synced too
    assert set(_nested(client, parent_id)) == {DENSE, PRUNED, ERRORED}
    assert {p.name for p in (run_dir / TENSORBOARD).iterdir()} == {DENSE, PRUNED, ERRORED}
    assert client.get_run(parent_id).info.status == "FINISHED"
    assert [a.path for a in client.list_artifacts(parent_id, "report")] == ["report/dashboard.html"]


def test_a_tracking_failure_is_a_warning_not_a_crash(
    tmp_path: Path, uri: str, capsys: pytest.CaptureFixture
) -> None:
    run_dir = _fake_run(tmp_path / "run")
    tracker = open_tracking(run_dir, uri, tensorboard=False)
    tracker.mlflow.client = None  # every MLflow call now fails
    tracker.ended(run_dir / "trials" / DENSE)
    assert f"MLflow run of {DENSE}" in capsys.readouterr().err


def _cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    assert main(list(argv)) == 2
    err = capsys.readouterr().err
    assert err.startswith("corroprune: error: ") and "Traceback" not in err
    return err


def test_without_mlflow_installed_the_error_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    for module in ("mlflow", "mlflow.entities", "mlflow.tracking"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    err = _cli_error(capsys, "sweep", "--preset", "demo", "--mlflow", uri, "--out", str(out))
    assert "--mlflow needs the mlflow extra: pip install 'corroprune[mlflow]'" in err
    assert not out.exists()
    run_dir = _fake_run(tmp_path / "run")
    err = _cli_error(capsys, "track", str(run_dir), "--mlflow", uri)
    assert "pip install 'corroprune[mlflow]'" in err


@pytest.mark.parametrize(
    "uri",
    ["ftp://host/mlflow", "runs/mlflow.db", "sqlite://", "sqlite:///FILE/mlflow.db"],
)
def test_a_bad_tracking_uri_is_named_before_the_sweep_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture, uri: str
) -> None:
    (tmp_path / "FILE").write_text("a file, not a folder")
    uri = uri.replace("FILE", str(tmp_path / "FILE"))
    out = tmp_path / "out"
    err = _cli_error(capsys, "sweep", "--preset", "demo", "--mlflow", uri, "--out", str(out))
    assert f"--mlflow {uri}:" in err
    assert not out.exists()


def test_read_trial_gives_the_trial_identity(synced: tuple[Path, str]) -> None:
    run_dir, _ = synced
    trial = read_trial(run_dir / "trials" / ERRORED)
    assert trial.status == "errored" and trial.error == "RuntimeError: CUDA out of memory"
    assert trial.identity["pruner"] == "mp" and trial.identity["target_sparsity"] == 0.9
