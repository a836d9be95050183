"""Masks to polygons to QuPath GeoJSON features.

Polygons follow pixel edges exactly (their area is the pixel count): OpenCV traces contours through
pixel centres, which would lose 10-20% of a small nucleus's area, so each step of its trace is mapped to
the pixel sides it passes (see ``_contours``). All geometry is made valid and snapped
to a 0.01 px grid, because QuPath rounds coordinates when it reads GeoJSON and rejects a whole file over
one invalid ring.
"""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import shapely
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry.base import BaseGeometry

from qpbridge.cards import ClassInfo
from qpbridge.pools import split_map

GRID_STEPS = 100  # coordinate grid steps per full-resolution pixel
GRID = 1 / GRID_STEPS  # coordinate grid in full-resolution pixels


def on_grid(c: np.ndarray) -> np.ndarray:
    """Coordinates rounded to the grid, each the double nearest to k / GRID_STEPS (a division, as GEOS rounds):
    JSON writes them as short as they are ("12.34"), where k * GRID gives "12.340000000000002" for some."""
    return np.round(c * GRID_STEPS) / GRID_STEPS


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Only the polygonal parts of a geometry (make_valid may return lines or collections)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    if not parts:
        return Polygon()
    return shapely.union_all(parts)


# Moore neighbourhood directions as OpenCV's border following steps: k turns from +x (0) towards +y (2).
_DIR_X = np.array([1, 1, 0, -1, -1, -1, 0, 1], np.int64)
_DIR_Y = np.array([0, 1, 1, 1, 0, -1, -1, -1], np.int64)
ISOLATED = 64  # visit-table row of a one-pixel region
PINCH = 0.02  # how far a ring backs off a corner where two pixels touch (survives the 0.01 grid)


def _crack_tables() -> tuple[np.ndarray, ...]:
    """The corners a border visit adds to the pixel-edge outline, per (entry a, exit b) and variant.

    OpenCV follows a border with the region on the side of direction k - 2 of each step k. Leaving a pixel
    entered in direction a, it scans the neighbours a + 3, a + 2, ... until the next border pixel (b): all
    of those are background, and the 4-neighbours among them (even directions) are exactly this pixel's
    sides ("cracks") on the outline, in order; the side facing k runs along k - 2. Consecutive sides of one
    pixel always turn, so each side's start is a corner, except perhaps the first, which may continue the
    last side of the visit before.

    Row ``a * 8 + b + 65 * v`` (``ISOLATED`` for a one-pixel region) holds the visit's corners as offsets
    from the pixel's top-left corner, for the variants v = 0 (all), 1 (pinched: the first corner, which
    the region only touches there, becomes two points backed off it by ``PINCH`` along the edge coming in
    and the edge going out) and 2 (the first corner left out, being on a straight edge). Returned: the
    number of corners per row; the corners, six slots per row, as complex offsets x + iy; for the 65 plain
    rows the direction of the first and the last side (-1 for none); and, per plain row, what its sides add
    to twice a ring's signed area (the shoelace sum): so much times the pixel's x, so much times its y,
    plus a constant."""
    start = {0: (1, 1), 2: (0, 1), 4: (0, 0), 6: (1, 0)}
    rows = ISOLATED + 1
    count = np.zeros(3 * rows, np.int64)
    corners_xy = np.zeros((3 * rows, 6), np.complex128)  # up to 5 corners, and a closing point
    first, last = np.full(rows, -1, np.int64), np.full(rows, -1, np.int64)
    twice = np.zeros((3, rows), np.int64)
    for row in range(rows):
        a, b = divmod(row, 8)
        scanned = (4, 3, 2, 1, 0, 7, 6, 5) if row == ISOLATED else [(a + 3 - t) % 8 for t in range((a + 3 - b) % 8)]
        sides = [k for k in scanned if k % 2 == 0]
        if not sides:
            continue
        first[row], last[row] = (sides[0] - 2) % 8, (sides[-1] - 2) % 8
        for k in sides:  # cross((x + sx, y + sy), u) for the side from corner (sx, sy) one step along u
            sx, sy = start[k]
            ux, uy = _DIR_X[(k - 2) % 8], _DIR_Y[(k - 2) % 8]
            twice[:, row] += (uy, -ux, sx * uy - sy * ux)
        corners = [start[k] for k in sides]
        (cx, cy), lo, hi = corners[0], (a - 1) % 8, (a + 1) % 8
        pinched = [(cx - PINCH * _DIR_X[lo], cy - PINCH * _DIR_Y[lo]),
                   (cx + PINCH * _DIR_X[hi], cy + PINCH * _DIR_Y[hi]), *corners[1:]]
        for v, pts in enumerate((corners, pinched, corners[1:])):
            count[row + v * rows] = len(pts)
            for j, (px, py) in enumerate(pts):
                corners_xy[row + v * rows, j] = complex(px, py)
    return count, corners_xy.ravel(), first, last, twice


