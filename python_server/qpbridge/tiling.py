"""Tile grids in full-resolution coordinates (pure functions)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from qpbridge.protocol import TileSpec


def grid(width: int, height: int, tile: int, overlap: int = 0) -> list[tuple[int, int, int, int]]:
    """(x, y, w, h) boxes of at most ``tile`` px covering a width x height image; edge tiles are clipped."""
    if tile <= 0 or overlap < 0 or overlap >= tile:
        raise ValueError(f"need 0 <= overlap < tile, got tile={tile}, overlap={overlap}")
    step = tile - overlap
    xs = range(0, max(width - overlap, 1), step)
    ys = range(0, max(height - overlap, 1), step)
    return [(x, y, min(tile, width - x), min(tile, height - y)) for y in ys for x in xs]


def image_tiles(img: np.ndarray, image_mpp: float | None, model_mpp: float, tile: int,
                overlap: int = 0) -> Iterator[tuple[TileSpec, np.ndarray]]:
    """Tiles of an in-memory full-resolution image, downsampled to the model's pixel size first.

    When the image is finer than the model (or its pixel size is unknown), tiles are cut from a resized
    copy and carry the downsample that maps them back to full resolution.
    """
    import cv2

    h, w = img.shape[:2]
    ds = model_mpp / image_mpp if image_mpp else 1.0
    if ds > 1.0 + 1e-3:
        small_w, small_h = max(1, round(w / ds)), max(1, round(h / ds))
        small = cv2.resize(img, (small_w, small_h), interpolation=cv2.INTER_AREA)
        ds = w / small_w  # the exact factor of the resize, so coordinates land where they belong
    else:
        small, ds = img, 1.0
    sh, sw = small.shape[:2]
    for x, y, tw, th in grid(sw, sh, tile, overlap):
        px = np.ascontiguousarray(small[y:y + th, x:x + tw])
        yield TileSpec(x=math.floor(x * ds), y=math.floor(y * ds), width=tw, height=th,
                       downsample=ds), px
