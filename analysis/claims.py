"""The paper's published claims checked against a run, judged with their uncertainty.

Each claim reduces to per-seed statistics (a model's mean pruned mIoU, a combination's relative
drop, a pruner's jitter), compared against a threshold or against each other paired by seed (the
pruned trials of one seed share their dense bases). A comparison is decided only when its 95%
t-interval over seeds (analysis.stats) lies wholly on one side:

- `holds`: every comparison the claim needs is decided in its favour;
- `fails`: one of them is decided against it;
- `inconclusive`: otherwise: an interval straddles the threshold, or one seed gives no interval
  at all (the point estimate is shown, with the seeds a 5% test at 80% power would need given the
  spread measured, when there is one);
- `not run`: the trials it needs are not finished.

The paper prunes element-wise (unstructured), so its claims are checked on element trials only;
channel-pruned trials never enter them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from analysis.collect import DENSE, ELEMENT
from analysis.figures import PRUNER_ORDER, ordered
from analysis.stats import seeds_needed, t_interval

HOLDS, FAILS, INCONCLUSIVE, NOT_RUN = "holds", "fails", "inconclusive", "not run"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_RUN)
KEEP_MAX_SPARSITY, KEEP_MAX_DROP = 0.5, 0.05
FPN_SPARSITY = 0.9
FPN_MAX_DROP = {"sscs": 0.10, "nea": 0.05}  # other datasets (synthetic, folder) use the SSCS one
MP_SPARSITY = 0.2


@dataclass(frozen=True)
class Claim:
    claim: str
    dataset: str
    verdict: str  # holds | fails | inconclusive | not run
    evidence: str  # the numbers that decided it, or why it could not be checked
    definition: str
    n: int = 0  # seeds the verdict rests on (the fewest of its comparisons)
    seeds_needed: int | None = None  # for an inconclusive verdict, given the measured spread


@dataclass(frozen=True)
class Comparison:
    """One per-seed statistic against a bound: `favours` is the side the claim needs."""

    label: str
    values: pd.Series  # per seed
    bound: float = 0.0
    favours: str = "above"  # above | below

    def interval(self) -> tuple[int, float, float, float, float]:
        return t_interval(self.values)

    def decided(self) -> str:
        """HOLDS or FAILS when the interval is wholly on one side of the bound, else INCONCLUSIVE."""
        n, _, _, low, high = self.interval()
        if n < 2 or math.isnan(low):
            return INCONCLUSIVE
        above, below = low > self.bound, high < self.bound
        if not (above or below):
            return INCONCLUSIVE
        return HOLDS if above == (self.favours == "above") else FAILS

    def point(self) -> bool:
        """Whether the mean alone is on the claim's side."""
        mean = self.interval()[1]
        return mean > self.bound if self.favours == "above" else mean < self.bound

    def text(self, fmt: str = "{:.3f}") -> str:
        n, mean, _, low, high = self.interval()
        interval = f" [{fmt.format(low)}, {fmt.format(high)}]" if n > 1 else ""
        return f"{self.label} {fmt.format(mean)}{interval} (n={n})"

    def needed(self) -> int | None:
        n, mean, sd, _, _ = self.interval()
        return seeds_needed(mean - self.bound, sd) if n > 1 else None


def judge(comparisons: list[Comparison], need: str = "all") -> tuple[str, int, int | None, str]:
    """(verdict, n, seeds needed, note) of a claim that needs `all` comparisons on its side, or
    `any` one of them (the best pruner)."""
    n = min(c.interval()[0] for c in comparisons)
    verdicts = [c.decided() for c in comparisons]
    if need == "all":
        verdict = (
            FAILS if FAILS in verdicts else HOLDS if set(verdicts) == {HOLDS} else INCONCLUSIVE
        )
        point = all(c.point() for c in comparisons)
    else:
        verdict = (
            HOLDS if HOLDS in verdicts else FAILS if set(verdicts) == {FAILS} else INCONCLUSIVE
        )
        point = any(c.point() for c in comparisons)
    if verdict != INCONCLUSIVE:
        return verdict, n, None, ""
    open_ = [c for c, v in zip(comparisons, verdicts, strict=True) if v == INCONCLUSIVE]
    needed = [c.needed() for c in open_]
    known = [k for k in needed if k is not None]
    seeds = max(known) if known else None
    side = "holds" if point else "fails"
    if n < 2:
        note = (
            f"inconclusive with {n} seed: no interval; the point estimate {side}. Run at least "
            "2 seeds (sweep --seeds 0,1,2) to measure the spread"
        )
    else:
        note = f"inconclusive at n={n}: an interval straddles its bound; the point estimate {side}"
        if seeds:
            note += f"; about {seeds} seeds would decide it (5% test, 80% power, measured spread)"
    return verdict, n, seeds, note


