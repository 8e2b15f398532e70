"""The latency-budgeted search's report: the accuracy/latency front, the baselines, and the verdict.

Reads SEARCH_DIR/results.json (written by `corroprune tune --preset budget-search`) and needs
neither torch nor Ray: everything drawn here was measured by the search.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from analysis.figures import pareto_front
from analysis.report import atomic_write
from trainables.errors import UserError

RESULTS_FILE = "results.json"
FORMAT = "corroprune-budget-v1"
STATUSES = ("finished", "over_budget", "error")
STATUS_LABELS = {
    "finished": "search: finished",
    "over_budget": "search: over budget (stopped before fine-tuning)",
}
STATUS_COLOURS = {"finished": "#636EFA", "over_budget": "#EF553B"}
REQUIRED = ("budget_ms", "runtime", "threads", "size", "trials", "baselines", "chosen")
TRIAL_KEYS = (
    "trial_id",
    "arch",
    "pruner",
    "sparsity",
    "stage_ratios",
    "status",
    "val_miou",
    "latency_ms",
)
BASELINE_KEYS = ("trial", "arch", "pruner", "sparsity", "val_miou", "test_miou", "latency_ms")
TRIAL_COLUMNS = (
    "trial_id",
    "arch",
    "pruner",
    "sparsity",
    "status",
    "val_miou",
    "latency_ms",
    "latency_p90_ms",
    "achieved_sparsity",
    "params",
    "within_budget",
    "pareto",
    "error",
    "out_dir",
)
BASELINE_COLUMNS = (
    "trial",
    "arch",
    "pruner",
    "sparsity",
    "granularity",
    "val_miou",
    "test_miou",
    "latency_ms",
    "latency_p90_ms",
    "within_budget",
    "pareto",
)


def load_budget(search_dir: Path) -> dict[str, Any]:
    """SEARCH_DIR/results.json, checked: a missing or malformed file is a UserError naming it."""
    path = Path(search_dir) / RESULTS_FILE
    expected = f"a {FORMAT} results file written by `corroprune tune --preset budget-search`"
    if not path.is_file():
        raise UserError(f"{path} not found: expected {expected}")
    try:
        results = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is unreadable ({err}): expected {expected}") from None
    if not isinstance(results, dict) or results.get("format") != FORMAT:
        found = results.get("format") if isinstance(results, dict) else type(results).__name__
        raise UserError(f"{path} has format {found!r}: expected {expected}")
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}: expected {expected}")
    for key, keys in (("trials", TRIAL_KEYS), ("baselines", BASELINE_KEYS)):
        rows = results[key]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise UserError(f"{path}: `{key}` must be a list of objects")
        for i, row in enumerate(rows):
            lacking = [k for k in keys if k not in row]
            if lacking:
                raise UserError(f"{path}: {key}[{i}] lacks {', '.join(lacking)}")
    for i, trial in enumerate(results["trials"]):
        if trial["status"] not in STATUSES:
            raise UserError(
                f"{path}: trials[{i}] has status {trial['status']!r}, "
                f"expected one of {', '.join(STATUSES)}"
            )
    return results


def _num(value: Any, fmt: str = "{:.3f}") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return fmt.format(value)


def _size(results: dict[str, Any]) -> str:
    return "x".join(str(n) for n in results["size"])


def _threads(n: Any) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def latency_axis_title(results: dict[str, Any]) -> str:
    """e.g. "latency, ms (onnx, 2 threads, 512x512, batch 1)"."""
    return (
        f"latency, ms ({results['runtime']}, {_threads(results['threads'])}, "
        f"{_size(results)}, batch 1)"
    )


def _ratios_text(ratios: dict[str, float], sep: str = "<br>") -> str:
    return sep.join(f"{stage}: {_num(r, '{:.2f}')}" for stage, r in ratios.items())


def _trial_hover(trial: dict[str, Any]) -> str:
    return (
        f"<b>{trial['trial_id']}</b><br>arch {trial['arch']}, pruner {trial['pruner']}<br>"
        f"sparsity {_num(trial['sparsity'], '{:.2f}')}, "
        f"achieved {_num(trial.get('achieved_sparsity'), '{:.3f}')}<br>"
        f"val mIoU {_num(trial['val_miou'])}, latency {_num(trial['latency_ms'], '{:.1f}')} ms"
        f"<br>stage ratios:<br>{_ratios_text(trial['stage_ratios'])}"
    )


def _baseline_hover(row: dict[str, Any]) -> str:
    granularity = f", {row['granularity']}" if row.get("granularity") else ""
    return (
        f"<b>{row['trial']}</b><br>{row['arch']}, {row['pruner']}{granularity}, "
        f"sparsity {_num(row['sparsity'], '{:.2f}')}<br>val mIoU {_num(row['val_miou'])}, "
        f"test mIoU {_num(row['test_miou'])}<br>latency {_num(row['latency_ms'], '{:.1f}')} ms"
    )


def _drawable(rows: list[dict[str, Any]], y: str = "val_miou") -> list[dict[str, Any]]:
    return [r for r in rows if r.get("latency_ms") is not None and r.get(y) is not None]


def _markers(rows: list[dict[str, Any]], hover: list[str], name: str, **marker: Any) -> go.Scatter:
    return go.Scatter(
        x=[r["latency_ms"] for r in rows],
        y=[r["val_miou"] for r in rows],
        mode="markers",
        name=name,
        marker=marker,
        hovertext=hover,
        hovertemplate="%{hovertext}<extra></extra>",
    )


def front_trials(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The finished search trials on the (low latency, high validation mIoU) Pareto front."""
    finished = _drawable([t for t in results["trials"] if t["status"] == "finished"])
    if not finished:
        return []
    mask = pareto_front([t["latency_ms"] for t in finished], [t["val_miou"] for t in finished])
    front = [t for t, on in zip(finished, mask, strict=True) if on]
    return sorted(front, key=lambda t: (t["latency_ms"], t["val_miou"]))


