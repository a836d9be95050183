"""Built-in nucleus detector (family ``builtin-nuclei``): colour deconvolution, threshold, watershed.

No weights; in the spirit of QuPath's watershed cell detection. On tiles at ``card.mpp`` (0.5 µm/px
by default):

1. Colour deconvolution (Ruifrok & Johnston) with the card's ``params.stain_vectors``
   (``hematoxylin``, ``eosin``; the third vector is their normalised cross product) gives per-pixel
   haematoxylin and eosin optical density.
2. Background subtraction: a grey-level opening of the haematoxylin channel with a disk of radius
   ``params.background_radius_um`` (a rolling-ball-like estimate of the local non-nuclear level) is
   subtracted; the estimate is capped at ``params.max_background`` (0 = no cap) so that dense sheets
   of nuclei, wider than the disk, are not subtracted away.
3. Gaussian smoothing (``params.smooth_sigma_um``).
4. Threshold on the smoothed, background-subtracted haematoxylin OD: Otsu's threshold of the
   tile's tissue pixels (summed RGB OD above ``params.tissue_od``, so glass does not drag it down),
   clamped to [``params.threshold``, ``params.otsu_max``]; with ``otsu_max`` <= ``threshold`` the
   fixed ``threshold`` alone. The bounds keep a tile of only stroma or only nuclei sane.
5. Clean-up: holes inside nuclei are filled (up to ``params.max_area_um2``), an opening of radius
   1 px removes spurs, pieces smaller than ``card.min_area_um2`` are dropped.
6. Splitting: the Euclidean distance transform of the mask, smoothed by
   ``params.distance_smooth_um``, has its local maxima at least ``params.min_separation_um`` apart
   (and, if ``params.peak_prominence_um`` > 0, rising that much above the saddle to a higher peak:
   an h-maxima test) taken as markers; a marker-controlled watershed on the inverted distance splits
   touching nuclei. Pieces without a marker keep a label of their own.
7. Objects larger than ``params.max_area_um2`` or smaller than ``card.min_area_um2`` are dropped and
   labels renumbered 1..N.

The defaults (here and in ``models/nuclei/config.json``) were tuned on 13 MoNuSeg 2018 training
images downsampled to 0.5 µm/px: detected/annotated count ratio 0.73-1.14 (median 0.95), 83 % of
annotated nuclei centres inside a detection, F1 at IoU 0.5 about 0.58.

Per-label measurements (haematoxylin/eosin OD from step 1, before background subtraction) are
computed with ``np.bincount``/``scipy.ndimage``; shape measurements are computed elsewhere from the
final polygons.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from qpbridge.errors import ModelCardError
from qpbridge.families.base import InstanceResult, ModelFamily, TileResult, register_family
from qpbridge.families.params import object_param
from qpbridge.families.stains import (
    DEFAULT_EOSIN,
    DEFAULT_HEMATOXYLIN,
    check_rgb_tile,
    deconvolution_matrix,
    optical_density,
)
from qpbridge.families.tissue import fill_small_holes

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

H_MEAN = "Nucleus: Hematoxylin OD mean"
H_MAX = "Nucleus: Hematoxylin OD max"
E_MEAN = "Nucleus: Eosin OD mean"

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class NucleusParams:
    """The card's ``params`` after validation, in card units (µm, µm², OD)."""

    hematoxylin: tuple[float, float, float]
    eosin: tuple[float, float, float]
    background_radius_um: float = 8.0
    max_background: float = 0.3
    smooth_sigma_um: float = 0.5
    threshold: float = 0.15
    otsu_max: float = 0.5
    tissue_od: float = 0.3
    distance_smooth_um: float = 0.5
    min_separation_um: float = 2.0
    peak_prominence_um: float = 0.0
    max_area_um2: float = 400.0

    @classmethod
    def from_card(cls, params: dict[str, Any]) -> NucleusParams:
        stains = object_param(params, "stain_vectors", ("hematoxylin", "eosin"), "nuclei")
        return cls(
            hematoxylin=_vector(stains.get("hematoxylin", DEFAULT_HEMATOXYLIN), "hematoxylin"),
            eosin=_vector(stains.get("eosin", DEFAULT_EOSIN), "eosin"),
            background_radius_um=_number(params, "background_radius_um", cls.background_radius_um),
            max_background=_number(params, "max_background", cls.max_background),
            smooth_sigma_um=_number(params, "smooth_sigma_um", cls.smooth_sigma_um),
            threshold=_number(params, "threshold", cls.threshold, positive=True),
            otsu_max=_number(params, "otsu_max", cls.otsu_max),
            tissue_od=_number(params, "tissue_od", cls.tissue_od),
            distance_smooth_um=_number(params, "distance_smooth_um", cls.distance_smooth_um),
            min_separation_um=_number(params, "min_separation_um", cls.min_separation_um),
            peak_prominence_um=_number(params, "peak_prominence_um", cls.peak_prominence_um),
            max_area_um2=_number(params, "max_area_um2", cls.max_area_um2, positive=True),
        )


