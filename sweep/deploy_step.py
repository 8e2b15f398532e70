"""A finished trial's INT8 record: its final model as static INT8 ONNX, scored on the test split
and timed beside fp32 (the sweep's `deploy_int8` option; run where the trial ran). No Ray.

`<trial>/deploy/` gets `model.onnx` (fp32, the INT8 model's source), `model.int8.onnx` and
`int8.json`, written last and atomically: a trial with `int8.json` is done, whatever it says.
The record's reader is light (the report reads it); torch, onnx and the data load only to write.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainables.errors import UserError

if TYPE_CHECKING:
    from deploy.artefacts import Artefact
    from trainables.config import TrialConfig

DEPLOY_DIR = "deploy"
FP32_MODEL = "model.onnx"
INT8_MODEL = "model.int8.onnx"
RECORD = "int8.json"
FORMAT = "corroprune-int8-v1"
EXPORTED, REFUSED = "exported", "refused"


def record_path(trial_dir: Path) -> Path:
    return Path(trial_dir) / DEPLOY_DIR / RECORD


def read_record(trial_dir: Path) -> dict[str, Any] | None:
    """The trial's INT8 record; None when it has none (or an unreadable one, which is redone)."""
    try:
        record = json.loads(record_path(trial_dir).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("format") == FORMAT else None


def _finished_trial(trial_dir: Path) -> tuple[dict[str, Any], Path]:
    """final.json and checkpoints/final.pt of a finished trial, or a UserError naming what lacks."""
    final_json, final_pt = trial_dir / "final.json", trial_dir / "checkpoints" / "final.pt"
    if not trial_dir.is_dir():
        raise UserError(f"trial folder not found: {trial_dir}")
    try:
        final = json.loads(final_json.read_text())
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{trial_dir} is not a finished trial: no readable final.json") from None
    if not final_pt.is_file():
        raise UserError(f"{trial_dir} has final.json but no checkpoints/final.pt to export")
    return final, final_pt


@dataclass(frozen=True)
class Timing:
    """How the trial timed its fp32 model (batch 1), and so how its INT8 model is timed."""

    size: tuple[int, int]  # the test images' (padded) size
    threads: int
    repeats: int  # 0: not timed

    def as_record(self) -> dict[str, Any]:
        return {"size": list(self.size), "threads": self.threads, "repeats": self.repeats}


def trial_timing(final: dict[str, Any], cfg: TrialConfig) -> Timing:
    """From final.json's `inference` block; for a run from before it existed, the first test
    image's size and this process's torch threads."""
    import torch

    from deploy.evaluate import split_dataset

    block = final.get("inference") if isinstance(final.get("inference"), dict) else {}
    size = block.get("size") or split_dataset(cfg.data, "test")[0][0].shape[-2:]
    threads = int(block.get("threads") or torch.get_num_threads())
    return Timing((int(size[0]), int(size[1])), threads, cfg.runtime.latency_repeats)


def _export(source: Artefact, out: Path, timing: Timing) -> dict[str, Any]:
    """fp32 ONNX of the deployable (slim) model, then its static INT8 model checked against it."""
    from deploy.artefacts import load_artefact
    from deploy.export import Int8Settings, export_onnx, export_onnx_int8

    h, w = timing.size
    export_onnx(source.model, source.cfg, out / FP32_MODEL, height=h, width=w)
    fp32 = load_artefact(out / FP32_MODEL, threads=timing.threads)
    check, used = export_onnx_int8(fp32, out / INT8_MODEL, Int8Settings(size=(h, w)))
    return {
        "agreement": check.agreement,
        "agreement_images": check.images,
        "agreement_held_out": check.held_out,
        "max_logit_diff": check.max_logit_diff,
        "calibration_images": used,
    }


def _latency(path: Path, timing: Timing) -> tuple[float | None, float | None]:
    """Median and 90th percentile batch-1 latency (ms) of an ONNX model; None when not timed."""
    if not timing.repeats:
        return None, None
    from deploy.bench_infer import measure

    cost = measure(path, *timing.size, timing.repeats, timing.threads, "cpu")
    return round(cost.latency_ms, 3), round(cost.latency_p90_ms, 3)


def _score_and_time(out: Path, timing: Timing) -> dict[str, Any]:
    """The INT8 model's test scores (the trials' own metric) and the latency of both models."""
    from deploy.artefacts import load_artefact
    from deploy.evaluate import evaluate, evaluation_data

    int8 = load_artefact(out / INT8_MODEL, threads=timing.threads)
    scores = evaluate(int8, evaluation_data(int8, None, None), "test")
    int8_ms, int8_p90 = _latency(out / INT8_MODEL, timing)
    fp32_ms, fp32_p90 = _latency(out / FP32_MODEL, timing)
    return {
        "test_miou": scores["miou"],
        "test_miou_corrosion": scores["miou_corrosion"],
        "test_iou": scores["iou"],
        "test_images": scores["images"],
        "latency_ms": int8_ms,
        "latency_p90_ms": int8_p90,
        "fp32_onnx_latency_ms": fp32_ms,
        "fp32_onnx_latency_p90_ms": fp32_p90,
        "file_mib": round((out / INT8_MODEL).stat().st_size / 2**20, 4),
        "fp32_onnx_file_mib": round((out / FP32_MODEL).stat().st_size / 2**20, 4),
    }


def deploy_int8(trial_dir: Path) -> dict[str, Any]:
    """The trial's INT8 record, made if it has none: exports, scores and times its final model
    as static INT8 ONNX, with the threads, image size and repeats the trial timed fp32 with.

    An export the exporter refuses (INT8 disagreeing with fp32, calibration data not found) is
    recorded with its reason rather than raised; the record is written last, atomically, and a
    trial that has one is left alone (delete `<trial>/deploy/` to redo it). A folder that is not
    a finished trial, or an unreadable final.pt, is a UserError and writes nothing.
    """
    from deploy.artefacts import load_artefact
    from trainables.checkpoint import write_json
    from trainables.cost import cpu_name

    trial_dir = Path(trial_dir).resolve()
    done = read_record(trial_dir)
    if done is not None:
        return done
    final, checkpoint = _finished_trial(trial_dir)
    source = load_artefact(checkpoint)  # the deployable model: slim when channel-pruned
    started = time.perf_counter()
    record: dict[str, Any] = {"format": FORMAT, "runtime": "onnxruntime-int8"}
    timing: Timing | None = None
    try:
        timing = trial_timing(final, source.cfg)
        out = trial_dir / DEPLOY_DIR
        record.update(status=EXPORTED, reason=None, **_export(source, out, timing))
        record.update(_score_and_time(out, timing))
    except UserError as err:
        record.update(status=REFUSED, reason=str(err))
    record.update(
        cpu=cpu_name(),
        hostname=socket.gethostname(),
        **(timing.as_record() if timing else {}),
        time_s=round(time.perf_counter() - started, 3),
        written_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    write_json(record_path(trial_dir), record)
    return record


def needs_int8(trial_dir: Path) -> bool:
    """A finished trial (final.json) without its INT8 record."""
    return (Path(trial_dir) / "final.json").exists() and read_record(trial_dir) is None
