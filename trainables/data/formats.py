"""On-disk dataset formats (folder, SSCS archive, NEA frames + VIA json) read into image/mask items."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainables.config import SSCS_VARIANTS
from trainables.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SSCS_FOLDER = "Corrosion Condition State Classification"
SSCS_COLOURS = {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2, (128, 128, 0): 3}
NEA_LABELS = {"corroded_c1": 1, "corroded_c2": 2}
Polygon = tuple[int, tuple[tuple[float, float], ...]]  # (class, points)
CLASS_NAMES = {
    4: ("good", "fair", "poor", "severe"),
    3: ("background", "corroded_c1", "corroded_c2"),
}


@dataclass(frozen=True)
class Item:
    """One sample: an image file and where its mask comes from (a file, or NEA polygons)."""

    image: Path
    mask: Path | None = None
    polygons: tuple[Polygon, ...] | None = None
    group: int = 0  # items of one group (a block of video frames) stay in one split


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: the file, and what was expected of it."""

    path: Path
    reason: str


def _images(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}


def paired_items(images_dir: Path, masks_dir: Path) -> list[Item]:
    """Images and masks matched by stem; unpaired files are left to `data check` to report."""
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise UserError(f"expected folder {d} (images and masks with the same stems)")
    images, masks = _images(images_dir), _images(masks_dir)
    return [Item(images[s], masks[s], group=i) for i, s in enumerate(sorted(images)) if s in masks]


def folder_dirs(root: Path, split: str) -> tuple[Path, Path]:
    return root / split / "images", root / split / "masks"


def sscs_root(root: Path) -> Path:
    """Accept the archive folder itself or its parent."""
    if (root / SSCS_FOLDER).is_dir():
        return root / SSCS_FOLDER
    return root


def sscs_variant_present(root: Path, variant: str) -> bool:
    return (sscs_root(root) / variant).is_dir()


def detect_sscs_variant(root: Path) -> str:
    """The variant whose folder the archive holds; 512x512 when it holds both or neither."""
    present = [v for v in SSCS_VARIANTS if sscs_variant_present(root, v)]
    return present[0] if len(present) == 1 else "512x512"


def other_sscs_variant(root: Path, variant: str) -> str | None:
    """The other variant when `variant`'s folder is missing but the other's is there."""
    other = next(v for v in SSCS_VARIANTS if v != variant)
    if sscs_variant_present(root, variant) or not sscs_variant_present(root, other):
        return None
    return other


def sscs_dirs(root: Path, split: str, variant: str) -> tuple[Path, Path]:
    base = sscs_root(root)
    cap = split.capitalize()
    if variant == "512x512":
        return base / "512x512" / cap / "images_512", base / "512x512" / cap / "mask_512"
    return base / "original" / cap / "images", base / "original" / cap / "masks"


def read_image(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); fully decoded so a truncated file fails here."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: unreadable image ({err})") from None


def read_index_mask(path: Path, num_classes: int) -> np.ndarray:
    """Index mask (H, W) uint8 from a palette/greyscale PNG of indices or an SSCS RGB mask."""
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            array = np.asarray(img.convert("RGB") if mode in ("RGB", "RGBA") else img)
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{path}: unreadable mask ({err})") from None
    if array.ndim == 3:
        return rgb_to_index(array, path)
    if array.ndim != 2:
        raise UserError(
            f"{path}: mask must be single-channel indices or RGB, got shape {array.shape}"
        )
    bad = np.unique(array[array >= num_classes])
    if bad.size:
        raise UserError(f"{path}: mask values {bad.tolist()[:5]} outside 0..{num_classes - 1}")
    return array.astype(np.uint8)


def rgb_to_index(rgb: np.ndarray, path: Path) -> np.ndarray:
    codes = rgb[..., 0].astype(np.int32) << 16 | rgb[..., 1].astype(np.int32) << 8 | rgb[..., 2]
    out = np.full(codes.shape, 255, np.uint8)
    for colour, index in SSCS_COLOURS.items():
        out[codes == (colour[0] << 16 | colour[1] << 8 | colour[2])] = index
    if (out == 255).any():
        unknown = {tuple(int(v) for v in c) for c in rgb[out == 255][:1000]}
        raise UserError(
            f"{path}: unknown mask colours {sorted(unknown)[:4]}; expected "
            f"{', '.join(map(str, SSCS_COLOURS))} (good, fair, poor, severe)"
        )
    return out


