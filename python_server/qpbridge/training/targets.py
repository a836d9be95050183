"""HoVer-Net's training targets from an instance label image, vectorised over all nuclei at once."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def hv_maps(labels: np.ndarray) -> np.ndarray:
    """(2, H, W) float32: horizontal and vertical distance of each nucleus pixel to its nucleus' centre of
    mass, scaled per nucleus and per side to [-1, 0] and [0, 1] as HoVer-Net's targets; 0 on background."""
    h, w = labels.shape
    out = np.zeros((2, h, w), dtype=np.float32)
    n = int(labels.max())
    if n == 0:
        return out
    flat = labels.ravel()
    fg = flat > 0
    ys, xs = np.divmod(np.flatnonzero(fg), w)
    lab = flat[fg]
    counts = np.maximum(np.bincount(lab, minlength=n + 1), 1)
    for axis, coord in ((0, xs), (1, ys)):
        c = coord.astype(np.float64)
        centre = np.bincount(lab, weights=c, minlength=n + 1) / counts
        d = c - centre[lab]
        idx = np.arange(1, n + 1)
        lo = np.asarray(ndi.minimum(d, labels=lab, index=idx))
        hi = np.asarray(ndi.maximum(d, labels=lab, index=idx))
        lo = np.concatenate([[0.0], np.nan_to_num(lo)])
        hi = np.concatenate([[0.0], np.nan_to_num(hi)])
        neg = np.where(lo[lab] < 0, d / np.where(lo[lab] < 0, -lo[lab], 1.0), 0.0)
        pos = np.where(hi[lab] > 0, d / np.where(hi[lab] > 0, hi[lab], 1.0), 0.0)
        out[axis].ravel()[fg] = np.where(d < 0, neg, pos).astype(np.float32)
    return out
