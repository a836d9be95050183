"""Model-pixel geometry to finished QuPath features: clean-up in model pixels, then full resolution."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from qpbridge import geometry
from qpbridge.cards import ModelCard
from qpbridge.engine.vectorise import EarlyHoles, HoledRegion


@dataclass
class _HoleParts:
    """Early holes (:class:`~qpbridge.engine.vectorise.EarlyHoles`) of one region, built as far as a hole can be
    without its region: each as the region's feature would hold it (simplified, at full resolution, on the grid)."""

    raw: np.ndarray  # the traced rings, as polygons (model pixels): the careful path rebuilds the whole region
    raw_area: np.ndarray
    live: np.ndarray  # not collapsed by the simplification (a collapsed hole is dropped)
    polys: np.ndarray  # the built rings, as polygons (empty where collapsed)
    valid: np.ndarray
    clash: np.ndarray  # meets another hole found with it
    area: np.ndarray
    length: np.ndarray
    coords: list[list[Any]]  # GeoJSON rings
    row: int = 0  # of the chunk they were found in (see EarlyHoles)

    @staticmethod
    def join(parts: list[_HoleParts]) -> _HoleParts:
        if len(parts) == 1:
            return parts[0]
        parts = sorted(parts, key=lambda p: p.row)
        arrays: dict[str, Any] = {f.name: np.concatenate([getattr(p, f.name) for p in parts])
                                  for f in fields(_HoleParts) if f.name not in ("coords", "row")}
        return _HoleParts(**arrays, coords=[c for p in parts for c in p.coords])

    def take(self, idx: np.ndarray) -> _HoleParts:
        arrays: dict[str, Any] = {f.name: getattr(self, f.name)[idx] for f in fields(self)
                                  if f.name not in ("coords", "row")}
        return _HoleParts(**arrays, coords=[self.coords[i] for i in idx.tolist()], row=self.row)


