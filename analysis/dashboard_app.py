"""`corroprune dashboard`: a live Dash app over the report's tables, re-reading the run dir as it grows."""

from __future__ import annotations

import math
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
from dash import Dash, Input, Output, State, dcc, html
from dash.exceptions import PreventUpdate

from analysis.claims import check_claims
from analysis.collect import (
    DENSE,
    GRANULARITY_ORDER,
    Run,
    column_name,
    examples,
    label_distribution,
    load_run,
    missing_notes,
)
from analysis.figures import MODEL_ORDER, PRUNER_ORDER, ordered, with_granularity
from analysis.report import (
    FIGURE_SECTIONS,
    STYLE,
    cell_text,
    dataset_figures,
    status_counts,
    table_columns,
)

INDEX = """<!DOCTYPE html>
<html><head>{%metas%}<title>{%title%}</title>{%favicon%}{%css%}<style>/*STYLE*/
.facet { display: inline-flex; gap: .4rem; margin-right: 1.5rem; }
.facet label { margin-right: .6rem; }
</style></head>
<body>{%app_entry%}<footer>{%config%}{%scripts%}{%renderer%}</footer></body></html>
"""
FACETS = ("model", "pruner", "granularity", "sparsity", "seed")  # checklists; dataset: a radio
_WATCHED = ("metrics.jsonl", "final.json", "error.txt", "examples.npz", "config.yaml")


def run_signature(run_dir: Path) -> tuple:
    """Names, sizes and mtimes of every file the tables are read from: changes when the run does."""
    files = [run_dir / "sweep_status.json", run_dir / "label_distribution.csv"]
    trials = run_dir / "trials"
    if trials.is_dir():
        files += [d / name for d in trials.iterdir() for name in _WATCHED]
    stats = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        stats.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(sorted(stats))


class RunCache:
    """The latest Run, examples and label distribution, reloaded only when the files change."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._lock = threading.Lock()
        self._signature: tuple | None = None
        self._value: tuple[Run, dict, tuple] | None = None
        self.version = 0  # bumped on every reload
        self.loaded_at = pd.Timestamp.now()

    def get(self) -> tuple[Run, dict[str, Any], tuple[pd.DataFrame, str]]:
        signature = run_signature(self.run_dir)
        with self._lock:
            if self._value is None or signature != self._signature:
                run = load_run(self.run_dir)
                self._value = (run, examples(run), label_distribution(run))
                self._signature = signature
                self.version += 1
                self.loaded_at = pd.Timestamp.now()
            return self._value


def filter_run(
    run: Run,
    models: list[str],
    pruners: list[str],
    sparsities: list[float],
    granularities: list[str] | None = None,
    seeds: list[int] | None = None,
) -> Run:
    """Keep the chosen models, pruners, sparsities, granularities and seeds (None: all); dense
    trials of the chosen models and seeds stay as the reference."""

    def keep(frame: pd.DataFrame) -> pd.DataFrame:
        if frame.empty:
            return frame
        frame = with_granularity(frame)
        dense = frame["pruner"] == DENSE
        chosen = frame["pruner"].isin(pruners) & frame["target_sparsity"].apply(
            lambda s: any(math.isclose(s, t) for t in sparsities)
        )
        if granularities is not None:
            chosen &= frame["granularity"].isin(granularities)
        kept = frame["model"].isin(models) & (dense | chosen)
        if seeds is not None and "seed" in frame:
            kept &= frame["seed"].isin(seeds)
        return frame[kept]

    return replace(run, results=keep(run.results), curves=keep(run.curves))


def facet_options(run: Run) -> dict[str, list]:
    results = run.results
    pruned = with_granularity(results[results["pruner"] != DENSE])
    return {
        "dataset": ordered(results["dataset"].dropna(), ("sscs", "nea")),
        "model": ordered(results["model"].dropna(), MODEL_ORDER),
        "pruner": ordered(pruned["pruner"].dropna(), PRUNER_ORDER),
        "granularity": ordered(pruned["granularity"].dropna(), GRANULARITY_ORDER),
        "sparsity": sorted(float(s) for s in pruned["target_sparsity"].dropna().unique()),
        "seed": sorted(int(s) for s in results["seed"].dropna().unique()),
    }


def _claims_table(run: Run, dataset: str) -> html.Table:
    claims = [c for c in check_claims(run.results, run.curves) if c.dataset == dataset]
    titles = ("claim", "dataset", "verdict", "seeds", "numbers that decided it")
    head = html.Tr([html.Th(t) for t in titles])
    rows = [
        html.Tr(
            [
                html.Td(c.claim),
                html.Td(c.dataset),
                html.Td(html.B(c.verdict)),
                html.Td(c.n or ""),
                html.Td(c.evidence),
            ],
            className=f"verdict-{c.verdict.replace(' ', '-')}",
        )
        for c in claims
    ]
    return html.Table([head, *rows], id="claims-table")


def _trials_table(run: Run, dataset: str) -> html.Table:
    """The report's trials table (size, latency and INT8 columns included) for the shown trials."""
    names = run.class_names.get(dataset, [])
    shown = run.results[run.results["dataset"] == dataset]
    columns = [*table_columns(shown), *((f"iou_{column_name(n)}", f"IoU {n}") for n in names)]
    rows = shown.to_dict("records")
    return html.Table(
        [
            html.Tr([html.Th(label) for _, label in columns]),
            *(
                html.Tr(
                    [html.Td(cell_text(row.get(c), c)) for c, _ in columns],
                    className=f"status-{row['status']}",
                )
                for row in rows
            ),
        ],
        id="trials-table",
        className="results",
    )


