"""Seed-to-seed spread of a multi-seed sweep, and the seeds a grid needs to separate differences.

    python benchmarks/bench_seeds.py RUN_DIR [--effects 0.01,0.02,0.05]

Reads a finished sweep run with several seeds (`corroprune sweep ... --seeds 0,1,2`) through the
report's own tables (analysis.collect, analysis.stats, analysis.claims) and prints, as Markdown:

- the spread over seeds: per kind of number (dense test mIoU, pruned test mIoU, the paired drop
  from the trial's own seed's dense model), the median and largest standard deviation over the
  combinations, and the median half-width of their 95% t-intervals;
- the seeds a two-sided 5% test at 80% power needs to separate a difference of each `--effects`
  size at the median spread of paired drops (analysis.stats.seeds_needed);
- every claim's verdict, n and (when inconclusive) the seeds its own measured effect needs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.claims import check_claims  # noqa: E402
from analysis.collect import DENSE, load_run  # noqa: E402
from analysis.stats import seeds_needed, summarize  # noqa: E402


def spread_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Median and largest sd over combinations, and the median interval half-width."""
    dense = summary[summary["pruner"] == DENSE]
    pruned = summary[summary["pruner"] != DENSE]
    rows = []
    for label, frame, column in (
        ("dense test mIoU", dense, "test_miou"),
        ("pruned test mIoU", pruned, "test_miou"),
        ("drop from own seed's dense (paired)", pruned, "iou_drop"),
    ):
        sd = frame[f"{column}_sd"].dropna()
        half = (frame[f"{column}_ci_high"] - frame[f"{column}_ci_low"]).dropna() / 2
        rows.append(
            {
                "number": label,
                "combinations": len(sd),
                "median sd": sd.median(),
                "largest sd": sd.max(),
                "median 95% half-width": half.median(),
            }
        )
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame) -> str:
    """A Markdown table (floats with 4 decimals, missing as "-")."""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "-"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(frame.columns) + " |", "|" + " --- |" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--effects", default="0.01,0.02,0.05")
    args = parser.parse_args(argv)
    run = load_run(args.run_dir)
    summary = summarize(run.results)
    seeds = sorted(run.results["seed"].dropna().unique())
    print(f"run {args.run_dir.resolve()}: seeds {', '.join(str(int(s)) for s in seeds)}, "
          f"{int((run.results['status'] == 'finished').sum())} finished trials\n")  # fmt: skip
    spread = spread_table(summary)
    print(markdown(spread), "\n")
    drop_sd = float(spread.iloc[2]["median sd"])
    effects = [float(e) for e in args.effects.split(",")]
    rows = [
        {"difference (mIoU)": e, "seeds needed": str(seeds_needed(e, drop_sd))} for e in effects
    ]
    print(f"seeds for a 5% test at 80% power, at the median paired-drop sd {drop_sd:.4f}:\n")
    print(markdown(pd.DataFrame(rows)), "\n")
    claims = check_claims(run.results, run.curves)
    table = pd.DataFrame(
        [
            {
                "claim": c.claim,
                "dataset": c.dataset,
                "verdict": c.verdict,
                "n": c.n,
                "seeds needed": "-" if c.seeds_needed is None else str(c.seeds_needed),
            }
            for c in claims
            if c.verdict != "not run"
        ]
    )
    print(markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
