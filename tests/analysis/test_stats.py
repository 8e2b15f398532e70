"""Intervals over seeds and the seeds a decision needs, against hand-computed values."""

import math

import pandas as pd
import pytest

from analysis.stats import by_combination, seeds_needed, summarize, t_interval


def test_t_interval_against_the_t_table() -> None:
    n, mean, sd, low, high = t_interval([0.60, 0.62, 0.64])
    assert (n, mean, sd) == (3, pytest.approx(0.62), pytest.approx(0.02))
    half = 4.302653 * 0.02 / math.sqrt(3)  # t(0.975, 2)
    assert (low, high) == (pytest.approx(0.62 - half), pytest.approx(0.62 + half))
    assert t_interval([0.5])[:2] == (1, 0.5) and math.isnan(t_interval([0.5])[3])
    assert t_interval([math.nan, 0.4, 0.6])[0] == 2  # NaNs (unfinished) are not seeds
    assert t_interval([])[0] == 0


def test_seeds_needed_is_the_normal_power_formula() -> None:
    # ((1.959964 + 0.841621) * sd / effect)^2 = 7.85 -> 8 when the effect equals the spread
    assert seeds_needed(0.03, 0.03) == 8
    assert seeds_needed(-0.06, 0.03) == 2  # the sign does not matter; never fewer than 2
    assert seeds_needed(0.0, 0.03) is None and seeds_needed(0.01, math.nan) is None


def _results() -> pd.DataFrame:
    rows = []
    for seed, (dense, pruned) in enumerate([(0.70, 0.66), (0.72, 0.69), (0.68, 0.63)]):
        base = {"dataset": "sscs", "model": "fpn", "encoder": "resnet101", "seed": seed}
        rows.append({**base, "pruner": "none", "granularity": "none", "target_sparsity": 0.0,
                     "test_miou": dense, "dense_test_miou": dense, "status": "finished",
                     "iou_rust": dense - 0.1, "trial": f"d{seed}"})  # fmt: skip
        rows.append({**base, "pruner": "agp", "granularity": "element", "target_sparsity": 0.5,
                     "test_miou": pruned, "dense_test_miou": dense, "iou_drop": dense - pruned,
                     "iou_drop_rel": (dense - pruned) / dense, "status": "finished",
                     "iou_rust": pruned - 0.1, "trial": f"p{seed}"})  # fmt: skip
    rows.append({**rows[-1], "seed": 3, "status": "running", "test_miou": math.nan})
    return pd.DataFrame(rows)


def test_summary_one_row_per_combination_with_paired_drops() -> None:
    summary = summarize(_results()).set_index("pruner")
    assert list(summary["n"]) == [3, 3] and summary.loc["agp", "seeds"] == "0,1,2"
    agp = summary.loc["agp"]
    assert agp["test_miou_mean"] == pytest.approx(0.66)
    drops = [0.04, 0.03, 0.05]  # each against its own seed's dense model
    n, mean, sd, low, high = t_interval(drops)
    assert agp["iou_drop_mean"] == pytest.approx(mean) and agp["iou_drop_sd"] == pytest.approx(sd)
    assert (agp["iou_drop_ci_low"], agp["iou_drop_ci_high"]) == (
        pytest.approx(low), pytest.approx(high),
    )  # fmt: skip
    assert agp["iou_rust_mean"] == pytest.approx(0.56)
    assert summary.loc["none", "encoder"] == "resnet101"


def test_by_combination_gives_error_bar_half_widths() -> None:
    rows = _results()
    rows = rows[rows["status"] == "finished"]
    points = by_combination(rows, "test_miou", ["pruner"]).set_index("pruner")
    half = t_interval([0.66, 0.69, 0.63])
    assert points.loc["agp", "err"] == pytest.approx((half[4] - half[3]) / 2)
    one = by_combination(rows[rows["seed"] == 0], "test_miou", ["pruner"])
    assert one["n"].tolist() == [1, 1] and one["err"].isna().all()
