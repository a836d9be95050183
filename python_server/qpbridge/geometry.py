"""Masks to polygons to QuPath GeoJSON features.

Polygons follow pixel edges exactly (their area is the pixel count): OpenCV traces contours through
pixel centres, which would lose 10-20% of a small nucleus's area, so contours are traced on the mask
doubled in size and mapped to pixel corners (see ``_contours``). All geometry is made valid and snapped
to a 0.01 px grid, because QuPath rounds coordinates when it reads GeoJSON and rejects a whole file over
one invalid ring.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import MultiPolygon, Polygon, mapping
from shapely.geometry.base import BaseGeometry

from qpbridge.cards import ClassInfo

GRID = 0.01  # coordinate grid in full-resolution pixels


def _polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Only the polygonal parts of a geometry (make_valid may return lines or collections)."""
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    parts = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    if not parts:
        return Polygon()
    return shapely.union_all(parts)


def _contours(mask: np.ndarray, min_area: float = 0.0, max_hole: float = 0.0,
              offset: tuple[float, float] = (0.0, 0.0), scale: float = 1.0) -> list[BaseGeometry]:
    """Pixel-edge polygons (with holes) of the 8-connected foreground of a binary mask, one per region.

    OpenCV traces contours through pixel centres. Traced on the mask doubled in size instead, every
    contour point is the centre of the sub-pixel nearest one corner of its pixel, so mapping sub-pixel
    index p to corner (p + 1) // 2 gives exactly the pixel edges: a polygon's area is its pixel count,
    with no buffering, and rings are valid by construction (pinches: see ``_unpinch``). All rings of the
    mask are mapped in one vectorised pass and the polygons built in one shapely call.

    Regions whose filled area is surely below ``min_area`` px² and holes surely below ``max_hole`` px²
    are left out before any polygon is built (post-processing would drop or fill them anyway): by Pick's
    theorem a region's filled sub-pixel count is at most its contour's area + length / 2 + 1, and a
    hole's at most its contour's area. Coordinates are ``(pixel + offset) * scale``.
    """
    import cv2

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if m.size == 0:
        return []
    m2 = cv2.resize(m, (m.shape[1] * 2, m.shape[0] * 2), interpolation=cv2.INTER_NEAREST)
    contours, hierarchy = cv2.findContours(m2, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None or not contours:
        return []
    parent = hierarchy[0][:, 3].astype(np.int64)
    is_hole = parent >= 0
    p, lens, starts, ring, nxt, prv = _ring_arrays(contours)
    if min_area > 0 or max_hole > 0:
        # Filter whole rings first: noisy masks have many more small rings than kept ones.
        q = p[nxt]
        area = np.abs(np.add.reduceat(p[:, 0] * q[:, 1] - q[:, 0] * p[:, 1], starts)) / 2.0
        keep = np.ones(len(lens), bool)
        if min_area > 0:
            d = q - p
            length = np.add.reduceat(np.hypot(d[:, 0], d[:, 1]), starts)
            keep &= is_hole | (area + 0.5 * length + 1.0 >= 4.0 * min_area)
        if max_hole > 0:
            keep &= ~is_hole | (area >= 4.0 * max_hole)
        keep &= ~is_hole | keep[np.maximum(parent, 0)]  # holes of dropped regions go too
        if not keep.all():
            kept = np.flatnonzero(keep)
            if len(kept) == 0:
                return []
            new_pos = np.full(len(lens), -1, np.int64)
            new_pos[kept] = np.arange(len(kept))
            parent = np.where(is_hole[kept], new_pos[np.maximum(parent[kept], 0)], -1)
            is_hole = parent >= 0
            contours = [contours[i] for i in kept.tolist()]
            p, lens, starts, ring, nxt, prv = _ring_arrays(contours)
    d = p[nxt] - p
    keep_ring = np.ones(len(lens), bool)
    pts = ((p + 1) >> 1).astype(np.float64)
    _unpinch(pts, p, d, prv, nxt, m2)
    keep_pt = np.any(pts != pts[prv], axis=1)
    keep_pt[starts] = True
    n_kept = np.bincount(ring[keep_pt], minlength=len(lens))
    keep_ring &= n_kept >= 3
    keep_ring &= ~is_hole | keep_ring[np.maximum(parent, 0)]  # holes of dropped regions go too
    shells = np.flatnonzero(keep_ring & ~is_hole)
    if len(shells) == 0:
        return []
    sel = keep_pt & keep_ring[ring]
    kept_rings = np.flatnonzero(keep_ring)
    new_index = np.full(len(lens), -1, np.int64)
    new_index[kept_rings] = np.arange(len(kept_rings))
    xy = pts[sel]
    if offset != (0.0, 0.0) or scale != 1.0:
        xy = (xy + np.asarray(offset, np.float64)) * scale
    rings = shapely.linearrings(xy, indices=new_index[ring[sel]])
    shell_pos = np.full(len(lens), -1, np.int64)
    shell_pos[shells] = np.arange(len(shells))
    holes = np.flatnonzero(keep_ring & is_hole)
    if len(holes) == 0:
        return list(shapely.polygons(rings[new_index[shells]]))
    # Each polygon's shell first, then its holes.
    members = np.concatenate([shells, holes])
    owner = np.concatenate([np.arange(len(shells)), shell_pos[parent[holes]]])
    order = np.lexsort((np.concatenate([np.zeros(len(shells)), np.ones(len(holes))]), owner))
    return list(shapely.polygons(rings[new_index[members[order]]], indices=owner[order]))


def _ring_arrays(contours: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """All rings' points in one (n, 2) array, ring lengths and starts, each point's ring, next and previous."""
    lens = np.fromiter((len(c) for c in contours), np.int64, len(contours))
    p = np.concatenate(contours).reshape(-1, 2).astype(np.int64)
    n = len(p)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    ends = starts + lens - 1
    ring = np.repeat(np.arange(len(lens)), lens)
    nxt = np.arange(1, n + 1)
    nxt[ends] = starts
    prv = np.arange(-1, n - 1)
    prv[starts] = ends
    return p, lens, starts, ring, nxt, prv


PINCH = 0.02  # how far a ring backs off a corner where two pixels touch (survives the 0.01 grid)


def _unpinch(pts: np.ndarray, p: np.ndarray, d: np.ndarray, prv: np.ndarray, nxt: np.ndarray,
             m2: np.ndarray) -> None:
    """Move ring points off the corners where two pixels touch only diagonally (in place).

    Such a pinch is a diagonal step of a contour whose two side pixels (in ``m2``, the doubled mask) are
    background; both its ends map to the shared corner, so the ring would pass through it twice and touch
    itself (invalid). Instead, each pass backs off the corner by ``PINCH`` along its incoming and outgoing
    edges, cutting the corner: the two passes stay apart, the region stays one valid polygon, as
    8-connectivity says it is, and loses PINCH² px² per pinch.
    """
    diag = np.flatnonzero((np.abs(d[:, 0]) == 1) & (np.abs(d[:, 1]) == 1))
    if len(diag) == 0:
        return
    # A diagonal step that cuts a concave corner has a foreground side pixel: no pinch there.
    side = (m2[p[diag, 1], p[diag, 0] + d[diag, 0]] > 0) | (m2[p[diag, 1] + d[diag, 1], p[diag, 0]] > 0)
    i = diag[~side]
    if len(i) == 0:
        return
    j = nxt[i]
    corner = pts[i].copy()
    before, after = pts[prv[i]].copy(), pts[nxt[j]].copy()
    pts[i] = corner + PINCH * np.sign(before - corner)
    pts[j] = corner + PINCH * np.sign(after - corner)


def trace_regions(mask: np.ndarray, x_off: float = 0.0, y_off: float = 0.0, scale: float = 1.0, *,
                  min_area: float = 0.0, max_hole: float = 0.0) -> list[BaseGeometry]:
    """One pixel-edge polygon (with holes) per 8-connected region of a binary mask, in the coordinates
    ``(pixel + offset) * scale``. ``min_area`` and ``max_hole`` (mask pixels²) skip regions and holes
    that post-processing would drop or fill."""
    return _contours(mask, min_area, max_hole, (float(x_off), float(y_off)), float(scale))


def mask_to_geometry(mask: np.ndarray) -> BaseGeometry:
    """All foreground of a binary mask as one (Multi)Polygon in pixel coordinates (pixel (0,0) = [0,1]²)."""
    polys = list(_contours(mask))
    if not polys:
        return Polygon()
    return polys[0] if len(polys) == 1 else shapely.union_all(polys)


def mask_to_polygons(mask: np.ndarray) -> list[BaseGeometry]:
    """One polygon per 8-connected foreground region of a binary mask."""
    out: list[BaseGeometry] = []
    for p in _contours(mask):
        out.extend(p.geoms if isinstance(p, MultiPolygon) else [p])
    return out


def labels_to_polygons(labels: np.ndarray, offset: tuple[float, float] = (0.0, 0.0)) -> dict[int, BaseGeometry]:
    """One polygon per label of a label image (shifted by ``offset``); a split label keeps its largest piece."""
    from scipy import ndimage

    out: dict[int, BaseGeometry] = {}
    slices = ndimage.find_objects(labels)
    for idx, sl in enumerate(slices):
        if sl is None:
            continue
        label = idx + 1
        crop = labels[sl] == label
        geom = mask_to_geometry(np.pad(crop, 1))
        if geom.is_empty:
            continue
        if isinstance(geom, MultiPolygon):
            geom = max(geom.geoms, key=lambda g: g.area)
        # -1 undoes the padding; the slice start moves the crop back into the tile.
        out[label] = affinity.translate(geom, sl[1].start - 1 + offset[0], sl[0].start - 1 + offset[1])
    return out


def to_fullres(geom: BaseGeometry, x0: float, y0: float, scale_x: float, scale_y: float) -> BaseGeometry:
    """Tile pixel coordinates to full-resolution image coordinates."""
    return shapely.transform(geom, lambda c: c * np.array([scale_x, scale_y]) + np.array([x0, y0]))


def clean(geom: BaseGeometry, simplify_tol: float = 0.0, min_area: float = 0.0, snap: bool = True) -> BaseGeometry:
    """Simplified, valid, small parts dropped, and (``snap``) on the 0.01 px grid; empty when nothing is left."""
    out: BaseGeometry = clean_many([geom], simplify_tol, min_area, snap)[0]
    return out


_EMPTY = Polygon()


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
        rounded = shapely.transform(out[live], lambda c: np.round(c / GRID) * GRID)
        ok = shapely.is_valid(rounded)
        out[live[ok]] = rounded[ok]
        for i in live[~ok].tolist():
            out[i] = _polygonal(shapely.set_precision(out[i], GRID))
    if min_area > 0:
        for i in live[shapely.get_type_id(out[live]) == shapely.GeometryType.MULTIPOLYGON].tolist():
            keep = [g for g in out[i].geoms if g.area >= min_area]
            out[i] = (keep[0] if len(keep) == 1 else MultiPolygon(keep)) if keep else _EMPTY
    small = live[shapely.is_empty(out[live]) | (shapely.area(out[live]) < max(min_area, GRID * GRID))]
    for i in small.tolist():
        out[i] = _EMPTY
    return out


def simplify_polygons(geoms: np.ndarray, tol: float) -> np.ndarray:
    """Plain Douglas-Peucker simplification (as ``shapely.simplify(..., preserve_topology=False)``) of the
    Polygons of an object array, ring by ring with OpenCV; other geometries come back unchanged.

    GEOS spends about 50 µs per jagged traced polygon on it, most of it outside the algorithm; OpenCV's
    ``approxPolyDP`` takes a few µs per ring. Like GEOS's, a shell that collapses (fewer than three
    points) empties its polygon and a hole that collapses is dropped. Rings are simplified in float32
    relative to their first point, which keeps coordinates within 1e-3 px of the originals."""
    import cv2

    out = geoms.copy()
    idx = np.flatnonzero((shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(geoms))
    if len(idx) == 0 or tol <= 0:
        return out
    rings, owner = shapely.get_rings(geoms[idx], return_index=True)
    counts = shapely.get_num_coordinates(rings)
    coords = shapely.get_coordinates(rings)
    starts = np.cumsum(counts) - counts
    origin = np.repeat(coords[starts], counts, axis=0)
    local = (coords - origin).astype(np.float32).reshape(-1, 1, 2)
    pieces: list[np.ndarray] = []
    sizes = np.zeros(len(counts), np.int64)
    for r, (a, n) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
        simple = cv2.approxPolyDP(local[a:a + n - 1], tol, True)  # the closing point left out
        if len(simple) >= 3:
            pieces.append(simple.reshape(-1, 2))
            sizes[r] = len(simple)
    is_shell = np.ones(len(counts), bool)
    is_shell[1:] = owner[1:] != owner[:-1]
    dead = np.zeros(len(idx), bool)
    dead[owner[is_shell & (sizes == 0)]] = True
    live_ring = (sizes > 0) & ~dead[owner]
    out[idx[dead]] = _EMPTY
    if not live_ring.any():
        return out
    # shift back: each kept ring's points plus its first original point
    xy = np.concatenate(pieces).astype(np.float64) + np.repeat(coords[starts[sizes > 0]], sizes[sizes > 0], axis=0)
    keep_pts = np.repeat(live_ring[sizes > 0], sizes[sizes > 0])
    ring_id = np.repeat(np.arange(int(live_ring.sum())), sizes[live_ring])
    new_rings = shapely.linearrings(xy[keep_pts], indices=ring_id)
    polys = shapely.polygons(new_rings, indices=np.searchsorted(np.flatnonzero(~dead), owner[live_ring]))
    out[idx[~dead]] = polys
    return out


MANY_HOLES = 256  # holes from which validity is first checked ring by ring (see ``valid_many``)


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
    if not shapely.is_valid(shell) or not shapely.is_valid(holes).all():
        return False
    shapely.prepare(shell)
    if not shapely.contains_properly(shell, holes).all():
        return False
    a, b = shapely.STRtree(holes).query(holes, predicate="intersects")
    return not bool((a != b).any())


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
    small = ~is_shell & (shapely.area(shapely.polygons(rings)) < max_hole_area)
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


def _polygon_coords(p: Polygon) -> list[Any]:
    return [shapely.get_coordinates(r).tolist() for r in (p.exterior, *p.interiors)]


def geojson_geometry(geom: BaseGeometry) -> dict[str, Any]:
    """GeoJSON geometry with plain lists (what json and QuPath's reader expect)."""
    if isinstance(geom, Polygon):
        return {"type": "Polygon", "coordinates": _polygon_coords(geom)}
    if isinstance(geom, MultiPolygon):
        return {"type": "MultiPolygon", "coordinates": [_polygon_coords(p) for p in geom.geoms]}
    return dict(mapping(geom))


def geojson_geometries(geoms: np.ndarray) -> list[dict[str, Any]]:
    """:func:`geojson_geometry` of many (Multi)Polygons at once: their coordinates are read in one shapely call
    and turned into Python lists once, then cut into rings."""
    parts, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_part = shapely.get_rings(parts, return_index=True)
    coords = shapely.get_coordinates(rings)
    counts = shapely.get_num_coordinates(rings)
    flat = coords.tolist()
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
