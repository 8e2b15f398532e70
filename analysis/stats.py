"""Repeated seeds turned into intervals: the per-combination summary and the seeds a claim needs.

The unit of replication is the training seed. A combination's n trials (one per seed) give a mean
and a 95% t-interval, mean +- t(0.975, n-1) * sd / sqrt(n). Why t and not a bootstrap over seeds:
with the 2 to 5 seeds a sweep can afford, a percentile bootstrap resamples so few values that its
interval is far too narrow (with n = 2 it is the range of the two values), while the t-interval
widens with small n as it should, at the price of assuming roughly normal seed-to-seed spread.

A pruned trial's drop is paired: it is measured against the dense model of its own seed (the one
it was warm-started from), so the seed-to-seed spread of the dense models cancels out of it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pandas as pd
from scipy import stats

from sweep.identity import COLUMNS

CONFIDENCE = 0.95
POWER = 0.8
# A combination: the identity without the seed.
COMBINATION = tuple(c for c in COLUMNS if c != "seed")
# Columns summarised with mean, sd and interval; per-class IoU columns (iou_<class>) are added.
SUMMARISED = ("test_miou", "dense_test_miou", "iou_drop", "iou_drop_rel", "achieved_sparsity")
AVERAGED = ("latency_ms", "params_deploy", "gmacs", "compact_mib")  # the same for every seed


def t_interval(values: Iterable[float]) -> tuple[int, float, float, float, float]:
    """(n, mean, sd, low, high) of the finite values; sd and the interval are NaN below n = 2."""
    x = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
    n = len(x)
    if n == 0:
        return 0, math.nan, math.nan, math.nan, math.nan
    mean = float(x.mean())
    if n < 2:
        return n, mean, math.nan, math.nan, math.nan
    sd = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
    return n, mean, sd, mean - half, mean + half


def seeds_needed(effect: float, sd: float, power: float = POWER) -> int | None:
    """Seeds for a two-sided 5% test to detect `effect` with `power`, given a seed-to-seed
    standard deviation `sd` (normal approximation, n = ((z(0.975) + z(power)) * sd / effect)^2,
    at least 2); None when the effect is 0 or the spread unknown."""
    if not (np.isfinite(effect) and np.isfinite(sd)) or effect == 0:
        return None
    z = stats.norm.ppf(0.5 + CONFIDENCE / 2) + stats.norm.ppf(power)
    return max(2, math.ceil((z * sd / abs(effect)) ** 2))


def _finished(results: pd.DataFrame) -> pd.DataFrame:
    rows = results[results["status"] == "finished"] if "status" in results else results
    return rows.assign(encoder=rows["encoder"].fillna("")) if "encoder" in rows else rows


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """One row per combination (dense bases included) over its finished seeds: n, the seeds, and
    mean, sd and the 95% t-interval of test mIoU, the paired drop and each class's IoU."""
    rows = _finished(results)
    keys = [c for c in COMBINATION if c in rows]
    classes = [c for c in rows.columns if c.startswith("iou_") and c != "iou_drop_rel"]
    classes = [c for c in classes if c != "iou_drop"]
    measured = [c for c in (*SUMMARISED, *classes) if c in rows]
    out = []
    for key, part in rows.groupby(keys, sort=False, dropna=False):
        record = dict(zip(keys, key, strict=True))
        seeds = sorted(int(s) for s in part["seed"].dropna()) if "seed" in part else []
        record["n"] = len(part)
        record["seeds"] = ",".join(map(str, seeds))
        for column in measured:
            n, mean, sd, low, high = t_interval(part[column])
            record[f"{column}_mean"] = mean
            record[f"{column}_sd"] = sd
            record[f"{column}_ci_low"] = low
            record[f"{column}_ci_high"] = high
        for column in AVERAGED:
            if column in part:
                record[column] = part[column].mean()
        out.append(record)
    frame = pd.DataFrame(out)
    if "encoder" in frame:
        frame["encoder"] = frame["encoder"].replace("", None)
    return frame


def by_combination(rows: pd.DataFrame, column: str, keys: list[str]) -> pd.DataFrame:
    """`rows` grouped by `keys` (a figure's series): mean of `column` (and of the cost columns),
    n, and the interval's half-width `err` (NaN below n = 2), for error bars."""
    if rows.empty:
        return rows.assign(n=[], err=[])
    records = []
    for key, part in rows.groupby(keys, sort=False, dropna=False):
        n, mean, _, low, high = t_interval(part[column])
        record = dict(zip(keys, key if isinstance(key, tuple) else (key,), strict=True))
        record.update({column: mean, "n": n, "err": (high - low) / 2 if n > 1 else math.nan})
        record["trial"] = ", ".join(part["trial"]) if "trial" in part else ""
        for other in ("latency_ms", "compact_mib", "latency_device", "latency_source"):
            if other in part and other not in keys and other != column:
                values = part[other].dropna()
                record[other] = (
                    values.mean() if pd.api.types.is_numeric_dtype(values) else
                    (values.iloc[0] if len(values) else None)
                )  # fmt: skip
        records.append(record)
    return pd.DataFrame(records)