def _claim(text, dataset, definition, comparisons, evidence, need="all") -> Claim:
    verdict, n, seeds, note = judge(comparisons, need)
    evidence = f"{evidence}; {note}" if note else evidence
    return Claim(text, dataset, verdict, evidence, definition, n, seeds)


def _element(frame: pd.DataFrame) -> pd.DataFrame:
    """The element-wise (paper) trials; tables without a granularity column are all element."""
    return frame[frame["granularity"] == ELEMENT] if "granularity" in frame else frame


def _pruned(results: pd.DataFrame, dataset: str) -> pd.DataFrame:
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    rows = _element(rows[rows["pruner"] != DENSE])
    rows = rows[rows["pruned_test_miou"].notna()]
    return rows.assign(seed=rows["seed"].fillna(0)) if "seed" in rows else rows.assign(seed=0)


def _pct(value: float) -> str:
    return f"{100 * value:.1f}%"


def _per_seed(rows: pd.DataFrame, by: str, column: str) -> pd.DataFrame:
    """Seeds x `by` table of the mean of `column` (one seed's trials averaged)."""
    return rows.groupby(["seed", by])[column].mean().unstack(by)


def best_models(results: pd.DataFrame, dataset: str) -> Claim:
    text = "FPN and LinkNet hold IoU best"
    definition = (
        "FPN and LinkNet rank 1 and 2 by mean pruned test mIoU over all their pruned trials: "
        "each beats every other model, the difference paired by seed with its 95% interval above 0"
    )
    rows = _pruned(results, dataset)
    table = _per_seed(rows, "model", "pruned_test_miou")
    means = table.mean().sort_values(ascending=False)
    if not {"fpn", "linknet"} <= set(means.index) or len(means) < 3:
        why = f"needs finished pruned FPN, LinkNet and at least one other model; has {list(means.index)}"
        return Claim(text, dataset, NOT_RUN, why, definition)
    counts = rows.groupby("model")["pruned_test_miou"].count()
    ranking = ", ".join(
        f"{i}. {m} {v:.3f} (n={int(counts[m])})" for i, (m, v) in enumerate(means.items(), start=1)
    )
    others = [m for m in means.index if m not in ("fpn", "linknet")]
    comparisons = [
        Comparison(f"{top} - {other}", (table[top] - table[other]).dropna())
        for top in ("fpn", "linknet")
        for other in others
    ]
    closest = min(comparisons, key=lambda c: c.interval()[1])
    evidence = f"mean pruned mIoU: {ranking}; closest: {closest.text()}"
    return _claim(text, dataset, definition, comparisons, evidence)


def lp_agp_keep(results: pd.DataFrame, dataset: str) -> Claim:
    text = "LP and AGP keep IoU up to 50% sparsity"
    definition = (
        f"every LP and AGP combination at target sparsity <= {KEEP_MAX_SPARSITY:g} loses less than "
        f"{100 * KEEP_MAX_DROP:g}% of its own seed's dense test mIoU (relative drop; its 95% "
        "interval over seeds below the bound)"
    )
    rows = _pruned(results, dataset)
    rows = rows[rows["pruner"].isin(["lp", "agp"])]
    rows = rows[rows["target_sparsity"] <= KEEP_MAX_SPARSITY + 1e-9]
    if rows.empty:
        return Claim(
            text, dataset, NOT_RUN, "no finished LP/AGP trial at sparsity <= 0.5", definition
        )
    comparisons, parts = [], []
    for pruner in ordered(rows["pruner"], PRUNER_ORDER):
        part = rows[rows["pruner"] == pruner]
        cells = part.groupby(["model", "target_sparsity"])
        mine = [
            Comparison(
                f"{model} s{sparsity:g}",
                cell.set_index("seed")["iou_drop_rel"],
                KEEP_MAX_DROP,
                "below",
            )
            for (model, sparsity), cell in cells
        ]
        worst = max(mine, key=lambda c: c.interval()[1])
        parts.append(f"{pruner}: worst {worst.text('{:.1%}')} of {len(part)} trials")
        comparisons += mine
    evidence = "relative mIoU drop " + "; ".join(parts)
    return _claim(text, dataset, definition, comparisons, evidence)


