"""Validate a dataset before any GPU hour is spent, and describe its class distribution."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from trainables.data.formats import (
    CLASS_NAMES,
    _images,
    folder_dirs,
    frame_index,
    load_item,
    nea_items,
    read_image,
    read_index_mask,
    sscs_dirs,
)
from trainables.errors import UserError

FORMATS = ("sscs", "nea", "folder", "synthetic")
DEFAULT_CLASSES = {"sscs": 4, "nea": 3}


@dataclass(frozen=True)
class Problem:
    path: Path
    reason: str


def _classes(fmt: str, num_classes: int | None) -> int:
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; allowed: {', '.join(FORMATS)}")
    if num_classes is not None:
        return num_classes
    return DEFAULT_CLASSES.get(fmt, 4)


def _pair_dirs(root: Path, fmt: str, sscs_variant: str) -> list[tuple[str, Path, Path]]:
    dirs = []
    for split in ("train", "test"):
        images, masks = (
            sscs_dirs(root, split, sscs_variant) if fmt == "sscs" else folder_dirs(root, split)
        )
        dirs.append((split, images, masks))
    return dirs


def _check_pairs(images_dir: Path, masks_dir: Path, num_classes: int) -> list[Problem]:
    problems = [Problem(d, "folder missing") for d in (images_dir, masks_dir) if not d.is_dir()]
    if problems:
        return problems
    images, masks = _images(images_dir), _images(masks_dir)
    problems += [Problem(images[s], "image without mask") for s in sorted(set(images) - set(masks))]
    problems += [Problem(masks[s], "mask without image") for s in sorted(set(masks) - set(images))]
    for stem in sorted(set(images) & set(masks)):
        try:
            image = read_image(images[stem])
        except UserError as err:
            problems.append(Problem(images[stem], str(err).split(": ", 1)[-1]))
            continue
        try:
            mask = read_index_mask(masks[stem], num_classes)
        except UserError as err:
            problems.append(Problem(masks[stem], str(err).split(": ", 1)[-1]))
            continue
        if mask.shape != image.shape[:2]:
            problems.append(
                Problem(
                    masks[stem],
                    f"mask size {mask.shape[::-1]} differs from image size {image.shape[1::-1]}",
                )
            )
    return problems


def _check_nea(root: Path) -> list[Problem]:
    try:
        items = nea_items(root, block_size=1)
    except UserError as err:
        return [Problem(root / "res.json", str(err))]
    problems = []
    annotated = {it.image.name for it in items}
    for item in items:
        if not item.image.is_file():
            problems.append(Problem(item.image, "listed in res.json but the image file is missing"))
            continue
        try:
            load_item(item, 3)
        except UserError as err:
            problems.append(Problem(item.image, str(err).split(": ", 1)[-1]))
    for frame in sorted(root.glob("*.jpg"), key=lambda p: frame_index(p.name)):
        if frame.name not in annotated:
            problems.append(Problem(frame, "image without annotation in res.json"))
    return problems


def check_dataset(
    root: Path, fmt: str, *, sscs_variant: str = "512x512", num_classes: int | None = None
) -> list[Problem]:
    """Every problem found: unreadable files, unpaired files, size mismatches, unknown labels."""
    n = _classes(fmt, num_classes)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    if fmt == "nea":
        return _check_nea(root)
    problems = []
    for _, images, masks in _pair_dirs(root, fmt, sscs_variant):
        problems += _check_pairs(images, masks, n)
    return problems


def _masks(root: Path, fmt: str, sscs_variant: str, n: int) -> list[tuple[str, np.ndarray]]:
    if fmt == "nea":
        return [("all", load_item(it, n)[1]) for it in nea_items(root, block_size=1)]
    out = []
    for split, _, masks in _pair_dirs(root, fmt, sscs_variant):
        if not masks.is_dir():
            raise UserError(f"expected folder {masks}")
        for path in _images(masks).values():
            out.append((split, read_index_mask(path, n)))
    return out


def class_distribution(
    root: Path, fmt: str, *, sscs_variant: str = "512x512", num_classes: int | None = None
) -> pd.DataFrame:
    """Pixels per class and split (the paper's Figure 4), one row per (split, class)."""
    n = _classes(fmt, num_classes)
    if not Path(root).is_dir():
        raise UserError(f"data root not found: {root}")
    counts: dict[str, np.ndarray] = {}
    for split, mask in _masks(Path(root), fmt, sscs_variant, n):
        counts[split] = (
            counts.get(split, np.zeros(n, np.int64)) + np.bincount(mask.ravel(), minlength=n)[:n]
        )
    names = CLASS_NAMES.get(n, tuple(f"class{i}" for i in range(n)))
    rows = [
        {
            "split": split,
            "class_id": c,
            "class_name": names[c],
            "pixels": int(total[c]),
            "percent": 100.0 * total[c] / max(total.sum(), 1),
        }
        for split, total in counts.items()
        for c in range(n)
    ]
    return pd.DataFrame(rows, columns=["split", "class_id", "class_name", "pixels", "percent"])
