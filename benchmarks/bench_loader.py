"""Loader throughput (images/s) of the training pipeline at the paper's image size, per place of
augmentation and worker count.

    python benchmarks/bench_loader.py [--augment cpu,device] [--workers 0,1,2] [--images 64]
                                      [--size 512] [--train-ips X] [--device auto]

For each (augmentation place, worker count): an empty decode cache, fresh datasets and one
`engine.make_loader`, as a trial makes it (persistent workers). Epoch 1 decodes the PNGs into the
disk cache and includes worker start-up; then a second loader, as the next trial of a sweep makes
it, runs its first epoch from the cache on disk; its second epoch is the steady state.

"cpu" augments in the loader (albumentations); "device" only reads uint8 arrays and draws the
augmentation parameters there, and the warp runs on the training device: its cost is timed
separately on `--device` (absolute GPU figures only count from a GPU machine).

Then checks that augmentations depend on the epoch but not on the number of workers, and how many
training images come out un-augmented, for each place.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
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

from trainables.config import DataConfig, SynthConfig  # noqa: E402
from trainables.cost import cpu_name  # noqa: E402
from trainables.data import build_datasets, decoded_root  # noqa: E402
from trainables.data.dataset import (  # noqa: E402
    SegmentationDataset,
    WarpCollate,
    WarpDataset,
    eval_transform,
)
from trainables.engine import make_loader, resolve_device, to_device  # noqa: E402

SEED = 0


def data_config(args: argparse.Namespace, root: Path) -> DataConfig:
    synthetic = SynthConfig(train=args.images, test=1, size=args.size, classes=4, seed=SEED)
    return DataConfig(dataset="synthetic", root=str(root), crop_size=args.size, synthetic=synthetic)


def train_set(cfg: DataConfig, augment: str = "cpu") -> SegmentationDataset:
    """The augmented training split (a fresh dataset: nothing mapped yet)."""
    return build_datasets(cfg, SEED, augment).train


def epoch_pass(loader: DataLoader, epoch: int, args: argparse.Namespace) -> tuple[float, int]:
    """Seconds and images for one epoch (or `args.batches` batches)."""
    loader.sampler.set_epoch(epoch)
    t0 = time.perf_counter()
    seen = 0
    for i, batch in enumerate(loader):  # (images, masks) or a WarpBatch
        seen += batch[0].shape[0]
        if args.batches and i + 1 >= args.batches:
            break
    return time.perf_counter() - t0, seen


def clear_decoded() -> None:
    shutil.rmtree(decoded_root(), ignore_errors=True)


def throughput(cfg: DataConfig, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One row per (place, workers): decode epoch, next trial's first epoch, steady state."""
    rows = []
    for augment in args.augment:
        for workers in args.workers:
            clear_decoded()
            row: dict[str, Any] = {"augment": augment, "workers": workers}
            for label, epochs in (("decode", (1,)), ("cached", (1, 2))):
                t0 = time.perf_counter()
                loader = make_loader(
                    train_set(cfg, augment), args.batch, train=True, num_workers=workers, seed=SEED
                )
                for epoch in epochs:
                    seconds, seen = epoch_pass(loader, epoch, args)
                    if epoch == 1:
                        seconds = time.perf_counter() - t0  # worker start-up counts here
                    row[label if epoch == 1 else "warm"] = seen / seconds
                del loader
            rows.append(row)
            print(format_row(row, args.train_ips), flush=True)
    return rows


def format_row(row: dict[str, Any], train_ips: float | None) -> str:
    cells = [row["augment"], str(row["workers"])]
    cells += [f"{row[k]:.1f}" for k in ("decode", "cached", "warm")]
    if train_ips:
        cells.append(f"{row['warm'] / train_ips:.2f}")
    return "| " + " | ".join(cells) + " |"


