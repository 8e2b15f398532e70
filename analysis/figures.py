"""One function per figure: tidy DataFrame in, plotly Figure out (titles and axis titles set).

Every trace carries `meta` with the facets it belongs to (dataset, model, pruner, sparsity), so the
static report's filters and the Dash app can show and hide traces without rebuilding figures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.collect import DENSE, column_name
from analysis.images import IGNORE_RGB, PALETTE, PALETTE_NAMES, colorize, downscale, png_data_uri

MODEL_ORDER = ("unet", "unetplusplus", "fpn", "linknet", "manet")
PRUNER_ORDER = ("lp", "agp", "mp", "magnitude")
COLOURS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880")
DASHES = {"lp": "solid", "agp": "dash", "mp": "dot", "magnitude": "dashdot"}
EMA_ALPHA = 0.1
MAX_EXAMPLES = 3
EXAMPLE_SIDE = 192  # pixels per example tile in the embedded PNGs


def ordered(values: Any, order: tuple[str, ...]) -> list[str]:
    """Distinct values, known names in the given order first, then the rest sorted."""
    present = {v for v in values if isinstance(v, str)}
    return [v for v in order if v in present] + sorted(present - set(order))


def model_colour(model: str, models: list[str]) -> str:
    rank = (
        MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER) + models.index(model)
    )
    return COLOURS[rank % len(COLOURS)]


def figure_number(dataset: str, paper: dict[str, str]) -> str:
    """The paper's figure number for this dataset (`paper` maps sscs/nea to it), or a generic one."""
    if dataset in paper:
        return f"Figure {paper[dataset]}"
    return "as Figures " + "/".join(dict.fromkeys(paper.values()))


def ema(values: pd.Series, alpha: float = EMA_ALPHA) -> pd.Series:
    """Exponential moving average s_t = alpha * x_t + (1 - alpha) * s_{t-1}, s_1 = x_1."""
    return values.ewm(alpha=alpha, adjust=False).mean()


def _meta(dataset: str, **facets: Any) -> dict[str, Any]:
    return {"dataset": dataset, **{k: v for k, v in facets.items() if v is not None}}


def _label(pruner: str, sparsity: float) -> str:
    return "dense" if pruner == DENSE else f"{pruner} s{sparsity:g}"


def label_distribution_figure(dist: pd.DataFrame, dataset: str, source: str) -> go.Figure:
    """Figure 4: share of pixels per class, one bar group per split."""
    table = dist[dist["dataset"] == dataset]
    if table.empty:  # a label_distribution.csv without a dataset column, in a multi-dataset run
        table = dist[dist["dataset"] == "all"]
    fig = go.Figure()
    for split, rows in table.groupby("split", sort=False):
        rows = rows.sort_values("class_id")
        fig.add_bar(
            x=rows["class_name"],
            y=rows["percent"],
            name=str(split),
            text=[f"{p:.1f}%" for p in rows["percent"]],
            customdata=rows["pixels"],
            hovertemplate="%{x}: %{y:.2f}% (%{customdata:,} pixels)<extra>%{fullData.name}</extra>",
            meta=_meta(dataset),
        )
    title = f"Label distribution, {dataset} (Figure 4)"
    if source == "examples":
        title += "<br><sup>no label_distribution.csv in the run: counted from the saved test examples' ground truth only</sup>"
    fig.update_layout(title=title, barmode="group", legend_title_text="split")
    fig.update_xaxes(title_text="class")
    fig.update_yaxes(title_text="share of labelled pixels (%)")
    return fig


def training_figure(curves: pd.DataFrame, dataset: str, alpha: float = EMA_ALPHA) -> go.Figure:
    """Figure 5: validation mIoU through the first (dense) training stage, raw and EMA-smoothed."""
    rows = curves[(curves["dataset"] == dataset) & (curves["stage"] == "train")]
    models = ordered(rows["model"], MODEL_ORDER)
    fig = go.Figure()
    for model in models:
        part = rows[rows["model"] == model].sort_values("global_epoch")
        colour = model_colour(model, models)
        meta = _meta(dataset, model=model)
        fig.add_scatter(
            x=part["global_epoch"],
            y=part["val_miou"],
            mode="lines",
            name=f"{model} raw",
            legendgroup=model,
            line={"color": colour, "width": 1},
            opacity=0.35,
            meta=meta,
        )
        fig.add_scatter(
            x=part["global_epoch"],
            y=ema(part["val_miou"], alpha),
            mode="lines",
            name=f"{model} EMA",
            legendgroup=model,
            line={"color": colour, "width": 2.5},
            meta=meta,
        )
    fig.update_layout(
        title=f"Validation mIoU while training the dense models, {dataset} "
        f"(Figure 5; EMA alpha = {alpha:g})",
        showlegend=True,
    )
    fig.update_xaxes(title_text="training epoch")
    fig.update_yaxes(title_text="validation mIoU", rangemode="tozero")
    return fig