_COUNT, _CORNERS_XY, _FIRST_SIDE, _LAST_SIDE, _TWICE_AREA = _crack_tables()
# Table offset of each visit's row by (previous visit's row, row): plain, or first corner skipped where the
# previous visit's last side runs on in this visit's first.
_VARIANT = np.where((_LAST_SIDE[:, None] >= 0) & (_LAST_SIDE[:, None] == _FIRST_SIDE[None, :]),
                    2 * (ISOLATED + 1), 0).ravel().astype(np.int64)
_DIAGONAL_ENTRY = (np.arange(ISOLATED + 1) // 8) % 2 == 1  # per visit row (the isolated row has no entry)
_FOUR_NEIGHBOURS = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], np.uint8)


@functools.lru_cache(maxsize=16)
def _step_codes(stride: int) -> np.ndarray:
    """Direction code of a step between pixels, indexed by its flat index change at ``stride`` (>= 3) + stride + 1."""
    table = np.zeros(2 * stride + 3, np.int64)
    table[_DIR_Y * stride + _DIR_X + stride + 1] = np.arange(8)
    return table


def _contours(mask: np.ndarray, min_area: float = 0.0, max_hole: float = 0.0, offset: tuple[float, float] = (0.0, 0.0),
              scale: float = 1.0, scratch: bool = False) -> list[BaseGeometry]:
    """Pixel-edge polygons (with holes) of the 8-connected foreground of a binary mask, one per region
    (see ``_trace``)."""
    return _trace(mask, min_area, max_hole, offset, scale, scratch, False)[0]


@dataclass
class TracedHoles:
    """The holes of a mask's regions (:func:`trace_holes`).

    ``polygons`` are the hole rings at least ``max_hole`` large, each as a polygon of its own, ``firsts`` the
    first pixel (x, y) of the border each was traced along (a pixel of the region enclosing it). ``contours``
    and ``all_firsts`` are the same for every hole OpenCV found, the small ones too: its border pixels as
    OpenCV gives them (``cv2.drawContours`` fills the hole with them)."""

    polygons: list[BaseGeometry]
    firsts: np.ndarray
    contours: list[np.ndarray]
    all_firsts: np.ndarray


def trace_holes(mask: np.ndarray, x_off: float = 0.0, y_off: float = 0.0, scale: float = 1.0, *,
                max_hole: float = 0.0, scratch: bool = False) -> TracedHoles:
    """The holes of the 8-connected regions of a binary mask, with exactly the rings :func:`trace_regions`
    gives them (which depend only on the pixels around each ring), without building the regions."""
    holes = _trace(mask, 0.0, max_hole, (float(x_off), float(y_off)), float(scale), scratch, True)[1]
    if holes is None:
        none = np.zeros((0, 2), np.int64)
        return TracedHoles([], none, [], none)
    return holes


