"""`corroprune report`: tables (parquet + CSV) and one self-contained offline HTML dashboard."""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from analysis.claims import Claim, check_claims
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
from analysis.figures import (
    MODEL_ORDER,
    PRUNER_ORDER,
    examples_figure,
    int8_figure,
    int8_rows,
    label_distribution_figure,
    latency_pareto_figure,
    ordered,
    per_class_figure,
    pruning_figure,
    size_pareto_figure,
    sparsity_figure,
    training_figure,
    with_granularity,
)
from analysis.stats import summarize

FIGURE_SECTIONS = (
    ("labels", "Label distribution"),
    ("training", "Dense training"),
    ("pruning", "Pruning and fine-tuning"),
    ("sparsity", "Test mIoU against sparsity"),
    ("pareto_latency", "Test mIoU against latency"),
    ("pareto_size", "Test mIoU against model size"),
    ("per_class", "Per-class IoU"),
    ("examples", "Example predictions"),
)
# Only in the report (the live dashboard keeps FIGURE_SECTIONS), after the latency plot, for a
# dataset whose trials have INT8 records with latency (the sweep's `deploy_int8`).
INT8_SECTION = ("int8", "Test mIoU against latency, fp32 and INT8")
TABLE_COLUMNS = (
    ("trial", "trial"),
    ("status", "status"),
    ("granularity", "granularity"),
    ("target_sparsity", "target"),
    ("achieved_sparsity", "achieved"),
    ("dense_test_miou", "dense mIoU"),
    ("test_miou", "test mIoU"),
    ("iou_drop", "drop"),
    ("iou_drop_rel", "rel. drop"),
    ("nonzero_params", "non-zero params"),
    ("total_params", "params"),
    ("params_deploy", "deployed params"),
    ("gmacs", "GMACs"),
    ("compact_mib", "compact MiB (fp32)"),
    ("compact_fp16_mib", "compact MiB (fp16)"),
    ("latency_ms", "latency ms"),
    ("latency_device", "latency device"),
    ("wall_time_s", "wall s"),
    ("node", "node"),
)
# Beside their fp32 counterparts (after the column named by the key), for rows with INT8 records
INT8_TABLE_COLUMNS = {
    "test_miou": (("int8_test_miou", "INT8 test mIoU"),),
    "latency_device": (
        ("onnx_latency_ms", "ONNX fp32 ms"),
        ("int8_latency_ms", "INT8 ms"),
        ("int8_agreement", "INT8 = fp32 pixels"),
        ("int8_status", "INT8 export"),
    ),
}
CELL_FORMATS = {  # columns not formatted as a float with three decimals
    "iou_drop_rel": "{:.1%}",
    "nonzero_params": "{:,.0f}",
    "total_params": "{:,.0f}",
    "params_deploy": "{:,.0f}",
    "gmacs": "{:.2f}",
    "compact_mib": "{:.2f}",
    "compact_fp16_mib": "{:.2f}",
    "latency_ms": "{:.1f}",
    "onnx_latency_ms": "{:.1f}",
    "int8_latency_ms": "{:.1f}",
    "int8_agreement": "{:.1%}",
}


