"""Pruning's overhead: a training step with Taylor accumulation and masks against a dense step.

    python benchmarks/bench_pruning.py [--repeats 30] [--size 64] [--encoder tu-test_resnet]
                                       [--archs fpn,manet] [--device auto]

Prints one row per architecture: ms per step dense and masked (timed alternately), their ratio,
the pruning work alone (Taylor accumulation, gradient masking, weight and momentum re-masking) and
what it adds to a dense step, and the memory the score accumulators add (one float32 per prunable
weight). The two steps' compute can differ by more than the pruning work: on a CPU, denormal
numbers in a randomly initialised model's gradients slow some convolutions, and zeroed weights
remove them (MA-Net; BENCHMARKS.md), so the added work is the column to compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from trainables.config import LossConfig, ModelConfig, OptimConfig, PruningConfig  # noqa: E402
from trainables.cost import cpu_name  # noqa: E402
from trainables.engine import build_loss, build_optimizer, resolve_device  # noqa: E402
from trainables.models import ARCHITECTURES, build_model  # noqa: E402
from trainables.pruning.pruner import Pruner  # noqa: E402


class Stepper:
    """One model, its optimizer and (for the masked one) an AGP pruner at 50 % with live Taylor
    accumulators; `step()` is one training step as the prune stage runs it."""

    def __init__(self, arch: str, args: argparse.Namespace, pruned: bool) -> None:
        torch.manual_seed(0)
        cfg = ModelConfig(arch=arch, encoder=args.encoder, encoder_weights=None)
        self.model = build_model(cfg, 4).to(args.device)
        self.loss_fn = build_loss(LossConfig()).to(args.device)
        self.optimizer, _ = build_optimizer(self.model, OptimConfig())
        self.pruner = None
        if pruned:
            cfg = PruningConfig(pruner="agp", sparsity=0.5, steps=1)
            self.pruner = Pruner(cfg, self.model, prune_epochs=1, iters_per_epoch=1)
            self.pruner.end_of_epoch(1)  # masks at 50 %, accumulators live
            params = self.pruner.masks.params.items()
            self.pruner.scores = {n: torch.zeros_like(p) for n, p in params}

    def step(self, x: torch.Tensor, y: torch.Tensor, sync: Callable[[], None]) -> float:
        """One step; returns the seconds its pruning work took (0 for the dense one)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.loss_fn(self.model(x), y).backward()
        hooks = 0.0
        if self.pruner is not None:
            sync()
            t0 = time.perf_counter()
            self.pruner.after_backward()
            self.pruner.masks.mask_gradients()
            sync()
            hooks += time.perf_counter() - t0
        self.optimizer.step()
        if self.pruner is not None:
            sync()
            t0 = time.perf_counter()
            self.pruner.after_step(self.optimizer)
            sync()
            hooks += time.perf_counter() - t0
        return hooks

    def accumulator_bytes(self) -> int:
        scores = self.pruner.scores.values() if self.pruner else ()
        return sum(s.numel() * s.element_size() for s in scores)


def step_times(arch: str, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per step, dense and masked, timed alternately (dense, masked, dense, ...) so
    that drift (allocator growth, frequency, other load) hits both alike; and the median ms of
    the masked step's pruning work alone (score accumulation, gradient, weight and momentum
    masking), which does not depend on the values flowing through the network."""
    device = args.device
    dense, masked = Stepper(arch, args, False), Stepper(arch, args, True)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 4, (args.batch, args.size, args.size), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"dense": [], "masked": [], "hooks": []}
    for i in range(args.warmup + args.repeats):
        for label, stepper in (("dense", dense), ("masked", masked)):
            sync()
            t0 = time.perf_counter()
            hooks = stepper.step(x, y, sync)
            sync()
            if i >= args.warmup:
                times[label].append(time.perf_counter() - t0)
                if label == "masked":
                    times["hooks"].append(hooks)
    out = {k: statistics.median(v) * 1000 for k, v in times.items()}
    return {**out, "accumulator_bytes": masked.accumulator_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--encoder", default="tu-test_resnet")
    parser.add_argument("--archs", default=",".join(ARCHITECTURES), help="comma list")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu")
    args = parser.parse_args()
    args.archs = [a for a in args.archs.split(",") if a]
    if not args.archs or any(a not in ARCHITECTURES for a in args.archs):
        parser.error(f"--archs: a comma list of {', '.join(ARCHITECTURES)}")
    args.device = resolve_device(args.device)
    torch.set_num_threads(args.threads)
    where = cpu_name() if args.device.type == "cpu" else torch.cuda.get_device_name(args.device)
    print(
        f"# {where}, torch {torch.__version__}, "
        f"{args.threads} thread(s), encoder {args.encoder}, {args.size}px, batch {args.batch}, "
        f"median of {args.repeats} steps each, dense and masked alternating"
    )
    print(
        "| model | dense ms/step | masked ms/step | ratio | pruning work ms/step "
        "| dense + pruning work / dense | accumulator memory |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in args.archs:
        t = step_times(arch, args)
        print(
            f"| {arch} | {t['dense']:.1f} | {t['masked']:.1f} | {t['masked'] / t['dense']:.2f} "
            f"| {t['hooks']:.1f} | {1 + t['hooks'] / t['dense']:.3f} "
            f"| {t['accumulator_bytes'] / 2**20:.1f} MiB |",
            flush=True,
        )


if __name__ == "__main__":
    main()
