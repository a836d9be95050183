"""Built-in tissue detector (family ``builtin-tissue``): no weights, thresholds at low resolution.

Output convention: ``predict`` returns one ``SemanticResult`` per tile whose ``classes`` map is a
(H, W) uint8 array holding ``0`` (the index of ``card.classes[0]``, "Tissue") on tissue pixels and
``NO_CLASS`` (255, from ``qpbridge.families.base``) on background, i.e. "no class, make no polygon here".

Algorithm (in the spirit of QuPath's threshold-based tissue detection), on tiles at ``card.mpp``
(8 µm/px by default):

1. Light Gaussian smoothing of the RGB tile (``params.smooth_um`` converted to pixels).
2. A pixel is tissue when its mean optical density over R, G, B exceeds ``params.od_threshold``
   *and* its HSV saturation exceeds ``params.saturation_threshold``. Both are fixed thresholds from
   the card, so a tile that is all tissue or all glass is handled like any other (no per-tile Otsu).
   White glass has OD ~0.02-0.05 and saturation ~0.01; grey dust and grey pen are unsaturated and
   rejected by the saturation test. ``params.max_od`` (off when absent; the shipped card sets 1.0,
   i.e. mean intensity below ~25) rejects very dark pixels (black slide borders, black ink, thick
   folds), whose HSV saturation is dominated by noise.
3. Morphological clean-up: an opening of radius 1 px drops isolated speckles and a closing of
   ``params.close_um`` (default ``smooth_um``) joins fragments of loose tissue.
4. Holes (background components not touching the tile border) smaller than
   ``card.max_hole_area_um2`` are filled.
5. Pieces smaller than ``card.min_area_um2`` are removed, except pieces that touch the tile border:
   those may continue in the neighbouring tile, so they are left for the polygon stage (which
   applies the card's ``min_area_um2`` and ``max_hole_area_um2`` to the polygons again) to judge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy import ndimage as ndi

from qpbridge.errors import ModelCardError
from qpbridge.families.base import NO_CLASS, ModelFamily, SemanticResult, TileResult, register_family
from qpbridge.families.stains import check_rgb_tile, mean_optical_density, saturation

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

__all__ = ["NO_CLASS", "TISSUE_CLASS", "TissueDetector", "fill_small_holes", "remove_small_pieces", "tissue_mask"]

TISSUE_CLASS = 0  # index of "Tissue" in card.classes

_DEFAULTS: dict[str, float] = {
    "od_threshold": 0.08,
    "saturation_threshold": 0.08,
    "smooth_um": 16.0,
}

_EIGHT = np.ones((3, 3), dtype=bool)


def _number(params: dict[str, Any], key: str, default: float | None) -> float | None:
    """A non-negative finite number from the card's params (``default`` when absent; None = off)."""
    value = params.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelCardError(f"tissue card parameter '{key}' must be a finite number, got {value!r}")
    if value < 0:
        raise ModelCardError(f"tissue card parameter '{key}' must be >= 0, got {value}")
    return float(value)


def _required(params: dict[str, Any], key: str, default: float) -> float:
    value = _number(params, key, default)
    if value is None:
        raise ModelCardError(f"tissue card parameter '{key}' must be a number, got null")
    return value


def _disk(radius: int) -> np.ndarray:
    kernel: np.ndarray = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return kernel


def _border_labels(labels: np.ndarray) -> np.ndarray:
    edges = np.concatenate([labels[0, :], labels[-1, :], labels[:, 0], labels[:, -1]])
    out: np.ndarray = np.unique(edges)
    return out


def fill_small_holes(mask: np.ndarray, max_hole_px: float) -> np.ndarray:
    """Fill background components that do not touch the border and are smaller than ``max_hole_px``."""
    if max_hole_px <= 0 or mask.all() or not mask.any():
        return mask
    holes, n = ndi.label(~mask)  # 4-connected background, the dual of 8-connected foreground
    if n == 0:
        return mask
    areas = np.bincount(holes.ravel(), minlength=n + 1)
    fill = areas < max_hole_px
    fill[0] = False
    fill[_border_labels(holes)] = False
    out: np.ndarray = mask | fill[holes]
    return out


