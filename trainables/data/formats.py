"""On-disk dataset formats (folder, SSCS archive, NEA frames + VIA json) read into image/mask items."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from trainables.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
SSCS_FOLDER = "Corrosion Condition State Classification"
SSCS_COLOURS = {(0, 0, 0): 0, (128, 0, 0): 1, (0, 128, 0): 2, (128, 128, 0): 3}
NEA_LABELS = {"corroded_c1": 1, "corroded_c2": 2}
CLASS_NAMES = {
    4: ("good", "fair", "poor", "severe"),
    3: ("background", "corroded_c1", "corroded_c2"),
}


@dataclass(frozen=True)
class Item:
    """One sample: an image file and where its mask comes from (a file, or NEA polygons)."""

    image: Path
    mask: Path | None = None
    polygons: tuple[tuple[int, tuple[tuple[float, float], ...]], ...] | None = (
        None  # (class, points)
    )
    group: int = 0  # items of one group (a block of video frames) stay in one split


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


def frame_index(name: str) -> int:
    match = re.match(r"(\d+)", Path(name).stem)
    return int(match.group(1)) if match else 0


def via_regions(entry: dict, where: str) -> list[tuple[int, tuple[tuple[float, float], ...]]]:
    regions = entry.get("regions", [])
    if isinstance(regions, dict):
        regions = list(regions.values())
    out = []
    for i, region in enumerate(regions):
        shape = region.get("shape_attributes", {})
        xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
        label = region.get("region_attributes", {}).get("isCorroded")
        if label not in NEA_LABELS:
            raise UserError(
                f"{where} region {i}: isCorroded {label!r}, expected one of {sorted(NEA_LABELS)}"
            )
        if not xs or not ys or len(xs) != len(ys):
            raise UserError(
                f"{where} region {i}: all_points_x and all_points_y must be equal-length lists"
            )
        out.append((NEA_LABELS[label], tuple(zip(xs, ys, strict=True))))
    return out


def read_via(root: Path) -> dict[str, list]:
    path = root / "res.json"
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
    out = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or "filename" not in entry:
            raise UserError(f"{path}: entry {key!r} has no 'filename'")
        out[entry["filename"]] = via_regions(entry, f"{path} entry {entry['filename']}")
    return out


def nea_items(root: Path, block_size: int) -> list[Item]:
    """Every annotated frame, grouped into blocks of consecutive frames."""
    regions = read_via(root)
    items = []
    for name in sorted(regions, key=frame_index):
        image = root / name
        if not image.is_file():
            image = root / "images" / name
        items.append(Item(image, polygons=tuple(regions[name])))
    return [
        Item(it.image, polygons=it.polygons, group=i // block_size) for i, it in enumerate(items)
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
    return chosen or {unique[-1]}


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