def pruning_figure(curves: pd.DataFrame, dataset: str) -> go.Figure:
    """Figure 6: validation mIoU through pruning and fine-tuning; boundary and mask updates marked."""
    rows = curves[(curves["dataset"] == dataset) & curves["stage"].isin(["prune", "finetune"])]
    models = ordered(rows["model"], MODEL_ORDER)
    fig = go.Figure()
    for (model, pruner, sparsity), part in rows.groupby(
        ["model", "pruner", "target_sparsity"], sort=True
    ):
        part = part.sort_values("global_epoch")
        updated = part.get("mask_updated", pd.Series(False, index=part.index)).fillna(False)
        updated = updated.astype(bool).to_numpy()
        fig.add_scatter(
            x=part["global_epoch"],
            y=part["val_miou"],
            mode="lines+markers",
            name=f"{model} {_label(pruner, sparsity)}",
            line={"color": model_colour(model, models), "dash": DASHES.get(pruner, "solid")},
            marker={
                "symbol": np.where(updated, "diamond", "circle").tolist(),
                "size": np.where(updated, 9, 3).tolist(),
            },
            customdata=np.stack([part["stage"], updated], axis=-1),
            hovertemplate="epoch %{x} (%{customdata[0]}): mIoU %{y:.3f}"
            "<br>mask updated: %{customdata[1]}<extra>%{fullData.name}</extra>",
            meta=_meta(dataset, model=model, pruner=pruner, sparsity=float(sparsity)),
        )
    prune_end = rows.loc[rows["stage"] == "prune", "global_epoch"].max()
    if not pd.isna(prune_end):
        fig.add_vline(
            x=float(prune_end) + 0.5,
            line={"dash": "dash", "color": "grey"},
            annotation_text="pruning | fine-tuning",
            annotation_position="top",
        )
    fig.update_layout(
        title=f"Validation mIoU through pruning and fine-tuning, {dataset} "
        "(Figure 6; diamonds = pruning steps, dashed line = stage boundary)",
        showlegend=True,  # also when the filters leave a single trace
    )
    fig.update_xaxes(title_text="epoch since pruning started")
    fig.update_yaxes(title_text="validation mIoU", rangemode="tozero")
    return fig


def dense_reference(results: pd.DataFrame, dataset: str, column: str = "test_miou") -> pd.Series:
    """Per model, the dense test score: its dense trial, else the pruned trials' copy of it."""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    dense = rows[rows["pruner"] == DENSE].groupby("model")[column].first()
    if f"dense_{column}" not in rows:
        return dense.dropna()
    fallback = rows.groupby("model")[f"dense_{column}"].median()
    return dense.combine_first(fallback).dropna()


def _sparsity_traces(
    results: pd.DataFrame, dataset: str, column: str, showlegend: bool
) -> list[go.Scatter]:
    """One line per model and pruner from the dense point at 0 to each target sparsity."""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    pruned = rows[rows["pruner"] != DENSE]
    models = ordered(rows["model"], MODEL_ORDER)
    reference = dense_reference(results, dataset, column)
    traces = []
    for model in models:
        colour = model_colour(model, models)
        if model in reference:
            traces.append(
                go.Scatter(
                    x=[0.0],
                    y=[reference[model]],
                    mode="markers",
                    name=f"{model} dense",
                    legendgroup=model,
                    showlegend=showlegend,
                    marker={"color": colour, "symbol": "star", "size": 12},
                    meta=_meta(dataset, model=model, reference=True),
                )
            )
        for pruner in ordered(pruned.loc[pruned["model"] == model, "pruner"], PRUNER_ORDER):
            part = pruned[(pruned["model"] == model) & (pruned["pruner"] == pruner)]
            part = part.sort_values("target_sparsity")
            x, y = part["target_sparsity"].tolist(), part[column].tolist()
            if model in reference:
                x, y = [0.0, *x], [reference[model], *y]
            traces.append(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=f"{model} {pruner}",
                    legendgroup=model,
                    showlegend=showlegend,
                    line={"color": colour, "dash": DASHES.get(pruner, "solid")},
                    meta=_meta(dataset, model=model, pruner=pruner),
                )
            )
    return traces


def sparsity_figure(results: pd.DataFrame, dataset: str) -> go.Figure:
    """Figures 7 and 8: test mIoU against target sparsity; the dense model is the 0 point."""
    fig = go.Figure(_sparsity_traces(results, dataset, "test_miou", showlegend=True))
    number = figure_number(dataset, {"sscs": "7", "nea": "8"})
    fig.update_layout(
        title=f"Test mIoU against sparsity, {dataset} ({number}; star = dense model)",
        legend_title_text="model pruner",
        showlegend=True,
    )
    fig.update_xaxes(title_text="target sparsity", range=[-0.03, 1.0])
    fig.update_yaxes(title_text="test mIoU")
    return fig