# ---- NEA ------------------------------------------------------------------------------------


FRAME_NUMBER = re.compile(r"\d+")
NO_FRAME_NUMBER = "frame name has no frame number; expected it to start with one, e.g. '12_84.jpg'"


def frame_index(name: str) -> int:
    """The frame number a NEA file name starts with ('12_84.jpg' -> 12)."""
    match = FRAME_NUMBER.match(Path(name).stem)
    if match is None:
        raise UserError(f"{name}: {NO_FRAME_NUMBER}")
    return int(match.group())


def _mapping(value: object) -> dict:
    return value if isinstance(value, dict) else {}


def _points(shape: dict) -> tuple[tuple[float, float], ...] | None:
    """A polygon's points; None unless all_points_x/y are equal-length lists of numbers."""
    xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
    if not (isinstance(xs, list) and isinstance(ys, list) and xs and len(xs) == len(ys)):
        return None
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in xs + ys):
        return None
    return tuple(zip(xs, ys, strict=True))


def _region(region: object) -> tuple[Polygon | None, list[str]]:
    """One VIA region as (class, points), or None and what is wrong with it."""
    fields = _mapping(region)
    label = _mapping(fields.get("region_attributes")).get("isCorroded")
    shape = _mapping(fields.get("shape_attributes"))
    points = _points(shape)
    problems = []
    if not isinstance(label, str) or label not in NEA_LABELS:
        problems.append(f"isCorroded {label!r}, expected one of {sorted(NEA_LABELS)}")
    if points is None:
        kind = shape.get("name")
        only = f" (shape {kind!r}; only polygons are read)" if kind not in (None, "polygon") else ""
        problems.append(
            f"expected all_points_x and all_points_y as equal-length lists of numbers{only}"
        )
    if problems:
        return None, problems
    return (NEA_LABELS[label], points), []


def _entry_polygons(entry: dict) -> tuple[list[Polygon], list[str]]:
    """The drawable regions of one VIA entry, and 'region i: ...' for each region that is not."""
    regions = entry.get("regions", [])
    if isinstance(regions, dict):
        regions = list(regions.values())
    if not isinstance(regions, list):
        return [], ["regions: expected a list of VIA regions"]
    polygons, problems = [], []
    for i, region in enumerate(regions):
        polygon, reasons = _region(region)
        problems += [f"region {i}: {r}" for r in reasons]
        if polygon is not None:
            polygons.append(polygon)
    return polygons, problems


