"""Reading a tile plan from an image in blocks.

Reading one 256 px tile at a time decodes each JPEG tile of a slide several times, so consecutive tiles
of one row are read together as blocks of up to ``BLOCK_PX`` canvas pixels, once, and sliced.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from qpbridge.engine.plan import PlannedTile, TilePlan

BLOCK_PX = 2048

# read_box(x0, y0, x1, y1, out_w, out_h): a full-resolution box as an out_h x out_w RGB array
ReadBox = Callable[[float, float, float, float, int, int], np.ndarray]


def blocks_of(plan: TilePlan, block_px: int = BLOCK_PX) -> list[list[PlannedTile]]:
    """Tiles grouped into row blocks of consecutive tiles spanning at most ``block_px`` canvas pixels."""
    blocks: list[list[PlannedTile]] = []
    current: list[PlannedTile] = []
    for t in plan.tiles:  # plan order is row-major
        if current and (t.row != current[0].row or t.col != current[-1].col + 1
                        or t.x + t.w - current[0].x > block_px):
            blocks.append(current)
            current = []
        current.append(t)
    if current:
        blocks.append(current)
    return blocks


def read_block(plan: TilePlan, block: list[PlannedTile], read_box: ReadBox) -> list[tuple[PlannedTile, np.ndarray]]:
    """Read the block's bounding box once, at canvas resolution, and slice its tiles."""
    x0 = block[0].x
    x1 = max(t.x + t.w for t in block)
    y0 = block[0].y
    y1 = max(t.y + t.h for t in block)
    ds = plan.ds
    px = read_box(plan.origin_x + x0 * ds, plan.origin_y + y0 * ds, plan.origin_x + x1 * ds,
                  plan.origin_y + y1 * ds, x1 - x0, y1 - y0)
    return [(t, np.ascontiguousarray(px[t.y - y0:t.y - y0 + t.h, t.x - x0:t.x - x0 + t.w])) for t in block]
