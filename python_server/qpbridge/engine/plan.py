"""Tile plans: the grid of overlapping tiles at the model's pixel size over a region of an image.

Engine types only; what a client is told to read (``TileSpec``) is made in :mod:`qpbridge.protocol`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from qpbridge.cards import ModelCard
from qpbridge.errors import BadRequestError


@dataclass(frozen=True)
class PlannedTile:
    """A tile in canvas pixels (the model's pixel size); row/col index the full grid."""

    index: int
    row: int
    col: int
    x: int
    y: int
    w: int
    h: int


@dataclass
class TilePlan:
    """A grid over a canvas of ``width`` x ``height`` model pixels.

    Canvas pixel (u, v) is full-resolution point (origin_x + u * ds, origin_y + v * ds). ``tiles`` holds
    only the tiles kept (those touching tissue / the ROI); rows and cols count the full grid.
    """

    width: int
    height: int
    tile: int
    overlap: int
    ds: float
    origin_x: int
    origin_y: int
    rows: int
    cols: int
    tiles: list[PlannedTile] = field(default_factory=list)

    @property
    def step(self) -> int:
        return self.tile - self.overlap

    def tiles_per_row(self) -> list[int]:
        counts = [0] * self.rows
        for t in self.tiles:
            counts[t.row] += 1
        return counts

    def fullres_box(self, t: PlannedTile) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the tile in full-resolution pixels."""
        return (self.origin_x + t.x * self.ds, self.origin_y + t.y * self.ds,
                self.origin_x + (t.x + t.w) * self.ds, self.origin_y + (t.y + t.h) * self.ds)


def _count(extent: int, tile: int, step: int) -> int:
    return 1 if extent <= tile else math.ceil((extent - tile) / step) + 1


def _grid(card: ModelCard, region: tuple[int, int, int, int], fullres_mpp: float | None, tile: int,
          overlap: int) -> tuple[float, int, int, int, int]:
    """(downsample, canvas width and height, columns, rows) of a plan's grid over ``region``."""
    ds = card.mpp / fullres_mpp if fullres_mpp else 1.0
    cw, ch = max(1, math.ceil(region[2] / ds - 1e-9)), max(1, math.ceil(region[3] / ds - 1e-9))
    return ds, cw, ch, _count(cw, tile, tile - overlap), _count(ch, tile, tile - overlap)


def grid_tiles(card: ModelCard, region: tuple[int, int, int, int], fullres_mpp: float | None) -> int:
    """Tiles of a plan over ``region`` before any are dropped (rows x columns), without planning them."""
    _, _, _, cols, rows = _grid(card, region, fullres_mpp, card.tile_size, card.plan_overlap)
    return cols * rows


def make_plan(card: ModelCard, region: tuple[int, int, int, int], fullres_mpp: float | None,
              keep: BaseGeometry | None = None, *, tile: int | None = None, overlap: int | None = None) -> TilePlan:
    """Plan tiles over ``region`` = (x, y, width, height) in full-resolution pixels.

    ``keep`` (full-resolution geometry: tissue, an ROI, or both intersected) drops tiles that do not
    touch it, so background never reaches the model.
    """
    x, y, w, h = region
    if w <= 0 or h <= 0:
        raise BadRequestError(f"region {region} is empty")
    tile = tile or card.tile_size
    overlap = card.plan_overlap if overlap is None else overlap
    if not 0 <= overlap < tile:
        raise BadRequestError(f"overlap must be in [0, tile size {tile}), got {overlap}")
    ds, cw, ch, cols, rows = _grid(card, region, fullres_mpp, tile, overlap)
    step = tile - overlap
    plan = TilePlan(width=cw, height=ch, tile=tile, overlap=overlap, ds=ds, origin_x=x, origin_y=y,
                    rows=rows, cols=cols)
    cand = []
    for r in range(rows):
        ty = r * step
        for c in range(cols):
            tx = c * step
            cand.append((r, c, tx, ty, min(tile, cw - tx), min(tile, ch - ty)))
    if keep is not None and not keep.is_empty:
        boxes = shapely.box(*np.array([[x + tx * ds, y + ty * ds, x + (tx + tw) * ds, y + (ty + th) * ds]
                                       for _, _, tx, ty, tw, th in cand]).T)
        shapely.prepare(keep)
        mask = shapely.intersects(keep, boxes)
        cand = [cd for cd, m in zip(cand, mask, strict=True) if m]
    elif keep is not None:
        cand = []
    plan.tiles = [PlannedTile(i, r, c, tx, ty, tw, th) for i, (r, c, tx, ty, tw, th) in enumerate(cand)]
    return plan
