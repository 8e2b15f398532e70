"""Honest latency: each deployable architecture timed once, alone; element-pruned trials at dense speed."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import collect
from analysis.figures import latency_pareto_figure
from analysis.latency import (
    IN_TRIAL,
    LATENCY_FILE,
    MEASURED_ALONE,
    apply_measured_latency,
    measure_run_latency,
)
from sweep.cli import main
from sweep.identity import DENSE, ELEMENT
from trainables import cost
from trainables.checkpoint import save_checkpoint, write_json, write_yaml
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.models import build_model
from trainables.pruning.pruner import Pruner

DENSE_TRIAL = "synthetic-fpn-dense"
ELEMENT_TRIAL = "synthetic-fpn-magnitude-s0.5"
CHANNEL_TRIAL = "synthetic-fpn-magnitude-channel-s0.5"
# In-trial latencies as a busy machine recorded them: the element model "2x slower" than its
# dense model, though it runs the very same dense kernels.
IN_TRIAL_MS = {DENSE_TRIAL: 10.0, ELEMENT_TRIAL: 20.0, CHANNEL_TRIAL: 4.0}


def _trial_config(pruner: str, granularity: str) -> TrialConfig:
    return TrialConfig.from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "crop_size": 64,
                "synthetic": {"train": 4, "test": 2, "size": 64, "classes": 4},
            },
            "model": {"arch": "fpn", "encoder": "tu-test_resnet", "encoder_weights": None},
            "pruning": {
                "pruner": pruner,
                "sparsity": 0.5 if pruner != "none" else 0.0,
                "steps": 1,
                "granularity": granularity,
            },
            "stages": {"prune_epochs": 1},
            "runtime": {"device": "cpu"},
        }
    )


def _write_trial(trials: Path, name: str, pruner: str, granularity: str) -> None:
    """config.yaml, final.json and checkpoints/final.pt laid out as Trial.finish writes them."""
    cfg = _trial_config(pruner, granularity)
    model = build_model(cfg.model, cfg.data.classes)
    state = {"model": model.state_dict(), "config": cfg.to_dict(), "dense_test": None}
    if cfg.pruned:
        pruner_ = Pruner(cfg.pruning, model, prune_epochs=1, iters_per_epoch=1)
        pruner_.end_of_epoch(1)
        state = {**state, "model": model.state_dict(), "masks": pruner_.masks.state_dict()}
    out = trials / name
    write_yaml(out / "config.yaml", cfg.to_dict())
    save_checkpoint(state, out / "checkpoints" / "final.pt")
    scores = {"test_loss": 0.5, "test_miou": 0.6, "test_miou_corrosion": 0.5, "test_iou": [0.6] * 4}
    inference = {"params": 1, "size": [64, 64], "latency_ms": IN_TRIAL_MS[name]}
    write_json(
        out / "final.json",
        {
            "class_names": ["good", "fair", "poor", "severe"],
            "dense": scores,
            "pruned": scores if cfg.pruned else None,
            "achieved_sparsity": 0.5 if cfg.pruned else 0.0,
            "inference": {**inference, "latency_device": "cpu", "threads": 1},
            "wall_time_s": 1.0,
        },
    )


@pytest.fixture(scope="module")
def tiny_run_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("latency") / "run"
    torch.manual_seed(0)
    _write_trial(run / "trials", DENSE_TRIAL, "none", "element")
    _write_trial(run / "trials", ELEMENT_TRIAL, "magnitude", "element")
    _write_trial(run / "trials", CHANNEL_TRIAL, "magnitude", "channel")
    (run / "trials" / "synthetic-fpn-agp-s0.9").mkdir()  # still running: no final.json
    return run


@pytest.fixture()
def tiny_run(tiny_run_template: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_run_template, tmp_path / "run"))


@pytest.fixture()
def timed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Parameter counts of the models the real timing function was called on, in order."""
    calls: list[int] = []
    real = cost.latency_ms

    def counting(model, x, repeats, warmup=3):
        calls.append(sum(p.numel() for p in model.parameters()))
        return real(model, x, repeats, warmup)

    monkeypatch.setattr(cost, "latency_ms", counting)
    return calls


def _files(run: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run)): p.read_bytes() for p in (run / "trials").rglob("*") if p.is_file()
    }


