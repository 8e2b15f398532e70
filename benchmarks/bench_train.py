"""Training-step throughput (images/s) per architecture and runtime variant, side by side.

    python benchmarks/bench_train.py [--archs fpn,unet] [--encoder resnet101] [--size 512] [--compile]
    python benchmarks/bench_train.py --trajectory 5 --archs fpn [--fast-variant bf16+channels_last]
                                     [--noise-floor [--noise-seed 1] | --seeds 0,1,2]

Throughput mode: each step is the project's own (smp model, `engine.build_loss`, SGD + CyclicLR from
`engine.build_optimizer`, `engine.forward` under the variant's RuntimeConfig); inputs are random,
made once on the device; no host synchronisation inside the timed steps. "+device-augment" variants
start each step from a uint8 batch in host memory instead and warp it on the device first, as a
trial with `runtime.augment: device` does. One row per architecture and variant, with the ratio to
the fp32 eager baseline of the same architecture.

Trajectory mode: the real trial (`trainables.trial.run_trial`) trained twice from the same seed on
the synthetic set, fp32 eager against the fast variant; validation mIoU per epoch side by side.
With `--seeds`, both once per seed, compared by their means against fp32's seed-to-seed spread:
the fair test for a change that draws different random numbers (device augmentation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from trainables.checkpoint import read_jsonl  # noqa: E402
from trainables.config import (  # noqa: E402
    ARCHS,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RuntimeConfig,
    TrialConfig,
)
from trainables.cost import cpu_name  # noqa: E402
from trainables.data import warp  # noqa: E402
from trainables.data.dataset import WarpBatch  # noqa: E402
from trainables.engine import (  # noqa: E402
    build_loss,
    build_optimizer,
    forward,
    resolve_device,
)
from trainables.models import build_model  # noqa: E402
from trainables.trial import run_trial  # noqa: E402


@dataclass(frozen=True)
class Variant:
    amp: bool  # bfloat16 autocast of the forward pass (logits and loss in float32)
    channels_last: bool  # model and inputs in NHWC
    compile: str = "off"  # torch.compile mode of the model (runtime.compile)
    augment: str = "cpu"  # "device": each step warps a uint8 batch on the device first


VARIANTS: dict[str, Variant] = {
    "fp32": Variant(amp=False, channels_last=False),
    "channels_last": Variant(amp=False, channels_last=True),
    "bf16": Variant(amp=True, channels_last=False),
    "bf16+channels_last": Variant(amp=True, channels_last=True),
    "bf16+channels_last+compile": Variant(amp=True, channels_last=True, compile="default"),
    "fp32+cudagraphs": Variant(amp=False, channels_last=False, compile="reduce-overhead"),
    "channels_last+cudagraphs": Variant(amp=False, channels_last=True, compile="reduce-overhead"),
    "bf16+channels_last+cudagraphs": Variant(
        amp=True, channels_last=True, compile="reduce-overhead"
    ),
    "fp32+device-augment": Variant(amp=False, channels_last=False, augment="device"),
    # The GPU default (runtime "auto"): what a trial on a GPU runs.
    "bf16+channels_last+cudagraphs+device-augment": Variant(
        amp=True, channels_last=True, compile="reduce-overhead", augment="device"
    ),
}
BASELINE = "fp32"
# From-scratch training needs the demo preset's loss and learning rate (pure Tversky at the
# paper's 1e-2 can stall with background never predicted; see README, "The demo").
TRAJECTORY_LOSS = {"ce_weight": 0.5}
TRAJECTORY_OPTIM = {"max_lr": 0.05, "half_cycle_iters": 40}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment(device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """What the numbers depend on: device, library versions, threads, backend flags, date."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    conv = getattr(torch.backends.cudnn, "conv", None)
    return {
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
        "smp": metadata.version("segmentation-models-pytorch"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "conv_fp32_precision": getattr(conv, "fp32_precision", "n/a"),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "encoder": args.encoder,
        "size": args.size,
        "batch": args.batch,
        "classes": args.classes,
    }


def train_step(
    model: torch.nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    parts: tuple[Any, Any, Any],
    runtime: RuntimeConfig,
) -> torch.Tensor:
    """One step as `engine.train_one_epoch` makes it (no pruning hooks); the loss stays on device."""
    loss_fn, optimizer, scheduler = parts
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(forward(model, images, runtime), targets)  # targets (N, H, W)
    loss.backward()
    optimizer.step()
    scheduler.step()
    return loss.detach()


def build_step_parts(
    arch: str, variant: Variant, args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, tuple[Any, Any, Any]]:
    """Model (same seed for every variant), loss, optimizer and schedule on `device`."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, encoder=args.encoder, encoder_weights=None)
    model = build_model(cfg, args.classes).to(device)
    if variant.channels_last:
        model = model.to(memory_format=torch.channels_last)
    loss_fn = build_loss(LossConfig()).to(device)
    optimizer, scheduler = build_optimizer(model, OptimConfig())
    if variant.compile != "off":
        model = torch.compile(model, mode=variant.compile)
    model.train()
    return model, (loss_fn, optimizer, scheduler)


def measure(
    arch: str,
    name: str,
    batch: tuple[torch.Tensor, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Warm-up steps, then `args.steps` timed steps between two device synchronisations."""
    variant = VARIANTS[name]
    model, parts = build_step_parts(arch, variant, args, device)
    runtime = RuntimeConfig(
        device=device.type, amp=variant.amp, channels_last=variant.channels_last, progress=False
    )
    images, targets = batch
    raw = warp_batch_input(args) if variant.augment == "device" else None

    def step() -> torch.Tensor:
        if raw is None:
            return train_step(model, images, targets, parts, runtime)
        return train_step(model, *raw.warp(device), parts, runtime)  # uint8 copied each step

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    synchronize(device)
    t1 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    synchronize(device)
    elapsed = time.perf_counter() - t1
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "arch": arch,
        "variant": name,
        "images_per_s": args.steps * images.shape[0] / elapsed,
        "ms_per_step": 1000 * elapsed / args.steps,
        "warmup_s": t1 - t0,
        "last_loss": float(loss),
        "peak_mib": peak,
    }


