"""Read a run directory (finished or still running) into tidy pandas tables; pure, read-only."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from analysis.latency import apply_measured_latency
from sweep.deploy_step import REFUSED, read_record
from sweep.identity import CHANNEL, COUPLED, DENSE, ELEMENT, TrialId, sweep_grid, trial_id

STATUSES = ("finished", "errored", "running")
GRANULARITY_ORDER = (ELEMENT, CHANNEL, COUPLED)
# final.json's `inference` block -> results columns (absent in runs made before it existed: NaN)
INFERENCE_COLUMNS = {
    "params": "params_deploy",
    "gmacs": "gmacs",
    "compact_mib": "compact_mib",
    "compact_fp16_mib": "compact_fp16_mib",
    "latency_ms": "latency_ms",
    "latency_device": "latency_device",
}
# <trial>/deploy/int8.json (the sweep's `deploy_int8`) -> results columns (NaN / None when absent):
# the INT8 model's test mIoU and latency, and fp32 ONNX Runtime's latency timed beside it
INT8_COLUMNS = {
    "status": "int8_status",  # exported | refused
    "test_miou": "int8_test_miou",
    "test_miou_corrosion": "int8_test_miou_corrosion",
    "latency_ms": "int8_latency_ms",
    "fp32_onnx_latency_ms": "onnx_latency_ms",
    "agreement": "int8_agreement",  # share of pixels where INT8 and fp32 predict the same class
    "file_mib": "int8_mib",
    "reason": "int8_reason",  # why the export was refused
}
RESULT_COLUMNS = [
    "trial", "dataset", "model", "encoder", "pruner", "granularity", "target_sparsity",
    "achieved_sparsity", "overall_sparsity", "dense_test_miou", "pruned_test_miou", "test_miou",
    "dense_test_miou_corrosion", "pruned_test_miou_corrosion", "iou_drop", "iou_drop_rel",
    "total_params", "nonzero_params", "params_deploy", "gmacs", "compact_mib", "compact_fp16_mib",
    "latency_ms", "latency_device", *INT8_COLUMNS.values(), "status", "wall_time_s", "node",
    "hostname", "epochs_done", "last_stage", "started_at", "seed", "error",
]  # fmt: skip


@dataclass(frozen=True)
class Run:
    """Everything the report needs from one run directory."""

    run_dir: Path
    results: pd.DataFrame
    curves: pd.DataFrame
    class_names: dict[str, list[str]]  # dataset -> class names, in class-id order
    sweep: dict[str, Any] = field(default_factory=dict)
    status: dict[str, Any] = field(default_factory=dict)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Records of a JSON-lines file; unparsable lines (a half-written last line) are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or not (yet) complete."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def column_name(class_name: str) -> str:
    """A class name as a column-name fragment: `severe` -> `severe`, `Corroded C1` -> `corroded_c1`."""
    return re.sub(r"[^0-9a-z]+", "_", str(class_name).lower()).strip("_") or "class"


def _facets(name: str, config: dict[str, Any]) -> dict[str, Any]:
    """The trial's identity columns (sweep.identity): its config first, its folder name second.

    Dense trials get granularity DENSE ("none"): they are the reference of every granularity.
    A folder from before the seed axis (no `-seed<n>`, no seed in its config) is seed 0.
    """
    identity = trial_id(name, config)
    if identity is None:
        return {**TrialId("", "").columns(), "dataset": None, "model": None}
    return identity.columns()


def _error_line(trial_dir: Path) -> str | None:
    """The error's one-line summary (error.txt's first non-empty line)."""
    path = trial_dir / "error.txt"
    if not path.is_file():
        return None
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[0] if lines else "error (no message)"


def _scores(block: dict[str, Any] | None) -> tuple[float, float, list[float]]:
    if not block:
        return math.nan, math.nan, []
    iou = [float(v) if v is not None else math.nan for v in block.get("test_iou") or []]
    return (
        float(block.get("test_miou", math.nan)),
        float(block.get("test_miou_corrosion", math.nan)),
        iou,
    )


def _inference(final: dict[str, Any] | None) -> dict[str, Any]:
    """Deployable size and speed columns from final.json's `inference` block; NaN when absent."""
    block = (final or {}).get("inference")
    block = block if isinstance(block, dict) else {}
    out: dict[str, Any] = {}
    for key, column in INFERENCE_COLUMNS.items():
        value = block.get(key)
        if key == "latency_device":
            out[column] = value if isinstance(value, str) else None
        else:
            out[column] = float(value) if isinstance(value, int | float) else math.nan
    return out


