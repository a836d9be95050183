"""Model-pixel geometry to finished QuPath features: clean-up in model pixels, then full resolution."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from qpbridge import geometry
from qpbridge.cards import ModelCard


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
        the mapping, which repairs what it must), and give the same result the careful path always gave."""
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
        g = shapely.transform(fast, lambda c: np.round((c * scale + shift) / grid) * grid)
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
