"""The paper's published claims checked against a run: holds, fails or not run, with the numbers.

The paper prunes element-wise (unstructured), so its claims are checked on element trials only;
channel-pruned trials never enter them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from analysis.collect import DENSE, ELEMENT
from analysis.figures import PRUNER_ORDER, ordered

HOLDS, FAILS, NOT_RUN = "holds", "fails", "not run"
KEEP_MAX_SPARSITY, KEEP_MAX_DROP = 0.5, 0.05
FPN_SPARSITY = 0.9
FPN_MAX_DROP = {"sscs": 0.10, "nea": 0.05}  # other datasets (synthetic, folder) use the SSCS one
MP_SPARSITY = 0.2


@dataclass(frozen=True)
class Claim:
    claim: str
    dataset: str
    verdict: str  # holds | fails | not run
    evidence: str  # the numbers that decided it, or why it could not be checked
    definition: str


def _element(frame: pd.DataFrame) -> pd.DataFrame:
    """The element-wise (paper) trials; tables without a granularity column are all element."""
    return frame[frame["granularity"] == ELEMENT] if "granularity" in frame else frame


def _pruned(results: pd.DataFrame, dataset: str) -> pd.DataFrame:
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    rows = _element(rows[rows["pruner"] != DENSE])
    return rows[rows["pruned_test_miou"].notna()]


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def best_models(results: pd.DataFrame, dataset: str) -> Claim:
    text = "FPN and LinkNet hold IoU best"
    definition = (
        "FPN and LinkNet rank 1 and 2 by mean pruned test mIoU over all their pruned trials"
    )
    rows = _pruned(results, dataset)
    means = rows.groupby("model")["pruned_test_miou"].agg(["mean", "count"])
    means = means.sort_values("mean", ascending=False)
    if not {"fpn", "linknet"} <= set(means.index) or len(means) < 3:
        why = f"needs finished pruned FPN, LinkNet and at least one other model; has {list(means.index)}"
        return Claim(text, dataset, NOT_RUN, why, definition)
    ranking = ", ".join(
        f"{i}. {m} {r['mean']:.3f} (n={int(r['count'])})"
        for i, (m, r) in enumerate(means.iterrows(), start=1)
    )
    verdict = HOLDS if set(means.index[:2]) == {"fpn", "linknet"} else FAILS
    return Claim(text, dataset, verdict, f"mean pruned mIoU: {ranking}", definition)


def lp_agp_keep(results: pd.DataFrame, dataset: str) -> Claim:
    text = "LP and AGP keep IoU up to 50% sparsity"
    definition = (
        f"every LP and AGP trial at target sparsity <= {KEEP_MAX_SPARSITY:g} loses less than "
        f"{100 * KEEP_MAX_DROP:g}% of its dense model's test mIoU (relative drop)"
    )
    rows = _pruned(results, dataset)
    rows = rows[rows["pruner"].isin(["lp", "agp"])]
    rows = rows[rows["target_sparsity"] <= KEEP_MAX_SPARSITY + 1e-9]
    if rows.empty:
        return Claim(
            text, dataset, NOT_RUN, "no finished LP/AGP trial at sparsity <= 0.5", definition
        )
    parts = []
    for pruner in ordered(rows["pruner"], PRUNER_ORDER):
        part = rows[rows["pruner"] == pruner]
        worst = part.loc[part["iou_drop_rel"].idxmax()]
        parts.append(
            f"{pruner}: worst {_pct(worst['iou_drop_rel'])} ({worst['model']} "
            f"s{worst['target_sparsity']:g}) of {len(part)} trials"
        )
    verdict = HOLDS if (rows["iou_drop_rel"] < KEEP_MAX_DROP).all() else FAILS
    return Claim(text, dataset, verdict, "relative mIoU drop " + "; ".join(parts), definition)


def fpn_at_90(results: pd.DataFrame, dataset: str, paper_dataset: str) -> Claim:
    """FPN at 0.9 against the threshold the paper gives for `paper_dataset` (sscs or nea)."""
    limit = FPN_MAX_DROP[paper_dataset]
    text = f"FPN at 0.9 loses less than {100 * limit:g}% IoU on {paper_dataset.upper()}"
    if dataset != paper_dataset:
        text += f" (checked on {dataset} with the {paper_dataset.upper()} threshold)"
    definition = (
        f"the best pruner's FPN at target sparsity {FPN_SPARSITY:g} loses less than {100 * limit:g}% "
        "of the dense FPN's test mIoU (relative drop); every pruner's drop is listed"
    )
    rows = _pruned(results, dataset)
    rows = rows[(rows["model"] == "fpn") & np.isclose(rows["target_sparsity"], FPN_SPARSITY)]
    if rows.empty:
        return Claim(text, dataset, NOT_RUN, "no finished FPN trial at sparsity 0.9", definition)
    rows = rows.sort_values("iou_drop_rel")
    listed = ", ".join(
        f"{r.pruner} {_pct(r.iou_drop_rel)} ({r.dense_test_miou:.3f} -> {r.pruned_test_miou:.3f})"
        for r in rows.itertuples()
    )
    best = rows.iloc[0]
    verdict = HOLDS if best["iou_drop_rel"] < limit else FAILS
    evidence = f"best {best['pruner']} {_pct(best['iou_drop_rel'])}; relative drops: {listed}"
    return Claim(text, dataset, verdict, evidence, definition)


def epoch_jitter(curves: pd.DataFrame, dataset: str) -> pd.Series:
    """Per pruner, the mean |change of validation mIoU| from one epoch to the next after dense training."""
    rows = curves[(curves["dataset"] == dataset) & curves["stage"].isin(["prune", "finetune"])]
    rows = _element(rows[rows["pruner"] != DENSE]).sort_values(["trial", "global_epoch"])
    if rows.empty:
        return pd.Series(dtype=float)
    steps = rows.groupby("trial")["val_miou"].diff().abs()
    return steps.groupby(rows["pruner"]).mean().dropna()


def mp_unstable(results: pd.DataFrame, curves: pd.DataFrame, dataset: str) -> Claim:
    text = "MP unstable, worst at 20% sparsity"
    definition = (
        f"at target sparsity {MP_SPARSITY:g} MP has the lowest mean pruned test mIoU of all pruners, "
        "and MP's validation mIoU jumps more from epoch to epoch (mean |change|, pruning and "
        "fine-tuning) than every other pruner's"
    )
    rows = _pruned(results, dataset)
    at = rows[np.isclose(rows["target_sparsity"], MP_SPARSITY)]
    means = at.groupby("pruner")["pruned_test_miou"].mean()
    if "mp" not in means or len(means) < 2:
        why = f"needs finished MP and another pruner at sparsity 0.2; has {list(means.index)}"
        return Claim(text, dataset, NOT_RUN, why, definition)
    means = means[ordered(means.index, PRUNER_ORDER)]
    worst = means.idxmin() == "mp"
    evidence = "mean pruned mIoU at s0.2: " + ", ".join(f"{p} {v:.3f}" for p, v in means.items())
    jitter = epoch_jitter(curves, dataset)
    if "mp" in jitter and len(jitter) >= 2:
        jitter = jitter[ordered(jitter.index, PRUNER_ORDER)]
        unstable = bool((jitter.drop("mp") < jitter["mp"]).all())
        evidence += "; mean |epoch-to-epoch change| of val mIoU: " + ", ".join(
            f"{p} {v:.4f}" for p, v in jitter.items()
        )
    else:
        unstable = True
        evidence += "; no pruning curves to judge stability (decided on the ranking alone)"
    verdict = HOLDS if worst and unstable else FAILS
    return Claim(text, dataset, verdict, evidence, definition)


def check_claims(results: pd.DataFrame, curves: pd.DataFrame) -> list[Claim]:
    """Every claim for every dataset in the run; SSCS/NEA claims marked not run when absent."""
    datasets = ordered(results["dataset"].dropna(), ("sscs", "nea"))
    claims = []
    for dataset in datasets:
        claims.append(best_models(results, dataset))
        claims.append(lp_agp_keep(results, dataset))
        claims.append(fpn_at_90(results, dataset, "nea" if dataset == "nea" else "sscs"))
        claims.append(mp_unstable(results, curves, dataset))
    for paper_dataset in ("sscs", "nea"):
        if paper_dataset not in datasets:
            claim = fpn_at_90(results.iloc[0:0], paper_dataset, paper_dataset)
            why = f"dataset {paper_dataset} is not in this run"
            claims.append(Claim(claim.claim, paper_dataset, NOT_RUN, why, claim.definition))
    return claims


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    return pd.DataFrame(
        [asdict(c) for c in claims],
        columns=["claim", "dataset", "verdict", "evidence", "definition"],
    )