def _results(run: Path) -> pd.DataFrame:
    return collect.results_table(run)[0].set_index("trial", drop=False)


def test_each_architecture_timed_once_and_element_trials_take_the_dense_figure(
    tiny_run: Path, timed: list[int]
) -> None:
    before = _files(tiny_run)
    table = measure_run_latency(tiny_run, threads=1, repeats=3)
    dense_params = sum(
        p.numel() for p in build_model(_trial_config("none", ELEMENT).model, 4).parameters()
    )
    # Two distinct deployables: the dense net (dense and element trials) and the slim one.
    assert sorted(timed) == sorted([dense_params, table.by_trial()[CHANNEL_TRIAL].params])
    dense, slim = table.architectures
    assert dense.trials == (DENSE_TRIAL, ELEMENT_TRIAL) and dense.params == dense_params
    assert slim.trials == (CHANNEL_TRIAL,) and slim.deploys == "slim"
    assert slim.params < dense.params and slim.signature != dense.signature
    assert dense.size == (64, 64) and 0 < dense.latency_ms <= dense.latency_p90_ms
    assert _files(tiny_run) == before  # no trial file touched

    saved = json.loads((tiny_run / LATENCY_FILE).read_text())
    machine = saved["machine"]
    assert machine["cpu"] == cost.cpu_name() and machine["threads"] == 1
    assert machine["torch"] == torch.__version__ and machine["repeats"] == 3
    assert {"hostname", "measured_at", "load_1min", "warning"} <= set(machine)
    assert [a["trials"] for a in saved["architectures"]] == [
        [DENSE_TRIAL, ELEMENT_TRIAL],
        [CHANNEL_TRIAL],
    ]

    results = apply_measured_latency(_results(tiny_run), tiny_run)
    assert results.loc[ELEMENT_TRIAL, "latency_ms"] == results.loc[DENSE_TRIAL, "latency_ms"]
    assert results.loc[DENSE_TRIAL, "latency_ms"] == dense.latency_ms
    assert results.loc[CHANNEL_TRIAL, "latency_ms"] == slim.latency_ms
    finished = results[results["status"] == "finished"]
    assert set(finished["latency_source"]) == {MEASURED_ALONE}
    assert set(finished["latency_device"]) == {f"cpu: {machine['cpu']}, 1 thread, measured alone"}
    running = results.loc["synthetic-fpn-agp-s0.9"]
    assert math.isnan(running["latency_ms"]) and pd.isna(running["latency_source"])

    fig = latency_pareto_figure(results, "synthetic")
    assert (
        "measured alone" in fig.layout.xaxis.title.text
        and machine["cpu"] in fig.layout.xaxis.title.text
    )
    assert "measured alone" in fig.layout.title.text


def test_a_rerun_replaces_latency_json(tiny_run: Path, timed: list[int]) -> None:
    measure_run_latency(tiny_run, threads=1, repeats=2)
    (tiny_run / "trials" / CHANNEL_TRIAL / "final.json").unlink()  # no longer finished
    table = measure_run_latency(tiny_run, threads=1, repeats=1)
    assert len(timed) == 2 + 1
    saved = json.loads((tiny_run / LATENCY_FILE).read_text())
    assert saved["machine"]["repeats"] == 1 and len(saved["architectures"]) == 1
    assert set(table.by_trial()) == {DENSE_TRIAL, ELEMENT_TRIAL}


def _frame(**columns: list) -> pd.DataFrame:
    base = {
        "trial": [
            "d-dense",
            "d-agp-s0.5",
            "d-agp-channel-s0.5",
            "d-agp-s0.9",
            "e-dense",
            "e-agp-s0.5",
        ],
        "dataset": ["syn", "syn", "syn", "syn", "syn", "syn"],
        "model": ["fpn", "fpn", "fpn", "fpn", "unet", "unet"],
        "encoder": ["r18"] * 6,
        "pruner": [DENSE, "agp", "agp", "agp", DENSE, "agp"],
        "granularity": [DENSE, ELEMENT, "channel", ELEMENT, DENSE, ELEMENT],
        "target_sparsity": [0.0, 0.5, 0.5, 0.9, 0.0, 0.5],
        "test_miou": [0.7, 0.68, 0.6, math.nan, 0.6, 0.58],
        "latency_ms": [10.0, 20.0, 4.0, math.nan, math.nan, 30.0],
        "latency_device": ["cpu", "cpu", "cpu", None, None, "cpu"],
        "status": ["finished", "finished", "finished", "running", "finished", "finished"],
    }
    return pd.DataFrame({**base, **columns}).set_index("trial", drop=False)