def _via_entries(path: Path) -> dict:
    """res.json's entries (a VIA project or its bare image metadata); UserError if unreadable."""
    if not path.is_file():
        raise UserError(f"NEA annotations not found: expected {path} (VGG Image Annotator json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if isinstance(data, dict) and "_via_img_metadata" in data:
        data = data["_via_img_metadata"]
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of VIA entries with 'filename' and 'regions'")
    return data


def scan_via(root: Path) -> tuple[dict[str, list[Polygon]], list[Problem]]:
    """Every listed frame with its drawable polygons, and a Problem for each bad entry or region.

    A UserError only when res.json itself is missing or unreadable.
    """
    path = root / "res.json"
    listed: dict[str, list[Polygon]] = {}
    problems = []
    for key, entry in _via_entries(path).items():
        name = _mapping(entry).get("filename")
        if not isinstance(name, str) or not name:
            problems.append(Problem(path, f"entry {key!r} has no 'filename'"))
        elif name in listed:
            problems.append(Problem(path, f"entry {key!r}: {name!r} is already listed"))
        else:
            listed[name], reasons = _entry_polygons(entry)
            problems += [Problem(path, f"entry {name!r} {r}") for r in reasons]
            if not FRAME_NUMBER.match(Path(name).stem):
                problems.append(Problem(root / name, NO_FRAME_NUMBER))
    return listed, problems


def read_via(root: Path) -> dict[str, list[Polygon]]:
    """Polygons per frame name; a UserError naming the first problem and how many follow."""
    listed, problems = scan_via(root)
    if problems:
        first, more = problems[0], len(problems) - 1
        listing = f"`corroprune data check {root} --format nea` lists them all"
        tail = f"; {more} more: {listing}" if more else ""
        raise UserError(f"{first.path}: {first.reason}{tail}")
    return listed


def nea_image(root: Path, name: str) -> Path:
    """A listed frame: in the folder itself, else in its images/ subfolder."""
    image = root / name
    return image if image.is_file() else root / "images" / name


def nea_items(root: Path, block_size: int) -> list[Item]:
    """Every annotated frame, grouped into blocks of consecutive frames."""
    regions = read_via(root)
    names = sorted(regions, key=frame_index)
    return [
        Item(nea_image(root, name), polygons=tuple(regions[name]), group=i // block_size)
        for i, name in enumerate(names)
    ]


def rasterise(polygons: tuple, height: int, width: int) -> np.ndarray:
    """Polygons to an index mask; c1 drawn first so c2 (more severe) wins where they overlap."""
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    for cls, points in sorted(polygons, key=lambda p: p[0]):
        draw.polygon([tuple(map(float, pt)) for pt in points], fill=int(cls))
    return np.asarray(canvas, dtype=np.uint8)


def split_blocks(groups: list[int], fraction: float, offset: int = 0) -> set[int]:
    """Every k-th block (k = round(1/fraction)), spread through the video, starting at `offset`."""
    unique = sorted(set(groups))
    step = max(round(1 / fraction), 2)
    chosen = {g for i, g in enumerate(unique) if (i - offset) % step == step - 1}
    return chosen or set(unique[-1:])


def guard_blocks(groups: Iterable[int], chosen: set[int], guard: int) -> set[int]:
    """The blocks within `guard` blocks (in video order) of a chosen one, not chosen themselves:
    the gap that keeps near-duplicate frames out of two splits."""
    near = {c + d for c in chosen for d in range(-guard, guard + 1)}
    return (near & set(groups)) - chosen


def block_runs(blocks: Iterable[int]) -> list[list[int]]:
    """Maximal runs of consecutive block numbers, in video order."""
    runs: list[list[int]] = []
    for block in sorted(set(blocks)):
        if runs and block == runs[-1][-1] + 1:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


def _run_ends(run: list[int], guard: int, whole: bool) -> list[tuple[list[int], list[int]]]:
    """(validation, unused) choices at the start of `run`: a part followed by `guard` unused
    blocks and at least one training block, or all of it when `whole`."""
    parts = [(run[:k], run[k : k + guard]) for k in range(1, len(run) - guard)]
    return parts + ([(run, [])] if whole else [])


def val_blocks(groups: list[int], fraction: float, seed: int, guard: int) -> set[int]:
    """Validation blocks for about `fraction` of the frames (`groups`: a block per frame), taken
    at ends of runs of consecutive blocks, in an order drawn from `seed`.

    A whole run costs no frames: between runs lie a test block and its guard blocks (see
    `split_items`). Part of a run costs the `guard` blocks left unused after it, so it is taken
    only where that brings the share closer to `fraction` by more than the frames it leaves
    unused, or where nothing else gives a validation block. Empty when every choice would leave
    no training block. The caller drops training blocks within `guard` of these (`guard_blocks`).
    """
    frames = Counter(groups)
    target = fraction * len(groups)
    rng = np.random.default_rng(seed)
    runs = block_runs(frames)
    runs = [runs[i] if rng.random() < 0.5 else runs[i][::-1] for i in rng.permutation(len(runs))]
    chosen: list[int] = []

    def cost(choice: tuple[list[int], list[int]]) -> float:
        val, unused = choice
        share = sum(frames[b] for b in chosen + val)
        return abs(share - target) + sum(frames[b] for b in unused)

    whole = 0  # runs taken whole; at least one run keeps training blocks
    for run in runs:
        best = min(_run_ends(run, guard, whole < len(runs) - 1), key=cost, default=None)
        if best is not None and cost(best) < cost(([], [])):
            chosen += best[0]
            whole += best[0] == run
    if not chosen:
        ends = [c for run in runs for c in _run_ends(run, guard, len(runs) > 1)]
        chosen = min(ends, key=cost, default=([], []))[0]
    return set(chosen)


def load_item(item: Item, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    image = read_image(item.image)
    if item.polygons is not None:
        mask = rasterise(item.polygons, *image.shape[:2])
    else:
        mask = read_index_mask(item.mask, num_classes)
    if mask.shape != image.shape[:2]:
        raise UserError(
            f"{item.mask}: mask size {mask.shape[::-1]} != image size {image.shape[1::-1]}"
        )
    return image, mask
