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


NEAR_INTEGER = 0.1  # relative: a downsample this close to a whole number k is done in two fast steps (below)


def paste_scaled(out: np.ndarray, src: np.ndarray, src_x: float, src_y: float, box_x: float, box_y: float,
                 step: float) -> None:
    """Resize ``src`` (source pixels from (src_x, src_y)) to ``out``'s grid, whose pixel (u, v) starts at
    source point (box_x + u * step, box_y + v * step), and paste it where it lands, clipped on every side.

    Downsampling averages areas. OpenCV's area averaging by a fractional factor takes up to ten times as long
    as by a whole one, longer than decoding the pixels. So by a factor within ``NEAR_INTEGER`` of a whole
    number k (a 0.2527 µm/px scan read at 0.5 µm/px: 1.979x) the fraction is scaled linearly at the source's
    resolution first, then k x k blocks are averaged: on CMU-1 at 1.005x to 2.2x that is 2 to 5 times faster,
    and within 2 grey levels of the exact area average at the 99th percentile (0.05 to 0.2 on average)."""
    import cv2

    h_out, w_out = out.shape[:2]
    rw, rh = max(1, round(src.shape[1] / step)), max(1, round(src.shape[0] / step))
    if (rw, rh) != (src.shape[1], src.shape[0]):
        src = np.ascontiguousarray(src)
        k = max(1, round(step))
        if step != k and abs(step - k) <= NEAR_INTEGER * step:
            # the fraction first, linearly at the source's resolution, then whole k x k blocks (OpenCV's fast path)
            src = cv2.resize(src, (k * rw, k * rh), interpolation=cv2.INTER_LINEAR)
            if k > 1:
                src = cv2.resize(src, (rw, rh), interpolation=cv2.INTER_AREA)
        else:
            src = cv2.resize(src, (rw, rh), interpolation=cv2.INTER_AREA if step > 1 else cv2.INTER_LINEAR)
    u0, v0 = round((src_x - box_x) / step), round((src_y - box_y) / step)
    su, sv = max(0, -u0), max(0, -v0)
    du, dv = max(0, u0), max(0, v0)
    w, h = min(rw - su, w_out - du), min(rh - sv, h_out - dv)
    if w > 0 and h > 0:
        out[dv:dv + h, du:du + w] = src[sv:sv + h, su:su + w]


class ArrayImage:
    """An in-memory full-resolution RGB image with the same ``read`` as a slide (white outside)."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self.height, self.width = rgb.shape[:2]

    def read(self, x0: float, y0: float, x1: float, y1: float, out_w: int, out_h: int) -> np.ndarray:
        import math

        out = np.full((out_h, out_w, 3), 255, np.uint8)
        cx0, cy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        cx1, cy1 = min(self.width, math.ceil(x1)), min(self.height, math.ceil(y1))
        if cx1 > cx0 and cy1 > cy0:
            paste_scaled(out, self.rgb[cy0:cy1, cx0:cx1], cx0, cy0, x0, y0, (x1 - x0) / out_w)
        return out