class FeatureBuilder:
    """Turns polygons in model-pixel coordinates into features, applying the card's post-processing.

    Tolerances come from the card in µm and are applied in model pixels (where one pixel is
    ``card.mpp`` µm); measurements use the full-resolution pixel size when it is known. An optional ROI
    (full-resolution geometry) clips every result.
    """

    def __init__(self, card: ModelCard, fullres_mpp: float | None, roi: BaseGeometry | None = None,
                 image_size: tuple[int, int] | None = None) -> None:
        self.card = card
        self.fullres_mpp = fullres_mpp
        # Results never reach outside the image (edge tiles are padded) nor outside the ROI.
        clip = shapely.box(0, 0, *image_size) if image_size else None
        if roi is not None:
            clip = roi if clip is None else roi.intersection(clip)
        if clip is not None:
            shapely.prepare(clip)
        self.clip = clip
        self.tol = card.simplify_um / card.mpp
        self.min_area = card.min_area_um2 / card.mpp ** 2
        self.max_hole = card.max_hole_area_um2 / card.mpp ** 2
        nucleus = card.task == "instance-segmentation" and card.classes[0].name.lower().startswith("nucle")
        self.prefix = "Nucleus: " if nucleus else ""
        self._early: dict[int, list[_HoleParts]] = {}  # early holes built, by the key of the region they belong to
        self._early_lock = threading.Lock()

    def build(self, geom: BaseGeometry, cls_index: int, x0: float, y0: float, sx: float, sy: float,
              extra: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A feature for ``geom`` (model pixels; full-res = (x0, y0) + (sx, sy) * model), or None if nothing is left."""
        return self.build_many([geom], [cls_index], x0, y0, sx, sy, [extra])[0]

    def build_many(self, geoms: Sequence[BaseGeometry], classes: Sequence[int], x0: float, y0: float, sx: float,
                   sy: float, extras: Sequence[dict[str, Any] | None] | None = None) -> list[dict[str, Any] | None]:
        """:meth:`build` of many geometries in vectorised shapely calls (which release the GIL, so several
        threads can build at once); one result per geometry, None where nothing is left.

        The common case takes one validity check per geometry: simplify (plain Douglas-Peucker), map to
        full resolution and round to the grid in one pass, then check. Geometries that come out invalid,
        multi-part, or crossing the clip take the careful path (:func:`geometry.clean_many` before and after
        the mapping, which repairs what it must), and give the same result the careful path always gave.

        :class:`~qpbridge.engine.vectorise.EarlyHoles` are built and kept (their result is None) for the
        :class:`~qpbridge.engine.vectorise.HoledRegion` they belong to, which must come in a later call."""
        special = [i for i, g in enumerate(geoms) if isinstance(g, (EarlyHoles, HoledRegion))]
        if special:
            return self._build_special(geoms, classes, x0, y0, sx, sy, extras, special)
        n = len(geoms)
        arr = np.empty(n, dtype=object)
        arr[:] = list(geoms)
        if self.max_hole > 0:
            types = shapely.get_type_id(arr)
            for i in np.flatnonzero(types == shapely.GeometryType.MULTIPOLYGON).tolist():
                arr[i] = geometry.fill_small_holes(arr[i], self.max_hole)
            holed = np.flatnonzero((types == shapely.GeometryType.POLYGON) & (shapely.get_num_interior_rings(arr) > 0))
            if len(holed):
                arr[holed] = geometry.fill_small_holes_many(arr[holed], self.max_hole)
        if self.min_area > 0:
            # The region's own area (small holes filled) decides, not its simplified outline's: a region
            # is kept or dropped whatever the simplification tolerance, as the tracer already decided.
            small = np.flatnonzero(shapely.area(arr) < self.min_area)
            arr[small] = geometry.EMPTY
        scale, shift, grid = np.array([sx, sy]), np.array([x0, y0]), geometry.GRID
        fast = geometry.simplify_polygons(arr, self.tol) if self.tol > 0 else arr
        g = shapely.transform(fast, self._mapper(x0, y0, sx, sy))
        ok = (shapely.get_type_id(arr) == shapely.GeometryType.POLYGON) & ~shapely.is_empty(g)
        if self.clip is not None:
            ok &= shapely.contains(self.clip, g)
        ok[ok] = geometry.valid_many(g[ok])
        area = shapely.area(g)
        ok &= area >= grid * grid
        careful = np.flatnonzero(~ok & ~shapely.is_empty(arr))
        if len(careful):
            c = geometry.clean_many(arr[careful], self.tol, self.min_area, snap=False)
            live = np.flatnonzero(~shapely.is_empty(c))
            c = shapely.transform(c[live], lambda xy: xy * scale + shift)
            if self.clip is not None:
                outside = np.flatnonzero(~shapely.contains(self.clip, c))
                if len(outside):
                    c[outside] = shapely.intersection(c[outside], self.clip)
            g[careful[live]] = geometry.clean_many(c)
            ok[careful[live]] = ~shapely.is_empty(g[careful[live]])
        out: list[dict[str, Any] | None] = [None] * n
        kept = np.flatnonzero(ok)
        if len(kept) == 0:
            return out
        g = g[kept]
        area = shapely.area(g).tolist()
        length = shapely.length(g).tolist()
        shapes = geometry.geojson_geometries(g)
        card, mpp, prefix = self.card, self.fullres_mpp, self.prefix
        ids = geometry.new_ids(len(kept))
        for j, i in enumerate(kept.tolist()):
            meas = geometry.measurements_of(area[j], length[j], mpp, prefix)
            extra = extras[i] if extras is not None else None
            if extra:
                meas.update(extra)
            out[i] = geometry.make_feature(shapes[j], card.object_type, card.classes[classes[i]], meas, card.name,
                                           ids[j])
        return out

    # ---- regions built from early holes ------------------------------------------------------------------

    def _build_special(self, geoms: Sequence[Any], classes: Sequence[int], x0: float, y0: float, sx: float,
                       sy: float, extras: Sequence[dict[str, Any] | None] | None,
                       special: list[int]) -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = [None] * len(geoms)
        for i in special:
            g = geoms[i]
            if isinstance(g, EarlyHoles):
                self.add_early(g, x0, y0, sx, sy)
            else:
                out[i] = self._build_holed(g, classes[i], x0, y0, sx, sy, extras[i] if extras is not None else None)
        taken = set(special)
        rest = [i for i in range(len(geoms)) if i not in taken]
        if rest:
            built = self.build_many([geoms[i] for i in rest], [classes[i] for i in rest], x0, y0, sx, sy,
                                    [extras[i] for i in rest] if extras is not None else None)
            for i, f in zip(rest, built, strict=True):
                out[i] = f
        return out

    @staticmethod
    def _mapper(x0: float, y0: float, sx: float, sy: float) -> Any:
        """Model pixels to full resolution, rounded to the grid."""
        scale, shift = np.array([sx, sy]), np.array([x0, y0])
        return lambda c: geometry.on_grid(c * scale + shift)

    def add_early(self, found: EarlyHoles, x0: float, y0: float, sx: float, sy: float) -> None:
        """Build early holes as far as they can be built alone, and keep them for their regions: the same
        steps, ring by ring, as :meth:`build_many` takes for a polygon's holes."""
        raw = found.holes
        raw_area = shapely.area(raw)
        keep = np.flatnonzero(raw_area >= self.max_hole) if self.max_hole > 0 else np.arange(len(raw))
        rings = shapely.get_exterior_ring(raw[keep])
        if self.tol > 0:
            rings = geometry.ring_map(lambda part: shapely.simplify(part, self.tol, preserve_topology=False), rings)
        # a hole that collapses is dropped, as geometry.simplify_polygons drops it
        live = ((shapely.get_type_id(rings) == shapely.GeometryType.LINEARRING)
                & (shapely.get_num_coordinates(rings) >= 4))
        polys = np.full(len(rings), geometry.EMPTY, dtype=object)
        polys[live] = shapely.polygons(shapely.transform(rings[live], self._mapper(x0, y0, sx, sy)))
        clash = np.zeros(len(polys), bool)
        if len(polys) > 1:
            a, b = shapely.STRtree(polys).query(polys, predicate="intersects")
            clash[a[a != b]] = True
        counts = shapely.get_num_coordinates(polys)
        ends = np.cumsum(counts).tolist()
        flat = geometry.points(shapely.get_coordinates(polys))
        parts = _HoleParts(raw[keep], raw_area[keep], live, polys, shapely.is_valid(polys), clash, shapely.area(polys),
                           shapely.length(polys), [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)],
                           found.row)
        owners = found.owners[keep]
        order = np.argsort(owners, kind="stable")
        cuts = np.flatnonzero(np.diff(owners[order])) + 1
        with self._early_lock:
            for idx in np.split(order, cuts) if len(order) else ():
                self._early.setdefault(int(owners[idx[0]]), []).append(parts.take(idx))

    def _build_holed(self, region: HoledRegion, cls: int, x0: float, y0: float, sx: float, sy: float,
                     extra: dict[str, Any] | None) -> dict[str, Any] | None:
        """The feature of a region whose early holes were built before: its outline and late holes are built
        as :meth:`build_many` builds a polygon, the early holes joined in, and the polygon checked as
        ``geometry.valid_many`` checks one with many holes. What fails a check is built whole, by the careful
        path, exactly as it would have been without early holes."""
        with self._early_lock:
            found = [p for key in region.owners for p in self._early.pop(key, [])]
        poly = region.polygon
        if not found:
            return self.build_many([poly], [cls], x0, y0, sx, sy, [extra])[0]
        early = _HoleParts.join(found)

        def whole() -> dict[str, Any] | None:
            full = shapely.Polygon(shapely.get_exterior_ring(poly),
                                   [*shapely.get_interior_ring(poly, np.arange(shapely.get_num_interior_rings(poly))),
                                    *shapely.get_exterior_ring(early.raw)])
            return self.build_many([full], [cls], x0, y0, sx, sy, [extra])[0]

        arr = np.array([poly], dtype=object)
        if self.max_hole > 0 and shapely.get_num_interior_rings(poly) > 0:
            arr = geometry.fill_small_holes_many(arr, self.max_hole)
        if self.min_area > 0 and float(shapely.area(arr[0])) - float(early.raw_area.sum()) < self.min_area:
            return None
        fast = geometry.simplify_polygons(arr, self.tol) if self.tol > 0 else arr
        g = shapely.transform(fast, self._mapper(x0, y0, sx, sy))[0]
        if shapely.get_type_id(g) != shapely.GeometryType.POLYGON or shapely.is_empty(g):
            return whole()
        shell = shapely.polygons(shapely.get_exterior_ring(g))
        late = shapely.polygons(shapely.get_interior_ring(g, np.arange(shapely.get_num_interior_rings(g))))
        if self.clip is not None and not shapely.contains(self.clip, shell):
            return whole()
        holes = np.concatenate([late, early.polys[early.live]])
        if len(holes) >= geometry.MANY_HOLES:
            ok = bool(shapely.is_valid(shell)) and bool(shapely.is_valid(late).all()) and bool(early.valid.all()) \
                and not early.clash.any()
            if ok:
                ok = bool(geometry.holes_inside(shell, holes).all())
            if ok and len(late):  # a late hole meeting another hole: a tree of the late ones, asked by every hole
                a, b = shapely.STRtree(late).query(holes, predicate="intersects")
                ok = not bool((a != b).any())
            if not ok:
                ok = bool(shapely.is_valid(self._assemble(g, early)))
        else:
            ok = bool(shapely.is_valid(self._assemble(g, early)))
        # ring by ring in the polygon's order, as GEOS sums them: the same numbers as the whole polygon's
        # (accumulate adds in order, one term after the other, as a loop would)
        area = float(np.subtract.accumulate(np.concatenate([shapely.area(shell)[None], shapely.area(late),
                                                             early.area[early.live]]))[-1])
        length = float(np.add.accumulate(np.concatenate([shapely.length(shapely.get_exterior_ring(g))[None],
                                                         shapely.length(shapely.get_exterior_ring(late)),
                                                         early.length[early.live]]))[-1])
        if not ok or area < geometry.GRID * geometry.GRID:
            return whole()
        rings = geometry.geojson_geometries(np.array([g], dtype=object))[0]["coordinates"]
        meas = geometry.measurements_of(area, length, self.fullres_mpp, self.prefix)
        if extra:
            meas.update(extra)
        coords = [*rings, *itertools.compress(early.coords, early.live.tolist())]
        return geometry.make_feature({"type": "Polygon", "coordinates": coords}, self.card.object_type,
                                     self.card.classes[cls], meas, self.card.name, geometry.new_ids(1)[0])

    @staticmethod
    def _assemble(g: BaseGeometry, early: _HoleParts) -> BaseGeometry:
        rings = shapely.get_interior_ring(g, np.arange(shapely.get_num_interior_rings(g)))
        return shapely.Polygon(shapely.get_exterior_ring(g),
                               [*rings, *shapely.get_exterior_ring(early.polys[early.live])])

