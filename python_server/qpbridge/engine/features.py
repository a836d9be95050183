"""Model-pixel geometry to finished QuPath features: clean-up in model pixels, then full resolution."""

from __future__ import annotations

from typing import Any

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
        geom = geometry.fill_small_holes(geom, self.max_hole)
        geom = geometry.clean(geom, self.tol, self.min_area, snap=False)
        if geom.is_empty:
            return None
        geom = geometry.to_fullres(geom, x0, y0, sx, sy)
        if self.clip is not None and not self.clip.contains(geom):
            geom = geom.intersection(self.clip)
        geom = geometry.clean(geom)
        if geom.is_empty:
            return None
        meas = geometry.shape_measurements(geom, self.fullres_mpp, self.prefix)
        if extra:
            meas.update(extra)
        card = self.card
        return geometry.make_feature(geom, card.object_type, card.classes[cls_index], meas, card.name)
