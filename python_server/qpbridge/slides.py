"""Whole-slide images through tiffslide: pixel size, pyramid level choice, region reads.

Region reads of tiled pyramid levels (SVS, pyramidal and OME-TIFF: whatever tifffile can decode) bypass
tiffslide's zarr store: the tiles a region needs are read with ``os.pread`` on one descriptor shared by all
reading threads (no seek, no lock) and decoded with tifffile's own decoder for the page (imagecodecs,
which releases the GIL). The zarr path runs an asyncio round trip per tile in Python, which, with several
reading threads, kept the interpreter lock busy enough to slow every other stage of a run. Levels that do
not fit (untiled, planar, z-stacks, other than 8 bits) are read through tiffslide as before.

A run reads a slide in blocks whose boxes overlap by the plan's overlap (``Slide.read_overlap``), so a stored
tile within that overlap of a box's bottom or right edge is needed again by the next band below or the next
block to the right. Such tiles are kept decoded, least recently used first out, up to two rows of the level's
stored tiles and 64 more (at most ``TILE_CACHE_BYTES``): each stored tile of a slide read in blocks is then
decoded about once, not about 1.5 times. Memory: for a 150,000 px wide slide read at its full resolution in 256 px
RGB tiles, (2 x 586 + 64) tiles of 192 kB = 243 MB; from its 4x downsampled level, 70 MB.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from qpbridge.errors import ImageReadError, MissingPixelSizeError
from qpbridge.images import paste_scaled

LEVEL_TOLERANCE = 0.01  # relative: a pyramid level this much coarser than asked for is still used (QuPath's rule)
TILE_CACHE_BYTES = 256 << 20  # decoded stored tiles kept for reads that need them again (see above)

SLIDE_SUFFIXES = {".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".svslide", ".qptiff"}


class Slide:
    """A slide opened once per reading thread (tiffslide handles are not shared between threads)."""

    def __init__(self, path: Path, mpp: float | None = None, *, name: str | None = None,
                 by_handle: bool = False) -> None:
        self.path = Path(path)
        self.name = name or self.path.name  # for messages: a jailed slide is read through /proc/self/fd/N
        # by_handle: give the reader open file objects, never the name (which it would resolve and reopen)
        self.by_handle = by_handle
        self._files: list[Any] = []
        if not self.path.is_file():
            raise ImageReadError(f"{self.name}: no such slide file")
        self._local = threading.local()
        ts = self._handle()
        self.width, self.height = (int(v) for v in ts.dimensions)
        self.level_dimensions = [tuple(int(v) for v in d) for d in ts.level_dimensions]
        self.level_downsamples = [float(d) for d in ts.level_downsamples]
        self.properties: dict[str, Any] = dict(ts.properties)
        file_mpp = self.properties.get("tiffslide.mpp-x")
        self.file_mpp = float(file_mpp) if file_mpp else None
        if mpp is not None and (not math.isfinite(mpp) or mpp <= 0):
            raise ImageReadError(f"pixel size override must be a positive number of µm/px, got {mpp}")
        self.mpp = mpp if mpp is not None else self.file_mpp
        self._direct = _TiledLevels.open(ts, self.path, self.level_dimensions)
        # full-resolution pixels by which consecutive reads overlap (a run's blocks): the stored tiles there are
        # kept decoded for the next read (see the module docstring)
        self.read_overlap = 0.0

    def close(self) -> None:
        """Release the file descriptor of direct reads (tiffslide handles close with their threads) and the
        files opened for ``by_handle`` reading."""
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        for f in self._files:
            f.close()
        self._files = []

    def _handle(self) -> Any:
        ts = getattr(self._local, "ts", None)
        if ts is None:
            import tiffslide

            try:
                if self.by_handle:
                    f = open(self.path, "rb")  # noqa: SIM115 - kept open for the reader, closed by close()
                    self._files.append(f)
                    ts = tiffslide.TiffSlide(f)
                else:
                    ts = tiffslide.TiffSlide(self.path)
            except Exception as exc:  # tiffslide raises several types for unreadable files
                raise ImageReadError(f"{self.name}: cannot open as a slide: {exc}") from None
            self._local.ts = ts
        return ts


    def require_mpp(self) -> float:
        if self.mpp is None:
            raise MissingPixelSizeError(
                f"{self.name} records no pixel size (µm/px); pass --mpp (the full-resolution pixel size) "
                "if you know it")
        return self.mpp

    def level_for(self, downsample: float) -> int:
        """The coarsest level that is at least as fine as ``downsample``, or coarser by at most
        ``LEVEL_TOLERANCE`` (as QuPath picks levels): a 40x scan at 0.252 µm/px read at 1 µm/px (3.97x) then
        comes from the 4x level, scaled up by 0.8%, instead of decoding 16 times the pixels of level 0 and
        averaging them down."""
        best = 0
        for i, d in enumerate(self.level_downsamples):
            if d <= downsample * (1 + 1e-6) or abs(d - downsample) <= LEVEL_TOLERANCE * max(d, downsample):
                best = i
        return best

    def read(self, x0: float, y0: float, x1: float, y1: float, out_w: int, out_h: int) -> np.ndarray:
        """Full-resolution box [x0, x1) x [y0, y1) as an out_h x out_w RGB array; outside the slide is white."""

        ds = (x1 - x0) / out_w
        level = self.level_for(ds)
        lds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # The box in level pixels, clipped to the level; the clipped-off part is filled with white.
        lx0, ly0 = x0 / lds, y0 / lds
        lx1, ly1 = x1 / lds, y1 / lds
        cx0, cy0 = max(0, math.floor(lx0)), max(0, math.floor(ly0))
        cx1, cy1 = min(lw, math.ceil(lx1)), min(lh, math.ceil(ly1))
        if cx1 <= cx0 or cy1 <= cy0:
            return np.full((out_h, out_w, 3), 255, np.uint8)
        direct = self._direct
        if direct is not None and direct.can_read(level):
            arr = direct.read(level, cx0, cy0, cx1, cy1, self.read_overlap / lds)
            if arr.shape == (out_h, out_w, 3) and ds == lds and (cx0, cy0) == (lx0, ly0):
                return arr  # whole level pixels inside the level (a run's blocks): no white, no resampling
        else:
            arr = np.asarray(self._handle().read_region((round(cx0 * lds), round(cy0 * lds)), level,
                                                        (cx1 - cx0, cy1 - cy0), as_array=True))
        if arr.ndim == 2:
            arr = np.repeat(arr[:, :, None], 3, axis=2)
        if arr.shape[2] == 4:  # RGBA: transparent means no tissue scanned there
            alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
            arr = (arr[:, :, :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
        arr = np.ascontiguousarray(arr[:, :, :3])
        out = np.full((out_h, out_w, 3), 255, np.uint8)
        # The read may start a fraction of a level pixel before the box and run past it.
        paste_scaled(out, arr, cx0, cy0, lx0, ly0, ds / lds)
        return out

    def thumbnail(self, max_size: int = 1024) -> tuple[np.ndarray, float]:
        """An RGB thumbnail and its downsample from full resolution."""
        ds = max(self.width, self.height) / max_size
        ds = max(ds, 1.0)
        w, h = max(1, round(self.width / ds)), max(1, round(self.height / ds))
        return self.read(0, 0, self.width, self.height, w, h), self.width / w


class _TiledLevels:
    """Direct tile reads of the tiled levels of a slide's TIFF pyramid (see the module docstring)."""

    def __init__(self, fd: int, pages: dict[int, Any]) -> None:
        self.fd = fd
        self.pages = pages
        # decoded stored tiles that a read used in part, by (level, index), least recently used first
        self._kept: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def open(cls, ts: Any, path: Path, level_dimensions: list[tuple[int, ...]]) -> _TiledLevels | None:
        try:
            tf = ts.ts_tifffile
            levels = tf.series[0].levels
        except Exception:  # not a TIFF-backed slide, or a layout tiffslide maps differently
            return None
        pages: dict[int, Any] = {}
        for i, dims in enumerate(level_dimensions):
            if i >= len(levels):
                break
            level = levels[i]
            page = level.keyframe
            ok = (len(level.pages) == 1 and page.is_tiled and page.imagedepth == 1 and page.tiledepth == 1
                  and np.dtype(page.dtype) == np.uint8 and page.samplesperpixel in (1, 3, 4)
                  and (page.samplesperpixel == 1 or int(page.planarconfig) == 1)
                  and (int(page.imagewidth), int(page.imagelength)) == (int(dims[0]), int(dims[1])))
            if ok:
                pages[i] = page
        if not pages:
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        return cls(fd, pages)

    def can_read(self, level: int) -> bool:
        return self.fd >= 0 and level in self.pages

    def read(self, level: int, x0: int, y0: int, x1: int, y1: int, overlap: float = 0.0) -> np.ndarray:
        """Level pixels [x0, x1) x [y0, y1) (inside the level) as (h, w) or (h, w, samples) uint8; the stored
        tiles within ``overlap`` level pixels of the bottom or right edge (or past it) are kept decoded."""
        page = self.pages[level]
        tw, th = int(page.tilewidth), int(page.tilelength)
        across = -(-int(page.imagewidth) // tw)
        spp = int(page.samplesperpixel)
        out = np.empty((y1 - y0, x1 - x0, spp), np.uint8)
        offsets, counts = page.dataoffsets, page.databytecounts
        # Two rows of stored tiles: a band of blocks leaves one row for the next band, plus block-edge columns.
        keep_at_most = min(2 * across + 64, TILE_CACHE_BYTES // (th * tw * spp))
        keep_y, keep_x = y1 - max(0.0, overlap), x1 - max(0.0, overlap)  # tiles reaching past these are kept
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                index = ty * across + tx
                # the part of this tile inside the box, in box and in tile coordinates
                bx0, by0 = max(x0, tx * tw), max(y0, ty * th)
                bx1, by1 = min(x1, (tx + 1) * tw), min(y1, (ty + 1) * th)
                dst = out[by0 - y0:by1 - y0, bx0 - x0:bx1 - x0]
                count = int(counts[index]) if index < len(counts) else 0
                if count == 0:  # a sparse tile: nothing was scanned there
                    dst[:] = 255
                    continue
                with self._lock:
                    seg = self._kept.get((level, index))
                    if seg is not None:
                        self._kept.move_to_end((level, index))
                if seg is None:
                    seg = self._decode(page, level, index, count, int(offsets[index]), (th, tw, spp))
                    if ((ty + 1) * th > keep_y or (tx + 1) * tw > keep_x) and keep_at_most > 0:
                        with self._lock:
                            self._kept[(level, index)] = seg
                            while len(self._kept) > keep_at_most:
                                self._kept.popitem(last=False)
                dst[:] = seg[by0 - ty * th:by1 - ty * th, bx0 - tx * tw:bx1 - tx * tw]
        return out[:, :, 0] if spp == 1 else out

    def _decode(self, page: Any, level: int, index: int, count: int, offset: int,
                shape: tuple[int, int, int]) -> np.ndarray:
        data = os.pread(self.fd, count, offset)
        try:
            seg = page.decode(data, index, jpegtables=page.jpegtables)[0]
        except Exception as exc:
            raise ImageReadError(f"tile {index} of level {level} cannot be decoded: {exc}") from None
        return np.asarray(seg).reshape(shape)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with self._lock:
            self._kept.clear()

    def __del__(self) -> None:
        self.close()


def resolve_slide_path(path: str | Path, roots: list[Path]) -> Path:
    """``path`` if it lies below one of ``roots`` after resolving links and '..'; else an error.

    Servers read only below roots their operator named, so a client cannot make them read (or learn
    about) any other file.
    """
    from qpbridge.errors import BadRequestError

    if not roots:
        raise BadRequestError("this server reads no slide files: start it with --slide-root DIR")
    p = Path(path)
    if not p.is_absolute():
        raise BadRequestError(f"slide path must be absolute, got {str(path)!r}")
    real = p.resolve()
    for root in roots:
        root_real = root.resolve()
        if real == root_real or root_real in real.parents:
            if not real.is_file():
                raise BadRequestError(f"no slide file at {path}")
            return real
    raise BadRequestError(f"{path} is outside the server's slide roots; only files below "
                          f"{', '.join(str(r) for r in roots)} can be read")


class OpenedSlide:
    """A slide file opened once below a slide root; read it only through ``handle_path``.

    ``handle_path`` (``/proc/self/fd/N``) reopens the very file that was checked, whatever happens to the
    path afterwards, so a link swapped in after the check is never followed.
    """

    def __init__(self, fd: int, real: Path, st: os.stat_result) -> None:
        self.fd = fd
        self.real = real
        self.stat = st
        self.handle_path = Path(f"/proc/self/fd/{fd}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def open_in_roots(path: str | Path, roots: list[Path]) -> OpenedSlide:
    """Open ``path`` read-only, then check that the opened file itself (its real path, device and inode)
    lies below one of ``roots``: links inside a root work, and no swap of a path component between the
    check and the reads can redirect them. Linux (``/proc/self/fd``) only."""
    import stat

    from qpbridge.errors import BadRequestError

    if not roots:
        raise BadRequestError("this server reads no slide files: start it with --slide-root DIR")
    p = Path(path)
    if not p.is_absolute():
        raise BadRequestError(f"slide path must be absolute, got {str(path)[:200]!r}")
    if not Path("/proc/self/fd").is_dir():
        raise BadRequestError("server-side slide reading needs Linux (/proc/self/fd)")
    try:
        # Non-blocking and no controlling terminal: a FIFO or a device named by a client must not hang us.
        fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:  # ENOENT, EACCES, ELOOP, ENAMETOOLONG; NUL bytes
        raise BadRequestError(f"cannot open slide {str(path)[:200]}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        st = os.fstat(fd)
        real = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if not stat.S_ISREG(st.st_mode):
            raise BadRequestError(f"no slide file at {str(path)[:200]}")
        for root in roots:
            try:
                root_real = root.resolve(strict=True)
            except (OSError, RuntimeError):
                continue
            if real == root_real or root_real not in real.parents:
                continue
            # The opened file must be the file now at that real path (same device and inode).
            try:
                now = os.stat(real, follow_symlinks=False)
            except OSError:
                continue
            if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
                return OpenedSlide(fd, real, st)
        raise BadRequestError(f"{str(path)[:200]} is outside the server's slide roots; only files below "
                              f"{', '.join(str(r) for r in roots)} can be read")
    except BaseException:
        os.close(fd)
        raise
