"""A PNG of the results drawn over a slide thumbnail, for a quick look without QuPath."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qpbridge.slides import Slide


def draw_overlay(slide: Slide, features: list[dict[str, Any]], out: Path, max_size: int = 2048) -> Path:
    import cv2
    from shapely.geometry import shape

    thumb, ds = slide.thumbnail(max_size)
    fill = thumb.copy()
    outline = thumb.copy()
    for f in features:
        color = tuple(int(c) for c in f["properties"]["classification"]["color"])
        geom = shape(f["geometry"])
        polys = getattr(geom, "geoms", [geom])
        for p in polys:
            ext = np.round(np.asarray(p.exterior.coords) / ds).astype(np.int32)
            holes = [np.round(np.asarray(r.coords) / ds).astype(np.int32) for r in p.interiors]
            cv2.fillPoly(fill, [ext, *holes], color)
            cv2.polylines(outline, [ext, *holes], True, color, 1, cv2.LINE_AA)
    blended = cv2.addWeighted(fill, 0.35, thumb, 0.65, 0)
    edges = np.any(outline != thumb, axis=2)
    blended[edges] = outline[edges]
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(blended, cv2.COLOR_RGB2BGR)):
        from qpbridge.errors import ImageReadError

        raise ImageReadError(f"could not write overlay {out}")
    return out
