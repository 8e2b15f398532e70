"""Loader throughput (images/s) of the training pipeline at the paper's image size, per worker count.

    python benchmarks/bench_loader.py [--workers 0,1,2] [--images 64] [--size 512] [--train-ips X]

For each worker count: fresh datasets (empty decode cache) and one `engine.make_loader`, as a trial
makes it (persistent workers), then two epochs. Epoch 1 decodes the PNGs and includes worker
start-up; epoch 2 reads the workers' in-memory decode caches. Then checks
that augmentations depend on the epoch but not on the number of workers, and how many training
images come out un-augmented.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import cv2  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from trainables.bench_infer import cpu_name  # noqa: E402
from trainables.config import DataConfig, SynthConfig  # noqa: E402
from trainables.data import build_datasets  # noqa: E402
from trainables.data.dataset import SegmentationDataset, eval_transform  # noqa: E402
from trainables.engine import make_loader  # noqa: E402

SEED = 0


def data_config(args: argparse.Namespace, root: Path) -> DataConfig:
    synthetic = SynthConfig(train=args.images, test=1, size=args.size, classes=4, seed=SEED)
    return DataConfig(dataset="synthetic", root=str(root), crop_size=args.size, synthetic=synthetic)


def train_set(cfg: DataConfig) -> SegmentationDataset:
    """The augmented training split, with an empty decode cache."""
    return build_datasets(cfg, SEED).train


def epoch_pass(loader: DataLoader, epoch: int, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds and images for one epoch (or `args.batches` batches)."""
    loader.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    seen = 0
    for i, (images, _masks) in enumerate(loader):  # (N, 3, H, W), (N, H, W)
        seen += images.shape[0]
        if args.batches and i + 1 >= args.batches:
            break
    return time.perf_counter() - t0, seen