def _show(
    pruners: list[str], sparsities: list[float], granularities: list[str] | None = None
) -> tuple[str, float] | tuple[str, float, str] | None:
    """The example variant to show: the one pruner, sparsity (and granularity) chosen, else the
    default."""
    if len(pruners) == 1 and len(sparsities) == 1:
        if granularities is not None and len(granularities) == 1:
            return pruners[0], float(sparsities[0]), granularities[0]
        return pruners[0], float(sparsities[0])
    return None


def view(
    cache: RunCache,
    dataset: str | None,
    models: list[str] | None,
    pruners: list[str] | None,
    sparsities: list[float] | None,
    granularities: list[str] | None = None,
    seeds: list[int] | None = None,
) -> dict[str, Any]:
    """Everything the page shows for the current filters: figures, trials, counts, missing notes,
    claims. `granularities` None shows every granularity."""
    run, example, dist = cache.get()
    notes = missing_notes(run)
    out: dict[str, Any] = {
        "status": f"{status_counts(run.results)} (last change read {cache.loaded_at:%H:%M:%S})",
        "missing": [html.Li(n) for n in notes] or [html.Li("nothing missing")],
        "claims": _claims_table(run, dataset) if dataset else html.P("no trials yet"),
    }
    shown = filter_run(run, models or [], pruners or [], sparsities or [], granularities, seeds)
    out["trials"] = _trials_table(shown, dataset) if dataset else html.P("no trials yet")
    variant = _show(pruners or [], sparsities or [], granularities)
    figures = (
        dataset_figures(shown, dataset, dist, example.get(dataset), variant) if dataset else {}
    )
    for key, _ in FIGURE_SECTIONS:
        fig = figures.get(key)
        if fig is None:
            out[key] = {"data": [], "layout": {"title": {"text": "no data yet"}}}
            continue
        fig.update_layout(uirevision=f"{dataset}-{key}")  # keep zoom and legend clicks on refresh
        out[key] = fig
    return out


def _checklist(facet: str) -> html.Div:
    return html.Div(
        [html.B(f"{facet} "), dcc.Checklist(id=f"filter-{facet}", inline=True)],
        className="facet",
    )


def layout(run_dir: Path, refresh_s: float) -> html.Div:
    graphs = []
    for key, heading in FIGURE_SECTIONS:
        graphs += [html.H3(heading), dcc.Graph(id=f"fig-{key}", config={"displaylogo": False})]
    return html.Div(
        [
            html.H1("corroprune live dashboard"),
            html.P([f"Run {Path(run_dir).resolve()}: ", html.Span(id="status")]),
            html.Details(
                [html.Summary("What is missing"), html.Ul(id="missing")],
                open=True,
                className="missing",
            ),
            html.Nav(
                [
                    html.Div(
                        [html.B("dataset "), dcc.RadioItems(id="filter-dataset", inline=True)],
                        className="facet",
                    ),
                    *(_checklist(f) for f in FACETS),
                ],
                id="filters",
            ),
            html.H2("The paper's claims against this run"),
            html.Div(id="claims"),
            *graphs,
            html.H3("Trials"),
            html.Div(id="trials"),
            dcc.Interval(id="tick", interval=int(refresh_s * 1000)),
            dcc.Store(id="run-version"),
        ]
    )


