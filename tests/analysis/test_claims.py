"""The paper's claims judged with their uncertainty: holds, fails, inconclusive or not run."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from analysis.claims import (
    FAILS,
    HOLDS,
    INCONCLUSIVE,
    NOT_RUN,
    best_models,
    check_claims,
    claims_frame,
    fpn_at_90,
    lp_agp_keep,
    mp_unstable,
)
from analysis.collect import Run, load_run
from tests.analysis.fake_run import seeded


@pytest.fixture(scope="module")
def run(fake_run_dir: Path) -> Run:
    return load_run(fake_run_dir)


def _set(results: pd.DataFrame, trial: str, pruned: float) -> pd.DataFrame:
    """A copy with the trial's pruned test mIoU (and its drops) replaced, in every seed."""
    out = results.copy()
    rows = out["trial"].str.fullmatch(f"{trial}(-seed[0-9]+)?")
    dense = out.loc[rows, "dense_test_miou"]
    out.loc[rows, "pruned_test_miou"] = pruned
    out.loc[rows, "iou_drop"] = dense - pruned
    out.loc[rows, "iou_drop_rel"] = (dense - pruned) / dense
    return out


def test_one_seed_decides_nothing_and_says_what_it_needs(run: Run) -> None:
    claims = check_claims(run.results, run.curves)
    assert {c.verdict for c in claims} == {INCONCLUSIVE, NOT_RUN}
    for claim in claims:
        if claim.verdict == INCONCLUSIVE:
            assert claim.n == 1 and "inconclusive with 1 seed" in claim.evidence
            assert "--seeds 0,1,2" in claim.evidence
    nea = next(c for c in claims if c.dataset == "nea" and c.claim.startswith("FPN at"))
    assert "point estimate fails" in nea.evidence  # the best pruner loses 6% > 5%


def test_every_claim_for_every_dataset(run: Run) -> None:
    three = seeded(run)
    table = claims_frame(check_claims(three.results, three.curves)).set_index(["dataset", "claim"])
    synthetic = table.loc["synthetic"]
    assert (synthetic["verdict"] == HOLDS).all(), synthetic
    assert (synthetic["n"] == 3).all()
    sscs_rule = (
        "FPN at 0.9 loses less than 10% IoU on SSCS (checked on synthetic with the SSCS threshold)"
    )
    assert sscs_rule in synthetic.index
    nea = table.loc["nea"]["verdict"]
    assert nea["FPN at 0.9 loses less than 5% IoU on NEA"] == FAILS  # best is agp at 6%
    assert table.loc[("sscs", "FPN at 0.9 loses less than 10% IoU on SSCS"), "verdict"] == NOT_RUN
    assert set(table["verdict"]) <= {HOLDS, FAILS, INCONCLUSIVE, NOT_RUN}
    assert table["evidence"].str.len().gt(0).all() and table["definition"].str.len().gt(0).all()


def test_best_models(run: Run) -> None:
    three = seeded(run)
    claim = best_models(three.results, "synthetic")
    assert claim.verdict == HOLDS and claim.n == 3
    assert claim.evidence.startswith("mean pruned mIoU: 1. fpn 0.655 (n=27), 2. linknet")
    worse = three.results.copy()
    worse.loc[worse["model"] == "fpn", "pruned_test_miou"] = 0.1
    assert best_models(worse, "synthetic").verdict == FAILS
    two = three.results[three.results["model"] != "unet"]
    assert best_models(two, "synthetic").verdict == NOT_RUN


def test_a_difference_inside_the_noise_is_inconclusive_with_the_seeds_it_needs(run: Run) -> None:
    noisy = seeded(run, spread=0.08)  # LP at unet s0.5 drops 4.5% +- 11%: either side of 5%
    claim = lp_agp_keep(noisy.results, "synthetic")
    assert claim.verdict == INCONCLUSIVE and claim.n == 3
    assert "an interval straddles its bound" in claim.evidence
    assert claim.seeds_needed is not None and claim.seeds_needed > 3
    assert f"about {claim.seeds_needed} seeds would decide it" in claim.evidence


def test_lp_agp_keep(run: Run) -> None:
    three = seeded(run)
    claim = lp_agp_keep(three.results, "synthetic")
    assert claim.verdict == HOLDS and "lp: worst unet s0.5 4.5% [" in claim.evidence
    broken = _set(three.results, "synthetic-fpn-agp-s0.5", 0.6)  # 0.70 -> 0.60: 14% drop
    claim = lp_agp_keep(broken, "synthetic")
    assert claim.verdict == FAILS and "agp: worst fpn s0.5 14.3%" in claim.evidence
    only_mp = three.results[~three.results["pruner"].isin(["lp", "agp"])]
    assert lp_agp_keep(only_mp, "synthetic").verdict == NOT_RUN


def test_fpn_at_90_is_decided_by_the_best_pruner(run: Run) -> None:
    three = seeded(run)
    claim = fpn_at_90(three.results, "nea", "nea")
    assert claim.verdict == FAILS and claim.evidence.startswith("best agp 6.0%")
    better = _set(three.results, "nea-fpn-lp-s0.9", 0.64)  # 0.65 -> 0.64: 1.5%
    better.loc[better["trial"] == "nea-fpn-lp-s0.9-seed2", "pruned_test_miou"] = 0.645
    better["iou_drop_rel"] = 1 - better["pruned_test_miou"] / better["dense_test_miou"]
    assert fpn_at_90(better, "nea", "nea").verdict == HOLDS
    assert fpn_at_90(three.results, "synthetic", "sscs").verdict == HOLDS  # 6% < 10%
    no_fpn = three.results[three.results["model"] != "fpn"]
    assert fpn_at_90(no_fpn, "nea", "nea").verdict == NOT_RUN


def test_mp_unstable(run: Run) -> None:
    three = seeded(run)
    claim = mp_unstable(three.results, three.curves, "synthetic")
    assert claim.verdict == HOLDS and "mp 0.548" in claim.evidence
    assert "epoch-to-epoch" in claim.evidence
    good_mp = three.results.copy()
    at = (good_mp["pruner"] == "mp") & (good_mp["target_sparsity"] == 0.2)
    good_mp.loc[at, "pruned_test_miou"] = 0.99
    assert mp_unstable(good_mp, three.curves, "synthetic").verdict == FAILS
    calm = three.curves.copy()
    calm.loc[calm["pruner"] == "mp", "val_miou"] = 0.5
    assert mp_unstable(three.results, calm, "synthetic").verdict == FAILS
    no_mp = three.results[three.results["pruner"] != "mp"]
    assert mp_unstable(no_mp, three.curves, "synthetic").verdict == NOT_RUN


def test_claims_leave_channel_trials_out(run: Run) -> None:
    three = seeded(run)
    claim = lp_agp_keep(three.results, "synthetic")
    assert "agp: worst" in claim.evidence and "of 18 trials" in claim.evidence  # element only
    assert claim.verdict == HOLDS  # channel AGP at 0.5 loses 5% and more
    worse = _set(three.results, "synthetic-fpn-agp-channel-s0.9", 0.0)
    assert (
        best_models(worse, "synthetic").evidence == best_models(three.results, "synthetic").evidence
    )
    assert fpn_at_90(worse, "synthetic", "sscs").verdict == HOLDS