def per_class_figure(results: pd.DataFrame, dataset: str, class_names: list[str]) -> go.Figure:
    """Per-class test IoU against sparsity: one panel per class, lines as in Figures 7 and 8."""
    names = class_names or ["class0"]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, shared_yaxes=True)
    for col, name in enumerate(names, start=1):
        column = f"iou_{column_name(name)}"
        if column not in results:
            continue
        for trace in _sparsity_traces(results, dataset, column, showlegend=col == 1):
            fig.add_trace(trace, row=1, col=col)
        fig.update_xaxes(title_text="target sparsity", range=[-0.05, 1.0], row=1, col=col)
    fig.update_yaxes(title_text="test IoU", row=1, col=1)
    fig.update_layout(title=f"Per-class test IoU against sparsity, {dataset}", showlegend=True)
    return fig


def default_variant(results: pd.DataFrame, dataset: str) -> tuple[str, float]:
    """The (pruner, sparsity) the example figure shows first: first pruner at the highest sparsity."""
    rows = results[(results["dataset"] == dataset) & (results["pruner"] != DENSE)]
    rows = rows[rows["status"] == "finished"]
    if rows.empty:
        return DENSE, 0.0
    pruner = ordered(rows["pruner"], PRUNER_ORDER)[0]
    return pruner, float(rows.loc[rows["pruner"] == pruner, "target_sparsity"].max())


def colour_legend(class_names: list[str]) -> str:
    parts = []
    for i, name in enumerate(class_names):
        rgb = PALETTE[i] if i < len(PALETTE) else (255, 0, 255)
        swatch = "#{:02x}{:02x}{:02x}".format(*rgb) if i else "#555555"
        colour = PALETTE_NAMES[i] if i < len(PALETTE_NAMES) else "magenta"
        parts.append(f"<span style='color:{swatch}'>■</span> {name} {colour}")
    grey = "#{:02x}{:02x}{:02x}".format(*IGNORE_RGB)
    return "   ".join([*parts, f"<span style='color:{grey}'>■</span> ignore grey"])


def _tile(array: np.ndarray) -> str:
    return png_data_uri(downscale(array, EXAMPLE_SIDE))


def examples_figure(
    results: pd.DataFrame,
    example: dict[str, Any] | None,
    dataset: str,
    class_names: list[str],
    show: tuple[str, float] | None = None,
) -> go.Figure:
    """Figures 9 and 10: image, ground truth and each model's mask, one row per test image.

    Each model column holds one image trace per trial (dense and every pruner and sparsity);
    only the `show` variant (pruner, sparsity) is visible, the filters switch between them.
    """
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    preds = (example or {}).get("pred", {})
    rows = rows[rows["trial"].isin(preds)]
    models = ordered(rows["model"], MODEL_ORDER)
    show = show or default_variant(results, dataset)
    n = min(MAX_EXAMPLES, len(example["gt"])) if example else 0
    number = figure_number(dataset, {"sscs": "9", "nea": "10"})
    if n == 0:
        fig = go.Figure()
        fig.update_layout(title=f"Example predictions, {dataset} ({number}): none saved yet")
        return fig
    titles = ["image", "ground truth", *models]
    fig = make_subplots(
        rows=n,
        cols=len(titles),
        subplot_titles=[t if r == 0 else "" for r in range(n) for t in titles],
        horizontal_spacing=0.01,
        vertical_spacing=0.03,
    )
    for r in range(n):
        fig.add_trace(go.Image(source=_tile(example["image"][r]), name="image"), r + 1, 1)
        fig.add_trace(go.Image(source=_tile(colorize(example["gt"][r])), name="truth"), r + 1, 2)
        for c, model in enumerate(models, start=3):
            for row in rows[rows["model"] == model].itertuples():
                sparsity = float(row.target_sparsity)
                visible = row.pruner == show[0] and (
                    row.pruner == DENSE or math.isclose(sparsity, show[1])
                )
                fig.add_trace(
                    go.Image(
                        source=_tile(colorize(preds[row.trial][r])),
                        name=f"{model} {_label(row.pruner, sparsity)}",
                        visible=visible,
                        meta=_meta(dataset, model=model, pruner=row.pruner, sparsity=sparsity),
                    ),
                    r + 1,
                    c,
                )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(
        title=f"Example test predictions, {dataset} ({number}): {_label(*show)}",
        height=140 + 170 * n,
        margin={"l": 10, "r": 10, "t": 90, "b": 50},
        meta={"kind": "examples", "dataset": dataset, "pruner": show[0], "sparsity": show[1]},
    )
    fig.add_annotation(
        text=colour_legend(class_names),
        showarrow=False,
        xref="paper",
        yref="paper",
        x=0,
        y=-0.02,
        xanchor="left",
        yanchor="top",
    )
    return fig
