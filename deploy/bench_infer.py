"""Inference cost of models side by side: runtime, latency, parameters, MACs, file size, peak memory.

Each model is measured in a fresh process, so peak memory is its own and not the previous one's.
Any artefact runs: a checkpoint or compact file through torch, an ONNX file through ONNX Runtime.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from deploy.artefacts import Artefact, TorchRunner, load_artefact, onnx_module
from trainables.cost import gmacs, latency_ms


@dataclass(frozen=True)
class InferenceCost:
    model: str
    runtime: str  # torch | onnxruntime | onnxruntime-int8
    arch: str
    encoder: str
    params: int  # ONNX: elements of the graph's initializers (BatchNorm folded into convolutions)
    nonzero_params: int
    gmacs: float | None  # dense multiply-accumulates (zeros still cost); torch models only
    file_mib: float
    latency_ms: float  # median, batch 1
    latency_p90_ms: float
    peak_rss_mib: float
    device: str


def parameter_counts(artefact: Artefact) -> tuple[int, int]:
    """(elements, non-zero elements) of the model's parameters, or of an ONNX graph's weights."""
    if isinstance(artefact.runner, TorchRunner):
        params = list(artefact.model.parameters())
        return sum(p.numel() for p in params), sum(int(torch.count_nonzero(p)) for p in params)
    onnx = onnx_module()
    arrays = [
        onnx.numpy_helper.to_array(t) for t in onnx.load(str(artefact.path)).graph.initializer
    ]
    return sum(a.size for a in arrays), sum(int(np.count_nonzero(a)) for a in arrays)


def measure(
    path: Path, height: int, width: int, repeats: int, threads: int, device: str
) -> InferenceCost:
    artefact = load_artefact(path, threads=threads, device=device)
    torch_model = isinstance(artefact.runner, TorchRunner)
    if torch_model:
        x = torch.randn(1, 3, height, width, device=torch.device(device))  # (1, 3, H, W)
        macs = gmacs(artefact.model, x)
    else:
        x, macs = np.random.default_rng(0).standard_normal((1, 3, height, width), np.float32), None
    times = latency_ms(artefact, x, repeats)
    params, nonzero = parameter_counts(artefact)
    cfg = artefact.cfg
    return InferenceCost(
        model=str(path),
        runtime=artefact.runtime,
        arch=cfg.model.arch if cfg else "?",
        encoder=cfg.model.encoder if cfg else "?",
        params=params,
        nonzero_params=nonzero,
        gmacs=macs,
        file_mib=path.stat().st_size / 2**20,
        latency_ms=statistics.median(times),
        latency_p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device=device,
    )


def _worker(args: tuple) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return asdict(measure(*args))


def bench(
    paths: list[Path], height: int, width: int, repeats: int, threads: int, device: str
) -> list[InferenceCost]:
    """Each model in its own spawned process, one after the other (never concurrently)."""
    ctx = mp.get_context("spawn")
    results = []
    for path in paths:
        with ctx.Pool(1) as pool:
            results.append(
                InferenceCost(
                    **pool.apply(_worker, ((path, height, width, repeats, threads, device),))
                )
            )
    return results


def label(path: Path) -> str:
    """`trial/final.pt` for a run's checkpoint, else the file name."""
    return (
        f"{path.parent.parent.name}/{path.name}" if path.parent.name == "checkpoints" else path.name
    )


def table(results: list[InferenceCost]) -> str:
    rows = [
        "| model | runtime | arch / encoder | params | non-zero | GMACs | file MiB | latency ms (p50 / p90) | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        macs = f"{r.gmacs:.2f}" if r.gmacs is not None else "n/a"
        rows.append(
            f"| {label(Path(r.model))} | {r.runtime} | {r.arch} / {r.encoder} | {r.params:,} | "
            f"{r.nonzero_params:,} | {macs} | {r.file_mib:.1f} | "
            f"{r.latency_ms:.1f} / {r.latency_p90_ms:.1f} | {r.peak_rss_mib:.0f} |"
        )
    return "\n".join(rows)
