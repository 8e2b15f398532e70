"""Coupled-channel pruning's real speed-up: dense, channel, coupled and Torch-Pruning side by side.

    python benchmarks/bench_coupled.py [--archs fpn|all|unet,fpn,...] [--encoder resnet101]
        [--size 512 512] [--channel-sparsities 0.5,0.7,0.9] [--tp-ratios 0.5,0.75]
        [--scopes layer] [--coupled-sparsities 0.5,0.9] [--runtimes torch,onnx,onnx-int8]
        [--threads 2] [--repeats 10] [--device cpu]
    python benchmarks/bench_coupled.py --graph-times [--encoder resnet101] [--size 512 512]

One process, batch 1, random initial weights (latency depends on shapes, not values). Rows, per
architecture: dense; today's `channel` granularity (magnitude) at each sparsity, cut out
(`channels.shrink`); Torch-Pruning 1.6.1's own pipeline (MetaPruner, group magnitude, the same
channel ratio in every group) at each ratio; `coupled` (magnitude, each scope) at the same
parameter count as each Torch-Pruning row, cut out with `coupled.slim`; and `coupled` at each
explicit sparsity. "pruned" is the fraction of prunable weights (conv weights outside the head)
removed, the project's `pruning.sparsity`; "graph s" the dependency-graph build (64 px trace).

Every model runs through each of `--runtimes`: torch eager; ONNX Runtime fp32 (`deploy.export.
export_onnx`, into a temporary folder); ONNX Runtime static INT8 (`deploy.export.quantize_int8`,
calibrated on `--calibration-images` random images of `--calibration-size` px: the ranges change
values, not kernels). ONNX Runtime sessions get `--threads` intra-op threads, torch the same.
Latency: median and 90th percentile of `--repeats` runs after 3 warm-up runs; speed-ups are
against the same architecture's dense model through the first of `--runtimes` (torch by default).

`--graph-times` builds `coupled.find_groups` for all five architectures at `--size` instead.
"""

from __future__ import annotations

import argparse
import copy
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_pruning as tp  # noqa: E402
from segmentation_models_pytorch.decoders.manet.decoder import PABBlock  # noqa: E402
from torch import nn  # noqa: E402

from deploy.artefacts import load_artefact  # noqa: E402
from deploy.export import export_onnx, quantize_int8  # noqa: E402
from trainables.config import ModelConfig, PruningConfig, TrialConfig  # noqa: E402
from trainables.cost import cpu_name, gmacs, latency_ms  # noqa: E402
from trainables.errors import UserError  # noqa: E402
from trainables.models import ARCHITECTURES, build_model  # noqa: E402
from trainables.pruning import channels, coupled  # noqa: E402
from trainables.pruning.pruner import Pruner  # noqa: E402

EXCLUDE = ("segmentation_head",)
CLASSES = 4
RUNTIMES = ("torch", "onnx", "onnx-int8")
RUNTIME_TITLES = {"torch": "torch", "onnx": "ORT fp32", "onnx-int8": "ORT INT8"}
# Torch-Pruning's own handling of every module, except MA-Net's attention, without which its
# graph does not build (coupled.py's GroupNorm pruner, which drops whole groups, is corroprune's).
TP_PRUNERS = {k: v for k, v in coupled.CUSTOM_PRUNERS.items() if k != nn.GroupNorm}
TP_ROOTS = [nn.Conv2d, nn.ConvTranspose2d, PABBlock]


def channel_slim(dense: nn.Module, sparsity: float) -> nn.Module:
    """Today's channel granularity, magnitude-ranked in one update, then cut out."""
    model = copy.deepcopy(dense)
    cfg = PruningConfig(pruner="magnitude", sparsity=sparsity, steps=1, granularity="channel")
    pruner = Pruner(cfg, model, prune_epochs=1, iters_per_epoch=1)
    pruner.end_of_epoch(1)
    return channels.shrink(model, pruner.groups, pruner.channel_keeps())


def tp_pruner(
    model: nn.Module, importance: tp.importance.Importance, ratio: float, steps: int = 1
) -> tuple[tp.pruner.MetaPruner, float]:
    """Torch-Pruning's MetaPruner on `model` (in place): `ratio` of every group's channels in
    `steps` equal steps (its linear schedule), the class head kept, its GroupNorm handling as it
    is; MA-Net's attention through corroprune's pruner. Returns it and its graph build time."""
    head = [m for m in model.segmentation_head.modules() if isinstance(m, nn.Conv2d)]
    param = next(model.parameters())
    example = torch.zeros(1, 3, coupled.EXAMPLE_SIZE, coupled.EXAMPLE_SIZE, device=param.device)
    t0 = time.perf_counter()
    with coupled.opaque_attention(model):
        pruner = tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            pruning_ratio=ratio,
            iterative_steps=steps,
            ignored_layers=head,
            customized_pruners=TP_PRUNERS,
            root_module_types=TP_ROOTS,
        )
    return pruner, time.perf_counter() - t0


