"""Checkpoint traffic: bytes of checkpoints/last.pt written per trial-hour, every epoch vs cadence.

    python benchmarks/bench_checkpoint.py [--encoder resnet101] [--images-per-s 245.4,74.7]
                                          [--train-images 317] [--batch 4] [--trials 20]

Builds the paper preset's trials (smp FPN, the encoder without downloaded weights, 4 classes) as
real `Trial`s and writes their last.pt once per kind of stage with `Trial.save`, SGD momentum
buffers filled by one optimizer step: the dense trial's training stage (model + momentum), the
pruned trial's prune stage (+ an AGP score per prunable weight + masks) and its fine-tuning stage
(scores released). Then counts the writes each paper-preset trial makes, with the trial's own rule
(`RuntimeConfig.checkpoint_due`), once for one last.pt per epoch (the old behaviour) and once for
the default cadence, given an epoch time: training steps only (`--train-images // --batch`, the
last partial batch dropped) at `--images-per-s` (default: the H100 FPN-ResNet-101 512 px figures in
BENCHMARKS.md, GPU default and fp32 eager). Validation makes real epochs longer, so the per-epoch
figures are upper bounds. dense.pt and final.pt (once per trial) are not counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from sweep.config import load_preset, trial_config  # noqa: E402
from trainables.config import RuntimeConfig, TrialConfig  # noqa: E402
from trainables.cost import cpu_name  # noqa: E402
from trainables.engine import build_optimizer  # noqa: E402
from trainables.trial import Position, Trial, stage_plan  # noqa: E402

EVERY_EPOCH = RuntimeConfig(checkpoint_every_epochs=1, checkpoint_every_s=None)


def paper_config(encoder: str, pruner: str, root: Path) -> TrialConfig:
    """The paper preset's trial with the paper's model, on a few synthetic images (the state's
    size depends on the model only), on the CPU."""
    return trial_config(
        load_preset("paper"),
        {
            "data": {
                "dataset": "synthetic",
                "root": str(root / "synthetic"),
                "cache": False,
                "crop_size": 64,
                "synthetic": {"train": 8, "test": 2, "size": 64},
            },
            "model": {"arch": "fpn", "encoder": encoder, "encoder_weights": None},
            "pruning": {"pruner": pruner, "sparsity": 0.9 if pruner != "none" else 0.0},
            "runtime": {"device": "cpu", "progress": False},
        },
    )


def write_last(trial: Trial, stage_index: int) -> tuple[int, float]:
    """Bytes and seconds of one last.pt of `trial` after a step (momentum buffers filled)."""
    optimizer, scheduler = build_optimizer(trial.model, trial.cfg.optim)
    for p in trial.model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    t0 = time.perf_counter()
    trial.save(Position(stage_index, 1, 1), optimizer, scheduler)
    seconds = time.perf_counter() - t0
    return (trial.ckpt_dir / "last.pt").stat().st_size, seconds


def measure_sizes(encoder: str, root: Path) -> dict[str, tuple[int, float]]:
    """(bytes, write seconds) of last.pt per stage: train (dense trial), prune, finetune."""
    torch.manual_seed(0)
    dense = Trial(paper_config(encoder, "none", root), root / "dense", None, None)
    sizes = {"train": write_last(dense, 0)}
    del dense
    pruned = Trial(paper_config(encoder, "agp", root), root / "agp", None, None)
    sizes["prune"] = write_last(pruned, 0)
    pruned.pruner.freeze()  # fine-tuning: masks fixed, score accumulators released
    sizes["finetune"] = write_last(pruned, 1)
    return sizes


def stage_writes(epochs: int, epoch_s: float, runtime: RuntimeConfig) -> int:
    """last.pt writes in a stage of `epochs` epochs of `epoch_s` seconds each."""
    writes, since = 0, 0.0
    for epoch in range(1, epochs + 1):
        since += epoch_s
        if runtime.checkpoint_due(epoch, epochs, since):
            writes, since = writes + 1, 0.0
    return writes


def trial_traffic(
    plan: list[tuple[str, int]], sizes: dict[str, int], epoch_s: float, runtime: RuntimeConfig
) -> tuple[int, float]:
    """(last.pt writes, bytes per trial-hour) of a trial running `plan`."""
    writes = {stage: stage_writes(epochs, epoch_s, runtime) for stage, epochs in plan}
    hours = sum(epochs for _, epochs in plan) * epoch_s / 3600
    return sum(writes.values()), sum(n * sizes[s] for s, n in writes.items()) / hours


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="resnet101")
    parser.add_argument("--images-per-s", default="245.4,74.7", help="comma list")
    parser.add_argument("--train-images", type=int, default=317, help="SSCS: 396, 80 %% train")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--trials", type=int, default=20, help="concurrent trials")
    args = parser.parse_args()
    rates = [float(v) for v in args.images_per_s.split(",") if v]
    steps = args.train_images // args.batch
    if steps < 1 or not rates or min(rates) <= 0:
        parser.error("--train-images, --batch and --images-per-s must give a positive epoch time")
    with tempfile.TemporaryDirectory() as tmp:
        measured = measure_sizes(args.encoder, Path(tmp))
    sizes = {stage: size for stage, (size, _) in measured.items()}
    plans = {  # stage 2 is warm-started from stage 1's dense.pt
        "stage 1 dense": stage_plan(paper_config(args.encoder, "none", Path(tmp)), False),
        "stage 2 pruned": stage_plan(paper_config(args.encoder, "agp", Path(tmp)), True),
    }
    default = RuntimeConfig()
    print(
        f"# {cpu_name()}, {os.cpu_count()} CPU(s), torch {torch.__version__}; paper preset, "
        f"fpn/{args.encoder}, 4 classes; default cadence: every "
        f"{default.checkpoint_every_epochs or '-'} epochs, every {default.checkpoint_every_s} s, "
        "and at each stage's end"
    )
    print("| stage | last.pt bytes | MiB | write s (this machine, temp folder) |")
    print("| --- | --- | --- | --- |")
    for stage, (size, seconds) in measured.items():
        print(f"| {stage} | {size:,} | {size / 2**20:.1f} | {seconds:.2f} |")
    for rate in rates:
        epoch_s = steps * args.batch / rate
        print(
            f"\n# epoch = {steps} steps x {args.batch} images / {rate} images/s = {epoch_s:.2f} s "
            "(training steps only)"
        )
        print(
            "| trial | epochs | minutes | writes: every epoch / default | GB per trial-hour: "
            f"every epoch / default | {args.trials} trials MB/s: every epoch / default |"
        )
        print("| --- | --- | --- | --- | --- | --- |")
        for name, plan in plans.items():
            old_n, old = trial_traffic(plan, sizes, epoch_s, EVERY_EPOCH)
            new_n, new = trial_traffic(plan, sizes, epoch_s, default)
            epochs = sum(e for _, e in plan)
            print(
                f"| {name} | {epochs} | {epochs * epoch_s / 60:.1f} | {old_n} / {new_n} "
                f"| {old / 1e9:.1f} / {new / 1e9:.2f} "
                f"| {args.trials * old / 3600e6:,.0f} / {args.trials * new / 3600e6:.1f} |"
            )


if __name__ == "__main__":
    main()
