"""Optical density and colour deconvolution helpers shared by the built-in families.

Optical density (OD) of an 8-bit channel value ``I`` is ``-log10((I + 1) / 256)``: 0 for white
(255), about 2.4 for black (0). Colour deconvolution follows Ruifrok & Johnston (2001): each stain
is a unit vector of OD per RGB channel; the rows of a 3x3 matrix ``M`` are the stain vectors (the
third is the normalised cross product of the first two when not given), so per-pixel OD row vectors
satisfy ``od = c @ M`` and the stain amounts are ``c = od @ inv(M)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from qpbridge.errors import ModelCardError, TileError

# Optical density of every 8-bit value, so conversion is a table look-up rather than a log per pixel.
OD_LUT: np.ndarray = (-np.log10((np.arange(256, dtype=np.float64) + 1.0) / 256.0)).astype(np.float32)
OD_LUT.setflags(write=False)

# Ruifrok & Johnston's H&E vectors (as QuPath's "H&E default"), used when a card gives none.
DEFAULT_HEMATOXYLIN: tuple[float, float, float] = (0.650, 0.704, 0.286)
DEFAULT_EOSIN: tuple[float, float, float] = (0.072, 0.990, 0.105)


def check_rgb_tile(tile: Any, index: int | None = None) -> np.ndarray:
    """The tile as a (H, W, 3) uint8 array, or TileError saying what is wrong with it."""
    where = "tile" if index is None else f"tile {index}"
    if not isinstance(tile, np.ndarray):
        raise TileError(f"{where} must be a numpy array, got {type(tile).__name__}")
    if tile.dtype != np.uint8:
        raise TileError(f"{where} must be uint8 RGB, got dtype {tile.dtype}")
    if tile.ndim != 3 or tile.shape[2] != 3:
        raise TileError(f"{where} must have shape (H, W, 3), got {tuple(tile.shape)}")
    if tile.shape[0] < 1 or tile.shape[1] < 1:
        raise TileError(f"{where} is empty: shape {tuple(tile.shape)}")
    return tile


def optical_density(rgb: np.ndarray) -> np.ndarray:
    """Per-channel OD (float32, same shape) of a uint8 image."""
    if rgb.dtype != np.uint8:
        raise TileError(f"optical density needs uint8 input, got dtype {rgb.dtype}")
    out: np.ndarray = OD_LUT[rgb]
    return out


def _unit(vec: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(vec, dtype=np.float64).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ModelCardError(f"stain vector '{name}' must be 3 finite numbers, got {list(np.ravel(vec))}")
    if np.any(arr < 0):
        raise ModelCardError(f"stain vector '{name}' must not have negative OD components, got {arr.tolist()}")
    norm = float(np.linalg.norm(arr))
    if norm <= 1e-12:
        raise ModelCardError(f"stain vector '{name}' has zero length")
    unit: np.ndarray = arr / norm
    return unit


def stain_matrix(
    stain1: Sequence[float] | np.ndarray,
    stain2: Sequence[float] | np.ndarray,
    stain3: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """The 3x3 stain matrix (rows = unit stain OD vectors); the third defaults to ``stain1 x stain2``."""
    v1 = _unit(stain1, "stain 1")
    v2 = _unit(stain2, "stain 2")
    if stain3 is None:
        v3 = np.cross(v1, v2)
        norm = float(np.linalg.norm(v3))
        if norm <= 1e-6:
            raise ModelCardError("stain vectors 1 and 2 are parallel; they cannot be separated")
        v3 = v3 / norm
    else:
        v3 = np.asarray(stain3, dtype=np.float64).reshape(-1)
        if v3.shape != (3,) or float(np.linalg.norm(v3)) <= 1e-12:
            raise ModelCardError("stain vector 3 must be 3 numbers, not all zero")
        v3 = v3 / np.linalg.norm(v3)
    mat = np.stack([v1, v2, v3])
    if abs(float(np.linalg.det(mat))) < 1e-6:
        raise ModelCardError("stain vectors are linearly dependent; the stain matrix cannot be inverted")
    return mat


def deconvolution_matrix(
    stain1: Sequence[float] | np.ndarray,
    stain2: Sequence[float] | np.ndarray,
    stain3: Sequence[float] | np.ndarray | None = None,
) -> np.ndarray:
    """``inv(stain_matrix(...))`` as float32: multiply OD row vectors by it to get stain amounts."""
    inv: np.ndarray = np.linalg.inv(stain_matrix(stain1, stain2, stain3)).astype(np.float32)
    return inv


def deconvolve(rgb: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """Stain amounts (H, W, 3) float32 of a uint8 RGB image, given ``deconvolution_matrix(...)``."""
    od = optical_density(rgb)
    h, w = od.shape[:2]
    out: np.ndarray = (od.reshape(-1, 3) @ inverse).reshape(h, w, 3)
    return out


def mean_optical_density(rgb: np.ndarray) -> np.ndarray:
    """Mean OD over R, G, B (float32, (H, W)) of a uint8 RGB image."""
    if rgb.dtype != np.uint8:
        raise TileError(f"optical density needs uint8 input, got dtype {rgb.dtype}")
    # Channel by channel: elementwise adds are much faster than a reduction over a length-3 axis.
    out: np.ndarray = OD_LUT[rgb[..., 0]] + OD_LUT[rgb[..., 1]]
    out += OD_LUT[rgb[..., 2]]
    out *= np.float32(1.0 / 3.0)
    return out


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] (float32) of a uint8 RGB image: ``(max - min) / max``, 0 where black."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx = np.maximum(np.maximum(r, g), b)
    mn = np.minimum(np.minimum(r, g), b)
    out: np.ndarray = (mx - mn).astype(np.float32)  # uint8 difference cannot wrap: mx >= mn
    out /= np.maximum(mx, 1).astype(np.float32)
    return out
