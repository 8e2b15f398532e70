"""The paper's claims: holds, fails or not run, decided by the numbers they print."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.claims import (
    FAILS,
    HOLDS,
    NOT_RUN,
    best_models,
    check_claims,
    claims_frame,
    fpn_at_90,
    lp_agp_keep,
    mp_unstable,
)
from analysis.collect import load_run


@pytest.fixture(scope="module")
def run(fake_run_dir: Path):
    return load_run(fake_run_dir)


def _set(results: pd.DataFrame, trial: str, pruned: float) -> pd.DataFrame:
    """A copy with one trial's pruned test mIoU (and its drops) replaced."""
    out = results.copy()
    i = out.index[out["trial"] == trial][0]
    dense = out.at[i, "dense_test_miou"]
    out.loc[i, ["pruned_test_miou", "iou_drop", "iou_drop_rel"]] = [
        pruned,
        dense - pruned,
        (dense - pruned) / dense,
    ]
    return out


def test_every_claim_for_every_dataset(run) -> None:
    table = claims_frame(check_claims(run.results, run.curves)).set_index(["dataset", "claim"])
    synthetic = table.loc["synthetic"]
    assert (synthetic["verdict"] == HOLDS).all(), synthetic
    sscs_rule = (
        "FPN at 0.9 loses less than 10% IoU on SSCS (checked on synthetic with the SSCS threshold)"
    )
    assert sscs_rule in synthetic.index
    nea = table.loc["nea"]["verdict"]
    assert nea["FPN at 0.9 loses less than 5% IoU on NEA"] == FAILS  # best is agp at 6%
    assert table.loc[("sscs", "FPN at 0.9 loses less than 10% IoU on SSCS"), "verdict"] == NOT_RUN
    assert set(table["verdict"]) <= {HOLDS, FAILS, NOT_RUN}
    assert table["evidence"].str.len().gt(0).all() and table["definition"].str.len().gt(0).all()


def test_best_models(run) -> None:
    claim = best_models(run.results, "synthetic")
    assert claim.verdict == HOLDS
    assert claim.evidence.startswith("mean pruned mIoU: 1. fpn 0.655 (n=9), 2. linknet")
    worse = run.results.copy()
    worse.loc[worse["model"] == "fpn", "pruned_test_miou"] = 0.1
    assert best_models(worse, "synthetic").verdict == FAILS
    two = run.results[run.results["model"] != "unet"]
    assert best_models(two, "synthetic").verdict == NOT_RUN


def test_lp_agp_keep(run) -> None:
    claim = lp_agp_keep(run.results, "synthetic")
    assert claim.verdict == HOLDS and "lp: worst 4.5% (unet s0.5)" in claim.evidence
    broken = _set(run.results, "synthetic-fpn-agp-s0.5", 0.6)  # 0.70 -> 0.60: 14% drop
    claim = lp_agp_keep(broken, "synthetic")
    assert claim.verdict == FAILS and "agp: worst 14.3% (fpn s0.5)" in claim.evidence
    only_mp = run.results[~run.results["pruner"].isin(["lp", "agp"])]
    assert lp_agp_keep(only_mp, "synthetic").verdict == NOT_RUN


def test_fpn_at_90_is_decided_by_the_best_pruner(run) -> None:
    claim = fpn_at_90(run.results, "nea", "nea")
    assert claim.verdict == FAILS and claim.evidence.startswith("best agp 6.0%")
    better = _set(run.results, "nea-fpn-lp-s0.9", 0.64)  # 0.65 -> 0.64: 1.5%
    assert fpn_at_90(better, "nea", "nea").verdict == HOLDS
    assert fpn_at_90(run.results, "synthetic", "sscs").verdict == HOLDS  # 6% < 10%
    no_fpn = run.results[run.results["model"] != "fpn"]
    assert fpn_at_90(no_fpn, "nea", "nea").verdict == NOT_RUN


def test_mp_unstable(run) -> None:
    claim = mp_unstable(run.results, run.curves, "synthetic")
    assert claim.verdict == HOLDS and "mp 0.548" in claim.evidence
    assert "epoch-to-epoch" in claim.evidence
    good_mp = run.results.copy()
    at = (good_mp["pruner"] == "mp") & (good_mp["target_sparsity"] == 0.2)
    good_mp.loc[at, "pruned_test_miou"] = 0.99
    assert mp_unstable(good_mp, run.curves, "synthetic").verdict == FAILS
    calm = run.curves.copy()
    calm.loc[calm["pruner"] == "mp", "val_miou"] = 0.5
    assert mp_unstable(run.results, calm, "synthetic").verdict == FAILS
    no_mp = run.results[run.results["pruner"] != "mp"]
    assert mp_unstable(no_mp, run.curves, "synthetic").verdict == NOT_RUN


def test_claims_leave_channel_trials_out(run) -> None:
    claim = lp_agp_keep(run.results, "synthetic")
    assert "agp: worst" in claim.evidence and "of 6 trials" in claim.evidence  # element only
    assert claim.verdict == HOLDS  # channel AGP at 0.5 loses 5% and more
    worse = _set(run.results, "synthetic-fpn-agp-channel-s0.9", 0.0)
    assert (
        best_models(worse, "synthetic").evidence == best_models(run.results, "synthetic").evidence
    )
    assert fpn_at_90(worse, "synthetic", "sscs").verdict == HOLDS