def _int8(trial_dir: Path) -> dict[str, Any]:
    """INT8 columns from the trial's deploy/int8.json; NaN (text columns None) when absent."""
    record = read_record(trial_dir) or {}
    out: dict[str, Any] = {}
    for key, column in INT8_COLUMNS.items():
        value = record.get(key)
        if key in ("status", "reason"):
            out[column] = value if isinstance(value, str) else None
        else:
            out[column] = float(value) if isinstance(value, int | float) else math.nan
    return out


def trial_row(trial_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """One results row for a trial folder, and the class names its final.json gives (if any)."""
    config = _read_yaml(trial_dir / "config.yaml")
    env = _read_json(trial_dir / "env.json") or {}
    final = _read_json(trial_dir / "final.json")
    records = read_jsonl(trial_dir / "metrics.jsonl")
    error = _error_line(trial_dir)
    status = "finished" if final is not None else "errored" if error else "running"
    row: dict[str, Any] = {"trial": trial_dir.name, **_facets(trial_dir.name, config)}
    last = records[-1] if records else {}
    source = final or last
    row.update(
        status=status,
        error=error if status == "errored" else None,
        achieved_sparsity=source.get("achieved_sparsity", math.nan),
        overall_sparsity=source.get("overall_sparsity", math.nan),
        total_params=source.get("total_params", math.nan),
        nonzero_params=source.get("nonzero_params", math.nan),
        wall_time_s=(final or {}).get("wall_time_s", math.nan),
        node=env.get("node_ip") or env.get("hostname"),
        hostname=env.get("hostname"),
        started_at=env.get("started_at"),
        epochs_done=len(records),
        last_stage=last.get("stage"),
        **_inference(final),
        **_int8(trial_dir),
    )
    dense, dense_corr, dense_iou = _scores((final or {}).get("dense"))
    pruned, pruned_corr, pruned_iou = _scores((final or {}).get("pruned"))
    is_pruned = row["pruner"] != DENSE
    row.update(
        dense_test_miou=dense,
        dense_test_miou_corrosion=dense_corr,
        pruned_test_miou=pruned,
        pruned_test_miou_corrosion=pruned_corr,
        test_miou=pruned if is_pruned else dense,
        iou_drop=dense - pruned if is_pruned else math.nan,
        iou_drop_rel=(dense - pruned) / dense if is_pruned and dense > 0 else math.nan,
    )
    names = list((final or {}).get("class_names") or [])
    row["_iou"] = pruned_iou if is_pruned else dense_iou
    row["_dense_iou"] = dense_iou
    return row, names


def _class_columns(rows: list[dict[str, Any]], class_names: dict[str, list[str]]) -> list[str]:
    """Spread per-class IoU lists into iou_<class> and dense_iou_<class> columns."""
    columns: list[str] = []
    for row in rows:
        iou, dense_iou = row.pop("_iou"), row.pop("_dense_iou")
        names = class_names.get(row["dataset"]) or [f"class{i}" for i in range(len(iou))]
        for prefix, values in (("iou_", iou), ("dense_iou_", dense_iou)):
            for i, name in enumerate(names):
                col = prefix + column_name(name)
                row[col] = values[i] if i < len(values) else math.nan
                if col not in columns:
                    columns.append(col)
    return columns


def trial_dirs(run_dir: Path) -> list[Path]:
    trials = Path(run_dir) / "trials"
    return sorted(p for p in trials.iterdir() if p.is_dir()) if trials.is_dir() else []


def results_table(run_dir: Path) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """One row per trial folder, and the class names of each dataset."""
    rows, class_names = [], {}
    for trial_dir in trial_dirs(run_dir):
        row, names = trial_row(trial_dir)
        if names and row["dataset"] not in class_names:
            class_names[row["dataset"]] = names
        rows.append(row)
    class_cols = _class_columns(rows, class_names)
    frame = pd.DataFrame(rows, columns=RESULT_COLUMNS + class_cols)
    dense_first = frame.assign(_pruned=frame["pruner"] != DENSE)
    order = dense_first.sort_values(
        ["dataset", "model", "_pruned", "granularity", "pruner", "target_sparsity", "seed"],
        key=lambda c: (
            c.map({g: i for i, g in enumerate(GRANULARITY_ORDER)}).fillna(len(GRANULARITY_ORDER))
            if c.name == "granularity"
            else c
        ),
    )
    return frame.loc[order.index].reset_index(drop=True), class_names


def curves_table(
    run_dir: Path, results: pd.DataFrame, class_names: dict[str, list[str]]
) -> pd.DataFrame:
    """One row per trial and epoch record, facets joined in, val_iou spread per class.

    The record's own `target_sparsity` (the schedule's value at that epoch) is renamed
    `scheduled_sparsity`; `target_sparsity` is the trial's final target, as in the results table.
    """
    frames = []
    columns = ["dataset", "model", "pruner", "granularity", "target_sparsity", "seed", "status"]
    facets = results.set_index("trial")[columns]
    for trial_dir in trial_dirs(run_dir):
        records = read_jsonl(trial_dir / "metrics.jsonl")
        if not records or trial_dir.name not in facets.index:
            continue
        frame = pd.DataFrame(records).rename(columns={"target_sparsity": "scheduled_sparsity"})
        info = facets.loc[trial_dir.name]
        if "val_iou" in frame:
            names = class_names.get(info["dataset"]) or []
            width = max((len(v) for v in frame["val_iou"] if isinstance(v, list)), default=0)
            names = names + [f"class{i}" for i in range(len(names), width)]
            for i, name in enumerate(names[:width]):
                frame[f"val_iou_{column_name(name)}"] = [
                    v[i] if isinstance(v, list) and i < len(v) else math.nan
                    for v in frame["val_iou"]
                ]
            frame = frame.drop(columns="val_iou")
        frame.insert(0, "trial", trial_dir.name)
        for i, col in enumerate(facets.columns, start=1):
            frame.insert(i, col, info[col])
        frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["trial", *facets.columns, "stage", "epoch", "global_epoch"])
    return pd.concat(frames, ignore_index=True)


