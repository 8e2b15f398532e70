"""Decoded (and resized) images and masks on disk, memory-mapped by every reader.

PNG/JPEG decoding and the `data.resize` step run once per image per machine: the arrays go to
`<cache root>/decoded/<key>.{image,mask}.npy`, and every later reader (each DataLoader worker,
each trial of a sweep, each run) maps them. Pages are shared through the OS page cache, so K
workers or K packed trials do not hold K copies. The key covers the source files (path, size,
modification time), the mask source, the class count, the resize and the cache format, so an
edited image or a new resize is decoded afresh. Files are written to a temporary name and then
renamed: a crash or two workers decoding the same image never leave a half-written array.
Delete the folder to reclaim the space.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from trainables.data.formats import Item, load_item

FORMAT = 1  # bump when decoding changes, so old arrays are not reused


def resize_longest(image: np.ndarray, mask: np.ndarray, size: int | None) -> tuple[np.ndarray, ...]:
    """The longer side to `size` (area-averaged image, nearest mask); None keeps the size."""
    if size is None:
        return image, mask
    resize = A.LongestMaxSize(
        max_size=size, interpolation=cv2.INTER_AREA, mask_interpolation=cv2.INTER_NEAREST, p=1.0
    )
    out = resize(image=image, mask=mask)
    return out["image"], out["mask"]


def decode(item: Item, num_classes: int, resize: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8, mask (H, W) uint8), read and resized; no cache."""
    image, mask = load_item(item, num_classes)
    image, mask = resize_longest(image, mask, resize)
    return np.ascontiguousarray(image, np.uint8), np.ascontiguousarray(mask, np.uint8)


def _stat(path: Path | None) -> list[object] | None:
    if path is None:
        return None
    st = path.stat()
    return [str(Path(path).resolve()), st.st_size, st.st_mtime_ns]


def cache_key(item: Item, num_classes: int, resize: int | None) -> str:
    source = {
        "format": FORMAT,
        "image": _stat(item.image),
        "mask": _stat(item.mask),
        "polygons": item.polygons,
        "classes": num_classes,
        "resize": resize,
    }
    return hashlib.sha1(json.dumps(source, default=str).encode()).hexdigest()


def _save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load(path: Path) -> np.ndarray | None:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # missing, or unreadable: decode again
        return None


def cached(
    item: Item, num_classes: int, resize: int | None, root: Path
) -> tuple[np.ndarray, np.ndarray]:
    """`decode(item)`, from `root` when already there (read-only memory maps), else decoded and
    stored there first."""
    try:
        key = cache_key(item, num_classes, resize)
    except OSError:  # a missing source file: let the decoder name it
        return decode(item, num_classes, resize)
    image_path, mask_path = root / f"{key}.image.npy", root / f"{key}.mask.npy"
    image, mask = _load(image_path), _load(mask_path)
    if image is not None and mask is not None and image.shape[:2] == mask.shape:
        return image, mask
    image, mask = decode(item, num_classes, resize)
    try:
        root.mkdir(parents=True, exist_ok=True)
        _save(mask_path, mask)
        _save(image_path, image)
    except OSError as err:  # a full or read-only disk costs speed, not the run
        warnings.warn(
            f"decode cache {root} not writable ({err}); images are decoded each time",
            stacklevel=2,
        )
    return image, mask
