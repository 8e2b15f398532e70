"""Fine-tuning epochs masked against slim: what cutting the pruned model before fine-tuning saves.

    python benchmarks/bench_slim_finetune.py [--arch fpn] [--encoder resnet18] [--size 128]
        [--granularities channel,coupled] [--sparsities 0.5,0.9] [--epochs 3]
        [--train-images 40] [--batch 4] [--threads 2] [--device cpu]

For each granularity and sparsity, one trial (`trainables.trial.Trial`: the synthetic set at
`--size`, random initial weights, magnitude pruning to the target in one prune epoch, then
`--epochs` fine-tuning epochs) runs twice from the same seed: fine-tuning masked at full size
(`pruning.slim_finetune=false`) and cut slim (`true`); the order alternates from row to row.
Columns: the median fine-tuning epoch (training plus validation, the `time_s` of its record in
metrics.jsonl) each way and their ratio, the one-time cut (`Trial.cut_slim`, which traces the
coupled graph), the slim model's parameters, and the largest difference between the two runs'
validation mIoU: both compute the same function, so only float rounding may separate them.
"""

from __future__ import annotations

import argparse
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

import torch  # noqa: E402

from trainables.checkpoint import read_jsonl  # noqa: E402
from trainables.config import ARCHS, STRUCTURED, TrialConfig  # noqa: E402
from trainables.cost import cpu_name  # noqa: E402
from trainables.trial import Trial  # noqa: E402

MODES = {"masked": False, "slim": True}  # name -> pruning.slim_finetune


class TimedTrial(Trial):
    """A trial that times its cut."""

    cut_s: float | None = None

    def cut_slim(self) -> None:
        t0 = time.perf_counter()
        super().cut_slim()
        self.cut_s = time.perf_counter() - t0


def trial_config(
    granularity: str, sparsity: float, slim: bool, args: argparse.Namespace, root: Path
) -> TrialConfig:
    """One prune epoch (magnitude, one mask update to the target), then the fine-tuning."""
    synthetic = {"train": args.train_images, "test": 2, "size": args.size, "seed": 0}
    return TrialConfig.from_dict(
        {
            "data": {
                "dataset": "synthetic",
                "root": str(root / "synthetic"),
                "crop_size": args.size,
                "synthetic": synthetic,
            },
            "model": {"arch": args.arch, "encoder": args.encoder, "encoder_weights": None},
            "optim": {"batch_size": args.batch},
            "stages": {"train_epochs": 0, "prune_epochs": 1, "finetune_epochs": args.epochs},
            "pruning": {
                "pruner": "magnitude",
                "sparsity": sparsity,
                "steps": 1,
                "granularity": granularity,
                "slim_finetune": slim,
            },
            "runtime": {
                "device": args.device,
                "progress": False,
                "latency_repeats": 0,
                "checkpoint_every_s": None,
            },
        }
    )


def run(cfg: TrialConfig, out: Path) -> dict:
    """Fine-tuning epoch times, validation mIoU, the cut's time and the final parameters."""
    out.mkdir(parents=True)
    torch.manual_seed(0)
    trial = TimedTrial(cfg, out, None, None, evaluate_test=False)
    result = trial.run()
    tuned = [r for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "finetune"]
    return {
        "epoch_s": statistics.median(r["time_s"] for r in tuned),
        "val_miou": [r["val_miou"] for r in tuned],
        "cut_s": trial.cut_s,
        "params": result["inference"]["params"],
        "total": result["total_params"],
    }


def measure(args: argparse.Namespace, root: Path) -> list[dict]:
    rows = []
    for granularity in args.granularities:
        for sparsity in args.sparsities:
            order = list(MODES) if len(rows) % 2 == 0 else list(reversed(MODES))
            runs = {}
            for mode in order:
                cfg = trial_config(granularity, sparsity, MODES[mode], args, root)
                runs[mode] = run(cfg, root / f"{granularity}-{sparsity:g}-{mode}")
                print(f"  {granularity} {sparsity:g} {mode} measured", file=sys.stderr, flush=True)
            rows.append({"granularity": granularity, "sparsity": sparsity, **runs})
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        "| granularity | sparsity | slim params | masked s / epoch | slim s / epoch | speed-up "
        "| cut s | max val mIoU diff |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        masked, slim = r["masked"], r["slim"]
        diff = max(abs(a - b) for a, b in zip(masked["val_miou"], slim["val_miou"], strict=True))
        print(
            f"| {r['granularity']} | {r['sparsity']:g} | {slim['params'] / 1e6:.2f} M of "
            f"{slim['total'] / 1e6:.2f} M | {masked['epoch_s']:.2f} | {slim['epoch_s']:.2f} | "
            f"{masked['epoch_s'] / slim['epoch_s']:.2f}x | {slim['cut_s']:.2f} | {diff:.1e} |"
        )


def machine_line(args: argparse.Namespace) -> str:
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    versions = ", ".join(
        f"{pkg} {version(pkg)}" for pkg in ("torch", "segmentation-models-pytorch", "torch-pruning")
    )
    return (
        f"# {args.arch}-{args.encoder}, {args.size} px crops, batch {args.batch}, "
        f"{args.train_images} synthetic images (80 % train, 20 % validation), {args.epochs} "
        f"fine-tuning epochs; {args.device} ({name}), {args.threads} thread(s); {versions}; "
        f"{datetime.now(UTC):%Y-%m-%d}"
    )


def _floats(values: str) -> list[float]:
    return [float(v) for v in values.split(",") if v]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="fpn", choices=ARCHS)
    p.add_argument("--encoder", default="resnet18")
    p.add_argument("--size", type=int, default=128, help="image and crop size (multiple of 32)")
    p.add_argument("--granularities", default=",".join(STRUCTURED))
    p.add_argument("--sparsities", default="0.5,0.9")
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs per run")
    p.add_argument("--train-images", type=int, default=40)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    args = p.parse_args(argv)
    args.granularities = args.granularities.split(",")
    unknown = [g for g in args.granularities if g not in STRUCTURED]
    if unknown:
        p.error(f"--granularities: {unknown[0]!r} cannot be cut; valid: {', '.join(STRUCTURED)}")
    args.sparsities = _floats(args.sparsities)
    if args.epochs < 1:
        p.error("--epochs: at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-slim-") as tmp:
        os.environ.setdefault("CORROPRUNE_CACHE", str(Path(tmp) / "cache"))  # not ~/.cache
        print(machine_line(args))
        print()
        print_table(measure(args, Path(tmp)))
    print(
        f"\n`python {shlex.join(sys.argv)}`; {os.cpu_count()} CPUs, 1-min load average "
        f"{load:.1f} at start and {os.getloadavg()[0]:.1f} at the end (above 0.5: other work "
        f"was running), {time.perf_counter() - started:.0f} s in all"
    )


if __name__ == "__main__":
    main()