def _unevaluated(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Over-budget trials stopped before any validation: a latency but no mIoU."""
    return [
        t
        for t in results["trials"]
        if t["status"] == "over_budget" and t["latency_ms"] is not None and t["val_miou"] is None
    ]


def _left_out(results: dict[str, Any]) -> str:
    """What the figure does not draw, for its title: errors, and trials without a latency."""
    errors = sum(t["status"] == "error" for t in results["trials"])
    unmeasured = sum(
        (t["status"] != "error" and t["latency_ms"] is None)
        or (t["status"] == "finished" and t["val_miou"] is None)
        for t in results["trials"]
    )
    parts = [f"{errors} errored"] if errors else []
    parts += [f"{unmeasured} without latency or mIoU"] if unmeasured else []
    return f" (not drawn: {', '.join(parts)})" if parts else ""


def _search_traces(results: dict[str, Any]) -> list[go.Scatter]:
    traces = []
    for status, label in STATUS_LABELS.items():
        rows = _drawable([t for t in results["trials"] if t["status"] == status])
        if rows:
            hover = [_trial_hover(t) for t in rows]
            traces.append(_markers(rows, hover, label, color=STATUS_COLOURS[status], size=8))
    unevaluated = _unevaluated(results)
    if unevaluated:
        traces.append(
            go.Scatter(
                x=[t["latency_ms"] for t in unevaluated],
                y=[0.0] * len(unevaluated),
                mode="markers",
                name="search: over budget, never validated (drawn at mIoU 0)",
                marker={"color": STATUS_COLOURS["over_budget"], "size": 8, "symbol": "x"},
                hovertext=[_trial_hover(t) for t in unevaluated],
                hovertemplate="%{hovertext}<extra></extra>",
            )
        )
    front = front_trials(results)
    if front:
        traces.append(
            go.Scatter(
                x=[t["latency_ms"] for t in front],
                y=[t["val_miou"] for t in front],
                mode="lines",
                line={"shape": "hv", "color": "black", "width": 1.5},
                name="Pareto front (finished search trials)",
                hoverinfo="skip",
            )
        )
    return traces


def _baseline_traces(results: dict[str, Any]) -> list[go.Scatter]:
    traces = []
    rows = _drawable(results["baselines"])
    if rows:
        hover = [_baseline_hover(r) for r in rows]
        name = "sweep baselines (uniform ratios, dense)"
        traces.append(_markers(rows, hover, name, color="#7F7F7F", size=9, symbol="square-open"))
    best = results.get("best_baseline_within_budget")
    if best and _drawable([best]):
        name = f"best baseline within budget: {best['trial']}"
        marker = {"color": "#00CC96", "size": 14, "symbol": "diamond-open", "line": {"width": 2}}
        traces.append(_markers([best], [_baseline_hover(best)], name, **marker))
    return traces


def _chosen_trace(chosen: dict[str, Any]) -> go.Scatter:
    hover = (
        f"<b>chosen: {chosen['trial_id']}</b><br>arch {chosen['arch']}, pruner "
        f"{chosen['pruner']}, sparsity {_num(chosen['sparsity'], '{:.2f}')} (achieved "
        f"{_num(chosen.get('achieved_sparsity'))})<br>val mIoU {_num(chosen['val_miou'])}, "
        f"test mIoU {_num(chosen.get('test_miou'))}<br>latency "
        f"{_num(chosen['latency_ms'], '{:.1f}')} ms (artefact "
        f"{_num(chosen.get('artefact_latency_ms'), '{:.1f}')} ms)<br>stage ratios:<br>"
        f"{_ratios_text(chosen['stage_ratios'])}"
    )
    marker = {"color": "gold", "size": 18, "symbol": "star", "line": {"color": "black", "width": 1}}
    return _markers([chosen], [hover], f"chosen: {chosen['trial_id']}", **marker)


def front_figure(results: dict[str, Any]) -> go.Figure:
    """Validation mIoU against measured latency: search trials by status (errors left out), their
    Pareto front, the sweep's baselines, the budget, and the chosen model."""
    fig = go.Figure(_search_traces(results) + _baseline_traces(results))
    chosen = results.get("chosen")
    if chosen and _drawable([chosen]):
        fig.add_trace(_chosen_trace(chosen))
    budget = results["budget_ms"]
    fig.add_vline(
        x=budget,
        line_dash="dash",
        line_color="red",
        annotation_text=f"budget {budget:g} ms",
        annotation_position="top right",
    )
    left_out = _left_out(results)
    fig.update_layout(
        title=f"Validation mIoU against measured latency, budget {budget:g} ms{left_out}",
        xaxis_title=latency_axis_title(results),
        yaxis_title="validation mIoU",
        legend={"orientation": "h", "yanchor": "top", "y": -0.2},
    )
    return fig


def _stages(trials: list[dict[str, Any]]) -> list[str]:
    """Every stage named in any trial's ratios, in order of first appearance."""
    return list(dict.fromkeys(stage for t in trials for stage in t["stage_ratios"]))


def trials_table(results: dict[str, Any]) -> pd.DataFrame:
    """One row per search trial, the stage ratios as `ratio_<stage>` columns."""
    trials = results["trials"]
    stages = _stages(trials)
    rows = [
        {
            **{c: t.get(c) for c in TRIAL_COLUMNS},
            **{f"ratio_{s}": t["stage_ratios"].get(s) for s in stages},
        }
        for t in trials
    ]
    return pd.DataFrame(rows, columns=[*TRIAL_COLUMNS, *(f"ratio_{s}" for s in stages)])


def _sparsity(row: dict[str, Any]) -> Any:
    achieved = row.get("achieved_sparsity")
    return achieved if achieved is not None else row.get("sparsity")


VERDICT_COLUMNS = {
    "test mIoU": lambda r: r.get("test_miou"),
    "val mIoU": lambda r: r.get("val_miou"),
    "latency, ms": lambda r: r.get("latency_ms"),
    "sparsity (search: achieved; baseline: target)": _sparsity,
}


def verdict_table(results: dict[str, Any]) -> pd.DataFrame:
    """The chosen search model, the sweep's best baseline within the budget, and their
    difference; a missing side says so in its `model` cell."""
    chosen, best = results.get("chosen"), results.get("best_baseline_within_budget")
    budget = f"{results['budget_ms']:g} ms"

    def row(who: str, model: dict[str, Any] | None, name: str, missing: str) -> dict[str, Any]:
        values = {c: get(model) if model else None for c, get in VERDICT_COLUMNS.items()}
        return {"": who, "model": model[name] if model else missing, **values}

    ours = row("search", chosen, "trial_id", f"none: no search model met {budget}")
    theirs = row(
        "best uniform-ratio baseline", best, "trial", f"none: no uniform-ratio model met {budget}"
    )
    difference = {
        c: ours[c] - theirs[c] if ours[c] is not None and theirs[c] is not None else None
        for c in VERDICT_COLUMNS
    }
    missing = "" if chosen and best else "n/a: one side is missing"
    rows = [ours, theirs, {"": "difference (search - baseline)", "model": missing, **difference}]
    return pd.DataFrame(rows, columns=["", "model", *VERDICT_COLUMNS]).astype(
        {c: float for c in VERDICT_COLUMNS}
    )


def tables(results: dict[str, Any]) -> dict[str, pd.DataFrame]:
    """The report's tables: "trials", "baselines" and "verdict"."""
    baselines = pd.DataFrame(
        [{c: b.get(c) for c in BASELINE_COLUMNS} for b in results["baselines"]],
        columns=list(BASELINE_COLUMNS),
    )
    return {
        "trials": trials_table(results),
        "baselines": baselines,
        "verdict": verdict_table(results),
    }


def verdict_sentence(results: dict[str, Any]) -> str:
    """The report's answer in one sentence (plain text)."""
    chosen, best = results.get("chosen"), results.get("best_baseline_within_budget")
    budget = f"{results['budget_ms']:g} ms"
    if best:
        baseline = (
            f"the best uniform-ratio model of the sweep under the budget reaches "
            f"{_num(best['test_miou'])} at {_num(best['latency_ms'], '{:.1f}')} ms."
        )
    else:
        baseline = f"no uniform-ratio model of the sweep meets the {budget} budget."
    if chosen:
        return (
            f"The search's model reaches test mIoU {_num(chosen.get('test_miou'))} at "
            f"{_num(chosen['latency_ms'], '{:.1f}')} ms; {baseline}"
        )
    fastest = results.get("fastest")
    if fastest:
        found = (
            f"the fastest model found is {fastest['name']} ({fastest['source']}) at "
            f"{_num(fastest['latency_ms'], '{:.1f}')} ms"
        )
    else:
        found = "no model was measured"
    return f"No search model met the {budget} budget: {found}; {baseline}"


def _header(results: dict[str, Any]) -> str:
    counts = {s: sum(t["status"] == s for t in results["trials"]) for s in STATUSES}
    e = html.escape
    facts = (
        f"Budget: <b>{results['budget_ms']:g} ms</b> per image (batch 1). Runtime "
        f"{e(str(results['runtime']))}, {_threads(results['threads'])}, input {_size(results)}, "
        f"CPU {e(str(results.get('cpu', 'unknown')))} on "
        f"{e(str(results.get('hostname', 'unknown')))}."
    )
    how = (
        "Latency is measured, not estimated: each model was timed one at a time, nothing else "
        f"running beside it (median of {e(str(results.get('repeats', '?')))} repeats; "
        "p90 in the tables)."
    )
    trials = (
        f"{len(results['trials'])} search configurations: {counts['finished']} finished, "
        f"{counts['over_budget']} over budget (stopped before fine-tuning), "
        f"{counts['error']} errored. Baselines: the sweep's uniform-ratio and dense models from "
        f"{e(str(results.get('run_dir', 'unknown')))}, timed the same way."
    )
    return "".join(f"<p>{p}</p>" for p in (facts, how, trials))


def _chosen_html(chosen: dict[str, Any] | None) -> str:
    if not chosen:
        return ""
    text = (
        f"Chosen: {chosen['trial_id']} ({chosen['arch']}, {chosen['pruner']}); artefact "
        f"{chosen.get('artefact')} measured at {_num(chosen.get('artefact_latency_ms'), '{:.1f}')}"
        f" ms; config {chosen.get('config')}. Stage ratios: "
        f"{_ratios_text(chosen['stage_ratios'], sep=', ')}."
    )
    return f"<p>{html.escape(text)}</p>"


def _table_html(title: str, frame: pd.DataFrame) -> str:
    body = frame.to_html(index=False, escape=True, na_rep="—", float_format=lambda v: f"{v:.4g}")
    return f"<h2>{html.escape(title)}</h2>{body}"


def write_budget_report(search_dir: Path) -> Path:
    """SEARCH_DIR/report.html (self-contained, plotly.js inlined) and SEARCH_DIR/trials.csv."""
    search_dir = Path(search_dir)
    results = load_budget(search_dir)
    frames = tables(results)
    figure = front_figure(results).to_html(full_html=False, include_plotlyjs="inline")
    parts = [
        f"<h1>Latency-budgeted search: {html.escape(search_dir.name)}</h1>",
        _header(results),
        f"<p class='verdict'><b>{html.escape(verdict_sentence(results), quote=False)}</b></p>",
        _chosen_html(results.get("chosen")),
        figure,
        _table_html(
            "Verdict: search model against the best uniform-ratio model", frames["verdict"]
        ),
        _table_html("Search trials", frames["trials"]),
        _table_html("Sweep baselines (uniform ratios and dense models)", frames["baselines"]),
    ]
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>corroprune: "
        f"{html.escape(search_dir.name)}</title></head><body>" + "".join(parts) + "</body></html>"
    )
    atomic_write(search_dir / "trials.csv", lambda p: frames["trials"].to_csv(p, index=False))
    return atomic_write(search_dir / "report.html", lambda p: p.write_text(page, encoding="utf-8"))