def atomic_write(path: Path, write: Callable[[Path], Any]) -> Path:
    """Let `write` fill a temporary sibling, then rename it over `path` (readers never see half)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_tables(run: Run, out: Path) -> list[Path]:
    """results (one row per trial), curves (per epoch) and summary (one row per combination over
    its seeds, with intervals: analysis.stats) as parquet and CSV twins."""
    written = []
    tables = (("results", run.results), ("curves", run.curves), ("summary", summarize(run.results)))
    for name, frame in tables:
        written.append(
            atomic_write(out / f"{name}.parquet", lambda p, f=frame: f.to_parquet(p, index=False))
        )
        written.append(
            atomic_write(out / f"{name}.csv", lambda p, f=frame: f.to_csv(p, index=False))
        )
    return written


def dataset_figures(
    run: Run,
    dataset: str,
    dist: tuple[pd.DataFrame, str],
    example: dict[str, Any] | None,
    show: tuple[str, float] | None = None,
) -> dict[str, go.Figure]:
    """Every figure of one dataset, keyed as in FIGURE_SECTIONS."""
    names = run.class_names.get(dataset, [])
    return {
        "labels": label_distribution_figure(dist[0], dataset, dist[1]),
        "training": training_figure(run.curves, dataset),
        "pruning": pruning_figure(run.curves, dataset),
        "sparsity": sparsity_figure(run.results, dataset),
        "pareto_latency": latency_pareto_figure(run.results, dataset),
        "pareto_size": size_pareto_figure(run.results, dataset),
        "per_class": per_class_figure(run.results, dataset, names),
        "examples": examples_figure(run.results, example, dataset, names, show),
    }


def status_counts(results: pd.DataFrame) -> str:
    counts = results["status"].value_counts()
    parts = [f"{counts.get(s, 0)} {s}" for s in ("finished", "errored", "running")]
    return f"{len(results)} trials: " + ", ".join(parts)


def _options(facet: str, values: list[Any]) -> str:
    items = ['<option value="all">all</option>']
    for value in values:
        label = (
            "dense (unpruned)"
            if facet == "pruner" and value == DENSE
            else f"{value:g}"
            if facet == "sparsity"
            else value
        )
        items.append(
            f'<option value="{html.escape(str(value))}">{html.escape(str(label))}</option>'
        )
    return f'<label>{facet} <select id="filter-{facet}">{"".join(items)}</select></label>'


def _filters(results: pd.DataFrame) -> str:
    pruned = with_granularity(results[results["pruner"] != DENSE])
    facets = {
        "dataset": ordered(results["dataset"].dropna(), ("sscs", "nea")),
        "model": ordered(results["model"].dropna(), MODEL_ORDER),
        "pruner": [*ordered(pruned["pruner"].dropna(), PRUNER_ORDER), DENSE],
        "granularity": ordered(pruned["granularity"].dropna(), GRANULARITY_ORDER),
        "sparsity": sorted(pruned["target_sparsity"].dropna().unique()),
    }
    selects = "".join(_options(f, v) for f, v in facets.items())
    return (
        f'<nav id="filters">{selects}<button id="filter-reset" type="button">show all</button>'
        '<span id="shown-count"></span></nav>'
    )


def _claims_html(claims: list[Claim]) -> str:
    rows = "".join(
        f'<tr class="verdict-{c.verdict.replace(" ", "-")}" data-dataset="{html.escape(c.dataset)}">'
        f"<td>{html.escape(c.claim)}</td><td>{html.escape(c.dataset)}</td>"
        f"<td><b>{c.verdict}</b></td><td>{c.n or ''}</td><td>{html.escape(c.evidence)}"
        f'<div class="definition">{html.escape(c.definition)}</div></td></tr>'
        for c in claims
    )
    head = (
        "<tr><th>claim</th><th>dataset</th><th>verdict</th><th>seeds</th>"
        "<th>numbers that decided it (95% intervals over seeds)</th></tr>"
    )
    return f'<table id="claims">{head}{rows}</table>'


def cell_text(value: Any, column: str) -> str:
    """A results value as the trials table shows it ("" for missing)."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if column in CELL_FORMATS and isinstance(value, int | float):
        return CELL_FORMATS[column].format(value)
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _facet_attributes(row: dict[str, Any]) -> str:
    """A table row's data-* attributes, which the page's filters read."""
    facets = {
        "dataset": row["dataset"],
        "model": row["model"],
        "pruner": row["pruner"],
        "granularity": row["granularity"],
        "sparsity": row["target_sparsity"],
    }
    return " ".join(f'data-{k}="{html.escape(str(v))}"' for k, v in facets.items())


def table_columns(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """The trials table's (column, label) pairs: TABLE_COLUMNS, with the INT8 ones beside their
    fp32 counterparts where some row has an INT8 record."""
    if "int8_status" not in rows or rows["int8_status"].isna().all():
        return list(TABLE_COLUMNS)
    return [c for column in TABLE_COLUMNS for c in (column, *INT8_TABLE_COLUMNS.get(column[0], ()))]


def _results_html(results: pd.DataFrame, dataset: str, class_names: list[str]) -> str:
    rows = with_granularity(results[results["dataset"] == dataset])
    per_class = ((f"iou_{column_name(n)}", f"IoU {n}") for n in class_names)
    columns = [*table_columns(rows), *per_class]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    body = []
    for row in rows.to_dict("records"):
        facets = _facet_attributes(row)
        cells = "".join(f"<td>{html.escape(cell_text(row.get(c), c))}</td>" for c, _ in columns)
        body.append(f'<tr class="status-{row["status"]}" {facets}>{cells}</tr>')
    return f'<table class="results"><tr>{head}</tr>{"".join(body)}</table>'


def _interval(row: dict[str, Any], column: str, fmt: str = "{:.3f}") -> str:
    mean, low, high = (row.get(f"{column}_{k}") for k in ("mean", "ci_low", "ci_high"))
    if mean is None or pd.isna(mean):
        return ""
    if low is None or pd.isna(low):
        return fmt.format(mean)
    return f"{fmt.format(mean)} [{fmt.format(low)}, {fmt.format(high)}]"


def _summary_html(summary: pd.DataFrame, dataset: str) -> str:
    """The per-combination table with intervals; empty when no combination has two seeds."""
    if summary.empty or summary["n"].max() < 2:
        return ""
    rows = summary[summary["dataset"] == dataset]
    head = "".join(
        f"<th>{t}</th>"
        for t in (
            "model",
            "pruner",
            "granularity",
            "target",
            "seeds",
            "test mIoU",
            "drop",
            "rel. drop",
        )
    )
    body = []
    for row in rows.to_dict("records"):
        cells = [
            row["model"], row["pruner"], row["granularity"], f"{row['target_sparsity']:g}",
            f"{row['n']} ({row['seeds']})", _interval(row, "test_miou"),
            _interval(row, "iou_drop"), _interval(row, "iou_drop_rel", "{:.1%}"),
        ]  # fmt: skip
        facets = _facet_attributes(row)
        body.append(
            f"<tr {facets}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
        )
    return f'<table class="results summary"><tr>{head}</tr>{"".join(body)}</table>'


def _figure_html(fig: go.Figure, div_id: str) -> str:
    config = {"responsive": True, "displaylogo": False}
    return pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=div_id, config=config)