def _trace(mask: np.ndarray, min_area: float, max_hole: float, offset: tuple[float, float], scale: float,
           scratch: bool, holes_only: bool) -> tuple[list[BaseGeometry], TracedHoles | None]:
    """Pixel-edge polygons (with holes) of the 8-connected foreground of a binary mask, one per region; with
    ``holes_only``, the holes alone, each as a polygon (and what :class:`TracedHoles` holds).

    OpenCV traces each border through the centres of its pixels. Every step of that trace tells which
    sides of the pixel it leaves lie on the border (``_crack_tables``), so the pixel-edge outline follows
    from the trace by table look-ups, in one vectorised pass over all rings of the mask: a polygon's area
    is its pixel count, with no buffering, and only corners are kept. Where a region's pixels touch only
    at a corner, the outline would pass that corner twice and touch itself (invalid); instead it backs
    off the corner by ``PINCH`` along both edges of each pass, so the region stays one valid polygon, as
    8-connectivity says it is, and gains PINCH² / 2 px² per pass.

    Holes smaller than ``max_hole`` px² are filled, then regions smaller than ``min_area`` px² (small holes
    filled) left out, before any polygon is built. One-pixel holes, most of a noisy map's, are filled in the
    mask before tracing (no ring to trace, and no pinch cut left where one touched a corner), in the mask
    itself with ``scratch`` (the caller gives it up), else in a copy; larger ones by leaving their rings
    out. Coordinates are ``(pixel + offset) * scale``.
    """
    import cv2

    m = np.asarray(mask)
    if m.size == 0:
        return [], None
    m = np.ascontiguousarray(m.view(np.uint8) if m.dtype == bool else m, dtype=np.uint8)
    if max_hole > 1:
        # One-pixel holes (background whose four neighbours are foreground) are most of the holes of a noisy
        # map, and always smaller than max_hole: filled in the mask, they cost no ring to trace.
        if not scratch and np.may_share_memory(m, mask):
            m = m.copy()
        np.bitwise_or(m, cv2.erode(m, _FOUR_NEIGHBOURS, borderType=cv2.BORDER_CONSTANT, borderValue=0), out=m)
    contours, hierarchy = cv2.findContours(m, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if hierarchy is None or not contours:
        return [], None
    parent = hierarchy[0][:, 3].astype(np.int64)
    n_rings = len(contours)
    lens = np.fromiter(map(len, contours), np.int64, n_rings)
    p = np.concatenate(contours).reshape(-1, 2)
    x, y = p[:, 0], p[:, 1]
    n = len(x)
    starts = np.cumsum(lens) - lens
    ends = starts + lens - 1
    # Each visit's step to the next visit, from the pixels' flat indices at a stride (the width + 2) at which
    # every step changes the index by its own amount.
    stride = m.shape[1] + 2
    at = y.astype(np.int64)
    at *= stride
    np.add(at, x, out=at)
    d = np.empty(n, np.int64)
    np.subtract(at[1:], at[:-1], out=d[:-1])
    d[ends] = at[starts] - at[ends]
    d += stride + 1
    b = _step_codes(stride)[d]  # each visit's exit, and the next visit's entry
    row = np.empty_like(b)
    np.multiply(b[:-1], 8, out=row[1:])
    row[starts] = b[ends] * 8
    row += b
    row[starts[lens == 1]] = ISOLATED
    rows = ISOLATED + 1

    # A diagonal entry with background on both sides passes a corner the region only touches.
    pinch = np.zeros(n, bool)
    diag = np.flatnonzero(_DIAGONAL_ENTRY[row])
    if len(diag):
        # the two pixels beside the step (from the pixel it came from, directions a - 1 and a + 1) lie in the
        # box of the two pixels of the step, so in the mask
        w = m.shape[1]
        step = _DIR_Y * w + _DIR_X
        side_lo, side_hi = np.roll(step, 1) - step, np.roll(step, -1) - step
        ad = row[diag] >> 3
        here = y[diag].astype(np.int64)
        here *= w
        np.add(here, x[diag], out=here)
        flat_m = m.ravel()
        bg = (flat_m[here + side_lo[ad]] == 0) & (flat_m[here + side_hi[ad]] == 0)
        pinch[diag[bg]] = True

    is_hole = parent >= 0
    keep_ring = np.ones(n_rings, bool)
    if holes_only:
        min_area, keep_ring = 0.0, is_hole.copy()
        hole_idx = np.flatnonzero(is_hole)
        all_firsts = np.stack([x[starts[hole_idx]], y[starts[hole_idx]]], axis=1).astype(np.int64)
    if min_area > 0 or max_hole > 0:
        # Shoelace per ring, summed side by side from the visits (the region lies to the right of each step
        # in image coordinates, so with this sign shells come out positive and holes negative); each pinch
        # adds PINCH² / 2 to the region.
        sums = np.add.reduceat(x * _TWICE_AREA[0][row] + y * _TWICE_AREA[1][row] + _TWICE_AREA[2][row], starts)
        area = -0.5 * sums + 0.5 * PINCH * PINCH * np.add.reduceat(pinch, starts)
        if max_hole > 0:
            keep_ring &= ~is_hole | (-area >= max_hole)
        if min_area > 0:
            kept_holes = np.flatnonzero(is_hole & keep_ring)
            net = area - np.bincount(parent[kept_holes], -area[kept_holes], minlength=n_rings)
            keep_ring &= net[np.where(is_hole, parent, np.arange(n_rings))] >= min_area
    if not (keep_ring.any() if holes_only else keep_ring[~is_hole].any()):
        if holes_only:
            return [], TracedHoles([], np.zeros((0, 2), np.int64), [contours[i] for i in hole_idx.tolist()], all_firsts)
        return [], None
    owner = np.where(is_hole, parent, np.arange(n_rings))  # each ring's shell
    if holes_only:  # each hole a polygon of its own
        firsts = np.stack([x[starts[keep_ring]], y[starts[keep_ring]]], axis=1).astype(np.int64)
        owner, is_hole = np.arange(n_rings), np.zeros(n_rings, bool)
    if not keep_ring.all():
        sel = np.repeat(keep_ring, lens)
        x, y, row, pinch = x[sel], y[sel], row[sel], pinch[sel]
        lens, owner, is_hole = lens[keep_ring], owner[keep_ring], is_hole[keep_ring]
        starts = np.cumsum(lens) - lens
        ends = starts + lens - 1

    # Polygons come from ragged arrays: closed rings, each shell followed by its holes. OpenCV lists a
    # shell's holes right after it; were that ever not so, the rings are put in that order first.
    if is_hole[0] or is_hole[1:][owner[1:] != owner[:-1]].any() or (owner[1:] < owner[:-1]).any():
        order = np.lexsort((is_hole, owner))
        cum = np.cumsum(lens[order]) - lens[order]
        visits = np.repeat(starts[order] - cum, lens[order]) + np.arange(len(x))
        x, y, row, pinch = x[visits], y[visits], row[visits], pinch[visits]
        lens, is_hole = lens[order], is_hole[order]
        starts = np.cumsum(lens) - lens
        ends = starts + lens - 1

    # The previous visit's last side runs on in this visit's first side: that corner is not one.
    key = np.empty_like(row)
    np.multiply(row[:-1], rows, out=key[1:])
    key[starts] = row[ends] * rows
    key += row
    rr = _VARIANT[key]
    rr += row
    pinched = np.flatnonzero(pinch)
    rr[pinched] = row[pinched] + rows
    c = _COUNT[rr]
    c[ends] += 1  # room for the ring's closing point after its last visit's corners
    cum = np.cumsum(c)
    # index into the flattened tables of each corner: its row's first entry, plus its place in the visit
    flat = np.repeat(rr * 6 - (cum - c), c)
    flat += np.arange(len(flat))
    base = np.empty(len(x), np.complex128)
    base.real, base.imag = x, y
    if offset != (0.0, 0.0):
        base += complex(offset[0], offset[1])
    xy = np.repeat(base, c)
    xy += _CORNERS_XY[flat]
    closing = cum[ends] - 1
    ring_offsets = np.concatenate([[0], closing + 1])
    xy[closing] = xy[ring_offsets[:-1]]
    coords = xy.view(np.float64).reshape(-1, 2)
    if scale != 1.0:
        coords *= scale
    geom_offsets = np.concatenate([np.flatnonzero(~is_hole), [len(lens)]])
    polygons = list(shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets)))
    if holes_only:
        return polygons, TracedHoles(polygons, firsts, [contours[i] for i in hole_idx.tolist()], all_firsts)
    return polygons, None