def load_run(run_dir: Path) -> Run:
    """Results and curves tables plus the sweep file and sweep status, whatever state the run is in."""
    run_dir = Path(run_dir)
    results, class_names = results_table(run_dir)
    results = apply_measured_latency(results, run_dir)  # latency.json, else dense figures
    curves = curves_table(run_dir, results, class_names)
    return Run(
        run_dir=run_dir,
        results=results,
        curves=curves,
        class_names=class_names,
        sweep=_read_yaml(run_dir / "sweep.yaml"),
        status=_read_json(run_dir / "sweep_status.json") or {},
    )


def expected_trials(sweep: dict[str, Any]) -> list[TrialId]:
    """The trials the sweep file's grid asks for (the same grid as sweep.grid)."""
    return sweep_grid(sweep)


def _identity_key(name: str) -> TrialId | None:
    """A folder name's identity without the encoder (names do not carry it)."""
    try:
        return TrialId.from_name(name)
    except ValueError:
        return None


def missing_notes(run: Run) -> list[str]:
    """What the report cannot show yet: errored and running trials, failed bases, unstarted trials."""
    notes = []
    results = run.results
    for row in results[results["status"] == "errored"].itertuples():
        notes.append(f"errored: {row.trial}: {row.error}")
    for row in results[results["status"] == "running"].itertuples():
        stage = f", last stage {row.last_stage}" if row.last_stage else ""
        notes.append(f"running or pending: {row.trial} ({row.epochs_done} epochs so far{stage})")
    for base in run.status.get("failed_base_models") or []:
        who = base.get("trial") or "-".join(str(base.get(k)) for k in ("dataset", "model"))
        notes.append(f"failed base model: {who}: {base.get('reason', 'no reason given')}")
    dropped = set(run.status.get("dropped_combinations") or [])
    if dropped:
        notes.append(f"dropped with their base model: {', '.join(sorted(dropped))}")
    present = {_identity_key(name) for name in set(results["trial"]) | dropped}
    unstarted = [i.name for i in expected_trials(run.sweep) if i not in present]
    if unstarted:
        notes.append(f"not started yet ({len(unstarted)}): {', '.join(unstarted)}")
    return notes + _int8_notes(run)