def warp_cost(cfg: DataConfig, args: argparse.Namespace) -> dict[str, float]:
    """Images/s of `WarpBatch.warp` (the device half of "device" augmentation) on `args.device`,
    batches of `args.batch` from the loader, after 3 warm-up batches."""
    device = resolve_device(args.device)
    loader = make_loader(train_set(cfg, "device"), args.batch, train=True, seed=SEED)
    batches = list(loader)[: max(args.warp_batches, 4)]
    for batch in batches[:3]:
        batch.warp(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    seen = 0
    for _ in range(args.warp_repeats):
        for batch in batches:
            images, masks = batch.warp(device)
            seen += images.shape[0]
    sync()
    return {"device": str(device), "ips": seen / (time.perf_counter() - t0)}


def digests(
    dataset: SegmentationDataset, epoch: int, workers: int, args: argparse.Namespace
) -> list[bytes]:
    """One digest per (image, mask) pair of the first `args.check_batches` batches, in order."""
    loader = make_loader(dataset, args.batch, train=True, num_workers=workers, seed=SEED)
    loader.sampler.set_epoch(epoch)
    out = []
    for i, batch in enumerate(loader):
        images, masks = to_device(batch, torch.device("cpu"))
        for image, mask in zip(images, masks, strict=True):
            h = hashlib.blake2b(image.numpy().tobytes(), digest_size=16)
            h.update(mask.numpy().tobytes())
            out.append(h.digest())
        if i + 1 >= args.check_batches:
            break
    return out


def check_augmentations(cfg: DataConfig, args: argparse.Namespace, augment: str) -> dict[str, Any]:
    """Same loader order (same seed) each time: only the augmentation can differ."""
    dataset = train_set(cfg, augment)
    first = digests(dataset, 1, 0, args)
    with_workers = digests(dataset, 1, args.check_workers, args)
    second = digests(dataset, 2, 0, args)
    same_across_epochs = sum(a == b for a, b in zip(first, second, strict=True))
    return {
        "augment": augment,
        "images": len(first),
        "identical_across_worker_counts": first == with_workers,
        "identical_across_epochs": same_across_epochs,
        "distinct_within_epoch": len(set(first)) == len(first),
        "shares": augmentation_shares(cfg, augment),
    }


def dihedral(image: torch.Tensor) -> list[torch.Tensor]:
    """The 8 flips and 90-degree turns of (3, H, W), the identity first."""
    turns = [torch.rot90(image, k, (-2, -1)) for k in range(4)]
    return turns + [t.flip(-1) for t in turns]


def augmented(dataset: SegmentationDataset, index: int, epoch: int) -> torch.Tensor:
    """One training image (3, H, W) as the trial sees it, wherever it is augmented."""
    if isinstance(dataset, WarpDataset):
        return WarpCollate(dataset.crop)([dataset[(epoch, index)]]).warp(torch.device("cpu"))[0][0]
    return dataset[(epoch, index)][0]


def augmentation_shares(cfg: DataConfig, augment: str, epoch: int = 1) -> dict[str, int]:
    """How many training images came out un-augmented, or only flipped/turned (no affine).

    Compared with the same image through the evaluation transform (normalised, no padding at a
    multiple of 32; the device warp matches it to float rounding). With independent draws per
    transform (affine p=0.8, flips p=0.5, turn p=0.5 by 0-3 quarters) about 4 % come out
    untouched and about 16 % only flipped/turned.
    """
    train = train_set(cfg, augment)
    plain = SegmentationDataset(
        train.items, eval_transform(cfg), train.num_classes, seed=SEED, cache=train.cache_dir
    )
    untouched = flipped_only = 0
    for i in range(len(train)):
        out, ref = augmented(train, i, epoch), plain[i][0]  # (3, H, W) each
        variants = dihedral(ref) if out.shape == ref.shape else []
        same = [torch.allclose(out, v, atol=1e-3) for v in variants]
        untouched += bool(same) and same[0]
        flipped_only += any(same[1:])
    return {"images": len(train), "untouched": untouched, "flipped_only": flipped_only}


def print_check(check: dict[str, Any], workers: int) -> None:
    yes_no = "yes" if check["identical_across_worker_counts"] else "no"
    print(f"## augmentation on {check['augment']}")
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
        f"{n_train} in the train split, crop {args.size}, batch {args.batch}; persistent "
        f"workers (start-up counted in each first epoch); images/s"
    )
    extra = " | steady / training" if args.train_ips else ""
    print(
        "| augment on | workers | first epoch, decoding | next trial's first epoch, cached "
        f"| steady state{extra} |"
    )
    print("| --- " * (6 if args.train_ips else 5) + "|")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--augment", default="cpu,device", help="comma list: cpu, device")
    parser.add_argument("--workers", default="0,1,2", help="comma list of DataLoader workers")
    parser.add_argument("--images", type=int, default=64, help="synthetic train set (80%% train)")
    parser.add_argument("--size", type=int, default=512, help="image and crop size")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--batches", type=int, default=0, help="per epoch (0: whole epoch)")
    parser.add_argument("--train-ips", type=float, default=None, help="training images/s")
    parser.add_argument("--device", default="auto", help="where the device warp is timed")
    parser.add_argument("--warp-batches", type=int, default=8)
    parser.add_argument("--warp-repeats", type=int, default=5)
    parser.add_argument("--check-batches", type=int, default=4)
    parser.add_argument("--check-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.augment = [a for a in args.augment.split(",") if a]
    if args.size % 32 or args.images < 2 or any(w < 0 for w in args.workers):
        parser.error("--size a multiple of 32, --images at least 2, --workers 0 or more")
    if not set(args.augment) <= {"cpu", "device"}:
        parser.error("--augment: a comma list of cpu and device")
    return args


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        os.environ["CORROPRUNE_CACHE"] = str(Path(tmp) / "cache")  # inherited by the workers
        cfg = data_config(args, Path(tmp) / "synthetic")
        t0 = time.perf_counter()
        n_train = len(train_set(cfg))  # generates the set once
        print_header(args, n_train, time.perf_counter() - t0)
        throughput(cfg, args)
        if "device" in args.augment:
            cost = warp_cost(cfg, args)
            print(
                f"device warp (WarpBatch.warp, batch {args.batch}) on {cost['device']}: "
                f"{cost['ips']:.0f} images/s"
            )
        for augment in args.augment:
            print_check(check_augmentations(cfg, args, augment), args.check_workers)


if __name__ == "__main__":
    main()