def release(device: torch.device, compiled: bool) -> None:
    """Free what a variant left behind so the next one starts from the same state."""
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def random_batch(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (args.batch, 3, args.size, args.size)
    images = torch.randn(shape, generator=gen, device=device)  # (N, 3, H, W)
    targets = torch.randint(
        0, args.classes, (args.batch, args.size, args.size), generator=gen, device=device
    )  # (N, H, W)
    return images, targets


def warp_batch_input(args: argparse.Namespace) -> WarpBatch:
    """A random uint8 batch with augmentation matrices, as a `WarpDataset` loader yields it
    (pinned on a GPU machine, as the trial's loader pins it)."""
    rng = np.random.default_rng(0)
    n, size = args.batch, args.size
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = rng.integers(0, args.classes, (n, size, size), dtype=np.uint8)
    theta = np.stack([warp.sample_transform(rng, size, size, size) for _ in range(n)])
    tensors = [torch.from_numpy(a) for a in (images, masks, theta)]
    if torch.cuda.is_available():
        tensors = [t.pin_memory() for t in tensors]
    return WarpBatch(*tensors, size)


def format_row(result: dict[str, Any], base: dict[str, Any] | None) -> str:
    if "error" in result:
        return f"| {result['arch']} | {result['variant']} | error: {result['error']} | | | | | |"
    ratio = result["images_per_s"] / base["images_per_s"] if base and "error" not in base else None
    peak = f"{result['peak_mib']:.0f}" if result["peak_mib"] is not None else "-"
    return (
        f"| {result['arch']} | {result['variant']} | {result['images_per_s']:.2f} "
        f"| {result['ms_per_step']:.1f} | {f'{ratio:.2f}' if ratio else '-'} "
        f"| {result['warmup_s']:.1f} | {peak} | {result['last_loss']:.4f} |"
    )


def print_header(env: dict[str, Any]) -> None:
    print(
        f"# {env['device']}; torch {env['torch']}, smp {env['smp']}, Python {env['python']}, "
        f"{env['threads']} thread(s); cudnn.benchmark={env['cudnn_benchmark']}, "
        f"conv fp32 precision {env['conv_fp32_precision']}; {env['date']}"
    )
    print(
        f"# encoder {env['encoder']}, {env['size']}x{env['size']}, batch {env['batch']}, "
        f"{env['classes']} classes, random weights"
    )


def run_throughput(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env = environment(device, args)
    print_header(env)
    print(f"# {args.warmup} warm-up + {args.steps} timed steps per variant; ratio = vs fp32")
    print("| model | variant | images/s | ms/step | vs fp32 | warm-up s | peak MiB | last loss |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    batch = random_batch(args, device)
    results = []
    for arch in args.archs:
        base = None
        for name in args.variants:
            try:
                result = measure(arch, name, batch, args, device)
            except Exception as err:  # one failed variant (OOM, compile) must not end the run
                print(f"{arch} {name}: {type(err).__name__}: {err}", file=sys.stderr)
                result = {"arch": arch, "variant": name, "error": type(err).__name__}
            release(device, VARIANTS[name].compile != "off")
            base = result if name == BASELINE else base
            results.append(result)
            print(format_row(result, base), flush=True)
    return {"environment": env, "results": results}


def trajectory_config(
    arch: str, name: str, args: argparse.Namespace, device: torch.device, root: Path, seed: int = 0
) -> TrialConfig:
    """The demo's from-scratch settings on the synthetic set at `args.size`, train stage only."""
    variant = VARIANTS[name]
    runtime: dict[str, Any] = {
        "device": device.type,
        "amp": variant.amp,
        "channels_last": variant.channels_last,
        "progress": False,
    }
    runtime["compile"] = variant.compile
    runtime["augment"] = variant.augment
    if "latency_repeats" in {f.name for f in dataclasses.fields(RuntimeConfig)}:
        runtime["latency_repeats"] = 0  # the trial's CPU latency of the final model: not needed
    if args.threads:
        runtime["threads"] = args.threads
    synthetic = {"train": args.train_images, "test": args.test_images, "size": args.size}
    return TrialConfig.from_dict(
        {
            "seed": seed,
            "data": {
                "dataset": "synthetic",
                "root": str(root),
                "crop_size": args.size,
                "num_workers": args.workers,
                "synthetic": {**synthetic, "classes": args.classes, "seed": 0},
            },
            "model": {"arch": arch, "encoder": args.encoder, "encoder_weights": "none"},
            "loss": TRAJECTORY_LOSS,
            "optim": {"batch_size": args.batch, **TRAJECTORY_OPTIM},
            "stages": {"train_epochs": args.trajectory, "prune_epochs": 0, "finetune_epochs": 0},
            "runtime": runtime,
        }
    )


def train_runs(args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, Any]]:
    """Label -> {records, final}: the fp32 run, the fast run and, optionally, an fp32 rerun
    (`--noise-seed`: with another trial seed, i.e. other initial weights, split and draws)."""
    arch = args.archs[0]
    runs_to_do = [(BASELINE, BASELINE, 0), (args.fast_variant, args.fast_variant, 0)]
    if args.noise_floor:
        label = f"fp32 seed {args.noise_seed}" if args.noise_seed else "fp32 rerun"
        runs_to_do.append((label, BASELINE, args.noise_seed))
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp) / "synthetic"  # generated once, shared by every run
        for i, (label, name, seed) in enumerate(runs_to_do):
            cfg = trajectory_config(arch, name, args, device, root, seed)
            out = Path(tmp) / f"run{i}"
            final = run_trial(cfg, out)
            runs[label] = {"records": read_jsonl(out / "metrics.jsonl"), "final": final}
    return runs


def seed_runs(args: argparse.Namespace, device: torch.device) -> dict[str, list[dict[str, Any]]]:
    """Variant -> one {records, final} per seed in `args.seeds`: fp32 and the fast variant."""
    arch = args.archs[0]
    runs: dict[str, list[dict[str, Any]]] = {BASELINE: [], args.fast_variant: []}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        root = Path(tmp) / "synthetic"
        for seed in args.seeds:
            for name in runs:
                out = Path(tmp) / f"{name}-{seed}"
                final = run_trial(trajectory_config(arch, name, args, device, root, seed), out)
                runs[name].append({"records": read_jsonl(out / "metrics.jsonl"), "final": final})
    return runs


def print_seed_summary(runs: dict[str, list[dict[str, Any]]], fast: str) -> None:
    """Per epoch: each variant's mean val mIoU over seeds [min, max], and the gap of the means
    against the seed-to-seed spread of fp32 (the noise a change of random draws has to beat)."""

    def per_epoch(name: str) -> list[list[float]]:  # [epoch][seed]
        return [
            list(v)
            for v in zip(
                *([r["val_miou"] for r in run["records"]] for run in runs[name]), strict=True
            )
        ]

    base, other = per_epoch(BASELINE), per_epoch(fast)
    print(f"| epoch | fp32 val mIoU mean [min, max] | {fast} mean [min, max] | gap of means |")
    print("| --- | --- | --- | --- |")
    for epoch, (a, b) in enumerate(zip(base, other, strict=True), start=1):
        gap = abs(statistics.mean(b) - statistics.mean(a))
        print(
            f"| {epoch} | {statistics.mean(a):.4f} [{min(a):.4f}, {max(a):.4f}] "
            f"| {statistics.mean(b):.4f} [{min(b):.4f}, {max(b):.4f}] | {gap:.4f} |"
        )
    gaps = [abs(statistics.mean(b) - statistics.mean(a)) for a, b in zip(base, other, strict=True)]
    spread = max(max(a) - min(a) for a in base)
    print(f"max gap of the means, {fast} vs fp32: {max(gaps):.4f}")
    print(f"max seed-to-seed spread of fp32 (noise): {spread:.4f}")
    for name in runs:
        tests = [run["final"]["dense"]["test_miou"] for run in runs[name]]
        finals = [run["records"][-1]["val_miou"] for run in runs[name]]
        print(
            f"{name}: final val mIoU {statistics.mean(finals):.4f} +- {statistics.pstdev(finals):.4f}, "
            f"test mIoU {statistics.mean(tests):.4f} +- {statistics.pstdev(tests):.4f} "
            f"({len(tests)} seeds)"
        )


def max_diff(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> float:
    return max(abs(x["val_miou"] - y["val_miou"]) for x, y in zip(a, b, strict=True))


def print_trajectory(runs: dict[str, dict[str, Any]], fast: str) -> None:
    labels = list(runs)
    cols = " | ".join(f"{label} val mIoU" for label in labels)
    times = " | ".join(f"{label} s" for label in labels)
    print(f"| epoch | {cols} | abs diff ({fast} - fp32) | {times} |")
    print("| --- " * (2 + 2 * len(labels)) + "|")
    base = runs[BASELINE]["records"]
    for i, rec in enumerate(base):
        recs = [runs[label]["records"][i] for label in labels]
        mious = " | ".join(f"{r['val_miou']:.4f}" for r in recs)
        secs = " | ".join(f"{r['time_s']:.1f}" for r in recs)
        diff = abs(runs[fast]["records"][i]["val_miou"] - rec["val_miou"])
        print(f"| {rec['epoch']} | {mious} | {diff:.4f} | {secs} |")
    print(f"max |diff| of val mIoU, {fast} vs fp32: {max_diff(base, runs[fast]['records']):.4f}")
    for label in labels[2:]:
        floor = max_diff(base, runs[label]["records"])
        print(f"max |diff| of val mIoU, fp32 vs {label} (noise floor): {floor:.4f}")
    tests = ", ".join(f"{k} {v['final']['dense']['test_miou']:.4f}" for k, v in runs.items())
    print(f"test mIoU after training: {tests}")
    if len(base) > 1:  # epoch 1 carries start-up (cuDNN autotuning, compilation)
        mean = {
            k: sum(r["time_s"] for r in v["records"][1:]) / (len(base) - 1) for k, v in runs.items()
        }
        ratio = mean[BASELINE] / mean[fast]
        print(f"mean epoch time after epoch 1 (train + val): fp32 / {fast} = {ratio:.2f}")


def run_trajectory(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    env = environment(device, args)
    print_header(env)
    print(
        f"# trajectory: {args.archs[0]}, {args.trajectory} epochs, synthetic {args.train_images} "
        f"train (80/20 train/val) + {args.test_images} test images, "
        f"loss {TRAJECTORY_LOSS}, optim {TRAJECTORY_OPTIM}, {args.workers} loader worker(s)"
    )
    if len(args.seeds) > 1:
        seeds = seed_runs(args, device)
        print_seed_summary(seeds, args.fast_variant)
        return {"environment": env, "seeds": args.seeds, "trajectory": seeds}
    runs = train_runs(args, device)
    print_trajectory(runs, args.fast_variant)
    return {"environment": env, "trajectory": runs}


def variant_list(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The variants to measure, fp32 first (the ratios' base); the compile one only with --compile."""
    names = [v for v in args.variants.split(",") if v] if args.variants else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant '{unknown[0]}'; valid: {', '.join(VARIANTS)}")
    names = [n for n in names if args.compile or VARIANTS[n].compile == "off"]
    if args.compile and not any(VARIANTS[n].compile != "off" for n in names):
        names.append("bf16+channels_last+compile")
    return [BASELINE] + [n for n in names if n != BASELINE]


def check_fast_variant(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    if args.fast_variant not in VARIANTS or args.fast_variant == BASELINE:
        parser.error(f"--fast-variant: one of {', '.join(v for v in VARIANTS if v != BASELINE)}")


def parse_args() -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma list")
    parser.add_argument("--encoder", default="resnet101")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--variants", default=None, help=f"comma list of: {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile variant")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cudnn-benchmark", action="store_true", help="cuDNN autotuning on")
    parser.add_argument("--json", type=Path, default=None, help="write the raw results here")
    parser.add_argument("--trajectory", type=int, default=0, metavar="EPOCHS")
    parser.add_argument("--fast-variant", default="bf16+channels_last")
    parser.add_argument("--train-images", type=int, default=40, help="trajectory: synthetic train")
    parser.add_argument("--test-images", type=int, default=12, help="trajectory: synthetic test")
    parser.add_argument("--workers", type=int, default=0, help="trajectory: data.num_workers")
    parser.add_argument("--noise-floor", action="store_true", help="trajectory: rerun fp32 too")
    parser.add_argument("--noise-seed", type=int, default=0, help="trajectory: the rerun's seed")
    parser.add_argument(
        "--seeds",
        default="0",
        help="trajectory: comma list; 2 or more: fp32 and the fast variant "
        "per seed, compared by their means against fp32's seed-to-seed spread",
    )
    args = parser.parse_args()
    args.archs = [a for a in args.archs.split(",") if a]
    args.seeds = [int(x) for x in args.seeds.split(",") if x]
    bad = [a for a in args.archs if a not in ARCHS]
    if bad or not args.archs:
        parser.error(f"--archs: unknown '{bad[0] if bad else ''}'; valid: {', '.join(ARCHS)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup 0 or more")
    return args, parser


def main() -> None:
    args, parser = parse_args()
    args.variants = variant_list(args, parser)
    if args.trajectory:
        check_fast_variant(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    device = resolve_device(args.device)
    result = run_trajectory(args, device) if args.trajectory else run_throughput(args, device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        print(f"raw results: {args.json}")


if __name__ == "__main__":
    main()