def test_element_pruned_trial_shows_its_dense_latency_not_the_in_trial_noise(
    tmp_path: Path,
) -> None:
    """The defect (issue 14): an element-pruned trial timed 2x slower than its dense model beside
    other trials is drawn at 2x; it runs the dense kernels, so it must sit at the dense figure."""
    results = apply_measured_latency(_frame(), tmp_path)  # no latency.json: in-trial figures
    assert results.loc["d-agp-s0.5", "latency_ms"] == 10.0  # the dense trial's, not 20.0
    assert results.loc["d-agp-channel-s0.5", "latency_ms"] == 4.0  # its own architecture
    assert math.isnan(results.loc["d-agp-s0.9", "latency_ms"])  # running: nothing to show
    assert results.loc["e-agp-s0.5", "latency_ms"] == 30.0  # its dense trial has no figure
    assert math.isnan(results.loc["e-dense", "latency_ms"])
    assert results.loc["d-agp-s0.5", "latency_source"] == IN_TRIAL
    assert pd.isna(results.loc["e-dense", "latency_source"])
    fig = latency_pareto_figure(results, "syn")
    element = next(t for t in fig.data if t.name == "fpn agp")
    assert list(element.x) == [10.0]
    assert "in-trial, other trials beside it: noisy" in fig.layout.title.text
    assert "--measure-latency" in fig.layout.title.text


def test_dense_figure_is_taken_within_the_same_seed_and_odd_frames_survive(tmp_path: Path) -> None:
    seeded = apply_measured_latency(_frame(seed=[0, 1, 1, 1, 0, 0]), tmp_path)
    assert seeded.loc["d-agp-s0.5", "latency_ms"] == 20.0  # seed 1 has no dense trial
    untimed = _frame(latency_ms=[10.0, math.nan, 4.0, math.nan, math.nan, 30.0])
    assert math.isnan(apply_measured_latency(untimed, tmp_path).loc["d-agp-s0.5", "latency_ms"])
    empty = apply_measured_latency(_frame().iloc[:0], tmp_path)
    assert empty.empty and "latency_source" in empty
    bare = apply_measured_latency(pd.DataFrame({"trial": ["x"], "status": ["finished"]}), tmp_path)
    assert math.isnan(bare.loc[0, "latency_ms"]) and pd.isna(bare.loc[0, "latency_source"])


def test_report_measure_latency_end_to_end(tiny_run: Path, capsys) -> None:
    code = main(["report", str(tiny_run), "--measure-latency", "--threads", "1", "--repeats", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("ms median") == 2 and "measuring latency alone" in out
    assert f"wrote {tiny_run / LATENCY_FILE}: 2 architectures for 3 trials" in out
    assert (tiny_run / "report" / "dashboard.html").is_file()
    report = pd.read_csv(tiny_run / "report" / "results.csv").set_index("trial")
    measured = json.loads((tiny_run / LATENCY_FILE).read_text())["architectures"]
    assert report.loc[ELEMENT_TRIAL, "latency_ms"] == measured[0]["latency_ms"]  # not 20.0
    assert report.loc[CHANNEL_TRIAL, "latency_source"] == MEASURED_ALONE


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--measure-latency", "--threads", "0"], "--threads must be 1 or more (got 0)"),
        (["--measure-latency", "--repeats", "0"], "--repeats must be 1 or more (got 0)"),
        (["--threads", "2"], "only apply with --measure-latency"),
    ],
)
def test_bad_latency_settings_exit_2(
    tiny_run: Path, capsys, extra: list[str], message: str
) -> None:
    code = main(["report", str(tiny_run), *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("corroprune: error: ") and message in err
    assert "Traceback" not in err and not (tiny_run / LATENCY_FILE).exists()


def test_a_run_without_finished_trials_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run" / "trials" / "a-fpn-dense").mkdir(parents=True)
    with pytest.raises(UserError, match="has no finished trials"):
        measure_run_latency(tmp_path / "run", threads=1, repeats=1)
