"""Pruning's overhead: a training step with Taylor accumulation and masks against a dense step.

    python benchmarks/bench_pruning.py [--repeats 30] [--size 64] [--encoder tu-test_resnet]

Prints one row per architecture: ms per step dense and masked, their ratio, and the memory the
score accumulators add (one float32 per prunable weight).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from trainables.config import LossConfig, ModelConfig, OptimConfig, PruningConfig  # noqa: E402
from trainables.engine import build_loss, build_optimizer  # noqa: E402
from trainables.models import ARCHITECTURES, build_model  # noqa: E402
from trainables.pruning.pruner import Pruner  # noqa: E402


def step_times(arch: str, args: argparse.Namespace, pruned: bool) -> tuple[float, int]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, encoder=args.encoder, encoder_weights=None), 4)
    loss_fn = build_loss(LossConfig())
    optimizer, _ = build_optimizer(model, OptimConfig())
    pruner = None
    if pruned:
        cfg = PruningConfig(pruner="agp", sparsity=0.5, steps=1)
        pruner = Pruner(cfg, model, prune_epochs=1, iters_per_epoch=1)
        pruner.end_of_epoch(1)  # masks at 50 %, accumulators live
        pruner.scores = {n: torch.zeros_like(p) for n, p in pruner.masks.params.items()}
    x = torch.randn(args.batch, 3, args.size, args.size)
    y = torch.randint(0, 4, (args.batch, args.size, args.size))
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        if pruner is not None:
            pruner.after_backward()
            pruner.masks.mask_gradients()
        optimizer.step()
        if pruner is not None:
            pruner.after_step(optimizer)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    extra = sum(s.numel() * s.element_size() for s in pruner.scores.values()) if pruner else 0
    return statistics.median(times) * 1000, extra


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder", default="tu-test_resnet")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), encoder {args.encoder}, {args.size}px, batch {args.batch}, "
        f"median of {args.repeats} steps"
    )
    print("| model | dense ms/step | masked ms/step | ratio | accumulator memory |")
    print("| --- | --- | --- | --- | --- |")
    for arch in ARCHITECTURES:
        dense, _ = step_times(arch, args, pruned=False)
        masked, extra = step_times(arch, args, pruned=True)
        print(
            f"| {arch} | {dense:.1f} | {masked:.1f} | {masked / dense:.2f} | {extra / 2**20:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
