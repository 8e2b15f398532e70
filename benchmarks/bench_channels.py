"""Channel pruning's real speed-up: dense, channel-pruned (slim) and unstructured models side by side.

    python benchmarks/bench_channels.py [--arch fpn] [--encoder resnet101] [--size 512 512]
        [--sparsities 0.5,0.7,0.9] [--threads 2] [--repeats 10] [--device cpu]

For each channel sparsity the model's channel groups are masked (magnitude ranking on the random
initial weights: latency depends on shapes, not values) and cut out (`channels.shrink`); its
unstructured twin is masked element-wise to the same number of non-zero weights. One row per
model: parameters (physical), non-zero parameters, GMACs, compact fp16 size and batch-1 latency.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
from datetime import UTC, datetime

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
from torch import nn  # noqa: E402

from trainables.compact import compact_bytes  # noqa: E402
from trainables.config import ModelConfig, PruningConfig  # noqa: E402
from trainables.cost import cpu_name, gmacs, latency_ms  # noqa: E402
from trainables.models import build_model  # noqa: E402
from trainables.pruning import channels  # noqa: E402
from trainables.pruning.pruner import Pruner  # noqa: E402


def masked(model: nn.Module, sparsity: float, granularity: str) -> tuple[nn.Module, Pruner]:
    model = copy.deepcopy(model)
    cfg = PruningConfig(pruner="magnitude", sparsity=sparsity, steps=1, granularity=granularity)
    pruner = Pruner(cfg, model, prune_epochs=1, iters_per_epoch=1)
    pruner.end_of_epoch(1)
    return model, pruner


def element_twin(model: nn.Module, nonzero: int) -> nn.Module:
    """Element-wise masks leaving `nonzero` non-zero parameters in all (head, BN, biases dense)."""
    probe = Pruner(
        PruningConfig(pruner="magnitude", sparsity=0.5, steps=1),
        model,
        prune_epochs=1,
        iters_per_epoch=1,
    )
    prunable = sum(m.numel() for m in probe.masks.masks.values())
    rest = sum(p.numel() for p in model.parameters()) - prunable
    sparsity = min(max(1 - (nonzero - rest) / prunable, 0.0), 0.99)
    return masked(model, sparsity, "element")[0]


def row(name: str, model: nn.Module, x: torch.Tensor, repeats: int) -> dict:
    model = model.eval().to(x.device)
    times = latency_ms(model, x, repeats)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "nonzero": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
        "gmacs": gmacs(model, x),
        "fp16_mib": compact_bytes(model.cpu(), fp16=True) / 2**20,
        "p50": statistics.median(times),
        "p90": times[min(len(times) - 1, int(0.9 * len(times)))],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fpn")
    p.add_argument("--encoder", default="resnet101")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--sparsities", default="0.5,0.7,0.9")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dense = build_model(ModelConfig(arch=args.arch, encoder=args.encoder, encoder_weights=None), 4)
    x = torch.randn(1, 3, *args.size, device=args.device)
    rows = [row("dense", dense, x, args.repeats)]
    for s in (float(v) for v in args.sparsities.split(",")):
        model, pruner = masked(dense, s, "channel")
        slim = channels.shrink(model, pruner.groups, pruner.channel_keeps())
        rows.append(row(f"channel {s:g}", slim, x, args.repeats))
        rows.append(
            row(
                f"element, same non-zeros as channel {s:g}",
                element_twin(dense, rows[-1]["nonzero"]),
                x,
                args.repeats,
            )
        )
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(
        f"# {args.arch} / {args.encoder}, batch 1, {args.size[0]}x{args.size[1]}, {args.device} "
        f"({name}), {args.threads} thread(s), {args.repeats} runs, torch {torch.__version__}, "
        f"{datetime.now(UTC):%Y-%m-%d}"
    )
    print(
        "| model | params | non-zero | GMACs | compact fp16 MiB | latency ms p50 / p90 | speed-up |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['model']} | {r['params']:,} | {r['nonzero']:,} | {r['gmacs']:.2f} | "
            f"{r['fp16_mib']:.1f} | {r['p50']:.1f} / {r['p90']:.1f} | {rows[0]['p50'] / r['p50']:.2f}x |"
        )


if __name__ == "__main__":
    main()
