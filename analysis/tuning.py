"""The fine-tuning search's report: best configurations, parallel coordinates, parameter importance."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from pandas.api.types import is_numeric_dtype

from analysis.report import atomic_write

PARAMS = ("max_lr", "base_lr", "momentum", "finetune_epochs", "alpha", "beta", "class_weighting")


def load_search(tune_dir: Path) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """All trials of every combination (one row each) and the per-combination best.json."""
    frames, bests = [], []
    for combo in sorted(p for p in Path(tune_dir).iterdir() if (p / "trials.csv").exists()):
        frames.append(
            pd.read_csv(combo / "trials.csv", keep_default_na=False, na_values=[""]).assign(
                combination=combo.name
            )
        )
        if (combo / "best.json").exists():
            bests.append(json.loads((combo / "best.json").read_text()))
    trials = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return trials, bests


def parallel_coordinates(trials: pd.DataFrame, combination: str) -> go.Figure:
    """One line per configuration, coloured by its last validation mIoU."""
    table = trials[trials["combination"] == combination]
    dims = []
    for name in PARAMS:
        if name not in table:
            continue
        values = table[name]
        if not is_numeric_dtype(values):
            codes = {v: i for i, v in enumerate(sorted(values.astype(str).unique()))}
            dims.append(
                {
                    "label": name,
                    "values": values.astype(str).map(codes),
                    "tickvals": list(codes.values()),
                    "ticktext": list(codes),
                }
            )
        else:
            dims.append({"label": name, "values": values})
    dims.append({"label": "val mIoU", "values": table["val_miou"]})
    fig = go.Figure(
        go.Parcoords(
            line={"color": table["val_miou"], "colorscale": "Viridis", "showscale": True},
            dimensions=dims,
        )
    )
    fig.update_layout(title=f"{combination}: searched fine-tuning settings against validation mIoU")
    return fig


def param_importance(trials: pd.DataFrame, combination: str) -> dict[str, float]:
    """Optuna's fANOVA importance of each searched parameter for the last validation mIoU."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    table = trials[(trials["combination"] == combination) & trials["val_miou"].notna()]
    names = [p for p in PARAMS if p in table and table[p].nunique() > 1]
    if len(table) < 2 or not names:
        return {}
    dists = {}
    for name in names:
        col = table[name]
        if not is_numeric_dtype(col):
            dists[name] = CategoricalDistribution(sorted(col.astype(str).unique()))
        else:
            dists[name] = FloatDistribution(float(col.min()), float(col.max()))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for _, row in table.iterrows():
        params = {n: float(row[n]) if is_numeric_dtype(table[n]) else str(row[n]) for n in names}
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, value=float(row["val_miou"])
            )
        )
    return optuna.importance.get_param_importances(study)


def importance_figure(importance: dict[str, float], combination: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=list(importance.values()), y=list(importance), orientation="h"))
    fig.update_layout(
        title=f"{combination}: parameter importance (fANOVA) for validation mIoU",
        xaxis_title="importance",
        yaxis_title="parameter",
    )
    return fig


def best_table(bests: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for b in bests:
        params = {k: b["best"].get(k) for k in PARAMS if k in b["best"]}
        rows.append(
            {
                "combination": b["combination"],
                **params,
                "best val mIoU": b["best"]["val_miou"],
                "test mIoU, tuned": b["tuned_test_miou"],
                "test mIoU, paper settings": b["paper_settings_test_miou"],
                "trials": b["trials"],
            }
        )
    return pd.DataFrame(rows)


def write_tuning_report(tune_dir: Path) -> Path:
    """TUNE_DIR/report.html: self-contained (plotly.js inside), works offline."""
    trials, bests = load_search(tune_dir)
    parts = [
        "<h1>Fine-tuning search</h1>",
        "<p>Configurations were chosen on validation mIoU; each chosen configuration was "
        "evaluated once on the test split.</p>",
        best_table(bests).to_html(index=False, float_format=lambda v: f"{v:.4g}"),
    ]
    first = True
    for combo in trials["combination"].unique() if not trials.empty else []:
        for fig in (
            parallel_coordinates(trials, combo),
            importance_figure(param_importance(trials, combo), combo),
        ):
            parts.append(
                fig.to_html(full_html=False, include_plotlyjs="inline" if first else False)
            )
            first = False
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>corroprune: "
        f"{html.escape(Path(tune_dir).name)}</title></head><body>"
        + "".join(parts)
        + "</body></html>"
    )
    path = Path(tune_dir) / "report.html"
    return atomic_write(path, lambda tmp: tmp.write_text(page))
