"""Masks to colours and arrays to embeddable PNG data URIs (numpy and zlib only)."""

from __future__ import annotations

import base64
import struct
import zlib

import numpy as np

IGNORE = 255
# Index-based: class 0 (good / background) black, then fair yellow, poor orange, severe red.
PALETTE = np.array([(0, 0, 0), (255, 221, 0), (255, 140, 0), (220, 20, 20)], dtype=np.uint8)
PALETTE_NAMES = ("black", "yellow", "orange", "red")
IGNORE_RGB = (128, 128, 128)
UNKNOWN_RGB = (255, 0, 255)  # a class id beyond the palette: loud on purpose


def colorize(mask: np.ndarray) -> np.ndarray:
    """Class ids (H, W) -> RGB (H, W, 3); 255 (ignore) grey."""
    rgb = np.empty((*mask.shape, 3), dtype=np.uint8)
    rgb[:] = UNKNOWN_RGB
    for class_id, colour in enumerate(PALETTE):
        rgb[mask == class_id] = colour
    rgb[mask == IGNORE] = IGNORE_RGB
    return rgb


def downscale(array: np.ndarray, max_side: int) -> np.ndarray:
    """Nearest-neighbour shrink by an integer stride so that no side exceeds max_side."""
    stride = max(1, -(-max(array.shape[:2]) // max_side))
    return array[::stride, ::stride]


def png_data_uri(rgb: np.ndarray) -> str:
    """An (H, W, 3) uint8 array as a `data:image/png;base64,...` URI."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    height, width = rgb.shape[:2]
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(height))  # filter 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")