def _int8_notes(run: Run) -> list[str]:
    """Refused INT8 exports, and finished trials of a `deploy_int8` sweep still without one."""
    results = run.results
    if "int8_status" not in results:
        return []
    notes = [
        f"INT8 export refused: {row.trial}: {row.int8_reason}"
        for row in results[results["int8_status"] == REFUSED].itertuples()
    ]
    if (run.sweep.get("sweep") or {}).get("deploy_int8"):
        waiting = results[(results["status"] == "finished") & results["int8_status"].isna()]
        if not waiting.empty:
            names = ", ".join(waiting["trial"])
            notes.append(f"no INT8 record yet ({len(waiting)}; run the sweep again): {names}")
    return notes


def label_distribution(run: Run) -> tuple[pd.DataFrame, str]:
    """Per-dataset label distribution: label_distribution.csv if the run has one, else the examples' gt.

    Returns the table (dataset, split, class_id, class_name, pixels, percent) and its source:
    "file" or "examples".
    """
    path = run.run_dir / "label_distribution.csv"
    if path.is_file():
        table = pd.read_csv(path)
        if "dataset" not in table:
            datasets = sorted(run.results["dataset"].dropna().unique())
            table.insert(0, "dataset", datasets[0] if len(datasets) == 1 else "all")
        return table, "file"
    rows = []
    for dataset, ex in examples(run).items():
        names = run.class_names.get(dataset) or []
        gt = ex["gt"]
        n = max(len(names), int(gt[gt != 255].max(initial=0)) + 1)
        counts = np.bincount(gt[gt != 255].ravel(), minlength=n)
        total = max(int(counts.sum()), 1)
        for c in range(n):
            name = names[c] if c < len(names) else f"class{c}"
            split = f"test examples ({gt.shape[0]} images)"
            rows.append((dataset, split, c, name, int(counts[c]), 100.0 * counts[c] / total))
    columns = ["dataset", "split", "class_id", "class_name", "pixels", "percent"]
    return pd.DataFrame(rows, columns=columns), "examples"


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as data:
            return {k: data[k] for k in ("image", "gt", "pred") if k in data}
    except (OSError, ValueError, EOFError):
        return None


def examples(run: Run) -> dict[str, dict[str, Any]]:
    """Per dataset: image (K,H,W,3), gt (K,H,W) and pred per trial name (K,H,W), finished trials."""
    out: dict[str, dict[str, Any]] = {}
    finished = run.results[run.results["status"] == "finished"]
    for row in finished.itertuples():
        data = _load_npz(run.run_dir / "trials" / row.trial / "examples.npz")
        if not data or not {"image", "gt", "pred"} <= data.keys():
            continue
        entry = out.setdefault(row.dataset, {"image": data["image"], "gt": data["gt"], "pred": {}})
        if data["pred"].shape == entry["gt"].shape:
            entry["pred"][row.trial] = data["pred"]
    return out
