"""Reading plain images (PNG, JPEG, TIFF) with their pixel size when the file records one."""

from __future__ import annotations

import contextlib
import struct
from pathlib import Path

import numpy as np

from qpbridge.errors import ImageReadError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


def _tiff_mpp(path: Path) -> float | None:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        desc = page.description or ""
        # Aperio-style description: "... |MPP = 0.2520|..."
        for part in desc.split("|"):
            key, _, value = part.partition("=")
            if key.strip().upper() == "MPP":
                with contextlib.suppress(ValueError):
                    return float(value)
        tags = page.tags
        if "XResolution" not in tags or "ResolutionUnit" not in tags:
            return None
        num, den = tags["XResolution"].value
        unit = int(tags["ResolutionUnit"].value)
        if not num or not den:
            return None
        per_unit = num / den
        um = {2: 25400.0, 3: 10000.0}.get(unit)  # inch, centimetre; 1 = no unit
        if um is None or per_unit <= 1:
            return None
        return um / per_unit


def _png_mpp(path: Path) -> float | None:
    """From the pHYs chunk (pixels per metre), when present."""
    data = path.read_bytes()
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"pHYs" and length == 9:
            ppm_x, _, unit = struct.unpack(">IIB", data[pos + 8:pos + 17])
            return 1e6 / ppm_x if unit == 1 and ppm_x > 0 else None
        if kind in (b"IDAT", b"IEND"):
            return None
        pos += 12 + length
    return None


def read_image(path: Path) -> tuple[np.ndarray, float | None]:
    """(RGB uint8 array, µm/px or None)."""
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ImageReadError(f"{path}: unsupported image type '{suffix}'; use PNG, JPEG or TIFF")
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    mpp: float | None = None
    if suffix in (".tif", ".tiff"):
        import tifffile

        try:
            arr = tifffile.imread(path, key=0)
            mpp = _tiff_mpp(path)
        except (tifffile.TiffFileError, ValueError, OSError) as exc:
            raise ImageReadError(f"{path}: cannot read TIFF: {exc}") from None
    else:
        import cv2

        raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if raw is None:
            raise ImageReadError(f"{path}: cannot decode image")
        if raw.ndim == 2:
            arr = cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
        elif raw.shape[2] == 4:
            arr = cv2.cvtColor(raw, cv2.COLOR_BGRA2RGB)
        else:
            arr = cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
        if suffix == ".png":
            mpp = _png_mpp(path)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ImageReadError(f"{path}: expected an RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ImageReadError(f"{path}: expected 8-bit RGB, got {arr.dtype}")
    return np.ascontiguousarray(arr[:, :, :3]), mpp


class ArrayImage:
    """An in-memory full-resolution RGB image with the same ``read`` as a slide (white outside)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]

    def read(self, x0: float, y0: float, x1: float, y1: float, out_w: int, out_h: int) -> np.ndarray:
        import math

        import cv2

        out = np.full((out_h, out_w, 3), 255, np.uint8)
        sx, sy = (x1 - x0) / out_w, (y1 - y0) / out_h
        cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        cx1, cy1 = min(self.width, math.ceil(x1)), min(self.height, math.ceil(y1))
        if cx1 <= cx0 or cy1 <= cy0:
            return out
        crop = self.rgb[cy0:cy1, cx0:cx1]
        rw, rh = max(1, round((cx1 - cx0) / sx)), max(1, round((cy1 - cy0) / sy))
        if (rw, rh) != (crop.shape[1], crop.shape[0]):
            crop = cv2.resize(np.ascontiguousarray(crop), (rw, rh),
                              interpolation=cv2.INTER_AREA if sx > 1 else cv2.INTER_LINEAR)
        u0, v0 = round((cx0 - x0) / sx), round((cy0 - y0) / sy)
        w, h = min(rw, out_w - u0), min(rh, out_h - v0)
        if w > 0 and h > 0:
            out[v0:v0 + h, u0:u0 + w] = crop[:h, :w]
        return out