def fpn_at_90(results: pd.DataFrame, dataset: str, paper_dataset: str) -> Claim:
    """FPN at 0.9 against the threshold the paper gives for `paper_dataset` (sscs or nea)."""
    limit = FPN_MAX_DROP[paper_dataset]
    text = f"FPN at 0.9 loses less than {100 * limit:g}% IoU on {paper_dataset.upper()}"
    if dataset != paper_dataset:
        text += f" (checked on {dataset} with the {paper_dataset.upper()} threshold)"
    definition = (
        f"the best pruner's FPN at target sparsity {FPN_SPARSITY:g} loses less than {100 * limit:g}% "
        "of its own seed's dense FPN test mIoU (relative drop, 95% interval over seeds below the "
        "bound); every pruner's drop is listed"
    )
    rows = _pruned(results, dataset)
    rows = rows[(rows["model"] == "fpn") & np.isclose(rows["target_sparsity"], FPN_SPARSITY)]
    if rows.empty:
        return Claim(text, dataset, NOT_RUN, "no finished FPN trial at sparsity 0.9", definition)
    comparisons = [
        Comparison(pruner, part.set_index("seed")["iou_drop_rel"], limit, "below")
        for pruner, part in rows.groupby("pruner")
    ]
    comparisons.sort(key=lambda c: c.interval()[1])
    dense = rows.groupby("pruner")[["dense_test_miou", "pruned_test_miou"]].mean()
    listed = ", ".join(
        f"{c.text('{:.1%}')} ({dense.at[c.label, 'dense_test_miou']:.3f} -> "
        f"{dense.at[c.label, 'pruned_test_miou']:.3f})"
        for c in comparisons
    )
    best = comparisons[0]
    evidence = f"best {best.label} {_pct(best.interval()[1])}; relative drops: {listed}"
    return _claim(text, dataset, definition, comparisons, evidence, need="any")


def epoch_jitter(curves: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Seeds x pruners: the mean |change of validation mIoU| from one epoch to the next after
    dense training, over that seed's trials of the pruner."""
    rows = curves[(curves["dataset"] == dataset) & curves["stage"].isin(["prune", "finetune"])]
    rows = _element(rows[rows["pruner"] != DENSE]).sort_values(["trial", "global_epoch"])
    if rows.empty:
        return pd.DataFrame()
    seed = rows["seed"].fillna(0) if "seed" in rows else pd.Series(0, index=rows.index)
    steps = rows.groupby("trial")["val_miou"].diff().abs()
    return steps.groupby([seed, rows["pruner"]]).mean().dropna().unstack("pruner")


def mp_unstable(results: pd.DataFrame, curves: pd.DataFrame, dataset: str) -> Claim:
    text = "MP unstable, worst at 20% sparsity"
    definition = (
        f"at target sparsity {MP_SPARSITY:g} MP has the lowest mean pruned test mIoU of all pruners, "
        "and MP's validation mIoU jumps more from epoch to epoch (mean |change|, pruning and "
        "fine-tuning) than every other pruner's: each difference paired by seed, its 95% "
        "interval on the claim's side of 0"
    )
    rows = _pruned(results, dataset)
    at = rows[np.isclose(rows["target_sparsity"], MP_SPARSITY)]
    table = _per_seed(at, "pruner", "pruned_test_miou")
    if "mp" not in table or len(table.columns) < 2:
        why = f"needs finished MP and another pruner at sparsity 0.2; has {list(table.columns)}"
        return Claim(text, dataset, NOT_RUN, why, definition)
    pruners = ordered(table.columns, PRUNER_ORDER)
    evidence = "mean pruned mIoU at s0.2: " + ", ".join(
        f"{p} {table[p].mean():.3f}" for p in pruners
    )
    comparisons = [
        Comparison(f"{p} - mp", (table[p] - table["mp"]).dropna()) for p in pruners if p != "mp"
    ]
    jitter = epoch_jitter(curves, dataset)
    if "mp" in jitter and len(jitter.columns) >= 2:
        order = ordered(jitter.columns, PRUNER_ORDER)
        evidence += "; mean |epoch-to-epoch change| of val mIoU: " + ", ".join(
            f"{p} {jitter[p].mean():.4f}" for p in order
        )
        comparisons += [
            Comparison(f"jitter mp - {p}", (jitter["mp"] - jitter[p]).dropna())
            for p in order
            if p != "mp"
        ]
    else:
        evidence += "; no pruning curves to judge stability (decided on the ranking alone)"
    return _claim(text, dataset, definition, comparisons, evidence)


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


CLAIM_COLUMNS = ["claim", "dataset", "verdict", "n", "seeds_needed", "evidence", "definition"]


def claims_frame(claims: list[Claim]) -> pd.DataFrame:
    return pd.DataFrame([asdict(c) for c in claims], columns=CLAIM_COLUMNS)