def _number(params: dict[str, Any], key: str, default: float, positive: bool = False) -> float:
    value = params.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ModelCardError(f"nuclei card parameter '{key}' must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ModelCardError(f"nuclei card parameter '{key}' must be {'> 0' if positive else '>= 0'}, got {value}")
    return float(value)


def _vector(value: Any, name: str) -> tuple[float, float, float]:
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 3
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    ):
        raise ModelCardError(f"stain vector '{name}' must be a list of 3 numbers, got {value!r}")
    return (float(value[0]), float(value[1]), float(value[2]))


def _disk(radius: int) -> np.ndarray:
    kernel: np.ndarray = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return kernel


def _otsu(values: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 1-D sample (histogram based, no copies of the image)."""
    lo, hi = float(values.min()), float(values.max())
    if hi - lo < 1e-6:
        return lo
    hist, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist).astype(np.float64)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = np.divide(m0, w0, out=np.zeros_like(m0), where=w0 > 0)
    mean1 = np.divide(m0[-1] - m0, w1, out=np.zeros_like(m0), where=w1 > 0)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def _markers(dist: np.ndarray, mask: np.ndarray, sep_px: float, prominence_px: float) -> np.ndarray:
    """Labelled watershed markers: separated, prominent local maxima of the distance map."""
    radius = max(1, round(sep_px))
    local_max = cv2.dilate(dist, _disk(radius))  # grey dilation = maximum filter; border = -inf
    peaks = (dist >= local_max) & mask & (dist > 0)
    if prominence_px > 0:
        # h-maxima: a peak must rise ``prominence_px`` above the level at which it merges with a
        # higher peak. Grey reconstruction by dilation of (dist - h) under dist gives that level.
        from skimage.morphology import reconstruction

        seed = np.maximum(dist - prominence_px, 0)
        recon = reconstruction(seed, dist, method="dilation")
        peaks &= (dist - recon) >= prominence_px - 1e-3
    markers, _ = ndi.label(peaks, structure=_EIGHT)
    out: np.ndarray = markers.astype(np.int32)
    return out


def segment_nuclei(
    rgb: np.ndarray, mpp: float, p: NucleusParams, min_area_um2: float, inverse: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32, stain OD (H, W, 3) float32) of one uint8 RGB tile at ``mpp`` µm/px."""
    od = optical_density(rgb)
    od_sum = od[..., 0] + od[..., 1] + od[..., 2]
    stains = (od.reshape(-1, 3) @ inverse).reshape(od.shape)
    hema = stains[..., 0]
    px_area = mpp * mpp
    min_px = min_area_um2 / px_area
    max_px = p.max_area_um2 / px_area

    work = hema
    bg_px = round(p.background_radius_um / mpp)
    if bg_px >= 1:
        pad = bg_px + 1
        padded = cv2.copyMakeBorder(hema, pad, pad, pad, pad, cv2.BORDER_REFLECT)
        background = cv2.morphologyEx(padded, cv2.MORPH_OPEN, _disk(bg_px))[pad:-pad, pad:-pad]
        if p.max_background > 0:
            background = np.minimum(background, np.float32(p.max_background))
        work = hema - np.maximum(background, 0)
    sigma = p.smooth_sigma_um / mpp
    if sigma >= 0.3:
        work = cv2.GaussianBlur(work, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT)

    threshold = p.threshold
    if p.otsu_max > threshold:
        # Otsu over tissue pixels only (white glass would drag it down), bounded by the card.
        tissue = od_sum > p.tissue_od
        if int(tissue.sum()) > 256:
            threshold = min(max(_otsu(work[tissue]), threshold), p.otsu_max)
    mask = work > threshold
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), stains

    mask = fill_small_holes(mask, max_px)
    mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, _disk(1)).astype(bool)
    comps, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return np.zeros(mask.shape, dtype=np.int32), stains
    areas = np.bincount(comps.ravel(), minlength=n + 1)
    keep = areas >= min_px
    keep[0] = False
    mask = keep[comps]
    if not mask.any():
        return np.zeros(mask.shape, dtype=np.int32), stains

    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    dist_sigma = p.distance_smooth_um / mpp
    if dist_sigma >= 0.3:
        dist = cv2.GaussianBlur(dist, (0, 0), sigmaX=dist_sigma, sigmaY=dist_sigma)
    dist[~mask] = 0
    markers = _markers(dist, mask, p.min_separation_um / mpp, p.peak_prominence_um / mpp)
    labels = watershed(-dist, markers, mask=mask, connectivity=2).astype(np.int32)

    # Pieces of the mask that received no marker keep a label of their own.
    orphan = mask & (labels == 0)
    if orphan.any():
        extra, _ = ndi.label(orphan, structure=_EIGHT)
        labels[orphan] = extra[orphan] + labels.max()

    n_labels = int(labels.max())
    areas = np.bincount(labels.ravel(), minlength=n_labels + 1)
    keep = (areas >= min_px) & (areas <= max_px)
    keep[0] = False
    new_ids = np.zeros(n_labels + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    out: np.ndarray = new_ids[labels]
    return out, stains


def measure(labels: np.ndarray, stains: np.ndarray) -> dict[int, dict[str, float]]:
    """Per-label haematoxylin mean/max and eosin mean OD (finite floats)."""
    n = int(labels.max())
    if n == 0:
        return {}
    flat = labels.ravel()
    counts = np.bincount(flat, minlength=n + 1).astype(np.float64)
    counts[counts == 0] = 1.0
    hema = np.ascontiguousarray(stains[..., 0]).ravel().astype(np.float64)
    eosin = np.ascontiguousarray(stains[..., 1]).ravel().astype(np.float64)
    h_mean = np.bincount(flat, weights=hema, minlength=n + 1) / counts
    e_mean = np.bincount(flat, weights=eosin, minlength=n + 1) / counts
    h_max = np.asarray(ndi.maximum(stains[..., 0], labels=labels, index=np.arange(1, n + 1)), dtype=np.float64)
    h_mean = np.nan_to_num(h_mean)
    e_mean = np.nan_to_num(e_mean)
    h_max = np.nan_to_num(h_max)
    return {
        i: {H_MEAN: float(h_mean[i]), H_MAX: float(h_max[i - 1]), E_MEAN: float(e_mean[i])} for i in range(1, n + 1)
    }


@register_family("builtin-nuclei")
class NucleusDetector(ModelFamily):
    """Nuclei by haematoxylin threshold and distance-transform watershed; thread-safe, no state."""

    thread_safe = True

    def __init__(self, card: ModelCard, device: str = "cpu") -> None:
        super().__init__(card, device)
        if card.mpp <= 0:
            raise ModelCardError(f"nuclei card '{card.name}' needs a positive mpp, got {card.mpp}")
        self.params = NucleusParams.from_card(card.params)
        self._inverse = deconvolution_matrix(self.params.hematoxylin, self.params.eosin)
        self._inverse.setflags(write=False)

    def segment(self, tile: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(labels, stain OD) of one tile at ``card.mpp``."""
        rgb = check_rgb_tile(tile)
        return segment_nuclei(rgb, self.card.mpp, self.params, self.card.min_area_um2, self._inverse)

    def predict(self, tiles: Sequence[np.ndarray]) -> list[TileResult]:
        """Tiles are segmented on all cores (OpenCV, scipy and numpy release the GIL)."""
        rgbs = [check_rgb_tile(tile, i) for i, tile in enumerate(tiles)]  # all checked before any work
        if len(rgbs) <= 1:
            return [self._one(rgb) for rgb in rgbs]
        from qpbridge.pools import postprocess_pool

        return list(postprocess_pool().map(self._one, rgbs))

    def _one(self, rgb: np.ndarray) -> TileResult:
        labels, stains = segment_nuclei(rgb, self.card.mpp, self.params, self.card.min_area_um2, self._inverse)
        return InstanceResult(labels=labels, measurements=measure(labels, stains))
