"""Seam-free stitching of overlapping tiles, in bounded memory.

Tiles come from a :class:`~qpbridge.plan.TilePlan` laid on a canvas at the model's pixel size.

Semantic models: each tile's class probabilities are weighted by a cosine window and added into a
rolling accumulator a little taller than one tile; once every tile that touches a strip (one grid step
tall) is in, the strip's argmax is taken and polygonised, and polygons touching the strip's lower edge
stay open to be merged with the next strip's. A region crossing any number of tiles comes back as one
polygon, and memory grows with the slide's width, never with its area.

Instance models: every tile has a *core*, the part of it closer to its own centre than to any
neighbour's (cores of all tiles partition the canvas). An instance is kept only by the tile whose core
holds its centroid, so a nucleus seen by two overlapping tiles is kept once, and (as long as it is
smaller than half the overlap) whole.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import shapely
from shapely import STRtree, affinity
from shapely.geometry.base import BaseGeometry

from qpbridge import geometry
from qpbridge.families import InstanceResult, SemanticResult
from qpbridge.plan import PlannedTile, TilePlan

# Called with (geometry in canvas model pixels, class index, extra measurements or None).
Emit = Callable[[BaseGeometry, int, "dict[str, Any] | None"], None]

WINDOW_FLOOR = 1e-3  # edge pixels keep a little weight, so canvas borders without a neighbour still count


def cosine_window(h: int, w: int, overlap: int) -> np.ndarray:
    """Weights that fall from 1 to ~0 over ``overlap`` pixels at each edge (a Hann ramp)."""

    def ramp(n: int) -> np.ndarray:
        out = np.ones(n, np.float32)
        k = min(overlap, n // 2)
        if k > 0:
            t = (np.arange(k, dtype=np.float32) + 0.5) / k
            edge = 0.5 - 0.5 * np.cos(np.pi * t)
            out[:k] = edge
            out[n - k:] = edge[::-1]
        return np.maximum(out, WINDOW_FLOOR)

    return np.outer(ramp(h), ramp(w))


class SemanticStitcher:
    """Blend probability tiles and emit one polygon per connected region per class."""

    def __init__(self, plan: TilePlan, n_classes: int, emit_classes: list[int], emit: Emit) -> None:
        self.plan = plan
        self.n_classes = n_classes
        self.emit_classes = emit_classes
        self.emit = emit
        step, tile = plan.step, plan.tile
        # Rows r and r+1 may be accumulated directly; rows further ahead wait in `pending`.
        self.buf_h = tile + step
        self.acc = np.zeros((n_classes, self.buf_h, plan.width), np.float32)
        self.wsum = np.zeros((self.buf_h, plan.width), np.float32)
        self.base_row = 0  # the next strip to finalise; the buffer starts at base_row * step
        self.remaining = plan.tiles_per_row()
        self.pending: dict[int, list[tuple[PlannedTile, np.ndarray]]] = {}
        self.open: dict[int, list[BaseGeometry]] = {c: [] for c in emit_classes}
        self.windows: dict[tuple[int, int], np.ndarray] = {}
        self.peak_pending = 0

    def _window(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        if key not in self.windows:
            self.windows[key] = cosine_window(h, w, self.plan.overlap)
        return self.windows[key]

    def add(self, tile: PlannedTile, result: SemanticResult) -> None:
        probs = result.probabilities(self.n_classes)
        if probs.shape[1:] != (tile.h, tile.w):
            import cv2

            probs = np.stack([cv2.resize(p, (tile.w, tile.h), interpolation=cv2.INTER_LINEAR) for p in probs])
        if tile.row > self.base_row + 1:
            self.pending.setdefault(tile.row, []).append((tile, probs))
            self.peak_pending = max(self.peak_pending, sum(len(v) for v in self.pending.values()))
        else:
            self._accumulate(tile, probs)
        self.remaining[tile.row] -= 1
        self._advance()

    def _accumulate(self, tile: PlannedTile, probs: np.ndarray) -> None:
        y0 = tile.y - self.base_row * self.plan.step
        win = self._window(tile.h, tile.w)
        self.acc[:, y0:y0 + tile.h, tile.x:tile.x + tile.w] += probs * win
        self.wsum[y0:y0 + tile.h, tile.x:tile.x + tile.w] += win

    def _advance(self) -> None:
        rows = self.plan.rows
        while self.base_row < rows and self.remaining[self.base_row] == 0:
            self._finalise_strip(self.base_row)
            self.base_row += 1
            for t, p in self.pending.pop(self.base_row + 1, []):
                self._accumulate(t, p)

    def finish(self) -> None:
        """Close the stitching; every tile of the plan must have been added."""
        self._advance()  # rows without tiles at the end (or a plan with none) are closed here
        if self.base_row < self.plan.rows:
            from qpbridge.errors import JobStateError

            missing = sum(self.remaining[self.base_row:])
            raise JobStateError(f"{missing} tiles of the plan were never sent; send them before finishing")
        for cls in self.emit_classes:
            for g in self.open[cls]:
                self.emit(g, cls, None)
            self.open[cls] = []

    def _finalise_strip(self, row: int) -> None:
        step = self.plan.step
        y_start = row * step
        last = row == self.plan.rows - 1
        h = (self.plan.height - y_start) if last else step
        h = max(0, min(h, self.buf_h))
        if h > 0:
            acc = self.acc[:, :h]
            wsum = self.wsum[:h]
            cmap = np.argmax(acc, axis=0)
            # Probability mass no class claims (one-hot maps with NO_CLASS pixels) competes as "none".
            best = np.take_along_axis(acc, cmap[None], axis=0)[0]
            none = wsum - acc.sum(axis=0)
            covered = (wsum > 0) & (best >= none)
            for cls in self.emit_classes:
                mask = (cmap == cls) & covered
                polys = [affinity.translate(p, 0, y_start) for p in geometry.mask_to_polygons(mask)] \
                    if mask.any() else []
                self._merge(cls, polys, y_start, y_start + h, last)
        # Shift the buffer up by one strip.
        self.acc[:, :-step] = self.acc[:, step:]
        self.acc[:, -step:] = 0
        self.wsum[:-step] = self.wsum[step:]
        self.wsum[-step:] = 0

    def _merge(self, cls: int, polys: list[BaseGeometry], top: float, bottom: float, last: bool) -> None:
        """Join this strip's polygons with the open ones from above; emit those that are complete."""
        opened = self.open[cls]
        eps = 1e-6
        at_top = [i for i, p in enumerate(polys) if p.bounds[1] <= top + eps]
        parent = list(range(len(opened) + len(polys)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        if opened and at_top:
            tree = STRtree(opened)
            for i in at_top:
                for j in tree.query(polys[i], predicate="intersects"):
                    # Sharing a stretch of the strip border joins them; a single touching corner does not.
                    if opened[j].intersection(polys[i]).length > 0 or opened[j].intersection(polys[i]).area > 0:
                        parent[find(int(j))] = find(len(opened) + i)
        groups: dict[int, list[BaseGeometry]] = {}
        for k, g in enumerate(opened + polys):
            groups.setdefault(find(k), []).append(g)
        still_open: list[BaseGeometry] = []
        for members in groups.values():
            merged = members[0] if len(members) == 1 else shapely.union_all(members)
            if not last and merged.bounds[3] >= bottom - eps:
                still_open.append(merged)
            else:
                self.emit(merged, cls, None)
        self.open[cls] = still_open


class InstanceCollector:
    """Keep each instance in the one tile whose core holds its centroid."""

    def __init__(self, plan: TilePlan, emit: Emit) -> None:
        self.plan = plan
        self.emit = emit
        self.kept = 0
        self.dropped = 0

    def core(self, tile: PlannedTile) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the tile's core in canvas pixels; outer tiles reach to infinity."""
        p = self.plan
        half = p.overlap / 2.0
        x0 = -math.inf if tile.col == 0 else tile.col * p.step + half
        x1 = math.inf if tile.col == p.cols - 1 else (tile.col + 1) * p.step + half
        y0 = -math.inf if tile.row == 0 else tile.row * p.step + half
        y1 = math.inf if tile.row == p.rows - 1 else (tile.row + 1) * p.step + half
        return x0, y0, x1, y1

    def add(self, tile: PlannedTile, result: InstanceResult) -> None:
        from scipy import ndimage

        x0, y0, x1, y1 = self.core(tile)
        labels = result.labels
        n = int(labels.max()) if labels.size else 0
        if n == 0:
            return
        # Centroids from pixel moments first, so only the instances kept are traced into polygons.
        idx = np.arange(1, n + 1)
        com = ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, idx)
        keep = np.zeros(n + 1, bool)
        for lab, (cy, cx) in zip(idx.tolist(), com, strict=True):
            if not math.isnan(cx):
                gx, gy = cx + 0.5 + tile.x, cy + 0.5 + tile.y
                keep[lab] = x0 <= gx < x1 and y0 <= gy < y1
        self.dropped += int(np.count_nonzero(~keep[1:]))
        masked = np.where(keep[labels], labels, 0)
        for label, geom in geometry.labels_to_polygons(masked, (tile.x, tile.y)).items():
            self.kept += 1
            self.emit(geom, result.class_of.get(label, 0),
                      result.measurements.get(label))

    def finish(self) -> None:
        return None