def report_sections(figures: dict[str, go.Figure]) -> list[tuple[str, str]]:
    """FIGURE_SECTIONS, with INT8_SECTION after the latency plot when `figures` has it."""
    sections = []
    for section in FIGURE_SECTIONS:
        sections.append(section)
        if section[0] == "pareto_latency" and INT8_SECTION[0] in figures:
            sections.append(INT8_SECTION)
    return sections


def dashboard_html(run: Run) -> str:
    """The whole report page; plotly.js is inlined so it works offline."""
    results = run.results
    dist = label_distribution(run)
    example = examples(run)
    claims = check_claims(results, run.curves)
    notes = missing_notes(run)
    summary = summarize(results)
    sections = []
    for dataset in ordered(results["dataset"].dropna(), ("sscs", "nea")):
        figures = dataset_figures(run, dataset, dist, example.get(dataset))
        if not int8_rows(results, dataset).empty:
            figures[INT8_SECTION[0]] = int8_figure(results, dataset)
        parts = [f"<h2>{html.escape(dataset)}</h2>"]
        for key, heading in report_sections(figures):
            parts.append(f"<h3>{heading}</h3>")
            parts.append(_figure_html(figures[key], f"fig-{dataset}-{key}"))
        combos = _summary_html(summary, dataset)
        if combos:
            parts.append("<h3>Combinations over seeds (mean [95% interval])</h3>")
            parts.append(combos)
        parts.append("<h3>Trials</h3>")
        parts.append(_results_html(results, dataset, run.class_names.get(dataset, [])))
        sections.append(
            f'<section class="dataset-section" data-dataset="{html.escape(dataset)}">'
            f"{''.join(parts)}</section>"
        )
    missing = (
        "<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>"
        if notes
        else "<p>Nothing missing: every trial of the sweep has finished.</p>"
    )
    preset = html.escape(str(run.sweep.get("preset", "unknown preset")))
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return PAGE.format(
        title=f"corroprune report: {preset}",
        plotlyjs=get_plotlyjs(),
        run_dir=html.escape(str(run.run_dir.resolve())),
        stamp=stamp,
        counts=html.escape(status_counts(results)),
        missing_class="missing" if notes else "complete",
        missing=missing,
        filters=_filters(results),
        claims=_claims_html(claims),
        sections="".join(sections) or "<p>No trials yet.</p>",
        script=SCRIPT,
        style=STYLE,
    )


def build_report(run_dir: Path, out: Path | None = None) -> dict[str, Any]:
    """Write results/curves tables and dashboard.html into RUN_DIR/report (or `out`)."""
    run = load_run(Path(run_dir))
    out = Path(out) if out else run.run_dir / "report"
    out.mkdir(parents=True, exist_ok=True)
    written = write_tables(run, out)
    page = dashboard_html(run)
    written.append(atomic_write(out / "dashboard.html", lambda p: p.write_text(page, "utf-8")))
    return {"files": written, "counts": status_counts(run.results), "missing": missing_notes(run)}


