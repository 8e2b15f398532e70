"""The latency-budgeted search's report, from a hand-made results.json (no Ray, no training)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis.budget import front_figure, load_budget, tables, write_budget_report
from trainables.errors import UserError

STAGES = ("encoder.stem", "encoder.layer1", "encoder.layer2", "decoder")


def _trial(trial_id: str, status: str, val: float | None, latency: float | None) -> dict[str, Any]:
    ratios = dict(zip(STAGES, (0.1, 0.3, 0.5, 0.9), strict=True))
    return {
        "trial_id": trial_id,
        "arch": "fpn",
        "pruner": "agp",
        "sparsity": 0.6,
        "stage_ratios": ratios,
        "status": status,
        "val_miou": val,
        "latency_ms": latency,
        "latency_p90_ms": None if latency is None else latency * 1.1,
        "achieved_sparsity": 0.58 if status != "error" else None,
        "params": 1_000_000,
        "within_budget": latency is not None and latency <= 100,
        "pareto": False,
        "error": "CUDA out of memory" if status == "error" else None,
        "out_dir": f"/search/{trial_id}",
    }


TRIALS = [
    _trial("t_00001", "finished", 0.40, 10.0),  # front
    _trial("t_00002", "finished", 0.45, 20.0),  # front
    _trial("t_00003", "finished", 0.38, 15.0),  # dominated by t_00001
    _trial("t_00004", "finished", 0.45, 30.0),  # dominated by t_00002 (same mIoU, slower)
    _trial("t_00005", "finished", 0.50, 60.0),  # front, the best within budget
    _trial("t_00006", "over_budget", 0.55, 150.0),  # better and slower, but not finished
    _trial("t_00007", "over_budget", None, 130.0),  # never validated
    _trial("t_00008", "error", None, None),
]
BASELINES = [
    {
        "trial": "synthetic-fpn-agp-s0.5-seed0",
        "arch": "fpn",
        "pruner": "agp",
        "sparsity": 0.5,
        "granularity": "coupled",
        "val_miou": 0.42,
        "test_miou": 0.41,
        "latency_ms": 40.0,
        "latency_p90_ms": 42.0,
        "within_budget": True,
        "pareto": True,
    },
    {
        "trial": "synthetic-unet-none-s0.0-seed0",
        "arch": "unet",
        "pruner": "none",
        "sparsity": 0.0,
        "granularity": None,
        "val_miou": 0.52,
        "test_miou": 0.50,
        "latency_ms": 140.0,
        "latency_p90_ms": 150.0,
        "within_budget": False,
        "pareto": True,
    },
]
RESULTS = {
    "format": "corroprune-budget-v1",
    "budget_ms": 100.0,
    "runtime": "onnx",
    "threads": 2,
    "size": [512, 512],
    "repeats": 20,
    "cpu": "AMD EPYC 7B13",
    "hostname": "bench-1",
    "run_dir": "/abs/sweep",
    "trials": TRIALS,
    "baselines": BASELINES,
    "chosen": {
        **TRIALS[4],
        "test_miou": 0.47,
        "test_miou_corrosion": 0.2,
        "artefact": "/search/chosen/model.onnx",
        "artefact_latency_ms": 58.0,
        "config": "/search/chosen/config.yaml",
    },
    "best_baseline_within_budget": BASELINES[0],
    "fastest": {"source": "search", "name": "t_00001", "latency_ms": 10.0},
}


def _write(search_dir: Path, results: Any) -> Path:
    search_dir.mkdir(parents=True, exist_ok=True)
    (search_dir / "results.json").write_text(json.dumps(results))
    return search_dir


def _non_dominated(points: list[tuple[float, float]]) -> set[tuple[float, float]]:
    """(latency, mIoU) points no other point beats on one and matches or beats on the other."""
    return {
        (c, s)
        for c, s in points
        if not any(c2 <= c and s2 >= s and (c2 < c or s2 > s) for c2, s2 in points)
    }


@pytest.fixture(scope="module")
def search_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = _write(tmp_path_factory.mktemp("search") / "search", RESULTS)
    write_budget_report(out)
    return out


def test_report_states_budget_chosen_trial_and_verdict(search_dir: Path) -> None:
    page = (search_dir / "report.html").read_text()
    assert "<script src=" not in page and page.count("Plotly.newPlot") == 1
    assert "Budget: <b>100 ms</b>" in page and "AMD EPYC 7B13" in page
    assert "measured, not estimated" in page and "one at a time" in page
    assert "t_00005" in page and "/search/chosen/model.onnx" in page
    assert (
        "The search's model reaches test mIoU 0.470 at 60.0 ms; the best uniform-ratio model of "
        "the sweep under the budget reaches 0.410 at 40.0 ms." in page
    )
    assert "CUDA out of memory" in page  # the errored trial is in the table
    assert not [p for p in search_dir.iterdir() if p.name.startswith(".")]  # no temp files


def test_trials_csv_and_table_have_one_ratio_column_per_stage(search_dir: Path) -> None:
    csv = pd.read_csv(search_dir / "trials.csv")
    assert csv["trial_id"].tolist() == [t["trial_id"] for t in TRIALS]
    trials = tables(RESULTS)["trials"]
    assert [c for c in trials.columns if c.startswith("ratio_")] == [f"ratio_{s}" for s in STAGES]
    assert trials.loc[0, "ratio_encoder.layer2"] == 0.5
    assert list(csv.columns) == list(trials.columns)


def test_figure_has_budget_line_axis_and_exact_pareto_front() -> None:
    fig = front_figure(RESULTS)
    (line,) = fig.layout.shapes
    assert line.x0 == line.x1 == 100.0 and line.line.dash == "dash"
    assert [a.text for a in fig.layout.annotations] == ["budget 100 ms"]
    assert fig.layout.xaxis.title.text == "latency, ms (onnx, 2 threads, 512x512, batch 1)"
    assert fig.layout.yaxis.title.text == "validation mIoU"
    (front,) = [t for t in fig.data if t.name.startswith("Pareto front")]
    finished = [(t["latency_ms"], t["val_miou"]) for t in TRIALS if t["status"] == "finished"]
    expected = _non_dominated(finished)
    assert expected == {(10.0, 0.40), (20.0, 0.45), (60.0, 0.50)}
    assert set(zip(front.x, front.y, strict=True)) == expected
    assert front.line.shape == "hv" and list(front.x) == sorted(front.x)


def test_figure_points_by_status_baselines_and_chosen() -> None:
    fig = front_figure(RESULTS)
    by_name = {t.name: t for t in fig.data}
    finished = by_name["search: finished"]
    assert len(finished.x) == 5 and "encoder.layer1: 0.30" in finished.hovertext[0]
    assert "achieved 0.580" in finished.hovertext[0]
    assert list(by_name["search: over budget (stopped before fine-tuning)"].x) == [150.0]
    never = by_name["search: over budget, never validated (drawn at mIoU 0)"]
    assert list(zip(never.x, never.y, strict=True)) == [(130.0, 0.0)]
    hovers = [h for t in fig.data if t.hovertext for h in t.hovertext]
    assert not any("t_00008" in h for h in hovers)  # errors omitted
    baselines = by_name["sweep baselines (uniform ratios, dense)"]
    assert baselines.marker.symbol == "square-open"
    assert "synthetic-unet-none-s0.0-seed0" in baselines.hovertext[1]
    chosen = by_name["chosen: t_00005"]
    assert chosen.marker.symbol == "star" and list(chosen.x) == [60.0]
    assert all(stage in chosen.hovertext[0] for stage in STAGES)


def test_verdict_table_compares_chosen_with_best_baseline() -> None:
    verdict = tables(RESULTS)["verdict"].set_index("")
    assert verdict.loc["search", "model"] == "t_00005"
    assert verdict.loc["best uniform-ratio baseline", "model"] == BASELINES[0]["trial"]
    diff = verdict.loc["difference (search - baseline)"]
    assert diff["test mIoU"] == pytest.approx(0.47 - 0.41)
    assert diff["latency, ms"] == pytest.approx(60.0 - 40.0)


def test_no_chosen_names_the_fastest(tmp_path: Path) -> None:
    results = copy.deepcopy(RESULTS)
    results["chosen"] = None
    results["best_baseline_within_budget"] = None
    page = write_budget_report(_write(tmp_path / "search", results)).read_text()
    assert (
        "No search model met the 100 ms budget: the fastest model found is t_00001 (search) at "
        "10.0 ms; no uniform-ratio model of the sweep meets the 100 ms budget." in page
    )
    verdict = tables(results)["verdict"].set_index("")
    assert verdict.loc["search", "model"] == "none: no search model met 100 ms"
    assert verdict.loc["difference (search - baseline)"].drop("model").isna().all()
    assert not any(t.name.startswith("chosen") for t in front_figure(results).data)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "not found"),
        ("{not json", "unreadable"),
        ({**RESULTS, "format": "corroprune-latency-v1"}, "corroprune-latency-v1"),
        ({k: v for k, v in RESULTS.items() if k != "trials"}, "lacks trials"),
        ({**RESULTS, "trials": [{"trial_id": "x"}]}, "trials[0] lacks"),
        ({**RESULTS, "trials": [{**TRIALS[0], "status": "done"}]}, "finished, over_budget"),
    ],
)
def test_missing_or_malformed_results_is_a_user_error(
    tmp_path: Path, content: Any, says: str
) -> None:
    if content is not None:
        tmp_path.joinpath("results.json").write_text(
            content if isinstance(content, str) else json.dumps(content)
        )
    with pytest.raises(UserError) as err:
        load_budget(tmp_path)
    assert str(tmp_path / "results.json") in str(err.value) and says in str(err.value)