def trace_regions(mask: np.ndarray, x_off: float = 0.0, y_off: float = 0.0, scale: float = 1.0, *,
                  min_area: float = 0.0, max_hole: float = 0.0, scratch: bool = False) -> list[BaseGeometry]:
    """One pixel-edge polygon (with holes) per 8-connected region of a binary mask, in the coordinates
    ``(pixel + offset) * scale``. Holes smaller than ``max_hole`` (mask pixels²) are filled, then regions
    smaller than ``min_area`` (mask pixels², small holes included) dropped. With ``scratch`` the mask may be
    changed (its one-pixel holes filled in place), which saves a copy of it."""
    return _contours(mask, min_area, max_hole, (float(x_off), float(y_off)), float(scale), scratch)


def mask_to_polygons(mask: np.ndarray) -> list[BaseGeometry]:
    """One polygon per 8-connected foreground region of a binary mask."""
    out: list[BaseGeometry] = []
    for p in _contours(mask):
        out.extend(p.geoms if isinstance(p, MultiPolygon) else [p])
    return out


def labels_to_polygons(labels: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> dict[int, BaseGeometry]:
    """One polygon per label of a label image (shifted by ``offset``); a split label keeps its largest piece.

    Labels may touch, so each is traced from its own mask; the masks are laid out side by side in one
    mosaic, a background pixel apart, and traced in one call (tracing them one by one costs a fixed
    overhead per label, most of the time for nuclei)."""
    from scipy import ndimage

    found = [(i + 1, sl) for i, sl in enumerate(ndimage.find_objects(labels)) if sl is not None]
    if not found:
        return {}
    sizes = np.array([(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) for _, sl in found])
    # Shelves of crops, tallest first, in rows about as wide as the mosaic is tall.
    order = np.argsort(-sizes[:, 0], kind="stable").tolist()
    width = max(int(sizes[:, 1].max()), int(math.sqrt(float(((sizes + 1).prod(axis=1)).sum())))) + 2
    at = np.zeros((len(found), 2), np.int64)  # each crop's top-left in the mosaic
    x = y = 1
    shelf = 0
    for i in order:
        h, w = sizes[i]
        if x + w + 1 > width:
            x, y = 1, y + shelf + 1
            shelf = 0
        at[i] = (y, x)
        x += w + 1
        shelf = max(shelf, h)
    mosaic = np.zeros((y + shelf + 1, width), np.uint8)
    owner = np.full(mosaic.shape, -1, np.int64)
    for i, (label, sl) in enumerate(found):
        (y0, x0), (h, w) = at[i], sizes[i]
        crop = labels[sl] == label
        mosaic[y0:y0 + h, x0:x0 + w] = crop
        owner[y0:y0 + h, x0:x0 + w] = i
    polys = np.asarray(_contours(mosaic), dtype=object)
    if len(polys) == 0:
        return {}
    # A polygon stays inside its pixels' box, so its lowest corner lies in its own crop.
    bounds = shapely.bounds(polys)
    crop_of = owner[bounds[:, 1].astype(np.int64), bounds[:, 0].astype(np.int64)]
    area = shapely.area(polys)
    best = np.lexsort((-area, crop_of))  # by crop, largest first
    first = best[np.r_[True, crop_of[best][1:] != crop_of[best][:-1]]]
    keep, which = polys[first], crop_of[first]
    starts = np.array([(sl[1].start, sl[0].start) for _, sl in found], np.float64)
    shift = starts[which] - at[which][:, ::-1] + np.asarray(offset, np.float64)
    coords, idx = shapely.get_coordinates(keep, return_index=True)
    keep = shapely.set_coordinates(keep.copy(), coords + shift[idx])
    return {found[k][0]: g for k, g in zip(which.tolist(), keep.tolist(), strict=True)}


def to_fullres(geom: BaseGeometry, x0: float, y0: float, scale_x: float, scale_y: float) -> BaseGeometry:
    """Tile pixel coordinates to full-resolution image coordinates."""
    return shapely.transform(geom, lambda c: c * np.array([scale_x, scale_y]) + np.array([x0, y0]))


def clean(geom: BaseGeometry, simplify_tol: float = 0.0, min_area: float = 0.0, snap: bool = True) -> BaseGeometry:
    """Simplified, valid, small parts dropped, and (``snap``) on the 0.01 px grid; empty when nothing is left."""
    out: BaseGeometry = clean_many([geom], simplify_tol, min_area, snap)[0]
    return out


EMPTY = Polygon()


def clean_many(geoms: Sequence[BaseGeometry] | np.ndarray, simplify_tol: float = 0.0, min_area: float = 0.0,
               snap: bool = True) -> np.ndarray:
    """:func:`clean` of many geometries, as an object array: each step is one vectorised shapely call over
    all of them (which also releases the GIL), with per-geometry work only for the few that need a repair."""
    out = np.empty(len(geoms), dtype=object)
    out[:] = list(geoms)
    live = np.flatnonzero(~shapely.is_empty(out))
    if len(live) == 0:
        return out
    if simplify_tol > 0:
        # Plain Douglas-Peucker is ten times cheaper than the topology-preserving kind on jagged rings;
        # the careful one only runs where the fast one breaks a geometry.
        fast = shapely.simplify(out[live], simplify_tol, preserve_topology=False)
        ok = ~shapely.is_empty(fast) & shapely.is_valid(fast)
        out[live[ok]] = fast[ok]
        bad = live[~ok]
        if len(bad):
            out[bad] = shapely.simplify(out[bad], simplify_tol, preserve_topology=True)
    invalid = live[~shapely.is_valid(out[live])]
    if len(invalid):
        out[invalid] = shapely.make_valid(out[invalid])
    types = shapely.get_type_id(out[live])
    for i in live[(types != shapely.GeometryType.POLYGON) & (types != shapely.GeometryType.MULTIPOLYGON)].tolist():
        out[i] = _polygonal(out[i])
    if snap:
        # Rounding to the grid keeps most polygons valid; set_precision repairs those it does not.
        rounded = shapely.transform(out[live], on_grid)
        ok = shapely.is_valid(rounded)
        out[live[ok]] = rounded[ok]
        for i in live[~ok].tolist():
            out[i] = _polygonal(shapely.set_precision(out[i], GRID))
    if min_area > 0:
        for i in live[shapely.get_type_id(out[live]) == shapely.GeometryType.MULTIPOLYGON].tolist():
            keep = [g for g in out[i].geoms if g.area >= min_area]
            out[i] = (keep[0] if len(keep) == 1 else MultiPolygon(keep)) if keep else EMPTY
    small = live[shapely.is_empty(out[live]) | (shapely.area(out[live]) < max(min_area, GRID * GRID))]
    for i in small.tolist():
        out[i] = EMPTY
    return out


def simplify_polygons(geoms: np.ndarray, tol: float) -> np.ndarray:
    """Plain Douglas-Peucker simplification of the Polygons of an object array (what GEOS's
    ``simplify(..., preserve_topology=False)`` does before it repairs invalid results); other geometries
    come back unchanged. A shell that collapses (fewer than three points left) empties its polygon, a hole
    that collapses is dropped. Results may be invalid: the caller checks.

    All rings go to GEOS in one call, as linear rings: GEOS checks and repairs each simplified polygon (about
    50 µs per jagged traced polygon, most of its time) but not a ring, and one call gives up the GIL once
    for the whole array. A call per ring (OpenCV's ``approxPolyDP``) gave it up per ring, and beside a thread
    running Python each ring then waited for the interpreter's switch interval (5 ms)."""
    out = geoms.copy()
    idx = np.flatnonzero((shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(geoms))
    if len(idx) == 0 or tol <= 0:
        return out
    rings, owner = shapely.get_rings(geoms[idx], return_index=True)
    simple = ring_map(lambda part: shapely.simplify(part, tol, preserve_topology=False), rings)
    counts = shapely.get_num_coordinates(simple)
    # a collapsed ring comes back as a line of fewer than four points
    live_ring = (shapely.get_type_id(simple) == shapely.GeometryType.LINEARRING) & (counts >= 4)
    is_shell = np.ones(len(rings), bool)
    is_shell[1:] = owner[1:] != owner[:-1]
    dead = np.zeros(len(idx), bool)
    dead[owner[is_shell & ~live_ring]] = True
    live_ring &= ~dead[owner]
    out[idx[dead]] = EMPTY
    if not live_ring.any():
        return out
    coords = shapely.get_coordinates(simple[live_ring])
    ring_offsets = np.concatenate([[0], np.cumsum(counts[live_ring])])
    geom_offsets = np.concatenate([np.flatnonzero(is_shell[live_ring]), [int(live_ring.sum())]])
    out[idx[~dead]] = shapely.from_ragged_array(shapely.GeometryType.POLYGON, coords, (ring_offsets, geom_offsets))
    return out


MANY_HOLES = 256  # holes from which validity is first checked ring by ring (see ``valid_many``)
RING_SLICE = 2048  # rings from which per-ring work is shared out (see ``ring_map``)


def ring_map(func: Any, rings: np.ndarray) -> np.ndarray:
    """``func`` (a vectorised shapely call, one result per element) of an object array of rings or polygons,
    in slices of at least ``RING_SLICE`` on the post-processing threads beside this one. A region spanning a
    slide (tens of thousands of holes) closes last and is built alone at the end of a run; its rings are
    independent, and these calls give up the GIL, so the threads share its cost."""
    parts = split_map(func, rings, RING_SLICE)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def valid_many(geoms: np.ndarray) -> np.ndarray:
    """``shapely.is_valid`` of each geometry, without its cost growing faster than the holes of a polygon.

    GEOS's check of one polygon with many holes grows faster than its size (measured: 1.4 s for the 25,000
    holes and 577,000 vertices of a region spanning a 16,384² px canvas, 9 times the time of a quarter of it),
    and such a polygon, a tissue class spanning a slide, is the last feature a run builds. For polygons with at
    least ``MANY_HOLES`` holes a sufficient condition is checked first, ring by ring (about 6 times faster
    there): a valid shell, valid holes, each hole in the shell's interior and no two holes meeting. Then the
    interior is connected and no rings cross, so the polygon is valid. A polygon that fails it (holes that
    touch, or cross) goes to GEOS, so the answer is always GEOS's."""
    out = np.zeros(len(geoms), bool)
    if len(geoms) == 0:
        return out
    holes = shapely.get_num_interior_rings(geoms)
    many = (shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON) & (holes >= MANY_HOLES)
    rest = np.flatnonzero(~many)
    out[rest] = shapely.is_valid(geoms[rest])
    for i in np.flatnonzero(many).tolist():
        out[i] = holes_clearly_apart(geoms[i]) or bool(shapely.is_valid(geoms[i]))
    return out


def holes_clearly_apart(poly: Polygon) -> bool:
    """Whether ``poly`` is valid by the sufficient condition of ``valid_many`` (False: not shown, not invalid)."""
    shell = shapely.polygons(shapely.get_exterior_ring(poly))
    holes = shapely.polygons(shapely.get_interior_ring(poly, np.arange(shapely.get_num_interior_rings(poly))))
    if not shapely.is_valid(shell):
        return False
    # no predicate on an invalid ring: GEOS may throw
    if not ring_map(shapely.is_valid, holes).all() or not holes_inside(shell, holes).all():
        return False
    a, b = shapely.STRtree(holes).query(holes, predicate="intersects")
    return not bool((a != b).any())


def holes_inside(shell: BaseGeometry, holes: np.ndarray) -> np.ndarray:
    """Whether each (valid) polygon of ``holes`` lies in the interior of ``shell``'s exterior ring, in slices on the
    post-processing threads (``ring_map``)."""

    def inside(part: np.ndarray) -> np.ndarray:
        # each slice its own prepared shell: a prepared geometry builds its indexes lazily, not thread-safely
        own = shapely.polygons(shapely.get_exterior_ring(shell))
        shapely.prepare(own)
        out: np.ndarray = shapely.contains_properly(own, part)
        return out

    return ring_map(inside, holes)


def fill_small_holes(geom: BaseGeometry, max_hole_area: float) -> BaseGeometry:
    """Drop interior rings smaller than max_hole_area (same units as the geometry)."""
    if max_hole_area <= 0 or geom.is_empty:
        return geom

    def fill(p: Polygon) -> Polygon:
        return Polygon(p.exterior, [r for r in p.interiors if Polygon(r).area >= max_hole_area])

    if isinstance(geom, Polygon):
        return fill(geom)
    if isinstance(geom, MultiPolygon):
        return shapely.union_all([fill(p) for p in geom.geoms])
    return geom


def fill_small_holes_many(polys: np.ndarray, max_hole_area: float) -> np.ndarray:
    """:func:`fill_small_holes` of an object array of Polygons, in vectorised calls: only polygons that
    lose a hole are rebuilt."""
    out = polys.copy()
    rings, owner = shapely.get_rings(polys, return_index=True)
    if len(rings) == 0:
        return out
    is_shell = np.ones(len(rings), bool)
    is_shell[1:] = owner[1:] != owner[:-1]  # each polygon's exterior comes first
    small = ~is_shell & (ring_map(lambda part: shapely.area(shapely.polygons(part)), rings) < max_hole_area)
    changed = np.unique(owner[small])
    if len(changed):
        sel = ~small & np.isin(owner, changed)
        out[changed] = shapely.polygons(rings[sel], indices=np.searchsorted(changed, owner[sel]))
    return out


def new_ids(n: int) -> list[str]:
    """``n`` random (version 4) UUIDs as strings, drawn at once: ``str(uuid.uuid4())`` costs more than the
    rest of a feature together."""
    raw = np.frombuffer(os.urandom(16 * n), np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40  # version 4
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80  # RFC 4122 variant
    h = raw.tobytes().hex()
    return [f"{h[i:i + 8]}-{h[i + 8:i + 12]}-{h[i + 12:i + 16]}-{h[i + 16:i + 20]}-{h[i + 20:i + 32]}"
            for i in range(0, 32 * n, 32)]


def shape_measurements(geom: BaseGeometry, mpp: float | None, prefix: str = "") -> dict[str, float]:
    """Area, perimeter (µm when the pixel size is known, else px) and circularity 4πA/P²."""
    return measurements_of(float(geom.area), float(geom.length), mpp, prefix)


def measurements_of(area_px: float, perim_px: float, mpp: float | None, prefix: str = "") -> dict[str, float]:
    """:func:`shape_measurements` from a geometry's area (px²) and perimeter (px)."""
    circ = 4.0 * math.pi * area_px / (perim_px * perim_px) if perim_px > 0 else 0.0
    if mpp:
        return {f"{prefix}Area µm^2": area_px * mpp * mpp, f"{prefix}Perimeter µm": perim_px * mpp,
                f"{prefix}Circularity": min(circ, 1.0)}
    return {f"{prefix}Area px^2": area_px, f"{prefix}Perimeter px": perim_px, f"{prefix}Circularity": min(circ, 1.0)}


def finite_measurements(values: Mapping[str, Any]) -> dict[str, float]:
    """Measurements QuPath can read: finite numbers only (NaN breaks QuPath 0.4's reader)."""
    out = {}
    for k, v in values.items():
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out[str(k)] = f
    return out


def points(coords: np.ndarray) -> list[tuple[float, float]]:
    """GeoJSON positions of an (N, 2) array, as (x, y) tuples: JSON writes them as arrays, and the garbage
    collector stops scanning a tuple of floats once it has seen it (a run holds millions of positions until it
    ends; as [x, y] lists, each collection of the older generations scanned them all: 0.1 s a time)."""
    xy = iter(coords.ravel().tolist())  # one list of floats, paired by zipping its iterator with itself
    return list(zip(xy, xy, strict=True))


def _polygon_coords(p: Polygon) -> list[Any]:
    return [points(shapely.get_coordinates(r)) for r in (p.exterior, *p.interiors)]


def geojson_geometry(geom: BaseGeometry) -> dict[str, Any]:
    """GeoJSON geometry of plain Python values (rings as lists of (x, y) tuples, written as JSON arrays)."""
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": _polygon_coords(geom)}
    if isinstance(geom, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [_polygon_coords(p) for p in geom.geoms]}
    return dict(mapping(geom))


def geojson_geometries(geoms: np.ndarray) -> list[dict[str, Any]]:
    """:func:`geojson_geometry` of many (Multi)Polygons at once: their coordinates are read in one shapely call
    and turned into Python values once (see ``points``), then cut into rings."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords = shapely.get_coordinates(rings)
    counts = shapely.get_num_coordinates(rings)
    flat = points(coords)
    ends = np.cumsum(counts).tolist()
    starts = [0, *ends[:-1]]
    part_rings: list[list[Any]] = [[] for _ in range(len(parts))]
    for r, (a, b) in enumerate(zip(starts, ends, strict=True)):
        part_rings[int(ring_part[r])].append(flat[a:b])
    types = shapely.get_type_id(geoms).tolist()
    out: list[dict[str, Any]] = []
    pos = 0
    n_parts = np.bincount(owner, minlength=len(geoms)).tolist()
    for kind, k in zip(types, n_parts, strict=True):
        if kind == shapely.GeometryType.MULTIPOLYGON:
            out.append({"type": "MultiPolygon", "coordinates": part_rings[pos:pos + k]})
        else:
            out.append({"type": "Polygon", "coordinates": part_rings[pos] if k else []})
        pos += k
    return out


def make_feature(geom: BaseGeometry | dict[str, Any], object_type: str, cls: ClassInfo,
                 measurements: Mapping[str, Any], model: str, fid: str | None = None) -> dict[str, Any]:
    """A QuPath GeoJSON Feature (QuPath 0.4+ layout) with a UUID id (``fid``, else a new one) and a coloured
    classification; ``geom`` may already be a GeoJSON geometry dict."""
    return {
        "type": "Feature",
        "id": fid if fid is not None else str(uuid.uuid4()),
        "geometry": geom if isinstance(geom, dict) else geojson_geometry(geom),
        "properties": {
            "objectType": object_type,
            "classification": {"name": cls.name, "color": list(cls.color)},
            "measurements": finite_measurements(measurements),
            "metadata": {"qpbridge.model": model},
        },
    }


def feature_collection(features: list[dict[str, Any]]) -> dict[str, Any]:
    return {"type": "FeatureCollection", "features": features}
