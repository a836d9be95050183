"""Morphological post-processing of a class raster (opening, then closing, per class), strip by strip.

A semantic card may ask for it in ``params.morphology``::

    "morphology": {"opening_um": 4.0, "closing_um": 4.0, "fill_class": "Background"}

Each emitted class's mask is opened (erosion then dilation with a disc of radius ``opening_um``: specks and
spurs thinner than the disc go) and then closed (dilation then erosion with a disc of ``closing_um``: gaps and
notches narrower than the disc are bridged), in the card's class order. Pixels a class loses go to
``fill_class`` (by name; default: the card's first class that makes no polygons, such as "Background", else no
class); pixels a class gains are taken from whatever held them, except pixels no tile covered, which stay
uncovered. Hole filling and the minimum region size are the card's ``postprocess.max_hole_area_um2`` and
``min_area_um2``, applied by the tracer to whole regions right after this step (see
:mod:`qpbridge.engine.vectorise`), so all four run on the raster before any polygon is made.

Where it runs: between the blend's argmax and the tracer. The stitcher finalises one strip (one grid step of
rows) at a time; an opening then closing of radii r1 and r2 changes a pixel only from pixels within
``2 * (r1 + r2)`` rows of it, so :class:`StripMorphology` holds back that many rows (the *margin*), filters each
new strip together with the margin above it and passes on only rows whose neighbourhood below has arrived.
Every raster row is filtered ``(strip + 2 * margin) / strip`` times at most, so the cost stays linear in the
pixels and memory is one strip plus two margins of rows; the result equals filtering the whole raster at
once (tested). The image's own top and bottom edges are treated as OpenCV does (erosion ignores pixels
outside the raster), so a region touching the edge is not eaten from there.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from qpbridge.errors import ModelCardError

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

NO_CLASS = 255


@dataclass(frozen=True)
class Morphology:
    """Opening then closing radii in canvas (model) pixels, per class; ``fill`` takes what a class loses."""

    opening_px: float
    closing_px: float
    classes: tuple[int, ...]
    fill: int = NO_CLASS

    @classmethod
    def from_card(cls, card: ModelCard) -> Morphology | None:
        """The card's ``params.morphology`` in model pixels, or None when the card asks for none."""
        spec = card.params.get("morphology")
        if spec is None:
            return None
        if not isinstance(spec, dict):
            raise ModelCardError("card parameter 'morphology' must be an object (opening_um, closing_um, fill_class)")
        unknown = set(spec) - {"opening_um", "closing_um", "fill_class"}
        if unknown:
            raise ModelCardError(f"unknown key(s) in params.morphology: {', '.join(sorted(unknown))} (known: "
                                 "opening_um, closing_um, fill_class; hole filling and the minimum region size are "
                                 "postprocess.max_hole_area_um2 and min_area_um2)")
        radii = []
        for key in ("opening_um", "closing_um"):
            value = spec.get(key, 0.0)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ModelCardError(f"params.morphology.{key} must be a number >= 0 (µm), got {value!r}")
            radii.append(float(value) / card.mpp)
        names = [c.name for c in card.classes]
        fill_name = spec.get("fill_class")
        if fill_name is None:
            fill = next((i for i, c in enumerate(card.classes) if not c.emit), NO_CLASS)
        elif fill_name in names:
            fill = names.index(fill_name)
        else:
            raise ModelCardError(f"params.morphology.fill_class '{fill_name}' is not one of the card's classes "
                                 f"({', '.join(names)})")
        if radii[0] <= 0 and radii[1] <= 0:
            return None
        return cls(radii[0], radii[1], tuple(card.emit_classes), fill)

    def at_scale(self, scale: float) -> Morphology:
        """The same operation on a raster whose pixels are ``scale`` canvas pixels wide."""
        return Morphology(self.opening_px / scale, self.closing_px / scale, self.classes, self.fill)

    @property
    def radii(self) -> tuple[int, int]:
        """Disc radii in raster pixels (a radius under half a pixel does nothing)."""
        return round(self.opening_px), round(self.closing_px)

    @property
    def margin(self) -> int:
        """Rows on each side that can change a row's result."""
        r1, r2 = self.radii
        return 2 * (r1 + r2)

    def apply(self, raster: np.ndarray) -> np.ndarray:
        """The filtered raster (a new array); the raster's own borders are image borders."""
        import cv2

        r1, r2 = self.radii
        out = raster.copy()
        covered = raster != NO_CLASS
        for c in self.classes:
            mask = (raster == c).astype(np.uint8)
            if not mask.any():
                continue
            new = mask
            if r1 > 0:
                new = cv2.morphologyEx(new, cv2.MORPH_OPEN, _disc(r1))
            if r2 > 0:
                new = cv2.morphologyEx(new, cv2.MORPH_CLOSE, _disc(r2))
            lost = (mask > new) & (out == c)
            out[lost] = self.fill
            out[(new > mask) & covered] = c
        return out


def _disc(radius: int) -> np.ndarray:
    import cv2

    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


class StripMorphology:
    """Filters a raster arriving as strips (top to bottom) and hands filtered strips to ``sink(strip, last)``,
    ``margin`` rows behind, with the same result as filtering the whole raster."""

    def __init__(self, morphology: Morphology, sink: Callable[[np.ndarray, bool], Any]) -> None:
        self.morphology = morphology
        self.sink = sink
        self.margin = morphology.margin
        self.rows: np.ndarray | None = None  # the rows held: ``top`` margin rows already passed on, then new ones
        self.top = 0  # how many of ``rows`` were passed on already (kept as context above)

    def add_strip(self, strip: np.ndarray, last: bool = False) -> None:
        rows = strip if self.rows is None else np.concatenate([self.rows, strip])
        if not last and rows.shape[0] - self.top <= self.margin:
            self.rows = rows  # not enough context below yet
            return
        filtered = self.morphology.apply(rows)
        stop = rows.shape[0] if last else rows.shape[0] - self.margin
        self.sink(filtered[self.top:stop], last)
        keep_from = max(0, stop - self.margin)
        self.rows = rows[keep_from:]
        self.top = stop - keep_from
