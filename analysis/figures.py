"""One function per figure: tidy DataFrame in, plotly Figure out (titles and axis titles set).

Every trace carries `meta` with the facets it belongs to (dataset, model, pruner, granularity,
sparsity), so the static report's filters and the Dash app can show and hide traces without
rebuilding figures. Element-wise and channel trials of the same pruner are distinct series.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis.collect import DENSE, ELEMENT, GRANULARITY_ORDER, column_name
from analysis.images import IGNORE_RGB, PALETTE, PALETTE_NAMES, colorize, downscale, png_data_uri
from analysis.latency import MEASURE_HINT, latency_note
from analysis.stats import by_combination
from sweep.identity import COUPLED, STRUCTURED

MODEL_ORDER = ("unet", "unetplusplus", "fpn", "linknet", "manet")
PRUNER_ORDER = ("lp", "agp", "mp", "magnitude")
COLOURS = ("#636EFA", "#EF553B", "#00CC96", "#AB63FA", "#FFA15A", "#19D3F3", "#FF6692", "#B6E880")
DASHES = {"lp": "solid", "agp": "dash", "mp": "dot", "magnitude": "dashdot"}
SYMBOLS = {"lp": "circle", "agp": "diamond", "mp": "triangle-up", "magnitude": "square"}
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


def series_name(pruner: str, granularity: str = ELEMENT) -> str:
    """`agp` for element-wise (the paper's) trials, `agp (channel)` for channel ones, `dense`."""
    if pruner == DENSE:
        return "dense"
    return pruner if granularity in (ELEMENT, DENSE) else f"{pruner} ({granularity})"


def _label(pruner: str, sparsity: float, granularity: str = ELEMENT) -> str:
    return "dense" if pruner == DENSE else f"{series_name(pruner, granularity)} s{sparsity:g}"


def with_granularity(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with a `granularity` column (tables from before channel pruning lack it)."""
    if "granularity" in frame:
        return frame
    dense = frame["pruner"] == DENSE if "pruner" in frame else False
    return frame.assign(granularity=np.where(dense, DENSE, ELEMENT))


def _series(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """(pruner, granularity) pairs of pruned rows: element first, pruners in PRUNER_ORDER."""
    pairs = set(zip(rows["pruner"], rows["granularity"], strict=True))
    return [
        (pruner, granularity)
        for granularity in ordered((g for _, g in pairs), GRANULARITY_ORDER)
        for pruner in ordered((p for p, g in pairs if g == granularity), PRUNER_ORDER)
    ]


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
    rows = with_granularity(rows)
    models = ordered(rows["model"], MODEL_ORDER)
    fig = go.Figure()
    for (model, granularity, pruner, sparsity), part in rows.groupby(
        ["model", "granularity", "pruner", "target_sparsity"], sort=True
    ):
        part = part.sort_values("global_epoch")
        updated = part.get("mask_updated", pd.Series(False, index=part.index)).fillna(False)
        updated = updated.astype(bool).to_numpy()
        fig.add_scatter(
            x=part["global_epoch"],
            y=part["val_miou"],
            mode="lines+markers",
            name=f"{model} {_label(pruner, sparsity, granularity)}",
            line={
                "color": model_colour(model, models),
                "dash": DASHES.get(pruner, "solid"),
                "width": 3 if granularity in STRUCTURED else 2,
            },
            marker={
                "symbol": np.where(updated, "diamond", "circle").tolist(),
                "size": np.where(updated, 9, 3).tolist(),
            },
            customdata=np.stack([part["stage"], updated], axis=-1),
            hovertemplate="epoch %{x} (%{customdata[0]}): mIoU %{y:.3f}"
            "<br>mask updated: %{customdata[1]}<extra>%{fullData.name}</extra>",
            meta=_meta(
                dataset,
                model=model,
                pruner=pruner,
                granularity=granularity,
                sparsity=float(sparsity),
            ),
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


def dense_reference(results: pd.DataFrame, dataset: str, column: str = "test_miou") -> pd.DataFrame:
    """Per model, the dense test score over its seeds (`mean`, interval half-width `err`, `n`):
    its dense trials, else the pruned trials' copies of it."""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    dense = rows[rows["pruner"] == DENSE].dropna(subset=[column])
    source = column
    if f"dense_{column}" in rows:  # a model whose dense trial is missing: its trials' copies
        copies = rows[~rows["model"].isin(dense["model"])].dropna(subset=[f"dense_{column}"])
        per_seed = copies.drop_duplicates(["model", "seed"]) if "seed" in copies else copies
        dense = pd.concat([dense, per_seed.assign(**{column: per_seed[f"dense_{column}"]})])
    if dense.empty:
        return pd.DataFrame(columns=["mean", "err", "n"])
    grouped = by_combination(dense, source, ["model"]).set_index("model")
    return grouped.rename(columns={source: "mean"})[["mean", "err", "n"]]


def _error_bars(err: pd.Series | list) -> dict | None:
    """Plotly error bars of the 95% intervals; None when no point has one (one seed each)."""
    err = pd.Series(err, dtype=float)
    if not err.notna().any():
        return None
    return {"type": "data", "array": err.tolist(), "visible": True, "thickness": 1}


def _sparsity_traces(
    results: pd.DataFrame, dataset: str, column: str, showlegend: bool
) -> list[go.Scatter]:
    """One line per model, pruner and granularity from the dense point at 0 to each sparsity;
    with several seeds, each point is their mean with its 95% interval as an error bar."""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    rows = with_granularity(rows)
    pruned = rows[rows["pruner"] != DENSE].dropna(subset=[column])
    models = ordered(rows["model"], MODEL_ORDER)
    reference = dense_reference(results, dataset, column)
    keys = ["model", "pruner", "granularity", "target_sparsity"]
    points = by_combination(pruned, column, keys)
    traces = []
    for model in models:
        colour = model_colour(model, models)
        if model in reference.index:
            ref = reference.loc[model]
            traces.append(
                go.Scatter(
                    x=[0.0],
                    y=[ref["mean"]],
                    error_y=_error_bars([ref["err"]]),
                    mode="markers",
                    name=f"{model} dense",
                    legendgroup=model,
                    showlegend=showlegend,
                    marker={"color": colour, "symbol": "star", "size": 12},
                    meta=_meta(dataset, model=model, reference=True),
                    customdata=[int(ref["n"])],
                    hovertemplate="dense: %{y:.3f} (n=%{customdata})<extra>%{fullData.name}</extra>",
                )
            )
        mine = points[points["model"] == model] if not points.empty else points
        for pruner, granularity in _series(mine):
            part = mine[(mine["pruner"] == pruner) & (mine["granularity"] == granularity)]
            part = part.sort_values("target_sparsity")
            x, y = part["target_sparsity"].tolist(), part[column].tolist()
            err, n = part["err"].tolist(), part["n"].astype(int).tolist()
            if model in reference.index:
                ref = reference.loc[model]
                x, y, err, n = [0.0, *x], [ref["mean"], *y], [ref["err"], *err], [int(ref["n"]), *n]
            traces.append(
                go.Scatter(
                    x=x,
                    y=y,
                    error_y=_error_bars(err),
                    mode="lines+markers",
                    name=f"{model} {series_name(pruner, granularity)}",
                    legendgroup=model,
                    showlegend=showlegend,
                    line={"color": colour, "dash": DASHES.get(pruner, "solid")},
                    marker={"symbol": _symbol(pruner, granularity)},
                    meta=_meta(dataset, model=model, pruner=pruner, granularity=granularity),
                    customdata=n,
                    hovertemplate="s%{x:g}: %{y:.3f} (n=%{customdata})<extra>%{fullData.name}</extra>",
                )
            )
    return traces


def _symbol(pruner: str, granularity: str) -> str:
    """Marker per pruner; filled for element-wise trials, open for channel ones, open with a dot
    for coupled ones, star for dense."""
    if pruner == DENSE:
        return "star"
    symbol = SYMBOLS.get(pruner, "x")
    if granularity == COUPLED:
        return f"{symbol}-open-dot"
    return f"{symbol}-open" if granularity in STRUCTURED else symbol


def sparsity_figure(results: pd.DataFrame, dataset: str) -> go.Figure:
    """Figures 7 and 8: test mIoU against target sparsity; the dense model is the 0 point."""
    fig = go.Figure(_sparsity_traces(results, dataset, "test_miou", showlegend=True))
    number = figure_number(dataset, {"sscs": "7", "nea": "8"})
    fig.update_layout(
        title=f"Test mIoU against sparsity, {dataset} ({number}; star = dense model)"
        + _seeds_note(results, dataset),
        legend_title_text="model pruner",
        showlegend=True,
    )
    fig.update_xaxes(title_text="target sparsity", range=[-0.03, 1.0])
    fig.update_yaxes(title_text="test mIoU")
    return fig


def _seeds_note(results: pd.DataFrame, dataset: str) -> str:
    """The subtitle saying what a point is when the run has several seeds."""
    if "seed" not in results:
        return ""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    seeds = rows["seed"].dropna().nunique()
    if seeds < 2:
        return ""
    return f"<br><sup>each point: the mean over up to {seeds} seeds; bars: 95% t-interval</sup>"


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
    title = f"Per-class test IoU against sparsity, {dataset}" + _seeds_note(results, dataset)
    fig.update_layout(title=title, showlegend=True)
    return fig


def default_variant(results: pd.DataFrame, dataset: str) -> tuple[str, float, str]:
    """The (pruner, sparsity, granularity) the example figure shows first: the first pruner of the
    first granularity (element before channel) at its highest sparsity."""
    rows = with_granularity(results[(results["dataset"] == dataset) & (results["pruner"] != DENSE)])
    rows = rows[rows["status"] == "finished"]
    if rows.empty:
        return DENSE, 0.0, DENSE
    pruner, granularity = _series(rows)[0]
    chosen = rows[(rows["pruner"] == pruner) & (rows["granularity"] == granularity)]
    return pruner, float(chosen["target_sparsity"].max()), granularity


def _variant(show: tuple[str, float] | tuple[str, float, str]) -> tuple[str, float, str]:
    """(pruner, sparsity[, granularity]) with the granularity filled in: element unless dense."""
    if len(show) == 3:
        return show  # type: ignore[return-value]
    return show[0], show[1], DENSE if show[0] == DENSE else ELEMENT


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


def _example_trace(
    row: Any, pred: np.ndarray, dataset: str, show: tuple[str, float, str]
) -> go.Image:
    """One trial's mask for one test image (H, W); visible when the trial is the `show` variant."""
    sparsity = float(row.target_sparsity)
    visible = row.pruner == show[0] and (
        row.pruner == DENSE or (math.isclose(sparsity, show[1]) and row.granularity == show[2])
    )
    return go.Image(
        source=_tile(colorize(pred)),
        name=f"{row.model} {_label(row.pruner, sparsity, row.granularity)}",
        visible=visible,
        meta=_meta(
            dataset,
            model=row.model,
            pruner=row.pruner,
            granularity=row.granularity,
            sparsity=sparsity,
        ),
    )


def examples_figure(
    results: pd.DataFrame,
    example: dict[str, Any] | None,
    dataset: str,
    class_names: list[str],
    show: tuple[str, float] | tuple[str, float, str] | None = None,
) -> go.Figure:
    """Figures 9 and 10: image, ground truth and each model's mask, one row per test image.

    Each model column holds one image trace per trial (dense and every pruner, granularity and
    sparsity); only the `show` variant (pruner, sparsity[, granularity]) is visible, the filters
    switch between them.
    """
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    preds = (example or {}).get("pred", {})
    rows = with_granularity(rows[rows["trial"].isin(preds)])
    models = ordered(rows["model"], MODEL_ORDER)
    show = _variant(show or default_variant(results, dataset))
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
                fig.add_trace(_example_trace(row, preds[row.trial][r], dataset, show), r + 1, c)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(
        title=f"Example test predictions, {dataset} ({number}): {_label(*show)}",
        height=140 + 170 * n,
        margin={"l": 10, "r": 10, "t": 90, "b": 50},
        meta={
            "kind": "examples",
            "dataset": dataset,
            "pruner": show[0],
            "sparsity": show[1],
            "granularity": show[2],
        },
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


def pareto_front(cost: Any, score: Any) -> np.ndarray:
    """Which points are on the Pareto front of (low cost, high score), as a boolean mask.

    A point is on it unless another point has lower-or-equal cost and higher-or-equal score, one
    of them strictly; equal points are both on it. Points with a NaN cost or score are never on
    it and dominate nothing.
    """
    cost, score = np.asarray(cost, dtype=float), np.asarray(score, dtype=float)  # (N,), (N,)
    valid = ~(np.isnan(cost) | np.isnan(score))
    no_worse = (cost[None, :] <= cost[:, None]) & (score[None, :] >= score[:, None])  # (N, N)
    better = (cost[None, :] < cost[:, None]) | (score[None, :] > score[:, None])  # [i, j]: j vs i
    dominated = (no_worse & better & valid[None, :]).any(axis=1)
    return valid & ~dominated


@dataclass(frozen=True)
class Cost:
    """The x axis of a Pareto figure: a results column and how to name it."""

    column: str
    axis_title: str
    what: str  # for the title: "latency", "size"
    hover: str  # plotly format of the value in the hover text
    missing: str  # the annotation when no trial of the dataset has the column
    front_by: str | None = None  # a column that splits the points into separate fronts


LATENCY = Cost(
    column="latency_ms",
    axis_title="median batch-1 latency (ms)",
    what="latency",
    hover="%{x:.1f} ms",
    missing="no latency measured yet: no finished trial's final.json has inference.latency_ms "
    f"(a run from before the inference benchmark, or latency not measured); {MEASURE_HINT}",
    front_by="latency_device",
)
SIZE = Cost(
    column="compact_mib",
    axis_title="compact export file size, fp32 (MiB)",
    what="model size",
    hover="%{x:.2f} MiB",
    missing="no model sizes yet: no finished trial's final.json has inference.compact_mib "
    "(a run from before the compact export was measured)",
)


def _front_trace(points: pd.DataFrame, cost: Cost, dataset: str, name: str) -> go.Scatter:
    """The Pareto front as a step line: the best test mIoU reachable for at most that cost."""
    front = points[pareto_front(points[cost.column], points["test_miou"])]
    front = front.sort_values([cost.column, "test_miou"])
    return go.Scatter(
        x=front[cost.column],
        y=front["test_miou"],
        mode="lines",
        line={"shape": "hv", "color": "black", "width": 1.5},
        name=name,
        hoverinfo="skip",
        meta=_meta(dataset, front=True),
    )


def _pareto_points(points: pd.DataFrame, cost: Cost, dataset: str) -> list[go.Scatter]:
    """One marker trace per model, pruner and granularity: colour by model, symbol by pruner."""
    models = ordered(points["model"], MODEL_ORDER)
    traces = []
    for model in models:
        rows = points[points["model"] == model]
        series = [(DENSE, DENSE)] + _series(rows[rows["pruner"] != DENSE])
        for pruner, granularity in series:
            part = rows[(rows["pruner"] == pruner) & (rows["granularity"] == granularity)]
            if part.empty:
                continue
            facets = {"reference": True} if pruner == DENSE else {"pruner": pruner}
            n = part["n"] if "n" in part else pd.Series(1, index=part.index)
            traces.append(
                go.Scatter(
                    x=part[cost.column],
                    y=part["test_miou"],
                    error_y=_error_bars(part["err"]) if "err" in part else None,
                    mode="markers",
                    name=f"{model} {series_name(pruner, granularity)}",
                    legendgroup=model,
                    marker={
                        "color": model_colour(model, models),
                        "symbol": _symbol(pruner, granularity),
                        "size": 12 if pruner == DENSE else 9,
                        "line": {"width": 1.5, "color": model_colour(model, models)},
                    },
                    text=part["trial"],
                    customdata=n.astype(int),
                    hovertemplate=(
                        f"%{{text}}<br>{cost.hover}, test mIoU %{{y:.3f}} (n=%{{customdata}})"
                        "<extra></extra>"
                    ),
                    meta=_meta(dataset, model=model, granularity=granularity, **facets),
                )
            )
    return traces


def pareto_figure(results: pd.DataFrame, dataset: str, cost: Cost) -> go.Figure:
    """Test mIoU against a deployment cost, one point per finished trial, with the Pareto front."""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    rows = with_granularity(rows)
    has = rows[cost.column].notna() if cost.column in rows else pd.Series(False, index=rows.index)
    trials = rows[has & rows["test_miou"].notna()]
    keys = ["model", "pruner", "granularity", "target_sparsity"]
    if cost.front_by and cost.front_by in trials:
        trials = trials.assign(**{cost.front_by: trials[cost.front_by].fillna("unknown")})
        keys.append(cost.front_by)
    points = by_combination(trials, "test_miou", keys) if not trials.empty else trials
    structured = set(trials["granularity"]) & set(STRUCTURED)
    legend = (
        "; open markers = channel pruning, with a dot: coupled"
        if COUPLED in structured
        else "; open markers = channel pruning"
        if structured
        else ""
    )
    title = f"Test mIoU against {cost.what}, {dataset} (line: Pareto front{legend})"
    title += _seeds_note(results, dataset)
    fig = go.Figure(_pareto_points(points, cost, dataset))
    groups = (
        points.groupby(points[cost.front_by].fillna("unknown"), sort=True)
        if cost.front_by and cost.front_by in points
        else [(None, points)]
    )
    for key, part in groups:
        name = "Pareto front" if len(groups) == 1 else f"Pareto front ({key})"
        if not part.empty:
            fig.add_trace(_front_trace(part, cost, dataset, name))
    if points.empty:
        fig.add_annotation(
            text=cost.missing, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5
        )
    elif len(trials) < len(rows):
        left_out = len(rows) - len(trials)
        plural = "trial has" if left_out == 1 else "trials have"
        title += f"<br><sup>{left_out} finished {plural} no {cost.what}: not shown</sup>"
    fig.update_layout(title=title, legend_title_text="model pruner", showlegend=True)
    fig.update_xaxes(title_text=cost.axis_title, rangemode="tozero")
    fig.update_yaxes(title_text="test mIoU")
    return fig


def latency_pareto_figure(results: pd.DataFrame, dataset: str) -> go.Figure:
    """Test mIoU against median batch-1 latency; one front per latency device when they differ,
    and a subtitle saying where the latency was measured (alone, or in-trial beside other trials)."""
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    devices = []
    if {"latency_ms", "latency_device"} <= set(rows.columns):
        measured = rows.loc[rows["latency_ms"].notna(), "latency_device"]
        devices = sorted(measured.dropna().unique())
    cost = LATENCY
    if devices:
        where = ", ".join(devices) + ("" if len(devices) == 1 else ": one front per device")
        cost = replace(LATENCY, axis_title=f"median batch-1 latency (ms, {where})")
    fig = pareto_figure(results, dataset, cost)
    note = latency_note(rows)
    if note:
        fig.update_layout(title=f"{fig.layout.title.text}<br><sup>{note}</sup>")
    return fig


def size_pareto_figure(results: pd.DataFrame, dataset: str) -> go.Figure:
    """Test mIoU against the compact export's file size (fp32 values: what the IoU was measured on)."""
    return pareto_figure(results, dataset, SIZE)


INT8_POINTS = ("onnx_latency_ms", "test_miou", "int8_latency_ms", "int8_test_miou")


def int8_rows(results: pd.DataFrame, dataset: str) -> pd.DataFrame:
    """Finished trials of `dataset` with both an fp32 and an INT8 point (the sweep's
    `deploy_int8`, latency timed); empty for a run without them."""
    if not set(INT8_POINTS) <= set(results.columns):
        return results.iloc[:0]
    rows = results[(results["dataset"] == dataset) & (results["status"] == "finished")]
    return with_granularity(rows.dropna(subset=list(INT8_POINTS)))


def int8_figure(results: pd.DataFrame, dataset: str) -> go.Figure:
    """Test mIoU against batch-1 latency in ONNX Runtime, fp32 (the series' marker, as in the
    Pareto plots) and static INT8 (a cross), a line joining each trial's two; colour by model,
    line dash by pruner, one trace per series."""
    rows = int8_rows(results, dataset)
    models = ordered(rows["model"], MODEL_ORDER)
    fig = go.Figure()
    for model in models:
        mine = rows[rows["model"] == model]
        for pruner, granularity in [(DENSE, DENSE), *_series(mine[mine["pruner"] != DENSE])]:
            part = mine[(mine["pruner"] == pruner) & (mine["granularity"] == granularity)]
            if part.empty:
                continue
            x, y, text = [], [], []
            for row in part.sort_values(["target_sparsity", "trial"]).itertuples():
                x += [row.onnx_latency_ms, row.int8_latency_ms, None]
                y += [row.test_miou, row.int8_test_miou, None]
                text += [f"{row.trial} fp32", f"{row.trial} INT8", ""]
            fp32 = _symbol(pruner, granularity)
            facets = {"reference": True} if pruner == DENSE else {"pruner": pruner}
            colour = model_colour(model, models)
            fig.add_trace(
                go.Scatter(
                    x=x,
                    y=y,
                    mode="lines+markers",
                    name=f"{model} {series_name(pruner, granularity)}",
                    legendgroup=model,
                    line={"color": colour, "width": 1, "dash": DASHES.get(pruner, "solid")},
                    marker={"color": colour, "symbol": [fp32, "x", fp32] * len(part), "size": 9},
                    text=text,
                    hovertemplate="%{text}<br>%{x:.1f} ms, test mIoU %{y:.3f}<extra></extra>",
                    meta=_meta(dataset, model=model, granularity=granularity, **facets),
                )
            )
    fig.update_layout(
        title=f"Test mIoU against latency, fp32 and INT8, {dataset} (fp32: the series' marker, "
        "INT8: a cross, joined by a line; both in ONNX Runtime)<br><sup>timed in-trial, one "
        "after the other with the trial's threads: compare a trial's two points; other trials "
        "may have run beside it</sup>",
        showlegend=True,
    )
    fig.update_xaxes(title_text="median batch-1 latency, ONNX Runtime CPU (ms)", rangemode="tozero")
    fig.update_yaxes(title_text="test mIoU")
    return fig
