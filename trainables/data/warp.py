"""Training augmentation as one affine warp per image, applied to whole uint8 batches on the
training device.

`dataset.train_transform` (albumentations, in DataLoader workers) affines, flips, turns, pads and
crops each image on the CPU: about 5 ms per 512 px image per core, too slow to feed a GPU that
trains at 250 images/s. Every one of those steps is an affine map of pixel coordinates, so here a
worker only draws the parameters (the same transforms with the same distributions, the constants
below) and composes them into one output -> source matrix; `warp_batch` then samples the whole
batch on the device with one `grid_sample` (bilinear images, nearest masks) and normalises it.
Pixels from outside the image are black and their labels ignored, as albumentations fills them.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = 255
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The training augmentation, shared with `dataset.train_transform`.
AFFINE_P = 0.8
SCALE = (0.75, 1.25)  # x and y drawn independently (albumentations' keep_ratio=False)
ROTATE = (-30.0, 30.0)  # degrees
TRANSLATE = (-0.1, 0.1)  # fraction of the width (x) and height (y), whole pixels
FLIP_P = 0.5  # horizontal and vertical, each
ROT90_P = 0.5  # then 0-3 quarter turns, counter-clockwise


def _shift(dx: float, dy: float) -> np.ndarray:
    return np.array([[1.0, 0.0, dx], [0.0, 1.0, dy], [0.0, 0.0, 1.0]])


def affine_matrix(
    scale: tuple[float, float], angle: float, translate: tuple[int, int], h: int, w: int
) -> np.ndarray:
    """Source -> output (3, 3) in pixel-centre coordinates (x right, y down), as albumentations'
    `Affine` builds it: scale, then rotate by `angle` degrees about the image centre, then shift."""
    cx, cy = w / 2 - 0.5, h / 2 - 0.5
    a = np.deg2rad(angle % 360)
    rotate = np.array([[np.cos(a), np.sin(a), 0.0], [-np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return (
        _shift(cx + translate[0], cy + translate[1])
        @ rotate
        @ np.diag([scale[0], scale[1], 1.0])
        @ _shift(-cx, -cy)
    )


def rot90_matrix(k: int, h: int, w: int) -> tuple[np.ndarray, int, int]:
    """`np.rot90(image, k)` as a source -> output matrix, and the turned image's (h, w)."""
    m = np.eye(3)
    for _ in range(k % 4):
        m = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, w - 1.0], [0.0, 0.0, 1.0]]) @ m
        h, w = w, h
    return m, h, w


def sample_transform(rng: np.random.Generator, h: int, w: int, crop: int) -> np.ndarray:
    """One training crop's output pixel -> source pixel map (2, 3), float32.

    In order, as `dataset.train_transform`: affine (p=AFFINE_P), horizontal and vertical flips,
    quarter turns, padding (centred) up to `crop`, then a `crop` x `crop` window at random.
    """
    m = np.eye(3)
    if rng.random() < AFFINE_P:
        scale = (float(rng.uniform(*SCALE)), float(rng.uniform(*SCALE)))
        angle = float(rng.uniform(*ROTATE))
        shift = (int(rng.uniform(*TRANSLATE) * w), int(rng.uniform(*TRANSLATE) * h))
        m = affine_matrix(scale, angle, shift, h, w)
    if rng.random() < FLIP_P:
        m = np.array([[-1.0, 0.0, w - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ m
    if rng.random() < FLIP_P:
        m = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, h - 1.0], [0.0, 0.0, 1.0]]) @ m
    if rng.random() < ROT90_P:
        turn, h, w = rot90_matrix(int(rng.integers(0, 4)), h, w)
        m = turn @ m
    padded_h, padded_w = max(h, crop), max(w, crop)
    top, left = (padded_h - h) // 2, (padded_w - w) // 2
    y0 = int(rng.integers(0, padded_h - crop + 1))
    x0 = int(rng.integers(0, padded_w - crop + 1))
    m = _shift(left - x0, top - y0) @ m
    return np.linalg.inv(m)[:2].astype(np.float32)


def warp_batch(
    images: torch.Tensor, masks: torch.Tensor, theta: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of `size` x `size` from a padded uint8 batch, on the batch's device.

    images (N, H, W, 3) uint8 and masks (N, H, W) uint8, each image at the top left of its canvas
    (images padded with 0, masks with IGNORE_INDEX); theta (N, 2, 3) maps output to source
    pixels. Returns ImageNet-normalised images (N, 3, size, size) float32 and masks
    (N, size, size) int64.
    """
    n, h, w, _ = images.shape
    device = images.device
    axis = torch.arange(size, device=device, dtype=torch.float32)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    out_xy1 = torch.stack((xs, ys, torch.ones_like(xs)), -1).view(1, size * size, 3)
    src = (out_xy1 @ theta.float().transpose(1, 2)).view(n, size, size, 2)  # (x, y) source px
    scale = torch.tensor([2.0 / w, 2.0 / h], device=device)
    grid = (src + 0.5) * scale - 1.0  # pixel centres, align_corners=False
    pixels = F.grid_sample(
        images.permute(0, 3, 1, 2).float(),
        grid,
        mode="bilinear",
        padding_mode="zeros",
        align_corners=False,
    )  # (N, 3, size, size), 0-255
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    nearest = torch.floor(src + 0.5).long()
    ix, iy = nearest[..., 0], nearest[..., 1]
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(n, -1)
    labels = masks.reshape(n, h * w).gather(1, flat).view(n, size, size).long()
    labels = labels.masked_fill(~inside, IGNORE_INDEX)
    return (pixels - mean) / std, labels