STYLE = """
body { font-family: system-ui, sans-serif; margin: 0 1.5rem 2rem; color: #222; }
nav#filters { position: sticky; top: 0; z-index: 10; background: #f4f4f4; padding: .5rem;
  border-bottom: 1px solid #ccc; display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; }
#shown-count { color: #555; font-size: .9em; }
.missing { background: #fff6d5; border: 1px solid #e0c050; padding: .3rem 1rem; }
.complete { background: #e8f6e8; border: 1px solid #8c8; padding: .3rem 1rem; }
table { border-collapse: collapse; font-size: .85em; margin: .5rem 0; }
th, td { border: 1px solid #ccc; padding: .2rem .4rem; vertical-align: top; text-align: left; }
tr.verdict-holds td:nth-child(3) { background: #d8f2d8; }
tr.verdict-fails td:nth-child(3) { background: #f6d0d0; }
tr.verdict-not-run td:nth-child(3) { background: #e6e6e6; }
tr.verdict-inconclusive td:nth-child(3) { background: #fff1c2; }
tr.status-errored { background: #fbe3e3; } tr.status-running { background: #fff6d5; }
.definition { color: #666; font-size: .9em; margin-top: .2rem; }
"""

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>{style}</style>
<script type="text/javascript">window.PlotlyConfig = {{MathJaxConfig: 'local'}};</script>
<script type="text/javascript">{plotlyjs}</script>
</head><body>
<h1>{title}</h1>
<p>Run <code>{run_dir}</code>, report written {stamp}. {counts}.</p>
<div id="missing-note" class="{missing_class}"><h2>What is missing</h2>{missing}</div>
{filters}
<h2>The paper's claims against this run</h2>
{claims}
{sections}
<script type="text/javascript">{script}</script>
</body></html>
"""

# Filters: each trace's `meta` names its facets; a facet a trace does not carry never hides it.
SCRIPT = """
(function () {
  const FACETS = ["dataset", "model", "pruner", "granularity", "sparsity"];
  const original = new Map();
  const same = (a, b) => Math.abs(parseFloat(a) - parseFloat(b)) < 1e-9;
  function selection() {
    const s = {};
    for (const f of FACETS) s[f] = document.getElementById("filter-" + f).value;
    return s;
  }
  function passes(meta, s) {
    if (!meta) return true;
    for (const f of ["dataset", "model"]) {
      if (s[f] !== "all" && meta[f] !== undefined && String(meta[f]) !== s[f]) return false;
    }
    if (meta.reference) return true;
    if (s.pruner !== "all" && meta.pruner !== undefined && meta.pruner !== s.pruner) return false;
    if (meta.pruner === "none") return true;  // dense: the reference of every granularity
    if (s.granularity !== "all" && meta.granularity !== undefined &&
        meta.granularity !== s.granularity) return false;
    return s.sparsity === "all" || meta.sparsity === undefined || same(meta.sparsity, s.sparsity);
  }
  function forExamples(gd, s) {
    const m = gd.layout.meta, e = Object.assign({}, s);
    if (e.pruner === "all") e.pruner = m.pruner;
    if (e.granularity === "all") e.granularity = m.granularity === "none" ? "element" : m.granularity;
    if (e.pruner !== "none" && e.sparsity === "all") e.sparsity = String(m.sparsity);
    const kind = e.granularity === "element" ? "" : " (" + e.granularity + ")";
    const label = e.pruner === "none" ? "dense" : e.pruner + kind + " s" + parseFloat(e.sparsity);
    const base = String(gd.layout.title.text).split(":")[0];
    Plotly.relayout(gd, {"title.text": base + ": " + label});
    return e;
  }
  function apply() {
    const s = selection();
    let shown = 0;
    document.querySelectorAll(".dataset-section").forEach(function (sec) {
      sec.style.display = s.dataset === "all" || sec.dataset.dataset === s.dataset ? "" : "none";
    });
    document.querySelectorAll(".js-plotly-plot").forEach(function (gd) {
      if (!original.has(gd)) original.set(gd, gd.data.map(t => t.visible === undefined ? true : t.visible));
      const isExamples = gd.layout.meta && gd.layout.meta.kind === "examples";
      const sel = isExamples ? forExamples(gd, s) : s;
      const vis = gd.data.map(function (t, i) {
        if (!passes(t.meta, sel)) return false;
        return isExamples ? true : original.get(gd)[i];
      });
      Plotly.restyle(gd, {visible: vis});
      if (gd.offsetParent !== null) {
        Plotly.Plots.resize(gd);
        shown += vis.filter(v => v === true).length;
      }
    });
    document.querySelectorAll("tr[data-dataset]").forEach(function (tr) {
      tr.style.display = passes(Object.assign({}, tr.dataset), s) ? "" : "none";
    });
    document.getElementById("shown-count").textContent = shown + " traces shown";
  }
  window.addEventListener("load", function () {
    for (const f of FACETS) document.getElementById("filter-" + f).addEventListener("change", apply);
    document.getElementById("filter-reset").addEventListener("click", function () {
      for (const f of FACETS) document.getElementById("filter-" + f).value = "all";
      apply();
    });
    apply();
  });
})();
"""