def updated_filters(
    options: dict[str, list], dataset: str | None, old_options: list, old_values: list
) -> tuple[str | None, list, list]:
    """The dataset choice, and each facet's options and ticked values after the run changed.

    A value that newly appears starts ticked; one the user unticked stays unticked.
    """
    datasets = options["dataset"]
    dataset = dataset if dataset in datasets else (datasets[0] if datasets else None)
    new_options, values = [], []
    for facet, old, ticked in zip(FACETS, old_options, old_values, strict=True):
        known = {o["value"] for o in old or []}
        current = options[facet]
        label = (lambda v: f"{v:g}") if facet == "sparsity" else str
        new_options.append([{"label": label(v), "value": v} for v in current])
        values.append([v for v in current if v not in known or v in (ticked or [])])
    return dataset, new_options, values


def _register_filters(app: Dash, cache: RunCache) -> None:
    @app.callback(
        Output("filter-dataset", "options"),
        Output("filter-dataset", "value"),
        *(Output(f"filter-{f}", "options") for f in FACETS),
        *(Output(f"filter-{f}", "value") for f in FACETS),
        Input("run-version", "data"),
        State("filter-dataset", "value"),
        *(State(f"filter-{f}", "options") for f in FACETS),
        *(State(f"filter-{f}", "value") for f in FACETS),
    )
    def refresh_filters(_version, dataset, *state):
        options = facet_options(cache.get()[0])
        old_options, old_values = list(state[: len(FACETS)]), list(state[len(FACETS) :])
        new = updated_filters(options, dataset, old_options, old_values)
        old = (dataset, old_options, old_values)
        if new == old:
            raise PreventUpdate  # setting equal values would still re-render every figure
        datasets = [{"label": d, "value": d} for d in options["dataset"]]
        return datasets, new[0], *new[1], *new[2]


def _register_poll(app: Dash, cache: RunCache) -> None:
    """The only callback on the timer, and a cheap one: it moves `run-version` when RUN_DIR
    changed. Rendering on every tick instead never finishes once a render takes longer than the
    tick (Dash drops a response that a newer request for the same outputs overtook)."""

    @app.callback(
        Output("run-version", "data"),
        Input("tick", "n_intervals"),
        State("run-version", "data"),
    )
    def poll(_tick, seen):
        cache.get()
        if cache.version == seen:
            raise PreventUpdate
        return cache.version


def _register_view(app: Dash, cache: RunCache) -> None:
    @app.callback(
        Output("status", "children"),
        Output("missing", "children"),
        Output("claims", "children"),
        Output("trials", "children"),
        *(Output(f"fig-{key}", "figure") for key, _ in FIGURE_SECTIONS),
        Input("run-version", "data"),
        Input("filter-dataset", "value"),
        *(Input(f"filter-{f}", "value") for f in FACETS),
    )
    def refresh_view(_version, dataset, models, pruners, granularities, sparsities, seeds):
        out = view(cache, dataset, models, pruners, sparsities, granularities or [], seeds or [])
        figures = (out[key] for key, _ in FIGURE_SECTIONS)
        return out["status"], out["missing"], out["claims"], out["trials"], *figures


def create_app(run_dir: Path, refresh_s: float = 10.0) -> Dash:
    """The Dash app; every `refresh_s` seconds it re-reads RUN_DIR if any trial file changed."""
    cache = RunCache(Path(run_dir))
    app = Dash(__name__, title="corroprune dashboard", serve_locally=True)
    app.layout = layout(run_dir, refresh_s)
    app.index_string = INDEX.replace("/*STYLE*/", STYLE)
    _register_poll(app, cache)
    _register_filters(app, cache)
    _register_view(app, cache)
    return app


def serve(
    run_dir: Path, host: str = "127.0.0.1", port: int = 8050, refresh_s: float = 10.0
) -> None:
    create_app(run_dir, refresh_s).run(host=host, port=port, debug=False)
