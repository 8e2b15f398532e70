"""Reading a run directory into tidy tables, partial runs included."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis.collect import (
    INFERENCE_COLUMNS,
    INT8_COLUMNS,
    RESULT_COLUMNS,
    expected_trials,
    label_distribution,
    load_run,
    missing_notes,
    read_jsonl,
    trial_row,
)
from tests.analysis.fake_run import (
    CHANNEL_TRIALS,
    ERRORED,
    INT8_REFUSED,
    NO_LATENCY,
    NOT_STARTED,
    RUNNING,
    inference,
    write_int8_records,
)


def test_read_jsonl_skips_a_half_written_last_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epoch": 2}\n{"epoch": 3, "val_mi')
    assert [r["epoch"] for r in read_jsonl(path)] == [1, 2]
    assert read_jsonl(tmp_path / "absent.jsonl") == []


@pytest.mark.parametrize(
    ("name", "facets"),
    [
        ("sscs-fpn-agp-s0.9", ("sscs", "fpn", "agp", 0.9, 0)),  # before the seed axis: seed 0
        ("nea-unetplusplus-dense-seed2", ("nea", "unetplusplus", "none", 0.0, 2)),
        ("my-data-linknet-mp-s0.25-seed1", ("my-data", "linknet", "mp", 0.25, 1)),
    ],
)
def test_facets_from_a_folder_name_alone(tmp_path: Path, name: str, facets: tuple) -> None:
    (tmp_path / name).mkdir()
    got = trial_row(tmp_path / name)[0]
    keys = ("dataset", "model", "pruner", "target_sparsity", "seed")
    assert tuple(got[k] for k in keys) == facets


def test_results_one_row_per_trial_with_status(fake_run_dir: Path) -> None:
    results = load_run(fake_run_dir).results
    assert len(results) == len(list((fake_run_dir / "trials").iterdir()))
    assert results["trial"].is_unique
    status = results.set_index("trial")["status"]
    assert status[ERRORED] == "errored" and status[RUNNING] == "running"
    assert (status.drop([ERRORED, RUNNING]) == "finished").all()
    errored = results.set_index("trial").loc[ERRORED]
    assert errored["error"] == "RuntimeError: CUDA out of memory"
    assert math.isnan(errored["test_miou"])


def test_results_columns_and_drops(fake_run_dir: Path) -> None:
    results = load_run(fake_run_dir).results.set_index("trial")
    for column in ("dataset", "model", "encoder", "pruner", "target_sparsity", "achieved_sparsity"):
        assert column in results
    row = results.loc["synthetic-fpn-lp-s0.9"]
    assert row["dense_test_miou"] == pytest.approx(0.70)
    assert row["pruned_test_miou"] == pytest.approx(0.70 * (1 - 0.08))
    assert row["iou_drop"] == pytest.approx(0.70 * 0.08)
    assert row["iou_drop_rel"] == pytest.approx(0.08)
    assert row["nonzero_params"] == 100 and row["total_params"] == 1000
    assert row["node"] == "10.0.0.1" and row["wall_time_s"] == 12.5
    # One column per class and dataset; the other dataset's classes are empty.
    assert {"iou_good", "iou_severe", "iou_corroded_c1"} <= set(results.columns)
    assert math.isnan(row["iou_corroded_c1"]) and not math.isnan(row["iou_severe"])
    dense = results.loc["synthetic-fpn-dense"]
    assert dense["pruner"] == "none" and dense["target_sparsity"] == 0.0
    assert dense["test_miou"] == pytest.approx(0.70) and math.isnan(dense["iou_drop"])


def test_running_trial_reports_progress_from_metrics(fake_run_dir: Path) -> None:
    row = load_run(fake_run_dir).results.set_index("trial").loc[RUNNING]
    assert row["epochs_done"] == 3  # the fourth, half-written line is skipped
    assert row["last_stage"] == "prune" and row["achieved_sparsity"] > 0


def test_curves_one_row_per_trial_and_epoch(fake_run_dir: Path) -> None:
    run = load_run(fake_run_dir)
    curves = run.curves
    assert not curves.duplicated(["trial", "global_epoch"]).any()
    dense = curves[curves["trial"] == "nea-fpn-dense"]
    assert list(dense["stage"].unique()) == ["train"] and len(dense) == 6
    pruned = curves[curves["trial"] == "nea-fpn-agp-s0.5"]
    assert list(pruned["stage"].unique()) == ["prune", "finetune"]
    assert (pruned["target_sparsity"] == 0.5).all()  # the trial's target, joined in
    assert pruned["scheduled_sparsity"].iloc[-1] == pytest.approx(0.5)
    assert {"val_iou_background", "val_iou_corroded_c2"} <= set(curves.columns)
    assert len(curves[curves["trial"] == RUNNING]) == 3


def test_missing_notes_name_what_is_not_there(own_run_dir: Path) -> None:
    status = {"failed_base_models": [{"dataset": "nea", "model": "manet", "reason": "OOM"}]}
    (own_run_dir / "sweep_status.json").write_text(json.dumps(status))
    notes = "\n".join(missing_notes(load_run(own_run_dir)))
    assert f"errored: {ERRORED}: RuntimeError" in notes
    assert f"running or pending: {RUNNING}" in notes
    assert f"not started yet (1): {NOT_STARTED}" in notes
    assert "failed base model: nea-manet: OOM" in notes


def test_empty_run_directory_gives_empty_tables(tmp_path: Path) -> None:
    run = load_run(tmp_path)
    assert run.results.empty and run.curves.empty and missing_notes(run) == []


def test_label_distribution_prefers_the_file(own_run_dir: Path) -> None:
    table, source = label_distribution(load_run(own_run_dir))
    assert source == "examples" and set(table["dataset"]) == {"synthetic", "nea"}
    sums = table.groupby("dataset")["percent"].sum()
    assert sums.to_numpy() == pytest.approx([100.0, 100.0])
    given = pd.DataFrame(
        {
            "split": ["train", "train"],
            "class_id": [0, 1],
            "class_name": ["good", "fair"],
            "pixels": [90, 10],
            "percent": [90.0, 10.0],
        }
    )
    given.to_csv(own_run_dir / "label_distribution.csv", index=False)
    table, source = label_distribution(load_run(own_run_dir))
    assert source == "file" and table["dataset"].tolist() == ["all", "all"]  # two datasets


def test_granularity_and_seed_from_the_config_over_the_name(tmp_path: Path) -> None:
    trial = tmp_path / "trials" / "sscs-fpn-agp-s0.5"
    trial.mkdir(parents=True)
    trial.joinpath("config.yaml").write_text(
        "seed: 4\npruning: {pruner: agp, granularity: channel}\n"
    )
    row = trial_row(trial)[0]
    assert (row["granularity"], row["seed"], row["dataset"]) == ("channel", 4, "sscs")


def test_size_and_latency_columns_come_from_final_json(fake_run_dir: Path) -> None:
    run = load_run(fake_run_dir)
    results = run.results.set_index("trial")
    assert set(INFERENCE_COLUMNS.values()) | {"granularity"} <= set(RESULT_COLUMNS)
    channel = results.loc["synthetic-fpn-agp-channel-s0.9"]
    assert channel["granularity"] == "channel" and channel["pruner"] == "agp"
    expected = inference("fpn", "agp", 0.9, "channel")
    assert channel["params_deploy"] == expected["params"] == 100
    for column in ("gmacs", "compact_mib", "compact_fp16_mib", "latency_ms"):
        assert channel[column] == pytest.approx(expected[column])
    assert channel["latency_device"] == "cpu"
    element = results.loc["synthetic-fpn-agp-s0.9"]
    assert element["granularity"] == "element" and element["params_deploy"] == 1000
    assert results.loc["synthetic-fpn-dense", "granularity"] == "none"  # config says element
    assert math.isnan(results.loc[NO_LATENCY, "latency_ms"])
    assert results.loc[NO_LATENCY, "compact_mib"] > 0
    old = results.loc["nea-fpn-agp-s0.9"]  # no `inference` block, no granularity in its config
    assert old["granularity"] == "element" and pd.isna(old["latency_device"])
    assert all(math.isnan(old[c]) for c in ("params_deploy", "gmacs", "compact_mib", "latency_ms"))
    curves = run.curves
    assert set(curves.loc[curves["trial"].isin(CHANNEL_TRIALS), "granularity"]) == {"channel"}


def test_int8_columns_come_from_the_trials_int8_records(own_run_dir: Path) -> None:
    assert set(INT8_COLUMNS.values()) <= set(RESULT_COLUMNS)
    before = load_run(own_run_dir)  # a run without `deploy_int8`: NaN / None, no notes
    assert before.results[["int8_test_miou", "int8_latency_ms", "int8_status"]].isna().all().all()
    assert not any("INT8" in n for n in missing_notes(before))
    written = write_int8_records(own_run_dir)
    run = load_run(own_run_dir)
    results = run.results.set_index("trial")
    row = results.loc["synthetic-fpn-agp-channel-s0.9"]
    assert row["int8_status"] == "exported" and row["int8_agreement"] == 0.99
    assert row["int8_test_miou"] == pytest.approx(row["test_miou"] - 0.004)
    assert row["onnx_latency_ms"] == pytest.approx(2 * row["int8_latency_ms"])
    refused = results.loc[INT8_REFUSED]
    assert refused["int8_status"] == "refused" and math.isnan(refused["int8_test_miou"])
    assert refused["int8_reason"].endswith("agrees with fp32 on only 60%")
    others = results.drop(written)
    assert others["int8_status"].isna().all() and others["int8_test_miou"].isna().all()
    notes = missing_notes(run)
    assert f"INT8 export refused: {INT8_REFUSED}: INT8 model of m agrees" in "\n".join(notes)
    assert not any(n.startswith("no INT8 record yet") for n in notes)
    # A sweep with `deploy_int8` names its finished trials that have no record yet.
    sweep = yaml.safe_load((own_run_dir / "sweep.yaml").read_text())
    sweep["sweep"]["deploy_int8"] = True
    (own_run_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep))
    waiting = [n for n in missing_notes(load_run(own_run_dir)) if "no INT8 record yet" in n]
    assert len(waiting) == 1
    names = waiting[0].split(": ", 1)[1].split(", ")
    assert "synthetic-unet-dense" in names and "nea-fpn-dense" in names
    assert not {"synthetic-fpn-dense", INT8_REFUSED, ERRORED, RUNNING} & set(names)


def test_expected_trials_with_a_granularity_axis() -> None:
    grid = {"datasets": ["sscs"], "models": ["fpn"], "pruners": ["agp"], "sparsities": [0.5]}
    names = lambda sweep: [i.name for i in expected_trials(sweep)]  # noqa: E731
    assert names({"sweep": grid}) == ["sscs-fpn-dense-seed0", "sscs-fpn-agp-s0.5-seed0"]
    both = {"sweep": {**grid, "granularities": ["element", "channel"]}}
    assert names(both) == [
        "sscs-fpn-dense-seed0",
        "sscs-fpn-agp-s0.5-seed0",
        "sscs-fpn-agp-channel-s0.5-seed0",
    ]
