"""A procedural corrosion set: painted or bare metal with rust patches of graded severity.

Severity is nested (severe cores inside poor inside fair), boundaries follow fractal noise, and
colour alone does not decide the class: rust hue varies per image, stains on sound metal look
rusty, and severity shows in texture (pitting) as much as in colour. Class shares follow SSCS:
good about 80%, severe the rarest.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from trainables.errors import UserError

# Shares of the corroded area taken by poor-or-worse and by severe (nested quantiles).
POOR_SHARE = 0.42
SEVERE_SHARE = 0.075


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Noise with features about size/cells pixels wide, in [0, 1] (bicubic-upsampled grid)."""
    grid = rng.random((cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(grid, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    out = np.asarray(img, dtype=np.float32)
    return (out - out.min()) / max(float(out.max() - out.min()), 1e-6)


def fractal_noise(
    rng: np.random.Generator, size: int, base_cells: int, octaves: int = 4
) -> np.ndarray:
    out = np.zeros((size, size), np.float32)
    amp, total = 1.0, 0.0
    for octave in range(octaves):
        out += amp * smooth_noise(rng, size, min(base_cells * 2**octave, size))
        total += amp
        amp *= 0.5
    return out / total


def metal_surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """Brushed or painted metal with a lighting gradient, a seam and bolts; (H, W, 3) float in [0, 1]."""
    painted = rng.random() < 0.4
    base = (
        rng.uniform([0.30, 0.45, 0.40], [0.55, 0.65, 0.70])
        if painted
        else np.full(3, rng.uniform(0.45, 0.7))
    )
    streaks = np.repeat(rng.normal(0, 1, (size, 1)), size, axis=1)  # brushed along x
    streaks = 0.5 * streaks + 0.5 * rng.normal(0, 1, (size, size))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    light = 0.85 + 0.3 * (np.cos(angle) * xx + np.sin(angle) * yy - 0.5)
    grey = light * (1 + 0.04 * streaks) + 0.06 * (fractal_noise(rng, size, 3) - 0.5)
    img = grey[..., None] * base[None, None, :]
    if rng.random() < 0.5:  # a panel seam
        pos = rng.integers(size // 5, 4 * size // 5)
        width = max(1, size // 64)
        img[pos : pos + width] *= 0.45
    for _ in range(rng.integers(0, 4)):  # bolts
        cy, cx = rng.integers(0, size, 2)
        r = max(1.5, size / 40)
        disk = (yy * size - cy) ** 2 + (xx * size - cx) ** 2 < r**2
        img[disk] = img[disk] * 0.6 + 0.25
    return img


def corrosion_field(rng: np.random.Generator, size: int) -> np.ndarray:
    """Where rust grows: a few patches (blobs) roughened by fractal noise; higher = worse."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    blobs = np.zeros((size, size), np.float32)
    for _ in range(rng.integers(1, 5)):
        cy, cx = rng.random(2)
        sy, sx = rng.uniform(0.06, 0.28, 2)
        blobs += rng.uniform(0.5, 1.0) * np.exp(
            -((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2))
        )
    edge = fractal_noise(rng, size, 4, octaves=5)
    return blobs * (0.55 + 0.9 * edge)


def severity_levels(field: np.ndarray, coverage: float) -> np.ndarray:
    """0..3 by nested quantiles of the field: the top `coverage` is corroded, its core worse."""
    flat = field.ravel()
    q_fair, q_poor, q_severe = np.quantile(
        flat, [1 - coverage, 1 - coverage * POOR_SHARE, 1 - coverage * SEVERE_SHARE]
    )
    levels = (field > q_fair).astype(np.uint8) + (field > q_poor) + (field > q_severe)
    return levels.astype(np.uint8)


def paint_rust(rng: np.random.Generator, img: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Colour and texture per severity; hue jittered per image so colour alone is ambiguous."""
    size = img.shape[0]
    hue = rng.uniform(-0.06, 0.06, 3)
    colours = {
        1: np.array([0.72, 0.45, 0.22]) + hue,  # fair: light orange-brown surface rust
        2: np.array([0.50, 0.26, 0.11]) + hue,  # poor: dark brown, flaking
        3: np.array([0.24, 0.12, 0.07]) + hue,  # severe: near black, pitted
    }
    pits = rng.random((size, size)) < 0.12
    grain = fractal_noise(rng, size, 8, octaves=3) - 0.5
    out = img.copy()
    for level, colour in colours.items():
        where = levels == level
        strength = {1: 0.55, 2: 0.8, 3: 0.92}[level]
        texture = 1 + (0.25 + 0.25 * level) * grain[..., None]
        out[where] = (1 - strength) * img[where] + strength * (colour * texture[where])
        if level >= 2:
            dark = where & pits
            out[dark] *= 0.55 if level == 3 else 0.8
    return out


def add_stains(rng: np.random.Generator, img: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Rust-coloured stains and dirt on sound metal (label stays good): distractors."""
    size = img.shape[0]
    field = corrosion_field(rng, size)
    stain = (field > np.quantile(field, 0.93)) & (levels == 0)
    tint = np.array([0.62, 0.44, 0.30]) + rng.uniform(-0.05, 0.05, 3)
    out = img.copy()
    out[stain] = 0.65 * out[stain] + 0.35 * tint
    return out


def generate_sample(
    rng: np.random.Generator, size: int, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its mask (H, W) uint8 with values in 0..classes-1."""
    img = metal_surface(rng, size)
    coverage = float(np.clip(rng.gamma(2.0, 0.1), 0.02, 0.55))  # mean corroded share about 0.2
    levels = severity_levels(corrosion_field(rng, size), coverage)
    img = paint_rust(rng, img, levels)
    img = add_stains(rng, img, levels)
    img += rng.normal(0, 0.025, img.shape)  # sensor noise
    image = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    if classes == 3:  # NEA-style: background, c1 (fair), c2 (poor or severe)
        levels = np.minimum(levels, 2)
    return image, levels


def _complete(out: Path, params: dict) -> bool:
    marker = out / "synthetic.json"
    return marker.exists() and json.loads(marker.read_text()) == params


def write_synthetic(
    out: Path, *, train: int, test: int, size: int, classes: int, seed: int
) -> Path:
    """Write the folder format (split/images, split/masks); a complete identical set is kept.

    Safe when several processes (the trials of a sweep) write the same set at once: each writes
    into its own temporary folder and renames it into place; the first complete copy wins.
    """
    out = Path(out)
    params = {"train": train, "test": test, "size": size, "classes": classes, "seed": seed}
    if _complete(out, params):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    tmp.chmod(0o755)  # mkdtemp makes 0700; the set is meant to be shared
    try:
        for split, count, split_seed in (("train", train, seed), ("test", test, seed + 10_000)):
            rng = np.random.default_rng(split_seed)
            (tmp / split / "images").mkdir(parents=True)
            (tmp / split / "masks").mkdir(parents=True)
            for i in range(count):
                image, mask = generate_sample(rng, size, classes)
                Image.fromarray(image).save(tmp / split / "images" / f"{i:05d}.png")
                Image.fromarray(mask, mode="L").save(tmp / split / "masks" / f"{i:05d}.png")
        (tmp / "synthetic.json").write_text(json.dumps(params))  # written last: marks completeness
        if out.exists() and not _complete(out, params):
            shutil.rmtree(out, ignore_errors=True)  # another set, or an incomplete one
        with contextlib.suppress(OSError):  # another writer renamed its copy first
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _complete(out, params):
        raise UserError(f"could not write the synthetic set to {out}")
    return out