def tp_graph(model: nn.Module) -> tp.DependencyGraph:
    """The dependency graph `tp_pruner` builds, alone: what replays a pruning history."""
    param = next(model.parameters())
    example = torch.zeros(1, 3, coupled.EXAMPLE_SIZE, coupled.EXAMPLE_SIZE, device=param.device)
    with coupled.opaque_attention(model):
        return tp.DependencyGraph().build_dependency(
            model, example_inputs=example, customized_pruners=TP_PRUNERS, verbose=False
        )


def tp_slim(dense: nn.Module, ratio: float) -> tuple[nn.Module, float]:
    """Torch-Pruning's pipeline in one step: group L2 magnitude, `ratio` of every group's
    channels."""
    model = copy.deepcopy(dense)
    pruner, build_s = tp_pruner(model, tp.importance.MagnitudeImportance(p=2), ratio)
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


# ---- latency through each runtime ---------------------------------------------------------------


def _p50_p90(times: list[float]) -> tuple[float, float]:
    return statistics.median(times), times[min(len(times) - 1, int(0.9 * len(times)))]


def export_config(arch: str, encoder: str) -> TrialConfig:
    """The config an export embeds: the architecture, 4 classes (latency needs nothing else)."""
    return TrialConfig.from_dict(
        {
            "data": {"dataset": "synthetic", "synthetic": {"classes": CLASSES}},
            "model": {"arch": arch, "encoder": encoder, "encoder_weights": None},
        }
    )


def calibration_images(args: argparse.Namespace) -> list[np.ndarray]:
    """Random ImageNet-normalised-like images, (1, 3, S, S) float32 each: INT8 ranges only."""
    rng = np.random.default_rng(0)
    size = args.calibration_size
    return [
        rng.standard_normal((1, 3, size, size), dtype=np.float32)
        for _ in range(args.calibration_images)
    ]


def onnx_latencies(
    model: nn.Module, x: torch.Tensor, cfg: TrialConfig, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    """(p50, p90) ms through ONNX Runtime fp32 and/or INT8 (`args.runtimes`), the exports in a
    temporary folder removed at the end."""
    out = {}
    image = x.cpu().numpy()  # (1, 3, H, W)
    with tempfile.TemporaryDirectory(prefix="bench-coupled-") as tmp:
        fp32, int8 = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        export_onnx(model.cpu(), cfg, fp32, height=x.shape[2], width=x.shape[3])
        model.to(x.device)
        if "onnx-int8" in args.runtimes:
            quantize_int8(fp32, int8, calibration_images(args))
        for runtime, path in (("onnx", fp32), ("onnx-int8", int8)):
            if runtime in args.runtimes:
                artefact = load_artefact(path, threads=args.threads)
                out[runtime] = _p50_p90(latency_ms(artefact, image, args.repeats))
                del artefact
    return out


def runtime_latencies(
    model: nn.Module, x: torch.Tensor, cfg: TrialConfig, args: argparse.Namespace
) -> dict[str, tuple[float, float]]:
    """(p50, p90) ms per runtime of `args.runtimes`, one after the other; an export that
    fails (ONNX Runtime disagreeing with torch) leaves its runtimes out, with a note."""
    out = {}
    if "torch" in args.runtimes:
        out["torch"] = _p50_p90(latency_ms(model, x, args.repeats))
    if any(r != "torch" for r in args.runtimes):
        try:
            out |= onnx_latencies(model, x, cfg, args)
        except UserError as err:
            print(f"  ONNX Runtime left out: {err}", file=sys.stderr, flush=True)
    return out


def row(
    name: str, model: nn.Module, x: torch.Tensor, args, cfg: TrialConfig, counted: tuple, **extra
) -> dict:
    model = model.eval().to(x.device)
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "kept": sum(model.get_parameter(n).numel() for n in counted),
        "gmacs": gmacs(model, x),
        "latency": runtime_latencies(model, x, cfg, args),
        **extra,
    }


