"""Loading, generating, checking and augmenting segmentation data."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from trainables.config import DataConfig
from trainables.data.dataset import (
    SegmentationDataset,
    WarpDataset,
    eval_transform,
    train_transform,
)
from trainables.data.formats import (
    CLASS_NAMES,
    Item,
    folder_dirs,
    guard_blocks,
    nea_items,
    other_sscs_variant,
    paired_items,
    split_blocks,
    sscs_dirs,
    sscs_root,
    val_blocks,
)
from trainables.data.synth import write_synthetic
from trainables.errors import UserError


@dataclass
class Datasets:
    train: SegmentationDataset
    val: SegmentationDataset
    test: SegmentationDataset
    class_names: tuple[str, ...]


def cache_root() -> Path:
    """`$CORROPRUNE_CACHE` or `~/.cache/corroprune`. A relative value means the folder the
    process started in, also inside a Ray trial, which runs in a folder of Ray's choosing."""
    root = Path(os.environ.get("CORROPRUNE_CACHE", Path.home() / ".cache" / "corroprune"))
    root = root.expanduser()
    return root if root.is_absolute() else Path(os.environ.get("TUNE_ORIG_WORKING_DIR", ".")) / root


def decoded_root() -> Path:
    """Where decoded, resized images are kept (`data.cache`; see `cache.py`)."""
    return cache_root() / "decoded"


def synthetic_root(cfg: DataConfig) -> Path:
    """The synthetic set's folder: `cfg.root` if given, else a cache keyed by its parameters."""
    if cfg.root:
        return Path(cfg.root)
    key = hashlib.sha1(json.dumps(asdict(cfg.synthetic), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "synthetic" / key


def class_names(root: Path | None, num_classes: int) -> tuple[str, ...]:
    listed = root / "classes.txt" if root else None
    if listed and listed.is_file():
        names = tuple(line.strip() for line in listed.read_text().splitlines() if line.strip())
        if len(names) != num_classes:
            raise UserError(f"{listed} lists {len(names)} classes, expected {num_classes}")
        return names
    return CLASS_NAMES.get(num_classes, tuple(f"class{i}" for i in range(num_classes)))


def _require_sscs_variant(root: Path, variant: str) -> None:
    """Name the variant the archive holds when only the other one than asked for is there."""
    other = other_sscs_variant(root, variant)
    if other is not None:
        raise UserError(
            f"{sscs_root(root) / variant}: folder missing, but the archive holds '{other}/'; "
            f"pick it with --set data.sscs_variant={other} (or data.sscs_variant in the preset)"
        )


def split_items(cfg: DataConfig, split: str) -> list[Item]:
    """The items of the dataset's own train or test split.

    NEA's test split is every k-th block of frames, the same for every seed; its train split
    leaves out the `data.nea_guard_blocks` blocks on either side of each test block, which belong
    to no split.
    """
    if cfg.root is None and cfg.dataset != "synthetic":
        raise UserError(f"dataset '{cfg.dataset}' needs --data-root (data.root)")
    if cfg.dataset == "synthetic":
        s = cfg.synthetic
        root = write_synthetic(
            synthetic_root(cfg),
            train=s.train,
            test=s.test,
            size=s.size,
            classes=s.classes,
            seed=s.seed,
        )
        return paired_items(*folder_dirs(root, split))
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    if cfg.dataset == "folder":
        return paired_items(*folder_dirs(root, split))
    if cfg.dataset == "sscs":
        _require_sscs_variant(root, cfg.sscs_variant)
        return paired_items(*sscs_dirs(root, split, cfg.sscs_variant))
    items = nea_items(root, cfg.nea_block_size)
    groups = [it.group for it in items]
    test = split_blocks(groups, cfg.nea_test_fraction)
    if split == "test":
        return [it for it in items if it.group in test]
    unused = test | guard_blocks(groups, test, cfg.nea_guard_blocks)
    return [it for it in items if it.group not in unused]


def _seeded_groups(groups: list[int], fraction: float, seed: int) -> set[int]:
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = max(1, round(fraction * len(unique))) if len(unique) > 1 else 0
    return {unique[i] for i in order[:n_val]}


def train_val_split(
    items: list[Item], fraction: float, seed: int, guard: int = 0
) -> tuple[list[Item], list[Item]]:
    """Seeded split by group (single images for most sets, frame blocks for NEA).

    With `guard` (NEA's blocks, numbered in video order), validation blocks are taken at ends of
    runs of consecutive blocks (`val_blocks`), and the `guard` blocks next to them belong to
    neither split.
    """
    groups = [it.group for it in items]
    if guard:
        val = val_blocks(groups, fraction, seed, guard)
    else:
        val = _seeded_groups(groups, fraction, seed)
    unused = val | guard_blocks(groups, val, guard)
    return [it for it in items if it.group not in unused], [it for it in items if it.group in val]


def _nea_too_small(cfg: DataConfig, empty: str) -> UserError:
    return UserError(
        f"dataset 'nea' ({cfg.root}): no {empty} frames left with "
        f"data.nea_block_size={cfg.nea_block_size}, data.nea_test_fraction="
        f"{cfg.nea_test_fraction} and data.nea_guard_blocks={cfg.nea_guard_blocks} (blocks "
        "left unused on either side of each test and validation block); lower "
        "data.nea_block_size, data.nea_guard_blocks or data.nea_test_fraction"
    )


def build_datasets(cfg: DataConfig, seed: int, augment: str = "cpu") -> Datasets:
    """Train (augmented) / val / test datasets; the test split is never touched by the split.

    The train/val split follows `cfg.split_seed`; `seed` (the trial's) only drives augmentation.

    `augment`: "cpu" augments the training set in the loader (albumentations); "device" yields
    uint8 `WarpDataset` items for `WarpBatch.warp` on the training device.
    """
    train_items, test_items = split_items(cfg, "train"), split_items(cfg, "test")
    guard = cfg.nea_guard_blocks if cfg.dataset == "nea" else 0
    train, val = train_val_split(train_items, cfg.val_fraction, cfg.split_seed, guard)
    if cfg.dataset == "nea" and test_items and not (train and val):
        raise _nea_too_small(cfg, "training" if not train else "validation")
    if not train_items:
        raise UserError(
            f"no training images with masks found for dataset '{cfg.dataset}' ({cfg.root})"
        )
    if not test_items:
        raise UserError(f"no test images with masks found for dataset '{cfg.dataset}' ({cfg.root})")
    n = cfg.classes
    root = synthetic_root(cfg) if cfg.dataset == "synthetic" else Path(cfg.root)
    shared = {"seed": seed, "cache": decoded_root() if cfg.cache else None, "resize": cfg.resize}
    if augment == "device":
        train_set: SegmentationDataset = WarpDataset(train, n, crop=cfg.crop_size, **shared)
    else:
        train_set = SegmentationDataset(train, train_transform(cfg), n, **shared)
    return Datasets(
        train=train_set,
        val=SegmentationDataset(val, eval_transform(cfg), n, **shared),
        test=SegmentationDataset(test_items, eval_transform(cfg), n, **shared),
        class_names=class_names(root if cfg.dataset == "folder" else None, n),
    )
