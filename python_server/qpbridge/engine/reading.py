"""Reading a tile plan from an image in blocks.

Reading one 256 px tile at a time decodes each JPEG tile of a slide several times, and so does reading one
plan row at a time (consecutive rows overlap: a row 256 px tall at a step of 192 px decodes two rows of a
slide's 256 px JPEG tiles, about 2.5 decodes per stored tile over the slide). So tiles are read together as
blocks of up to ``BLOCK_ROWS`` plan rows and ``BLOCK_PX`` canvas pixels across (a band of rows, cut across),
once, and sliced: about 1.5 decodes per stored tile, and about one where the slide keeps the stored tiles
that neighbouring blocks share (``Slide.read_overlap``, set by a run). A block that its tiles cover sparsely
(a tissue or ROI plan) is read row run by row run instead, so no large empty box is decoded.

Blocks come band by band; the tiles of a band reach the model in plan order (:func:`band_of` says where a
band ends). Tiles are views of their block, so memory is the blocks of one band, held until it is complete
(for a 150,000 px wide slide at 0.25 µm/px and 256 px tiles at 1 µm/px with a step of 192 px: 832 rows of
37,700 px x 3 bytes = 94 MB; the tiles as copies would be 4 rows x 196 tiles x 192 kB = 150 MB).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qpbridge.engine.plan import PlannedTile, TilePlan

BLOCK_PX = 2048
BLOCK_ROWS = 4
DENSE = 0.5  # a block is read whole when its tiles fill at least this part of the grid cells its box spans

# read_box(x0, y0, x1, y1, out_w, out_h): a full-resolution box as an out_h x out_w RGB array
ReadBox = Callable[[float, float, float, float, int, int], np.ndarray]


def band_of(tile: PlannedTile, rows: int | None = None) -> int:
    """The band of plan rows a tile is read with (``rows`` plan rows per band, default ``BLOCK_ROWS``)."""
    return tile.row // (rows or BLOCK_ROWS)


def blocks_of(plan: TilePlan, block_px: int | None = None, rows: int | None = None) -> list[list[PlannedTile]]:
    """Tiles grouped into blocks, each in plan order, band by band and left to right within a band: up to
    ``rows`` plan rows and ``block_px`` canvas pixels across (defaults ``BLOCK_ROWS``, ``BLOCK_PX``), or runs
    of consecutive tiles of one row where a block's tiles would cover less than ``DENSE`` of it."""
    block_px = block_px or BLOCK_PX
    rows = rows or BLOCK_ROWS
    bands: dict[int, list[PlannedTile]] = {}
    for t in plan.tiles:
        bands.setdefault(band_of(t, rows), []).append(t)
    blocks: list[list[PlannedTile]] = []
    for b in sorted(bands):
        band = bands[b]
        xs = sorted({t.x for t in band})
        widest = max(t.w for t in band)
        chunk_of: dict[int, int] = {}
        start, k = xs[0], 0
        for x in xs:  # columns into chunks of at most block_px across
            if x + widest - start > block_px and x != start:
                start, k = x, k + 1
            chunk_of[x] = k
        chunks: dict[int, list[PlannedTile]] = {}
        for t in band:  # plan order is kept within a chunk
            chunks.setdefault(chunk_of[t.x], []).append(t)
        for k in sorted(chunks):
            tiles = chunks[k]
            n_rows = max(t.row for t in tiles) - min(t.row for t in tiles) + 1
            n_cols = max(t.col for t in tiles) - min(t.col for t in tiles) + 1
            if n_rows > 1 and len(tiles) < DENSE * n_rows * n_cols:
                blocks.extend(_row_runs(tiles))
            else:
                blocks.append(tiles)
    return blocks


def _row_runs(tiles: list[PlannedTile]) -> list[list[PlannedTile]]:
    """Runs of consecutive tiles of one row (tiles in plan order)."""
    runs: list[list[PlannedTile]] = []
    for t in tiles:
        if runs and t.row == runs[-1][-1].row and t.col == runs[-1][-1].col + 1:
            runs[-1].append(t)
        else:
            runs.append([t])
    return runs


def read_block(plan: TilePlan, block: list[PlannedTile], read_box: ReadBox) -> list[tuple[PlannedTile, np.ndarray]]:
    """Read the block's bounding box once, at canvas resolution, and slice its tiles (views of the block: the
    model's batch is a copy of them anyway, and overlapping tiles would hold their overlap twice)."""
    x0 = min(t.x for t in block)
    x1 = max(t.x + t.w for t in block)
    y0 = min(t.y for t in block)
    y1 = max(t.y + t.h for t in block)
    ds = plan.ds
    px = read_box(plan.origin_x + x0 * ds, plan.origin_y + y0 * ds, plan.origin_x + x1 * ds,
                  plan.origin_y + y1 * ds, x1 - x0, y1 - y0)
    px.flags.writeable = False  # tiles overlap: one changed in place would change its neighbours
    return [(t, px[t.y - y0:t.y - y0 + t.h, t.x - x0:t.x - x0 + t.w]) for t in block]