def comparison(arch: str, args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    dense = build_model(ModelConfig(arch=arch, encoder=args.encoder, encoder_weights=None), CLASSES)
    cfg = export_config(arch, args.encoder)
    x = torch.randn(1, 3, *args.size, device=args.device)
    plan = CoupledPlan(dense)
    counted = tuple(coupled.counted_weights(coupled.build_graph(dense), EXCLUDE))

    def add(name: str, model: nn.Module, **extra) -> None:
        rows.append(row(name, model, x, args, cfg, counted, **extra))
        print(f"  {arch}: {name} measured", file=sys.stderr, flush=True)

    rows: list[dict] = []
    add("dense", dense)
    for s in _floats(args.channel_sparsities):
        add(f"channel {s:g}", channel_slim(dense, s))
    for s in _floats(args.coupled_sparsities):
        for scope in args.scopes.split(","):
            add(f"coupled {scope} {s:g}", plan.slim(s, scope), graph=plan.build_s)
    for r in _floats(args.tp_ratios):
        model, build_s = tp_slim(dense, r)
        add(f"Torch-Pruning ratio {r:g}", model, graph=build_s)
        target = rows[-1]["params"]
        for scope in args.scopes.split(","):
            s = plan.matching(target, scope)
            name = f"coupled {scope} {s:.3f} (params of TP {r:g})"
            add(name, plan.slim(s, scope), graph=plan.build_s)
    return rows


def _floats(values: str) -> list[float]:
    return [float(v) for v in values.split(",") if v]


def print_table(rows: list[dict], runtimes: list[str]) -> None:
    """One markdown table: per runtime p50 / p90 ms and the speed-up against the dense model
    through the first runtime (torch by default)."""
    titles = " | ".join(f"{RUNTIME_TITLES[r]} ms p50 / p90 (speed-up)" for r in runtimes)
    print(f"| model | pruned | params | GMACs | {titles} | graph s |")
    print("| --- | --- | --- | --- | " + "--- | " * len(runtimes) + "--- |")
    dense = rows[0]
    base = next((dense["latency"][r][0] for r in runtimes if r in dense["latency"]), None)

    def cell(times: tuple[float, float] | None) -> str:
        if times is None:
            return "n/a"
        speedup = f" ({base / times[0]:.2f}x)" if base else ""
        return f"{times[0]:.1f} / {times[1]:.1f}{speedup}"

    for r in rows:
        graph = f"{r['graph']:.1f}" if "graph" in r else ""
        cells = " | ".join(cell(r["latency"].get(rt)) for rt in runtimes)
        print(
            f"| {r['model']} | {1 - r['kept'] / dense['kept']:.3f} | {r['params'] / 1e6:.2f} M | "
            f"{r['gmacs']:.2f} | {cells} | {graph} |"
        )


def graph_times(args: argparse.Namespace) -> None:
    print("| architecture | graph build s | coupled groups | units | channels |")
    print("| --- | --- | --- | --- | --- |")
    for arch in ARCHITECTURES:
        cfg = ModelConfig(arch=arch, encoder=args.encoder, encoder_weights=None)
        model = build_model(cfg, CLASSES)
        t0 = time.perf_counter()
        groups = coupled.find_groups(model, EXCLUDE, example_size=args.size[0])
        seconds = time.perf_counter() - t0
        units, chans = sum(g.n_units for g in groups), sum(g.channels for g in groups)
        print(f"| {arch} | {seconds:.1f} | {len(groups)} | {units:,} | {chans:,} |", flush=True)
        del model


def machine_line(args: argparse.Namespace) -> str:
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    versions = ", ".join(
        f"{pkg} {version(pkg)}" for pkg in ("torch", "torch-pruning", "onnxruntime", "onnx")
    )
    return (
        f"# {args.encoder}, batch 1, {args.size[0]}x{args.size[1]}, {args.device} ({name}), "
        f"{args.threads} thread(s), {args.repeats} runs, runtimes {', '.join(args.runtimes)}; "
        f"{versions}; {datetime.now(UTC):%Y-%m-%d}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fpn", help="one architecture (--archs takes precedence)")
    p.add_argument(
        "--archs", default=None, help=f"comma list or 'all' ({', '.join(ARCHITECTURES)})"
    )
    p.add_argument("--encoder", default="resnet101")
    p.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    p.add_argument("--channel-sparsities", default="0.5,0.7,0.9")
    p.add_argument("--tp-ratios", default="0.5,0.75")
    p.add_argument("--scopes", default="layer")
    p.add_argument("--coupled-sparsities", default="0.5,0.9")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=", ".join(RUNTIMES))
    p.add_argument("--calibration-images", type=int, default=2)
    p.add_argument("--calibration-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--graph-times", action="store_true")
    args = p.parse_args(argv)
    names = args.archs or args.arch
    args.archs = list(ARCHITECTURES) if names == "all" else names.split(",")
    args.runtimes = args.runtimes.split(",")
    for value, allowed, what in (
        (args.archs, ARCHITECTURES, "--archs"),
        (args.runtimes, RUNTIMES, "--runtimes"),
    ):
        unknown = [v for v in value if v not in allowed]
        if unknown:
            p.error(f"{what}: unknown {unknown[0]!r}; valid: {', '.join(allowed)}")
    if args.device != "cpu" and args.runtimes != ["torch"]:
        p.error("ONNX Runtime runs on the CPU here: --runtimes torch with --device cuda")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    if args.graph_times:
        what = f"coupled graph build, {args.encoder}, trace at {args.size[0]}x{args.size[0]}"
        print(f"# {what}, {args.threads} thread(s)")
        graph_times(args)
    else:
        print(machine_line(args))
        for arch in args.archs:
            t0 = time.perf_counter()
            rows = comparison(arch, args)
            print(f"\n## {arch} ({time.perf_counter() - t0:.0f} s)\n")
            print_table(rows, args.runtimes)
            sys.stdout.flush()
    print(
        f"\n`OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '')} python {shlex.join(sys.argv)}`; "
        f"{os.cpu_count()} CPUs, 1-min load average "
        f"{load:.1f} at start and {os.getloadavg()[0]:.1f} at the end (above 0.5: other work "
        f"was running), {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
