"""The fine-tuning search on a real local Ray: Optuna + ASHA, masks fixed, test touched once."""

import csv
import json
from pathlib import Path

import pytest

from sweep.hpo import SearchConfig, parse_select, pruned_trials, run_search
from tests.conftest import tiny_config
from trainables.checkpoint import read_jsonl
from trainables.config import TrialConfig
from trainables.errors import UserError
from trainables.trial import run_trial

SEARCH = {
    "search": {
        "samples": 4,
        "grace_period": 1,
        "reduction_factor": 3,
        "seed": 0,
        "space": {
            "max_lr": {"type": "loguniform", "low": 1e-3, "high": 5e-2},
            "momentum": {"type": "uniform", "low": 0.3, "high": 0.9},
            "finetune_epochs": {"type": "choice", "values": [2, 3]},
            "alpha": {"type": "uniform", "low": 0.2, "high": 0.8},
            "class_weighting": {"type": "choice", "values": ["none", "inverse_sqrt_frequency"]},
        },
    },
    # one at a time: ASHA's decisions then depend only on the seeded results, not on timing
    "sweep": {"cpus_per_trial": 1, "gpus_per_trial": 0, "max_concurrent": 1},
}


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("sweep")
    cfg = TrialConfig.from_dict(
        tiny_config(pruning={"pruner": "agp", "sparsity": 0.5}, runtime={"threads": 1})
    )
    run_trial(cfg, run / "trials" / "synthetic-fpn-agp-s0.5-seed0")
    return run


def test_search_end_to_end(local_ray, finished_sweep: Path, tmp_path: Path) -> None:
    summaries = run_search(SEARCH, finished_sweep, "model=fpn,pruner=agp", None, tmp_path, None)
    assert len(summaries) == 1
    summary = summaries[0]
    assert summary["trials"] == 4 and 0 <= summary["tuned_test_miou"] <= 1
    paper = json.loads(
        (finished_sweep / "trials" / "synthetic-fpn-agp-s0.5-seed0" / "final.json").read_text()
    )
    assert summary["paper_settings_test_miou"] == paper["pruned"]["test_miou"]
    rows = list(csv.DictReader((tmp_path / "synthetic-fpn-agp-s0.5-seed0" / "trials.csv").open()))
    assert len(rows) == 4
    for row in rows:
        records = read_jsonl(Path(row["out_dir"]) / "metrics.jsonl")
        assert {r["stage"] for r in records} == {"finetune"}
        assert all(r["achieved_sparsity"] == pytest.approx(0.5, abs=0.01) for r in records)
        # early-stopped or not, a trial keeps its last metrics
        assert float(row["val_miou"]) == pytest.approx(records[-1]["val_miou"])
        assert int(row["epochs_run"]) == len(records) <= int(row["finetune_epochs"])
        assert not (Path(row["out_dir"]) / "examples.npz").exists()  # no test predictions
        final = Path(row["out_dir"]) / "final.json"
        if final.exists():
            assert json.loads(final.read_text())["pruned"] is None  # test untouched
    stopped = [r for r in rows if int(r["epochs_run"]) < int(r["finetune_epochs"])]
    assert stopped, "ASHA stopped no trial early"
    assert (tmp_path / "summary.json").exists()
    from analysis.tuning import (
        load_search,
        parallel_coordinates,
        param_importance,
        write_tuning_report,
    )

    trials, bests = load_search(tmp_path)
    combo = "synthetic-fpn-agp-s0.5-seed0"
    fig = parallel_coordinates(trials, combo)
    labels = [d.label for d in fig.data[0].dimensions]
    assert labels[-1] == "val mIoU" and "max_lr" in labels and "class_weighting" in labels
    importance = param_importance(trials, combo)
    assert set(importance) <= {"max_lr", "momentum", "finetune_epochs", "alpha", "class_weighting"}
    assert sum(importance.values()) == pytest.approx(1.0)
    page = write_tuning_report(tmp_path).read_text()
    assert "test mIoU, paper settings" in page and "parcoords" in page


def test_unreadable_trial_files_are_named(tmp_path: Path) -> None:
    trial = tmp_path / "trials" / "synthetic-fpn-agp-s0.5-seed0"
    (trial / "checkpoints").mkdir(parents=True)
    (trial / "checkpoints" / "final.pt").write_bytes(b"")
    (trial / "final.json").write_text("{")
    (trial / "config.yaml").write_text("seed: [0")
    with pytest.raises(UserError, match="synthetic-fpn-agp-s0.5-seed0/config.yaml is not valid"):
        pruned_trials(tmp_path, {})
    (trial / "config.yaml").write_text(
        "seed: 0\ndata: {dataset: synthetic}\nmodel: {arch: fpn}\n"
        "pruning: {pruner: agp, sparsity: 0.5}\n"
    )
    with pytest.raises(UserError, match="synthetic-fpn-agp-s0.5-seed0/final.json is not valid"):
        pruned_trials(tmp_path, {})


def test_selection_and_presets_are_checked(finished_sweep: Path) -> None:
    assert parse_select("model=fpn,sparsity=0.5,seed=1") == {
        "model": "fpn",
        "sparsity": 0.5,
        "seed": 1,
    }
    with pytest.raises(UserError, match="KEY one of dataset, model, encoder"):
        parse_select("arch=fpn")
    with pytest.raises(UserError, match="sparsity=high: expected a number"):
        parse_select("sparsity=high")
    with pytest.raises(UserError, match="no finished pruned trial"):
        pruned_trials(finished_sweep, {"model": "unet"})
    assert len(pruned_trials(finished_sweep, {"sparsity": 0.5})) == 1
    assert pruned_trials(finished_sweep, {"sparsity": 0.5, "seed": 0})[0]["name"].endswith("-seed0")
    with pytest.raises(UserError, match="no finished pruned trial"):
        pruned_trials(finished_sweep, {"seed": 1})
    with pytest.raises(UserError, match="not searchable"):
        SearchConfig.from_preset({"search": {"space": {"epochs": {"type": "choice"}}}}, None)
    weighting = {"class_weighting": {"type": "choice", "values": ["none", "balanced"]}}
    with pytest.raises(UserError, match="a choice of none, inverse_sqrt_frequency"):
        SearchConfig.from_preset({"search": {"space": weighting}}, None)
    with pytest.raises(UserError, match="no 'search' section"):
        SearchConfig.from_preset({"trial": {}}, None)
