"""Inference cost of models side by side: latency, parameters, MACs, file size and peak memory.

Each model is measured in a fresh process, so peak memory is its own and not the previous one's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


@dataclass(frozen=True)
class InferenceCost:
    model: str
    arch: str
    encoder: str
    params: int
    nonzero_params: int
    gmacs: float  # dense multiply-accumulates: zeros in dense kernels still cost
    file_mib: float
    latency_ms: float  # median, batch 1
    latency_p90_ms: float
    peak_rss_mib: float
    device: str


def _load(path: Path):
    from trainables.errors import UserError

    if path.suffix == ".safetensors":
        from trainables.export import load_compact

        return load_compact(path)
    from trainables.trial import model_from_checkpoint

    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return model_from_checkpoint(path)


def cpu_name() -> str:
    """The CPU's model name (for benchmark headers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int, warmup: int = 3) -> list[float]:
    """Sorted wall times of `repeats` forward passes after `warmup` ones (synchronised on CUDA)."""
    cuda = x.device.type == "cuda"
    times = []
    with torch.no_grad():
        for i in range(repeats + warmup):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if cuda:
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return sorted(times)


def gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates of one forward pass, dense kernels (zeros still cost)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2e9


def measure(
    path: Path, height: int, width: int, repeats: int, threads: int, device: str
) -> InferenceCost:
    torch.set_num_threads(threads)
    model, cfg = _load(path)
    dev = torch.device(device)
    model = model.eval().to(dev)
    x = torch.randn(1, 3, height, width, device=dev)
    macs = gmacs(model, x)
    times = latency_ms(model, x, repeats)
    params = sum(p.numel() for p in model.parameters())
    return InferenceCost(
        model=str(path),
        arch=cfg.model.arch,
        encoder=cfg.model.encoder,
        params=params,
        nonzero_params=sum(int(torch.count_nonzero(p)) for p in model.parameters()),
        gmacs=macs,
        file_mib=path.stat().st_size / 2**20,
        latency_ms=statistics.median(times),
        latency_p90_ms=times[min(len(times) - 1, int(0.9 * len(times)))],
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        device=device,
    )


def inference_summary(
    full: nn.Module, deployable: nn.Module, size: tuple[int, int], repeats: int
) -> dict[str, Any]:
    """What a trial records of its final model's cost: parameters, MACs, file sizes and (when
    `repeats` > 0) batch-1 CPU latency with the process's torch threads, at `size`. `full` (the
    model before any channel surgery, on any device) only gives the dense file size."""
    from trainables.export import compact_bytes

    deployable = deployable.eval().cpu()
    x = torch.randn(1, 3, *size)
    dense_bytes = sum(t.numel() * 4 for t in full.state_dict().values() if t.is_floating_point())
    return {
        "params": sum(p.numel() for p in deployable.parameters()),
        "nonzero_params": sum(int(torch.count_nonzero(p)) for p in deployable.parameters()),
        "gmacs": round(gmacs(deployable, x), 4),
        "size": list(size),
        "dense_fp32_mib": round(dense_bytes / 2**20, 4),
        "compact_mib": round(compact_bytes(deployable, fp16=False) / 2**20, 4),
        "compact_fp16_mib": round(compact_bytes(deployable, fp16=True) / 2**20, 4),
        "latency_ms": (
            round(statistics.median(latency_ms(deployable, x, repeats)), 3) if repeats else None
        ),
        "latency_device": "cpu",
        "threads": torch.get_num_threads(),
    }


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
        "| model | arch / encoder | params | non-zero | GMACs | file MiB | latency ms (p50 / p90) | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        rows.append(
            f"| {label(Path(r.model))} | {r.arch} / {r.encoder} | {r.params:,} | {r.nonzero_params:,} | "
            f"{r.gmacs:.2f} | {r.file_mib:.1f} | {r.latency_ms:.1f} / {r.latency_p90_ms:.1f} | "
            f"{r.peak_rss_mib:.0f} |"
        )
    return "\n".join(rows)
