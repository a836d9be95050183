"""HoVer-Net's post-processing of one tile's NP/HV (and TP) maps into labelled nuclei.

The same steps as HoVer-Net's ``__proc_np_hv`` (vandeboschlab/hover_net, ``models/hovernet/post_proc.py``),
written anew with OpenCV/scipy/skimage and every size in µm so one card works at any pixel size:

1. Foreground: nucleus probability >= ``np_threshold``, connected pieces under ``min_area_um2`` removed.
2. The H and V maps are min-max normalised to [0, 1] over the tile; their Sobel derivatives along their own
   axis (kernel ``sobel_um``, HoVer-Net's 21 px at 0.25 µm/px), normalised likewise and inverted, give an
   edge energy per axis that is high where a distance map jumps: between touching nuclei. The energy is the
   larger of the two, zero outside the foreground.
3. Markers: foreground minus pixels with energy >= ``edge_threshold``, holes filled, opened with a disc of
   ``marker_open_um`` (HoVer-Net's 5x5 ellipse), labelled, markers under ``min_marker_um2`` removed.
4. Marker-controlled watershed on ``-(1 - energy) * foreground`` (smoothed 3x3), inside the foreground;
   labels under ``min_area_um2`` are dropped and the rest renumbered 1..n.
5. Types (TP branch): each nucleus takes the type most of its pixels have among the non-background types
   (HoVer-Net's majority vote), counted with one ``np.bincount`` over (label, type) pairs.

Pure numpy/OpenCV/scipy on one tile; thread-safe. The family runs tiles on the shared post-processing pool
(OpenCV and scipy release the GIL for most of this).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from qpbridge.errors import ModelCardError
from qpbridge.families.params import object_param


@dataclass(frozen=True)
class HoverPostParams:
    """Post-processing settings of a hovernet card (``params.post``), in µm and probabilities."""

    np_threshold: float = 0.5
    edge_threshold: float = 0.4
    sobel_um: float = 5.25      # HoVer-Net: 21 px at 0.25 µm/px
    marker_open_um: float = 1.25  # HoVer-Net: 5 px ellipse at 0.25 µm/px
    min_area_um2: float = 0.625   # HoVer-Net: 10 px at 0.25 µm/px
    min_marker_um2: float = 0.625

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> HoverPostParams:
        post = object_param(params, "post", cls.__dataclass_fields__, "hovernet")
        values: dict[str, float] = {}
        for key, value in post.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
                raise ModelCardError(f"hovernet 'post.{key}' must be a number >= 0, got {value!r}")
            values[key] = float(value)
        return cls(**values)


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi - lo < 1e-12:
        return np.zeros_like(a, dtype=np.float32)
    out: np.ndarray = ((a - lo) / (hi - lo)).astype(np.float32)
    return out


def _odd(px: float, low: int = 3, high: int = 31) -> int:
    """An odd kernel size near ``px`` (OpenCV's Sobel takes at most 31)."""
    k = round(px) | 1
    return max(low, min(high, k))


def _remove_small(labels: np.ndarray, min_px: float) -> np.ndarray:
    if min_px <= 1 or labels.max() == 0:
        return labels
    areas = np.bincount(labels.ravel())
    small = areas < min_px
    small[0] = False
    if small.any():
        labels = labels.copy()
        labels[small[labels]] = 0
    return labels


def edge_energy(hv: np.ndarray, fg: np.ndarray, sobel_px: int) -> np.ndarray:
    """HoVer-Net's gradient energy of normalised H and V maps, (H, W) float32 in [0, 1], zero off ``fg``."""
    h = _minmax(hv[0])
    v = _minmax(hv[1])
    sh = cv2.Sobel(h, cv2.CV_32F, 1, 0, ksize=sobel_px)
    sv = cv2.Sobel(v, cv2.CV_32F, 0, 1, ksize=sobel_px)
    energy = np.maximum(1.0 - _minmax(sh), 1.0 - _minmax(sv))
    energy[~fg] = 0.0
    out: np.ndarray = energy
    return out


def hover_instances(np_prob: np.ndarray, hv: np.ndarray, mpp: float, p: HoverPostParams) -> np.ndarray:
    """Nucleus labels (H, W) int32, 1..n, from the nucleus probability (H, W) and HV maps (2, H, W)."""
    px_area = mpp * mpp
    fg = np_prob >= p.np_threshold
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)
    comps, _ = ndi.label(fg)
    fg = _remove_small(comps, p.min_area_um2 / px_area) > 0
    if not fg.any():
        return np.zeros(fg.shape, dtype=np.int32)
    energy = edge_energy(hv.astype(np.float32, copy=False), fg, _odd(p.sobel_um / mpp))
    dist = -cv2.GaussianBlur(((1.0 - energy) * fg).astype(np.float32), (3, 3), 0)
    marker = fg & (energy < p.edge_threshold)
    marker = fill_holes(marker)
    r = max(1, round(p.marker_open_um / mpp / 2))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    marker = cv2.morphologyEx(marker.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
    markers, _ = ndi.label(marker)
    markers = _remove_small(markers, p.min_marker_um2 / px_area)
    labels = watershed(dist, markers=markers, mask=fg).astype(np.int32)
    labels = _remove_small(labels, p.min_area_um2 / px_area)
    return relabel(labels)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background piece that does not reach the border filled (as scipy's
    ``binary_fill_holes``, by one OpenCV flood fill of the background from outside: a third of the time)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.uint8)
    padded[1:-1, 1:-1] = mask
    flood = np.zeros((h + 4, w + 4), dtype=np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 1, flags=4 | (2 << 8) | cv2.FLOODFILL_MASK_ONLY)
    outside = flood[2:-2, 2:-2].astype(bool)  # background reached from the border (4-connected)
    out: np.ndarray = ~outside
    return out


def relabel(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in the order of their values (0 stays 0)."""
    present = np.bincount(labels.ravel()) > 0
    present[0] = False
    lut = np.zeros(len(present), dtype=np.int32)
    lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
    out: np.ndarray = lut[labels]
    return out


def instance_types(labels: np.ndarray, types: np.ndarray, n_types: int) -> dict[int, int]:
    """Majority non-background type (1..n_types) of each label; labels with none get type 1."""
    n = int(labels.max())
    if n == 0:
        return {}
    pairs = labels.astype(np.int64).ravel() * (n_types + 1) + types.astype(np.int64).ravel()
    counts = np.bincount(pairs, minlength=(n + 1) * (n_types + 1)).reshape(n + 1, n_types + 1)
    best = np.argmax(counts[:, 1:], axis=1) + 1
    return {i: int(best[i]) for i in range(1, n + 1)}
