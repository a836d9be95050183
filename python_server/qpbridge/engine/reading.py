"""Reading a tile plan from an image in blocks.

Reading one 256 px tile at a time decodes each JPEG tile of a slide several times, and so does reading one
plan row at a time (consecutive rows overlap: a row 256 px tall at a step of 192 px decodes two rows of a
slide's 256 px JPEG tiles, about 2.5 decodes per stored tile over the slide). So tiles are read together as
blocks of up to ``BLOCK_ROWS`` plan rows and ``BLOCK_PX`` canvas pixels across (a band of rows, cut across),
once, and sliced: about 1.5 decodes per stored tile, and about one where the slide keeps the stored tiles
that neighbouring blocks share (``Slide.read_overlap``, set by a run). A block that its tiles cover sparsely
(a tissue or ROI plan) is read row run by row run instead, so no large empty box is decoded.

Blocks come band by band; the tiles of a band reach the model in plan order (:func:`band_of` says where a
band ends). Each block's tiles are cut out of it in one copy (per tile size) into a stack, so memory is the
tiles of one band, held until it is complete (for a 150,000 px wide slide at 0.25 µm/px and 256 px tiles at
1 µm/px with a step of 192 px: 4 rows x 196 tiles x 192 kB = 150 MB; the block read for them, 832 rows of
up to ``BLOCK_PX`` px, is freed once they are cut).
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
    """Read the block's bounding box once, at canvas resolution, and cut its tiles out of it.

    The tiles of one size are gathered in one copy into a stack (one numpy call per size, which gives up the
    GIL once: a copy per tile gives it up per tile, and beside a thread running Python each hand-over waits
    for the interpreter's switch interval). Each tile is a contiguous, read-only row of its stack, so the
    model's batch is filled with one copy per run of consecutive tiles."""
    x0 = min(t.x for t in block)
    x1 = max(t.x + t.w for t in block)
    y0 = min(t.y for t in block)
    y1 = max(t.y + t.h for t in block)
    ds = plan.ds
    px = read_box(plan.origin_x + x0 * ds, plan.origin_y + y0 * ds, plan.origin_x + x1 * ds,
                  plan.origin_y + y1 * ds, x1 - x0, y1 - y0)
    step = plan.step
    sizes: dict[tuple[int, int], list[int]] = {}
    for k, t in enumerate(block):
        sizes.setdefault((t.h, t.w), []).append(k)
    out: list[np.ndarray] = [px] * len(block)
    for (h, w), members in sizes.items():
        ys = [block[k].y - y0 for k in members]
        xs = [block[k].x - x0 for k in members]
        if any(v % step for v in ys + xs):  # not on the plan's grid: tile by tile
            for k, y, x in zip(members, ys, xs, strict=True):
                out[k] = _frozen(px[y:y + h, x:x + w].copy())
            continue
        rows, cols = np.array(ys) // step, np.array(xs) // step
        # every grid cell as a (rows, cols, h, w, ...) view of the block: all inside it, since the furthest
        # row and the furthest column each hold a tile of this size
        grid = np.lib.stride_tricks.as_strided(
            px, shape=(int(rows.max()) + 1, int(cols.max()) + 1, h, w, *px.shape[2:]),
            strides=(step * px.strides[0], step * px.strides[1], *px.strides), writeable=False)
        stack = _frozen(grid[rows, cols])
        for j, k in enumerate(members):
            out[k] = stack[j]
    return list(zip(block, out, strict=True))


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # as read, for every model: one changing its input in place is a bug
    return a