def throughput(cfg: DataConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One loader per worker count, as a trial makes it: workers start once and persist."""
    rows = []
    for workers in args.workers:
        t0 = time.perf_counter()
        loader = make_loader(train_set(cfg), args.batch, train=True, num_workers=workers, seed=SEED)
        row: dict[str, Any] = {"workers": workers}
        for epoch, label in ((1, "cold"), (2, "warm")):
            seconds, seen = epoch_pass(loader, epoch, args)
            if epoch == 1:
                seconds += time.perf_counter() - t0 - seconds  # worker start-up counts here
            row[label] = seen / seconds
            row["images"] = seen
        rows.append(row)
        print(format_row(row, args.train_ips), flush=True)
        del loader
    return rows


def format_row(row: dict[str, Any], train_ips: float | None) -> str:
    cells = [str(row["workers"]), f"{row['cold']:.1f}", f"{row['warm']:.1f}"]
    if train_ips:
        cells += [f"{row['cold'] / train_ips:.2f}", f"{row['warm'] / train_ips:.2f}"]
    return "| " + " | ".join(cells) + " |"


def digests(
    dataset: SegmentationDataset, epoch: int, workers: int, args: argparse.Namespace
) -> list[bytes]:
    """One digest per (image, mask) pair of the first `args.check_batches` batches, in order."""
    loader = make_loader(dataset, args.batch, train=True, num_workers=workers, seed=SEED)
    loader.sampler.set_epoch(epoch)
    out = []
    for i, (images, masks) in enumerate(loader):
        for image, mask in zip(images, masks, strict=True):
            h = hashlib.blake2b(image.numpy().tobytes(), digest_size=16)
            h.update(mask.numpy().tobytes())
            out.append(h.digest())
        if i + 1 >= args.check_batches:
            break
    return out


def check_augmentations(cfg: DataConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Same loader order (same seed) each time: only the augmentation can differ."""
    dataset = train_set(cfg)
    first = digests(dataset, 1, 0, args)
    with_workers = digests(dataset, 1, args.check_workers, args)
    second = digests(dataset, 2, 0, args)
    same_across_epochs = sum(a == b for a, b in zip(first, second, strict=True))
    return {
        "images": len(first),
        "identical_across_worker_counts": first == with_workers,
        "identical_across_epochs": same_across_epochs,
        "distinct_within_epoch": len(set(first)) == len(first),
        "shares": augmentation_shares(cfg),
    }


def dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree turns of (3, H, W), the identity first."""
    turns = [torch.rot90(image, k, (-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def augmentation_shares(cfg: DataConfig, epoch: int = 1) -> dict[str, int]:
    """How many training images came out un-augmented, or only flipped/turned (no affine).

    Compared with the same image through the evaluation transform (normalised, no padding at a
    multiple of 32). With independent draws per transform (affine p=0.8, flips p=0.5, turn
    p=0.5 by 0-3 quarters) about 4 % come out untouched and about 16 % only flipped/turned.
    """
    data = build_datasets(cfg, SEED)
    train = data.train
    plain = SegmentationDataset(train.items, eval_transform(cfg), train.num_classes, seed=SEED)
    train.set_epoch(epoch)
    untouched = flipped_only = 0
    for i in range(len(train)):
        out, ref = train[i][0], plain[i][0]  # (3, H, W) each
        variants = dihedral(ref) if out.shape == ref.shape else []
        untouched += bool(variants) and torch.equal(out, variants[0])
        flipped_only += any(torch.equal(out, v) for v in variants[1:])
    return {"images": len(train), "untouched": untouched, "flipped_only": flipped_only}


def print_check(check: dict[str, Any], workers: int) -> None:
    yes_no = "yes" if check["identical_across_worker_counts"] else "no"
    print(
        f"augmentations identical across worker counts: {yes_no} "
        f"(epoch 1, 0 vs {workers} workers, first {check['images']} images)"
    )
    print(
        f"augmentations differ between epochs 1 and 2: "
        f"{check['images'] - check['identical_across_epochs']} of {check['images']} images "
        f"(same loader order; an image may draw the same flips with no affine by chance)"
    )
    print(
        f"all images distinct within an epoch: {'yes' if check['distinct_within_epoch'] else 'no'}"
    )
    shares = check["shares"]
    print(
        f"epoch 1, whole train split: {shares['untouched']} of {shares['images']} images "
        f"un-augmented, {shares['flipped_only']} only flipped/turned (independent draws per "
        f"transform would give about 4 % and 16 %)"
    )


def print_header(args: argparse.Namespace, n_train: int, gen_s: float) -> None:
    print(
        f"# {cpu_name()}, {os.cpu_count()} CPU(s); "
        f"torch {torch.__version__}, albumentations {metadata.version('albumentations')}, "
        f"OpenCV threads {cv2.getNumThreads()}, torch threads {torch.get_num_threads()}; "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}"
    )
    print(
        f"# synthetic set: {args.images} images at {args.size} px (generated in {gen_s:.1f} s), "
        f"{n_train} in the train split, crop {args.size}, batch {args.batch}; one loader, persistent "
        f"workers (start-up counted in epoch 1)"
    )
    extra = " | loader/train cold | loader/train warm" if args.train_ips else ""
    print(f"| workers | epoch 1 (cold) images/s | epoch 2 (warm) images/s{extra} |")
    print("| --- " * (5 if args.train_ips else 3) + "|")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="0,1,2", help="comma list of DataLoader workers")
    parser.add_argument("--images", type=int, default=64, help="synthetic train set (80%% train)")
    parser.add_argument("--size", type=int, default=512, help="image and crop size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=0, help="per epoch (0: whole epoch)")
    parser.add_argument("--train-ips", type=float, default=None, help="training images/s")
    parser.add_argument("--check-batches", type=int, default=4)
    parser.add_argument("--check-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]
    if args.size % 32 or args.images < 2 or any(w < 0 for w in args.workers):
        parser.error("--size a multiple of 32, --images at least 2, --workers 0 or more")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        cfg = data_config(args, Path(tmp) / "synthetic")
        t0 = time.perf_counter()
        n_train = len(train_set(cfg))  # generates the set once
        print_header(args, n_train, time.perf_counter() - t0)
        throughput(cfg, args)
        print_check(check_augmentations(cfg, args), args.check_workers)


if __name__ == "__main__":
    main()
