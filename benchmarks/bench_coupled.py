"""Coupled-channel pruning's real speed-up: dense, channel, coupled and Torch-Pruning side by side.

    python benchmarks/bench_coupled.py [--arch fpn] [--encoder resnet101] [--size 512 512]
        [--channel-sparsities 0.5,0.7,0.9] [--tp-ratios 0.5,0.75] [--scopes layer,global]
        [--coupled-sparsities ...] [--threads 2] [--repeats 10] [--device cpu]
    python benchmarks/bench_coupled.py --graph-times [--encoder resnet101] [--size 512 512]

One process, batch 1, random initial weights (latency depends on shapes, not values). Rows:
dense; today's `channel` granularity (magnitude) at each sparsity, cut out (`channels.shrink`);
Torch-Pruning 1.6.1's own pipeline (MetaPruner, group magnitude, the same channel ratio in every
group) at each ratio; and `coupled` (magnitude, each scope) at the same parameter count as each
Torch-Pruning row, cut out with `coupled.slim`, plus `coupled` at any explicit sparsities.
"pruned" is the fraction of prunable weights (conv weights outside the head) removed, the
project's `pruning.sparsity`; "graph s" the dependency-graph build (64 px trace for both).

`--graph-times` builds `coupled.find_groups` for all five architectures at `--size` instead.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import time
from datetime import UTC, datetime
from importlib.metadata import version

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from segmentation_models_pytorch.decoders.manet.decoder import PABBlock  # noqa: E402
from torch import nn  # noqa: E402

from trainables.config import ModelConfig, PruningConfig  # noqa: E402
from trainables.cost import cpu_name, gmacs, latency_ms  # noqa: E402
from trainables.models import ARCHITECTURES, build_model  # noqa: E402
from trainables.pruning import channels, coupled  # noqa: E402
from trainables.pruning.pruner import Pruner  # noqa: E402

EXCLUDE = ("segmentation_head",)


def channel_slim(dense: nn.Module, sparsity: float) -> nn.Module:
    """Today's channel granularity, magnitude-ranked in one update, then cut out."""
    model = copy.deepcopy(dense)
    cfg = PruningConfig(pruner="magnitude", sparsity=sparsity, steps=1, granularity="channel")
    pruner = Pruner(cfg, model, prune_epochs=1, iters_per_epoch=1)
    pruner.end_of_epoch(1)
    return channels.shrink(model, pruner.groups, pruner.channel_keeps())