def remove_small_pieces(mask: np.ndarray, min_px: float, keep_border: bool = True) -> np.ndarray:
    """Remove 8-connected pieces smaller than ``min_px`` (pieces touching the border kept if asked)."""
    if min_px <= 0 or not mask.any():
        return mask
    labels, n = ndi.label(mask, structure=_EIGHT)
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    keep = areas >= min_px
    if keep_border:
        keep[_border_labels(labels)] = True
    keep[0] = False
    out: np.ndarray = keep[labels]
    return out


def tissue_mask(
    rgb: np.ndarray,
    mpp: float,
    od_threshold: float,
    saturation_threshold: float,
    smooth_um: float,
    close_um: float,
    min_area_um2: float,
    max_hole_area_um2: float,
    max_od: float | None = None,
) -> np.ndarray:
    """Boolean tissue mask of one uint8 RGB tile at ``mpp`` µm/px (see the module docstring)."""
    sigma_px = smooth_um / mpp
    img = rgb
    if sigma_px >= 0.3:
        img = cv2.GaussianBlur(rgb, (0, 0), sigmaX=sigma_px, sigmaY=sigma_px, borderType=cv2.BORDER_REFLECT)
    od = mean_optical_density(img)
    mask = (od > od_threshold) & (saturation(img) > saturation_threshold)
    if max_od is not None:
        mask &= od <= max_od
    if not mask.any():
        return mask
    u8: np.ndarray = mask.astype(np.uint8)
    u8 = cv2.morphologyEx(u8, cv2.MORPH_OPEN, _disk(1))
    close_px = round(close_um / mpp)
    if close_px >= 1:
        # Reflect-pad so the closing sees the tissue continue past the tile edge, as it may.
        pad = close_px + 1
        padded = cv2.copyMakeBorder(u8, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        u8 = cv2.morphologyEx(padded, cv2.MORPH_CLOSE, _disk(close_px))[pad:-pad, pad:-pad]
    mask = u8.astype(bool)
    px_area = mpp * mpp
    mask = fill_small_holes(mask, max_hole_area_um2 / px_area)
    mask = remove_small_pieces(mask, min_area_um2 / px_area, keep_border=True)
    return mask


@register_family("builtin-tissue")
class TissueDetector(ModelFamily):
    """Tissue vs background by optical density and saturation thresholds; thread-safe, no state."""

    thread_safe = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        if not card.classes:
            raise ModelCardError(f"tissue card '{card.name}' needs at least one class")
        params = card.params
        self.od_threshold = _required(params, "od_threshold", _DEFAULTS["od_threshold"])
        self.saturation_threshold = _required(params, "saturation_threshold", _DEFAULTS["saturation_threshold"])
        self.smooth_um = _required(params, "smooth_um", _DEFAULTS["smooth_um"])
        self.close_um = _required(params, "close_um", self.smooth_um)
        self.max_od = _number(params, "max_od", None)
        if card.mpp <= 0:
            raise ModelCardError(f"tissue card '{card.name}' needs a positive mpp, got {card.mpp}")

    def mask(self, tile: np.ndarray) -> np.ndarray:
        """Boolean tissue mask of one tile at ``card.mpp``."""
        rgb = check_rgb_tile(tile)
        return tissue_mask(
            rgb,
            mpp=self.card.mpp,
            od_threshold=self.od_threshold,
            saturation_threshold=self.saturation_threshold,
            smooth_um=self.smooth_um,
            close_um=self.close_um,
            min_area_um2=self.card.min_area_um2,
            max_hole_area_um2=self.card.max_hole_area_um2,
            max_od=self.max_od,
        )

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        rgbs = [check_rgb_tile(tile, i) for i, tile in enumerate(tiles)]  # all checked before any work
        results: list[TileResult] = []
        for rgb in rgbs:
            m = self.mask(rgb)
            classes = np.full(m.shape, NO_CLASS, dtype=np.uint8)
            classes[m] = TISSUE_CLASS
            results.append(SemanticResult(classes=classes))
        return results
