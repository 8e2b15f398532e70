"""What a model costs to run: MACs, batch-1 latency, and the record a trial keeps of it."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from trainables.compact import compact_bytes


def cpu_name() -> str:
    """The CPU's model name (for benchmark headers)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def latency_ms(model: Callable[[Any], Any], x: Any, repeats: int, warmup: int = 3) -> list[float]:
    """Sorted wall times of `repeats` calls `model(x)` after `warmup` ones (synchronised on
    CUDA). `model` is a torch module or anything else that runs a batch (an ONNX Runtime
    artefact, with `x` a numpy array)."""
    cuda = isinstance(x, torch.Tensor) and x.device.type == "cuda"
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


def fp32_bytes(model: nn.Module) -> int:
    """Bytes of the model's floating-point tensors (parameters and buffers) stored as fp32."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if t.is_floating_point())


def inference_summary(
    deployable: nn.Module, size: tuple[int, int], repeats: int, dense_bytes: int
) -> dict[str, Any]:
    """What a trial records of its final model's cost: parameters, MACs, file sizes and (when
    `repeats` > 0) batch-1 CPU latency with the process's torch threads, at `size`.
    `dense_bytes`: `fp32_bytes` of the full-size model, before any channel surgery."""
    deployable = deployable.eval().cpu()
    x = torch.randn(1, 3, *size)
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