def tp_slim(dense: nn.Module, ratio: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's pipeline: MetaPruner, group L2 magnitude, `ratio` of every group's
    channels (its GroupNorm handling as it is); MA-Net's attention through corroprune's pruner,
    without which the graph does not build."""
    model = copy.deepcopy(dense)
    head = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    t0 = time.perf_counter()
    with coupled.opaque_attention(model):
        pruner = tp.pruner.MetaPruner(
            model,
            torch.zeros(1, 3, coupled.EXAMPLE_SIZE, coupled.EXAMPLE_SIZE),
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=head,
            customized_pruners={
                k: v for k, v in coupled.CUSTOM_PRUNERS.items() if k != nn.GroupNorm
            },
            root_module_types=[nn.Conv2d, nn.ConvTranspose2d, PABBlock],
        )
    build_s = time.perf_counter() - t0
    pruner.step()
    return model, build_s


class CoupledPlan:
    """One graph of the dense model, its magnitude scores and exact parameter counts: slim
    models at any target, no surgery needed to know their size."""

    def __init__(self, dense: nn.Module) -> None:
        t0 = time.perf_counter()
        graph = coupled.build_graph(dense)
        self.groups = coupled.groups_of(graph, EXCLUDE)
        self.build_s = time.perf_counter() - t0
        self.dense = dense
        counted = coupled.counted_weights(graph, EXCLUDE)
        self.counted = coupled.WeightCounter(self.groups, counted)
        self.all = coupled.WeightCounter(self.groups, dict(dense.named_parameters()))
        params = coupled.group_parameters(dense, self.groups)
        squares = {n: p.detach().pow(2) for n, p in params.items()}
        self.scores = coupled.unit_scores(self.groups, coupled.channel_scores(self.groups, squares))
        self.ones = [torch.ones(g.n_units, dtype=torch.bool) for g in self.groups]

    def keeps(self, sparsity: float, scope: str) -> list[torch.Tensor]:
        def removed(units: list[torch.Tensor]) -> float:
            return self.counted.removed_fraction(coupled.channel_keeps(self.groups, units))

        units = coupled.select_units(self.scores, self.ones, sparsity, removed, scope)
        return coupled.channel_keeps(self.groups, units)

    def params(self, keeps: list[torch.Tensor]) -> int:
        return round(self.all.total * (1 - self.all.removed_fraction(keeps)))

    def matching(self, params: int, scope: str) -> float:
        """The sparsity whose slim model has the parameter count closest to `params`."""
        lo, hi = 0.0, 0.99
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.params(self.keeps(mid, scope)) > params else (lo, mid)
        return (lo + hi) / 2

    def slim(self, sparsity: float, scope: str) -> nn.Module:
        model = copy.deepcopy(self.dense)
        params = coupled.group_parameters(model, self.groups)
        masks = coupled.param_masks(params, self.groups, self.keeps(sparsity, scope))
        return coupled.slim(model, masks, EXCLUDE)


def row(name: str, model: nn.Module, x: torch.Tensor, args, counted: tuple, **extra) -> dict:
    model = model.eval().to(x.device)
    times = latency_ms(model, x, args.repeats)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "kept": sum(model.get_parameter(n).numel() for n in counted),
        "gmacs": gmacs(model, x),
        "p50": statistics.median(times),
        "p90": times[min(len(times) - 1, int(0.9 * len(times)))],
        **extra,
    }


def comparison(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    dense = build_model(ModelConfig(arch=args.arch, encoder=args.encoder, encoder_weights=None), 4)
    x = torch.randn(1, 3, *args.size, device=args.device)
    plan = CoupledPlan(dense)
    counted = tuple(coupled.counted_weights(coupled.build_graph(dense), EXCLUDE))
    rows = [row("dense", dense, x, args, counted)]
    for s in _floats(args.channel_sparsities):
        rows.append(row(f"channel {s:g}", channel_slim(dense, s), x, args, counted))
    for s in _floats(args.coupled_sparsities):
        for scope in args.scopes.split(","):
            slim = plan.slim(s, scope)
            rows.append(row(f"coupled {scope} {s:g}", slim, x, args, counted, graph=plan.build_s))
    for r in _floats(args.tp_ratios):
        model, build_s = tp_slim(dense, r)
        rows.append(row(f"Torch-Pruning ratio {r:g}", model, x, args, counted, graph=build_s))
        target = rows[-1]["params"]
        for scope in args.scopes.split(","):
            s = plan.matching(target, scope)
            name = f"coupled {scope} {s:.3f} (params of TP {r:g})"
            rows.append(row(name, plan.slim(s, scope), x, args, counted, graph=plan.build_s))
    return rows


def _floats(values: str) -> list[float]:
    return [float(v) for v in values.split(",") if v]


def print_table(rows: list[dict]) -> None:
    print("| model | pruned | params | GMACs | latency ms p50 / p90 | speed-up | graph s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    dense = rows[0]
    for r in rows:
        graph = f"{r['graph']:.1f}" if "graph" in r else ""
        print(
            f"| {r['model']} | {1 - r['kept'] / dense['kept']:.3f} | {r['params'] / 1e6:.2f} M | "
            f"{r['gmacs']:.2f} | {r['p50']:.1f} / {r['p90']:.1f} | "
            f"{dense['p50'] / r['p50']:.2f}x | {graph} |"
        )


def graph_times(args: argparse.Namespace) -> None:
    print("| architecture | graph build s | coupled groups | units | channels |")
    print("| --- | --- | --- | --- | --- |")
    for arch in ARCHITECTURES:
        cfg = ModelConfig(arch=arch, encoder=args.encoder, encoder_weights=None)
        model = build_model(cfg, 4)
        t0 = time.perf_counter()
        groups = coupled.find_groups(model, EXCLUDE, example_size=args.size[0])
        seconds = time.perf_counter() - t0
        units, chans = sum(g.n_units for g in groups), sum(g.channels for g in groups)
        print(f"| {arch} | {seconds:.1f} | {len(groups)} | {units:,} | {chans:,} |", flush=True)
        del model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fpn")
    p.add_argument("--encoder", default="resnet101")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--channel-sparsities", default="0.5,0.7,0.9")
    p.add_argument("--tp-ratios", default="0.5,0.75")
    p.add_argument("--scopes", default="layer,global")
    p.add_argument("--coupled-sparsities", default="")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--graph-times", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    if args.graph_times:
        what = f"coupled graph build, {args.encoder}, trace at {args.size[0]}x{args.size[0]}"
        print(f"# {what}, {args.threads} thread(s)")
        graph_times(args)
    else:
        rows = comparison(args)
        name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
        print(
            f"# {args.arch} / {args.encoder}, batch 1, {args.size[0]}x{args.size[1]}, "
            f"{args.device} ({name}), {args.threads} thread(s), {args.repeats} runs, "
            f"torch {torch.__version__}, torch-pruning {version('torch-pruning')}, {datetime.now(UTC):%Y-%m-%d}"
        )
        print_table(rows)
    print(
        f"\n`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} python {shlex.join(sys.argv)}`; "
        f"{os.cpu_count()} CPUs, 1-min load average "
        f"{load:.1f} at start and {os.getloadavg()[0]:.1f} at the end (above 0.5: other work "
        f"was running), {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
