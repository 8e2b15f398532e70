"""Latency for the report, measured alone in one quiet process: each deployable architecture once.

A trial times its model while other trials run beside it on the same machine, so its figure is
noise. Here every finished trial's deployable architecture is rebuilt (dense and element-pruned
trials: the dense net, since an unstructured model runs at dense speed; channel-pruned trials: the
slim net cut from final.pt), each distinct one is timed once, serially, and the result is written
to RUN_DIR/latency.json. The report's results table takes its latency from there.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import statistics
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sweep.identity import DENSE, ELEMENT
from trainables.config import TrialConfig
from trainables.errors import UserError

if TYPE_CHECKING:
    from torch import nn

LATENCY_FILE = "latency.json"
FORMAT = "corroprune-latency-v1"
MEASURED_ALONE = "measured alone"
IN_TRIAL = "in-trial (other trials ran beside it)"
MEASURE_HINT = "run `corroprune report RUN_DIR --measure-latency`"
DEFAULT_REPEATS = 20
WARMUP = 3  # untimed forward passes before the timed ones
BUSY_LOAD_PER_CORE = 0.5  # 1-minute load average per core above which timings are suspect
# An element trial's dense trial: the same identity but pruner (sweep.identity: TrialId.base).
DENSE_KEYS = ("dataset", "model", "encoder", "seed")


@dataclass(frozen=True)
class Architecture:
    """One distinct deployable architecture, the trials that deploy it, and its batch-1 latency."""

    signature: str  # hash of the model class, input size and (name, shape) of every tensor
    trials: tuple[str, ...]
    arch: str
    encoder: str
    deploys: str  # "dense" (dense and element-pruned trials) or "slim" (channel-pruned)
    params: int
    size: tuple[int, int]
    latency_ms: float  # median
    latency_p90_ms: float


@dataclass(frozen=True)
class LatencyTable:
    """latency.json: the machine block, one entry per architecture, and the trials not measured."""

    machine: dict[str, Any]
    architectures: tuple[Architecture, ...]
    skipped: tuple[str, ...] = ()  # "trial: why" for finished trials that could not be measured

    @property
    def device(self) -> str:
        return measured_device(self.machine)

    def by_trial(self) -> dict[str, Architecture]:
        return {trial: a for a in self.architectures for trial in a.trials}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "machine": self.machine,
            "architectures": [asdict(a) for a in self.architectures],
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LatencyTable:
        archs = tuple(
            Architecture(**{**a, "trials": tuple(a["trials"]), "size": tuple(a["size"])})
            for a in data["architectures"]
        )
        return cls(dict(data["machine"]), archs, tuple(data.get("skipped") or ()))


def measured_device(machine: dict[str, Any]) -> str:
    """Where latency.json's figures come from, as the results table's `latency_device`."""
    return f"cpu: {machine.get('cpu')}, {_threads(machine.get('threads'))}, {MEASURED_ALONE}"


def _threads(n: Any) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def default_threads() -> int:
    return min(4, os.cpu_count() or 1)


def busy_warning(load: float | None, cores: int, threads: int) -> str | None:
    """Why timings on this machine may be noisy now, or None."""
    problems = []
    if load is not None and load > BUSY_LOAD_PER_CORE * cores:
        problems.append(f"the machine looks busy (1-minute load {load:.2f} on {cores} cores)")
    if threads > cores:
        problems.append(f"{threads} threads on {cores} cores")
    if not problems:
        return None
    return "; ".join(problems) + ": latencies may be inflated; measure again on a quiet machine"


def machine_block(threads: int, repeats: int) -> dict[str, Any]:
    import torch

    from trainables.cost import cpu_name

    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_name(),
        "cores": cores,
        "threads": threads,
        "torch": torch.__version__,
        "hostname": socket.gethostname(),
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "repeats": repeats,
        "warmup": WARMUP,
        "batch": 1,
        "load_1min": load,
        "warning": busy_warning(load, cores, threads),
    }


def finished_trials(run_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(trial folder, final.json) of every finished trial, by name."""
    trials = Path(run_dir) / "trials"
    found = []
    for trial_dir in sorted(trials.iterdir()) if trials.is_dir() else []:
        try:
            final = json.loads((trial_dir / "final.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(final, dict):
            found.append((trial_dir, final))
    return found


def image_size(cfg: TrialConfig, final: dict[str, Any]) -> tuple[int, int]:
    """The test images' size the trial recorded (final.json inference.size), else its crop size."""
    size = (final.get("inference") or {}).get("size")
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
        return size[0], size[1]
    return cfg.data.crop_size, cfg.data.crop_size


def is_channel_pruned(cfg: TrialConfig) -> bool:
    """Structured (channel or coupled) pruning: the trial deploys a slim model of its own."""
    from trainables.config import STRUCTURED

    return cfg.pruned and cfg.pruning.granularity in STRUCTURED


def deployable(trial_dir: Path, cfg: TrialConfig) -> nn.Module:
    """What the trial deploys: the slim model cut from its final.pt when channel-pruned, else the
    dense architecture with random weights (zeros in dense kernels cost as much as any weight)."""
    if is_channel_pruned(cfg):
        from deploy.artefacts import model_from_checkpoint

        model, _ = model_from_checkpoint(trial_dir / "checkpoints" / "final.pt")  # masks -> slim
        return model.eval()
    from trainables.models import build_model

    dense = cfg.replace(model={"encoder_weights": None})
    return build_model(dense.model, dense.data.classes).eval()


def signature(model: nn.Module, size: tuple[int, int]) -> str:
    """Equal for two models exactly when they run the same computation graph at `size`."""
    shapes = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    blob = json.dumps([type(model).__name__, list(size), shapes])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def time_model(model: nn.Module, size: tuple[int, int], repeats: int) -> tuple[float, float]:
    """Median and p90 wall time (ms) of batch-1 forward passes with this process's torch threads."""
    import torch

    from trainables import cost

    x = torch.randn(1, 3, *size)  # (1, 3, H, W)
    times = cost.latency_ms(model.eval(), x, repeats, warmup=WARMUP)  # sorted
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def _resolve(
    trial_dir: Path,
    final: dict[str, Any],
    size: tuple[int, int] | None,
    dense_signatures: dict[tuple, str],
) -> tuple[TrialConfig, tuple[int, int], str, nn.Module | None]:
    """A trial's config, image size and deployable's signature; the model only when it had to be
    built (a dense architecture already seen is known by its key, not rebuilt)."""
    cfg = TrialConfig.from_dict(_read_config(trial_dir))
    at = size or image_size(cfg, final)
    key = (cfg.model.arch, cfg.model.encoder, cfg.data.classes, at)
    if not is_channel_pruned(cfg) and key in dense_signatures:
        return cfg, at, dense_signatures[key], None
    model = deployable(trial_dir, cfg)
    sig = signature(model, at)
    if not is_channel_pruned(cfg):
        dense_signatures[key] = sig
    return cfg, at, sig, model


def _measure_trials(
    trials: list[tuple[Path, dict[str, Any]]],
    repeats: int,
    size: tuple[int, int] | None,
    echo: Callable[[str], None],
) -> tuple[list[Architecture], list[str]]:
    """Time each distinct deployable once, in trial order; the trials sharing it join it."""
    measured: dict[str, Architecture] = {}
    dense_signatures: dict[tuple, str] = {}  # (arch, encoder, classes, size) -> signature
    skipped = []
    for trial_dir, final in trials:
        try:
            cfg, at, sig, model = _resolve(trial_dir, final, size, dense_signatures)
        except (UserError, OSError, RuntimeError, ValueError, KeyError) as err:
            skipped.append(f"{trial_dir.name}: {str(err).splitlines()[0] if str(err) else err!r}")
            continue
        if sig in measured:
            measured[sig] = replace(measured[sig], trials=(*measured[sig].trials, trial_dir.name))
            continue
        median, p90 = time_model(model, at, repeats)
        measured[sig] = Architecture(
            signature=sig,
            trials=(trial_dir.name,),
            arch=cfg.model.arch,
            encoder=cfg.model.encoder,
            deploys="slim" if is_channel_pruned(cfg) else "dense",
            params=sum(p.numel() for p in model.parameters()),
            size=at,
            latency_ms=round(median, 3),
            latency_p90_ms=round(p90, 3),
        )
        echo(describe(measured[sig]))
    return list(measured.values()), skipped


def _read_config(trial_dir: Path) -> dict[str, Any]:
    import yaml

    try:
        config = yaml.safe_load((trial_dir / "config.yaml").read_text())
    except yaml.YAMLError as err:
        raise UserError(f"config.yaml unreadable: {err}") from None
    if not isinstance(config, dict):
        raise UserError("config.yaml holds no trial config")
    return config


def describe(entry: Architecture) -> str:
    """One line per architecture, as the CLI prints it."""
    h, w = entry.size
    return (
        f"  {entry.signature}  {entry.arch}/{entry.encoder} {entry.deploys} {h}x{w}, "
        f"{entry.params:,} params: {entry.latency_ms:.2f} ms median, "
        f"{entry.latency_p90_ms:.2f} ms p90 (first trial {entry.trials[0]})"
    )


def measure_run_latency(
    run_dir: Path,
    threads: int | None = None,
    repeats: int = DEFAULT_REPEATS,
    size: tuple[int, int] | None = None,
    echo: Callable[[str], None] | None = None,
) -> LatencyTable:
    """Time every distinct deployable architecture of a run's finished trials once, alone in
    this process, and write RUN_DIR/latency.json (replacing any earlier one; trial folders are
    only read). `size` overrides each trial's test image size; `echo` receives progress lines."""
    threads = default_threads() if threads is None else threads
    if threads < 1:
        raise UserError(f"--threads must be 1 or more (got {threads})")
    if repeats < 1:
        raise UserError(f"--repeats must be 1 or more (got {repeats})")
    if size is not None and min(size) < 1:
        raise UserError(f"latency image size must be positive (got {size})")
    echo = echo or (lambda line: None)
    run_dir = Path(run_dir)
    trials = finished_trials(run_dir)
    if not trials:
        raise UserError(f"{run_dir} has no finished trials (no trials/*/final.json) to measure")
    machine = machine_block(threads, repeats)
    if machine["warning"]:
        echo(f"warning: {machine['warning']}")
    echo(
        f"measuring latency alone: {machine['cpu']}, {_threads(threads)}, batch 1, "
        f"median of {repeats} after {WARMUP} warm-up, torch {machine['torch']}, "
        f"on {machine['hostname']}"
    )
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        archs, skipped = _measure_trials(trials, repeats, size, echo)
    finally:
        torch.set_num_threads(previous)
    for note in skipped:
        echo(f"  not measured: {note}")
    if not archs:
        raise UserError(f"no finished trial of {run_dir} could be measured: {'; '.join(skipped)}")
    from trainables.checkpoint import write_json

    table = LatencyTable(machine, tuple(archs), tuple(skipped))
    write_json(run_dir / LATENCY_FILE, table.to_dict())
    n = sum(len(a.trials) for a in archs)
    echo(f"wrote {run_dir / LATENCY_FILE}: {len(archs)} architectures for {n} trials")
    return table


def read_latency(run_dir: Path) -> LatencyTable | None:
    """RUN_DIR/latency.json, or None when there is none (an unreadable one warns)."""
    path = Path(run_dir) / LATENCY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
        return LatencyTable.from_dict(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        warnings.warn(f"{path} ignored: {err}", stacklevel=2)
        return None


def apply_measured_latency(results: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    """A copy of `results` with honest latencies and a `latency_source` column.

    Trials covered by RUN_DIR/latency.json take its figure and are labelled measured alone.
    Element-pruned trials not covered but timed in-trial take their dense trial's figure (same
    dataset, model, encoder and seed where those columns exist): an unstructured model runs at
    dense speed, so its own in-trial time differs from the dense one by noise only. Everything
    else keeps its in-trial figure, labelled as such; a trial without any figure stays NaN.
    """
    out = results.copy()
    out["latency_ms"] = (
        pd.to_numeric(out["latency_ms"], errors="coerce") if "latency_ms" in out else math.nan
    )
    if "latency_device" not in out:
        out["latency_device"] = None
    out["latency_device"] = out["latency_device"].astype(object)
    out["latency_source"] = pd.Series(None, index=out.index, dtype=object)
    out.loc[out["latency_ms"].notna(), "latency_source"] = IN_TRIAL
    covered = pd.Series(False, index=out.index)
    table = read_latency(run_dir)
    if table is not None and "trial" in out:
        by_trial = table.by_trial()
        covered = out["trial"].isin(list(by_trial))
        out.loc[covered, "latency_ms"] = [by_trial[t].latency_ms for t in out["trial"][covered]]
        out.loc[covered, "latency_device"] = table.device
        out.loc[covered, "latency_source"] = MEASURED_ALONE
    return _element_takes_dense(out, ~covered)


def _element_takes_dense(out: pd.DataFrame, open_rows: pd.Series) -> pd.DataFrame:
    """Timed, finished element-pruned rows among `open_rows` take their dense trial's latency."""
    if not {"pruner", "granularity"} <= set(out.columns) or out.empty:
        return out
    keys = [c for c in DENSE_KEYS if c in out]
    columns = ["latency_ms", "latency_device", "latency_source"]
    dense = out[(out["pruner"] == DENSE) & out["latency_ms"].notna()]
    lookup: dict[tuple, Any] = {}
    for index, row in dense.iterrows():
        lookup.setdefault(_key(row, keys), index)
    element = open_rows & (out["pruner"] != DENSE) & (out["granularity"] == ELEMENT)
    element &= out["latency_ms"].notna()  # timed in-trial: replace the noise, invent nothing
    if "status" in out:
        element &= out["status"] == "finished"
    for index in out.index[element]:
        ref = lookup.get(_key(out.loc[index], keys))
        if ref is not None:
            for column in columns:
                out.at[index, column] = out.at[ref, column]
    return out


def _key(row: pd.Series, keys: list[str]) -> tuple:
    return tuple(None if pd.isna(row[k]) else row[k] for k in keys)


def latency_note(rows: pd.DataFrame) -> str | None:
    """Where the latencies of `rows` were measured, for a figure's subtitle; None when the rows
    carry no `latency_source` (not passed through `apply_measured_latency`) or no latency."""
    if not {"latency_ms", "latency_source"} <= set(rows.columns):
        return None
    sources = rows.loc[rows["latency_ms"].notna(), "latency_source"]
    if sources.empty:
        return None
    in_trial = int((sources == IN_TRIAL).sum())
    if in_trial:
        return (
            f"latency of {in_trial} of {len(sources)} trials measured in-trial, other trials "
            f"beside it: noisy; {MEASURE_HINT}"
        )
    return (
        "latency measured alone, one architecture at a time after the sweep; "
        "element-pruned trials run at their dense model's speed"
    )
