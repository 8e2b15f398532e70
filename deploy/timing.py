"""A model's batch-1 latency in a deployment runtime, measured on this machine's CPU: torch eager,
ONNX Runtime fp32, or static INT8 through ONNX Runtime.

Preparing (exporting, calibrating) and timing are two steps, so that a caller can keep other work
off the CPU for the timing alone (the budget search's quiet room, sweep/budget.py).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from trainables.config import TrialConfig
from trainables.cost import cpu_name, latency_ms

RUNTIMES = ("onnx", "onnx-int8", "torch")
FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx"}


@dataclass(frozen=True)
class TimingSetup:
    """How every model of one comparison is timed."""

    runtime: str  # one of RUNTIMES
    size: tuple[int, int]  # (H, W) of the input, batch 1
    threads: int
    repeats: int  # at least this many timed runs ...
    warmup: int = 5
    min_time_s: float = 1.0  # ... and as many more as fill this long (small models: noise)
    rounds: int = 3  # `time_rounds`: the runs split into this many rounds, the fastest kept

    def as_record(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "size": list(self.size),
            "threads": self.threads,
            "repeats": self.repeats,
            "rounds": self.rounds,
            "cpu": cpu_name(),
        }


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def prepare(model: nn.Module, cfg: TrialConfig, setup: TimingSetup, folder: Path) -> Any:
    """What runs in the chosen runtime: the model itself (torch, eval mode, on CPU) or its ONNX
    export in `folder` (INT8: calibrated on the model's own training images, as `corroprune
    export --format onnx-int8` does; a refused export raises its UserError)."""
    from deploy.artefacts import load_artefact
    from deploy.export import Int8Settings, export_onnx, export_onnx_int8

    model = model.cpu().eval()
    if setup.runtime == "torch":
        return model
    folder.mkdir(parents=True, exist_ok=True)
    h, w = setup.size
    fp32 = folder / FILES["onnx"]
    with torch_threads(setup.threads):
        export_onnx(model, cfg, fp32, height=h, width=w)
    if setup.runtime == "onnx":
        return load_artefact(fp32, threads=setup.threads)
    int8 = folder / FILES["onnx-int8"]
    source = load_artefact(fp32, threads=setup.threads)
    export_onnx_int8(source, int8, Int8Settings(size=(h, w)))
    return load_artefact(int8, threads=setup.threads)


def time_prepared(runner: Any, setup: TimingSetup) -> dict[str, float]:
    """Median and 90th percentile of batch-1 runs in ms: `setup.repeats` of them, or as many as
    fill `setup.min_time_s` (at most 2,000), after `setup.warmup` untimed ones."""
    h, w = setup.size
    x: Any = np.random.default_rng(0).standard_normal((1, 3, h, w), np.float32)  # (1, 3, H, W)
    if isinstance(runner, nn.Module):
        x = torch.from_numpy(x)
    with torch_threads(setup.threads):
        probe = latency_ms(runner, x, 1, setup.warmup)[0] / 1000  # s, warmed up
        runs = min(max(setup.repeats, 1, math.ceil(setup.min_time_s / max(probe, 1e-6))), 2000)
        times = latency_ms(runner, x, runs, warmup=0)
    return {
        "latency_ms": round(statistics.median(times), 4),
        "latency_p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 4),
        "timed_runs": runs,
    }


def time_rounds(runners: dict[str, Any], setup: TimingSetup) -> dict[str, dict[str, float]]:
    """Every runner timed in `setup.rounds` interleaved rounds (each round times every runner,
    with a share of `setup.repeats` and `setup.min_time_s`); kept per runner, its round with the
    lowest median. Prepare every runner before calling: a model timed right after its export (or
    another's) can run 20-50 % slow for a while on these machines, and whatever slows a round
    only adds time, so the fastest round is the model's own speed."""
    rounds = max(1, setup.rounds)
    share = replace(
        setup,
        repeats=max(1, math.ceil(setup.repeats / rounds)),
        min_time_s=setup.min_time_s / rounds,
    )
    best: dict[str, dict[str, float]] = {}
    runs: dict[str, int] = {}
    for _ in range(rounds):
        for key, runner in runners.items():
            timing = time_prepared(runner, share)
            runs[key] = runs.get(key, 0) + timing["timed_runs"]
            if key not in best or timing["latency_ms"] < best[key]["latency_ms"]:
                best[key] = timing
    return {key: {**best[key], "timed_runs": runs[key]} for key in runners}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
