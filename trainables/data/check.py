"""Validate a dataset before any GPU hour is spent, and describe its class distribution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from trainables.config import SSCS_VARIANTS
from trainables.data.formats import (
    CLASS_NAMES,
    Item,
    Polygon,
    Problem,
    _images,
    detect_sscs_variant,
    folder_dirs,
    load_item,
    nea_image,
    nea_items,
    other_sscs_variant,
    read_image,
    read_index_mask,
    scan_via,
    sscs_dirs,
    sscs_root,
)
from trainables.errors import UserError

FORMATS = ("sscs", "nea", "folder", "synthetic")
DEFAULT_CLASSES = {"sscs": 4, "nea": 3}
__all__ = ["Problem", "check_dataset", "class_distribution", "resolve_sscs_variant"]


def _reason(err: UserError) -> str:
    """A UserError's message without the leading 'path: ' (the Problem carries the path)."""
    return str(err).split(": ", 1)[-1]


def _classes(fmt: str, num_classes: int | None) -> int:
    if fmt not in FORMATS:
        raise UserError(f"unknown format '{fmt}'; allowed: {', '.join(FORMATS)}")
    if num_classes is not None:
        return num_classes
    return DEFAULT_CLASSES.get(fmt, 4)


def resolve_sscs_variant(root: Path, variant: str) -> str:
    """`variant` itself, or for 'auto' the one the archive holds (512x512 when it holds both)."""
    if variant == "auto":
        return detect_sscs_variant(Path(root))
    if variant not in SSCS_VARIANTS:
        allowed = ", ".join(("auto", *SSCS_VARIANTS))
        raise UserError(f"unknown SSCS variant '{variant}'; allowed: {allowed}")
    return variant


def _sscs_variant(root: Path, variant: str) -> tuple[str, Problem | None]:
    """The variant to read, and a Problem saying how to pick the other if only it is present."""
    variant = resolve_sscs_variant(root, variant)
    other = other_sscs_variant(root, variant)
    if other is None:
        return variant, None
    return variant, Problem(
        sscs_root(root) / variant,
        f"folder missing, but the archive holds '{other}/': pick it with "
        f"`--sscs-variant {other}` (data check, data stats) "
        f"or `--set data.sscs_variant={other}` (train, sweep)",
    )


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
            problems.append(Problem(images[stem], _reason(err)))
            continue
        try:
            mask = read_index_mask(masks[stem], num_classes)
        except UserError as err:
            problems.append(Problem(masks[stem], _reason(err)))
            continue
        if mask.shape != image.shape[:2]:
            problems.append(
                Problem(
                    masks[stem],
                    f"mask size {mask.shape[::-1]} differs from image size {image.shape[1::-1]}",
                )
            )
    return problems


def _check_frame(root: Path, name: str, polygons: list[Polygon]) -> list[Problem]:
    image = nea_image(root, name)
    if not image.is_file():
        missing = "listed in res.json but the image file is missing (here or in images/)"
        return [Problem(root / name, missing)]
    try:
        load_item(Item(image, polygons=tuple(polygons)), 3)
    except UserError as err:
        return [Problem(image, _reason(err))]
    return []


def _check_nea(root: Path) -> list[Problem]:
    """Every bad entry of res.json, every listed frame missing or unreadable, every unlisted one."""
    try:
        listed, problems = scan_via(root)
    except UserError as err:
        return [Problem(root / "res.json", _reason(err))]
    for name, polygons in listed.items():
        problems += _check_frame(root, name, polygons)
    problems += [
        Problem(frame, "image without annotation in res.json")
        for frame in sorted(root.glob("*.jpg"))
        if frame.name not in listed
    ]
    return problems


def check_dataset(
    root: Path, fmt: str, *, sscs_variant: str = "512x512", num_classes: int | None = None
) -> list[Problem]:
    """Every problem found: unreadable files, unpaired files, size mismatches, unknown labels.

    `sscs_variant` may be 'auto' (see `resolve_sscs_variant`).
    """
    n = _classes(fmt, num_classes)
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"data root not found: {root}")
    if fmt == "nea":
        return _check_nea(root)
    if fmt == "sscs":
        sscs_variant, problem = _sscs_variant(root, sscs_variant)
        if problem is not None:
            return [problem]
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
    """Pixels per class and split (the paper's Figure 4), one row per (split, class).

    `sscs_variant` may be 'auto' (see `resolve_sscs_variant`).
    """
    n = _classes(fmt, num_classes)
    if not Path(root).is_dir():
        raise UserError(f"data root not found: {root}")
    if fmt == "sscs":
        sscs_variant, problem = _sscs_variant(Path(root), sscs_variant)
        if problem is not None:
            raise UserError(f"{problem.path}: {problem.reason}")
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
