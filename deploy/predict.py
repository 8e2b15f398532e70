"""Predictions an inspector can use: colour overlays, index masks and corroded area per class."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from deploy.artefacts import Artefact
from trainables.checkpoint import write_json, write_text
from trainables.data.warp import IMAGENET_MEAN, IMAGENET_STD
from trainables.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
STD = np.array(IMAGENET_STD, dtype=np.float32)
# Background transparent, then yellow, orange, red by severity (colour-blind safe enough in order).
PALETTE = np.array(
    [[0, 0, 0], [255, 221, 0], [255, 136, 0], [220, 20, 20], [150, 0, 200]], dtype=np.uint8
)


@dataclass(frozen=True)
class Prediction:
    image: Path
    mask: np.ndarray  # (H, W) uint8 class indices
    area_percent: list[float]


def collect_images(inputs: list[Path]) -> list[Path]:
    """Files as given, folders expanded to their images (sorted); a missing path is an error."""
    found: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"no such image or folder: {path}")
    if not found:
        raise UserError(
            f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {', '.join(map(str, inputs))}"
        )
    return found


def read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"))  # (H, W, 3) uint8
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise UserError(f"{path}: unreadable image ({err})") from None


def preprocess(rgb: np.ndarray, multiple: int = 32) -> np.ndarray:
    """A model's input for an image of any size: ImageNet-normalised, then padded with zeros at
    the bottom/right to a multiple of 32. (1, 3, H', W') float32."""
    h, w = rgb.shape[:2]
    x = (rgb.astype(np.float32) / 255.0 - MEAN) / STD  # (H, W, 3)
    x = np.pad(x, ((0, -h % multiple), (0, -w % multiple), (0, 0)))
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def predict_mask(model: Artefact, rgb: np.ndarray) -> np.ndarray:
    """Class index per pixel (H, W) uint8 for an image of any size (padded, then cropped)."""
    h, w = rgb.shape[:2]
    logits = model(preprocess(rgb))  # (1, C, H', W')
    return logits[0, :, :h, :w].argmax(0).astype(np.uint8)


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    colours = PALETTE[np.minimum(mask, len(PALETTE) - 1)].astype(np.float32)
    blend = np.where(mask[..., None] > 0, (1 - alpha) * rgb + alpha * colours, rgb)
    return blend.round().astype(np.uint8)


def _save_png(array: np.ndarray, path: Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def predict_files(
    model: Artefact, images: list[Path], out: Path
) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Writes `<stem>_overlay.png`, `<stem>_mask.png` per image; bad images are reported, not fatal."""
    out.mkdir(parents=True, exist_ok=True)
    class_names = list(model.class_names)
    done: list[Prediction] = []
    failed: list[tuple[Path, str]] = []
    for path in images:
        try:
            rgb = read_rgb(path)
        except UserError as err:
            failed.append((path, str(err)))
            continue
        mask = predict_mask(model, rgb)
        counts = np.bincount(mask.ravel(), minlength=len(class_names))[: len(class_names)]
        area = (100.0 * counts / mask.size).round(3).tolist()
        _save_png(overlay(rgb, mask), out / f"{path.stem}_overlay.png")
        _save_png(mask, out / f"{path.stem}_mask.png")
        done.append(Prediction(path, mask, area))
    write_area_tables(done, failed, out, class_names)
    return done, failed


def write_area_tables(
    done: list[Prediction], failed: list[tuple[Path, str]], out: Path, class_names: list[str]
) -> None:
    rows: list[dict[str, Any]] = []
    for p in done:
        row: dict[str, Any] = {
            "image": str(p.image),
            "height": p.mask.shape[0],
            "width": p.mask.shape[1],
        }
        row.update(
            {f"area_pct_{name}": a for name, a in zip(class_names, p.area_percent, strict=True)}
        )
        row["area_pct_corroded"] = round(sum(p.area_percent[1:]), 3)
        rows.append(row)
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    write_text(out / "areas.csv", buf.getvalue())
    write_json(
        out / "areas.json",
        {
            "class_names": class_names,
            "images": rows,
            "failed": [{"image": str(path), "error": reason} for path, reason in failed],
        },
    )


def summary(done: list[Prediction], failed: list[tuple[Path, str]], out: Path) -> str:
    lines = [f"{len(done)} image(s) predicted; overlays, masks and areas.csv in {out.resolve()}"]
    lines += [f"skipped {reason}" for _, reason in failed]
    return "\n".join(lines)
