"""Class rasters to region polygons, strip by strip, in time linear in the pixels.

A uint8 class raster (one class index per pixel, ``NO_CLASS`` where nothing was predicted) arrives as
horizontal strips, top to bottom, which are gathered into chunks of at least ``CHUNK_ROWS`` rows (or
``CHUNK_PIXELS`` pixels, on very wide rasters). For each emitted class and chunk:

1. The chunk's 8-connected components of that class are labelled once (OpenCV).
2. Components on the chunk's top row are linked to the regions still *open* from the chunk above (a
   region is open while it touches the lowest row seen so far) by 8-adjacency between the two rows; the
   links are resolved as a graph in one vectorised call, which also merges the bounding boxes and pixel
   counts.
3. A region that does not reach the chunk's bottom row is closed and traced exactly once, with
   ``cv2.findContours`` (``RETR_CCOMP``: outer boundary and holes; see ``geometry.trace_regions``). A
   region living in one chunk is traced from the chunk, together with every other such region of the
   chunk; a region spanning chunks is traced from the retained rows of the class raster inside its
   bounding box, flood-filled from a seed pixel (or, for many regions at once, labelled) so that only
   that region is traced.

Nothing is ever re-unioned: every pixel is labelled once per class, traced once, and copied once more
for each spanning region whose bounding box holds it. A region is traced only if it can reach
``min_area``: its pixels, plus the enclosed background inside its bounding box (where all its holes
lie), must reach it. Noisy maps, where most components are specks, stay cheap that way.

Early holes (``early_holes``): a region open over many chunks (a tissue class spanning the slide) would close
at the very end of a run with all its holes, tens of thousands of them, to trace and build at once. Instead
each chunk also traces the holes that lie wholly inside it of the regions staying open (those already open
over two chunks' rows), which are final, and emits them (:class:`EarlyHoles`); the region is traced at its
close with those holes filled in its mask and emitted as a :class:`HoledRegion`, to be put together with
them. The rings are those the region's own trace gives, but where a hole touched the region's outside at a
corner: there the outline, traced with the hole filled, no longer backs off the corner (PINCH), and the hole
still does. A tracer of one class fills the early holes in its retained rows as it finds them (they are final,
and no other class reads those rows); with several classes, a hole's pixels may belong to another class still
to be traced, so their contours are kept and filled in the region's mask at its close.

Memory: the table of open regions holds at most one entry per pixel of a row (bounded by the width).
Rows of the class raster are kept from the top of the highest open region down (and a chunk's strips
until the chunk is complete), one byte per pixel: a region that stays open over the whole slide (a
tissue-wide class) keeps at most the whole raster, so the bound is one byte per output pixel. For a
150,000 x 100,000 px slide scanned at 0.25 µm/px and a model at 1 µm/px with quarter-resolution outputs
(SegFormer), the output raster is 9,375 x 6,250 px: at most 59 MB; at 0.5 µm/px it is 18,750 x 12,500
px, 234 MB. Regions that close (the usual case) free their rows as soon as they are traced. Classes traced
in several processes (:mod:`qpbridge.engine.trace_process`): each keeps the rows its own classes' open regions
need, so at most one byte per output pixel per process. Labelling and tracing a chunk takes, for that
moment, its label images, masks and summed-area table, plus the contour points of the regions it closes and a
dozen arrays per step of them. Measured (numpy's and OpenCV's
arrays, ``bench/bench_stitch.py --tracer-memory``) on a chunk of 256 rows of the 9,375 px wide raster:
13 bytes per chunk pixel on a smooth map (31 MB), 62 on independent random classes, the worst case
(150 MB). A chunk of several strips holds fewer than 2 x ``CHUNK_PIXELS`` pixels; a single strip larger
than that is labelled as it is, as it would be without chunks. Tracing a region spanning chunks takes,
for the time of the trace, about 4 bytes per pixel of its bounding box (measured likewise: the crop,
masks and OpenCV's copy) plus its contour points: a region as large as the whole raster above takes
about 0.25 GB for that moment, then gives it back. Early holes keep their border pixels (8 bytes each, as
OpenCV's contours) until their region closes, far fewer than the retained pixels (measured: at most 5.2 MB
for the 26,700 holes, small ones included, of a SegFormer class map of 4,096² px).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpbridge import geometry

NO_CLASS = 255
CHUNK_ROWS = 256  # raster rows labelled at once (see ``RegionTracer.add_strip``)
CHUNK_PIXELS = 1 << 22  # or fewer rows of a wide raster (4.2 M pixels: 50 MB to trace on a smooth map)
TRACE_OVERHEAD_PX = 20_000
FLOOD_SEEDS = 8  # regions closing together up to which flood fills beat one labelling of their box


@dataclass(frozen=True)
class EarlyHoles:
    """Holes of regions still open that are final already (``RegionTracer(early_holes=True)``): each hole lies
    inside one chunk, enclosed by pixels of one region, so no later row can change it. ``holes`` are the hole
    rings (canvas pixels), each as a polygon of its own, exactly as the region's trace would give them;
    ``owners`` the key of the region each belongs to; ``row`` the first raster row of the chunk they lie in (a
    region's holes are put together in the order of their chunks, whatever order they were built in)."""

    holes: np.ndarray  # object array of Polygons
    owners: np.ndarray  # int64
    row: int = 0


@dataclass(frozen=True)
class HoledRegion:
    """A region that had :class:`EarlyHoles`: ``polygon`` is its outline with the holes traced at its close,
    and its whole geometry adds the early holes of every key in ``owners`` (regions that merged into it)."""

    polygon: BaseGeometry
    owners: tuple[int, ...]


# Called with (geometry in canvas pixels, or EarlyHoles or HoledRegion with early_holes, class index).
EmitRegion = Callable[[Any, int], None]


@dataclass
class _OpenRegions:
    """Regions of one class touching the last row seen: their id on that row, box and a seed pixel."""

    ids: np.ndarray  # (width,) int64: open region index of each pixel of the last row, -1 for none
    x0: np.ndarray
    y0: np.ndarray
    x1: np.ndarray
    y1: np.ndarray
    sx: np.ndarray
    sy: np.ndarray
    area: np.ndarray  # pixels so far
    key: np.ndarray  # a number for each region, kept while it stays open (the smallest one where regions merge)

    @classmethod
    def empty(cls, width: int) -> _OpenRegions:
        z = np.zeros(0, np.int64)
        return cls(np.full(width, -1, np.int64), z, z, z, z, z, z, z, z)

    def __len__(self) -> int:
        return len(self.x0)


class RegionTracer:
    """Turns class-raster strips into one polygon per 8-connected region per class.

    ``scale`` is the size of a raster pixel in canvas pixels (4 for quarter-resolution outputs): polygons
    are emitted in canvas pixels. ``max_hole`` (canvas pixels²) fills smaller holes, then ``min_area``
    (canvas pixels²) drops smaller regions (small holes filled), exactly, before any polygon is built.

    With ``early_holes``, the holes of a region that stays open are emitted as soon as they are final
    (:class:`EarlyHoles`), and the region at its close as a :class:`HoledRegion` traced with them filled: a
    region spanning a slide, traced at the end of a run, then brings only its outline and the holes it closed
    last, and its thousands of other holes are traced (and can be built into features) while the run goes on.
    """

    def __init__(self, width: int, classes: list[int], emit: EmitRegion, *, scale: float = 1.0,
                 min_area: float = 0.0, max_hole: float = 0.0, chunk_rows: int = CHUNK_ROWS,
                 early_holes: bool = False, key_start: int = 0, key_step: int = 1) -> None:
        self.width = width
        self.scale = float(scale)
        self.min_px = max(0.0, min_area) / (self.scale * self.scale)
        self.max_hole_px = max(0.0, max_hole) / (self.scale * self.scale)
        self.emit = emit
        self.chunk_rows = max(1, chunk_rows)
        self.open = {c: _OpenRegions.empty(width) for c in classes}
        self.rows: deque[tuple[int, np.ndarray]] = deque()
        self.pending: list[np.ndarray] = []  # strips not labelled yet
        self.pending_rows = 0
        self.y = 0  # the next raster row expected
        self.labelled = 0  # the first raster row not labelled yet
        self.closed = False
        self.peak_rows = 0  # most raster rows retained at once (for stats and tests)
        self.regions = 0
        self.many: dict[int, bool] = {}  # per class: the last chunk held many components
        self.early_holes = early_holes
        # region keys are key_start, key_start + key_step, ...: tracers of a raster's classes in several processes
        # take keys of their own (the keys of early holes and the regions they belong to never meet)
        self.next_key = key_start
        self.key_step = max(1, key_step)
        # per open region (by key): the keys its early holes were found under; per such key, the border pixels
        # of those holes (OpenCV contours) by the raster row of the chunk they were found in, to fill them in
        # the region's mask when it closes
        self.owned: dict[int, set[int]] = {}
        self.hole_contours: dict[int, list[tuple[int, list[np.ndarray]]]] = {}
        # Tracing one class, early holes are filled in the retained rows as they are found (no other class reads
        # those rows), so a region's close, traced from them, finds them filled: nothing to draw then, at the
        # end of a run. (With several classes, a hole's pixels may be another class's, still to be traced.)
        self.paint_holes = early_holes and len(classes) == 1

    @property
    def retained_bytes(self) -> int:
        return sum(r.nbytes for _, r in self.rows) + sum(r.nbytes for r in self.pending)

    def add_strip(self, strip: np.ndarray, last: bool = False) -> None:
        """The next rows of the raster; ``last`` closes every region.

        Strips are labelled and traced in chunks of at least ``chunk_rows`` rows, or ``CHUNK_PIXELS`` pixels
        (a strip of a very wide raster goes on alone, as large as it is): what a chunk costs beyond its
        pixels (linking its first row to the regions open above it, tracing the regions that close across
        its top) is paid once per chunk, not once per strip."""
        if self.closed:
            raise RuntimeError("the tracer is closed")
        strip = np.ascontiguousarray(strip, dtype=np.uint8)
        if strip.ndim != 2 or strip.shape[1] != self.width:
            raise ValueError(f"strips must be (h, {self.width}) uint8, got {strip.shape}")
        if strip.shape[0]:
            self.pending.append(strip)
            self.pending_rows += strip.shape[0]
            self.y += strip.shape[0]
            self.peak_rows = max(self.peak_rows, sum(r.shape[0] for _, r in self.rows) + self.pending_rows)
        if self.pending_rows >= self.chunk_rows or self.pending_rows * self.width >= CHUNK_PIXELS or last:
            self._label_pending(last)

    def flush(self) -> None:
        """Label and trace the strips waiting for a full chunk now, so that every region they close is emitted
        (a run that stops early keeps them)."""
        if self.pending and not self.closed:
            self._label_pending(False)

    def _label_pending(self, last: bool) -> None:
        chunk = (self.pending[0] if len(self.pending) == 1 else
                 np.concatenate(self.pending) if self.pending else np.zeros((0, self.width), np.uint8))
        if self.paint_holes and len(self.pending) == 1:
            chunk = chunk.copy()  # painted: the caller's strip stays as it was
        self.pending, self.pending_rows = [], 0
        y0 = self.labelled
        self.labelled += chunk.shape[0]
        if chunk.shape[0]:
            self.rows.append((y0, chunk))
        for cls in self.open:
            self.open[cls] = self._chunk_class(cls, self.open[cls], chunk, y0, last)
        self._trim()
        self.closed = last

    def finish(self) -> None:
        if not self.closed:
            self.add_strip(np.zeros((0, self.width), np.uint8), last=True)

    # ---- one class of one chunk -----------------------------------------------------------------------

    def _chunk_class(self, cls: int, prev: _OpenRegions, chunk: np.ndarray, y0: int, last: bool) -> _OpenRegions:
        h = chunk.shape[0]
        k = len(prev)
        if h:
            n, labels, st = _label(chunk, cls, many=self.many.get(cls, False))
            self.many[cls] = n - 1 > FEW_COMPONENTS  # the next chunk of a noisy map is likely noisy too
        else:
            n, labels, st = 1, np.zeros((0, self.width), np.int32), np.zeros((0, 5), np.int64)
        if n == 1 and k == 0:
            return prev if h == 0 else _OpenRegions.empty(self.width)
        m = n - 1
        lx0, ly0 = st[:, 0], st[:, 1] + y0
        lx1, ly1 = lx0 + st[:, 2], ly0 + st[:, 3]
        at_bottom = (st[:, 1] + st[:, 3] == h) if not last else np.zeros(m, bool)

        # Nodes 0..k-1 are the open regions from above, k..k+m-1 this chunk's components.
        group, g_count = self._link(prev, labels[0] if h else None, k, m)
        gx0 = np.full(g_count, np.iinfo(np.int64).max)
        gy0 = gx0.copy()
        gx1 = np.full(g_count, np.iinfo(np.int64).min)
        gy1 = gx1.copy()
        for arr, vals, op in ((gx0, (prev.x0, lx0), np.minimum), (gy0, (prev.y0, ly0), np.minimum),
                              (gx1, (prev.x1, lx1), np.maximum), (gy1, (prev.y1, ly1), np.maximum)):
            op.at(arr, group, np.concatenate(vals))
        garea = np.bincount(group, np.concatenate((prev.area, st[:, 4])), minlength=g_count).astype(np.int64)
        has_prev = np.zeros(g_count, bool)
        has_prev[group[:k]] = True
        is_open = np.zeros(g_count, bool)
        is_open[group[k:][at_bottom]] = True
        # Each group keeps the smallest key of the open regions it joins, or takes a new one.
        gkey = np.full(g_count, np.iinfo(np.int64).max)
        np.minimum.at(gkey, group[:k], prev.key)
        fresh = np.flatnonzero(~has_prev)
        gkey[fresh] = self.next_key + self.key_step * np.arange(len(fresh))
        self.next_key += self.key_step * len(fresh)
        if self.owned and k:
            self._merge_owned(prev.key, gkey[group[:k]])
        big = (gx1 - gx0) * (gy1 - gy0) >= self.min_px
        done = ~is_open & big

        single = done & ~has_prev  # closed inside this chunk: exactly one component each
        doubt = np.flatnonzero(single & (garea < self.min_px))
        if len(doubt):
            single[doubt] = self._can_reach_min_area(chunk == cls, garea[doubt], gx0[doubt], gy0[doubt] - y0,
                                                     gx1[doubt], gy1[doubt] - y0)
        # Components closing here (1) and, for early holes, of tall regions staying open (2): one look-up for both.
        # (A region open over fewer rows than two chunks like this one is likely to close soon, and cheap to
        # trace whole then: most of a noisy map's regions, each with its own few holes.)
        comp_open = np.zeros(m, bool)
        if self.early_holes and h > 2 and not last:
            comp_open = (is_open & (y0 + h - gy0 >= 2 * h))[group[k:]]
        code = None
        if single.any() or comp_open.any():
            lut = np.zeros(n, np.uint8)
            lut[1:] = single[group[k:]] + 2 * comp_open
            code = lut.take(labels, mode="clip")  # (clip: no bounds checks, a third faster)
        if single.any():
            assert code is not None
            self._trace(code if not comp_open.any() else (code == 1).view(np.uint8), 0, y0, cls)
        spanning = np.flatnonzero(done & has_prev)
        if len(spanning):
            first_prev = np.full(g_count, -1, np.int64)
            first_prev[group[:k][::-1]] = np.arange(k)[::-1]
            seeds = first_prev[spanning]
            self._trace_spanning(cls, gx0[spanning], gy0[spanning], gx1[spanning], gy1[spanning],
                                 prev.sx[seeds], prev.sy[seeds], garea[spanning], gkey[spanning])
        if self.owned:  # regions closed now (traced or dropped) take their early holes with them
            for key in gkey[has_prev & ~is_open].tolist():
                for owner in self.owned.pop(key, ()):
                    self.hole_contours.pop(owner, None)

        og = np.flatnonzero(is_open)
        new_id = np.full(g_count, -1, np.int64)
        new_id[og] = np.arange(len(og))
        ids = np.full(self.width, -1, np.int64)
        if h and len(og):
            bottom = labels[h - 1]
            nz = bottom > 0
            ids[nz] = new_id[group[k + bottom[nz] - 1]]
        xs = np.flatnonzero(ids >= 0)
        sx = np.zeros(len(og), np.int64)
        sx[ids[xs][::-1]] = xs[::-1]  # the first pixel of each open region on the bottom row
        sy = np.full(len(og), y0 + h - 1, np.int64)
        if code is not None and comp_open.any():
            self._early(cls, code if not single.any() else (code == 2).view(np.uint8), labels, comp_open,
                        gkey[group[k:]], y0)
        return _OpenRegions(ids, gx0[og], gy0[og], gx1[og], gy1[og], sx, sy, garea[og], gkey[og])

    def _merge_owned(self, keys: np.ndarray, into: np.ndarray) -> None:
        """Open regions ``keys`` joined groups keyed ``into``: their early holes go with them."""
        moved = np.flatnonzero(keys != into)
        if len(moved) == 0:
            return
        owned = np.fromiter(self.owned, np.int64, len(self.owned))
        for i in moved[np.isin(keys[moved], owned)].tolist():
            self.owned.setdefault(int(into[i]), set()).update(self.owned.pop(int(keys[i])))

    def _early(self, cls: int, mask: np.ndarray, labels: np.ndarray, comp_open: np.ndarray, comp_key: np.ndarray,
               y0: int) -> None:
        """Emit the holes of this chunk's components of tall regions staying open that lie wholly inside it.

        Such a hole is a 4-connected part of the background enclosed by one component's pixels, none on the
        chunk's top or bottom row: its pixels and every pixel next to them are final, and so are its ring and
        the region it belongs to (the component's). Its ring depends only on that component's pixels and the
        background beside them (no other component of the class touches them, not even at a corner), so it is
        traced from ``mask``, of the open components (the others are 0), as the region's own trace would trace
        it."""
        found = geometry.trace_holes(mask, 0, y0, self.scale, max_hole=self.max_hole_px, scratch=True)
        if not found.contours:
            return
        # a hole's first border pixel is a pixel of the component enclosing it
        comp = labels[found.all_firsts[:, 1], found.all_firsts[:, 0]] - 1
        early = np.flatnonzero(comp_open[comp])
        owners = comp_key[comp[early]]
        order = np.argsort(owners, kind="stable")
        for part in np.split(order, np.flatnonzero(np.diff(owners[order])) + 1) if len(order) else ():
            key = int(owners[part[0]])
            self.owned.setdefault(key, set()).add(key)
            if not self.paint_holes:
                self.hole_contours.setdefault(key, []).append((y0, [found.contours[i] for i in early[part].tolist()]))
        if self.paint_holes and len(early):
            import cv2

            chunk = self.rows[-1][1]  # this chunk's rows, retained (see _label_pending)
            cv2.drawContours(chunk, [found.contours[i] for i in early.tolist()], -1, cls, thickness=cv2.FILLED)
        if found.polygons:
            comp = labels[found.firsts[:, 1], found.firsts[:, 0]] - 1
            keep = np.flatnonzero(comp_open[comp])
            if len(keep):
                holes = np.empty(len(keep), dtype=object)
                holes[:] = [found.polygons[i] for i in keep.tolist()]
                self.emit(EarlyHoles(holes, comp_key[comp[keep]], y0), cls)

    @staticmethod
    def _link(prev: _OpenRegions, top: np.ndarray | None, k: int, m: int) -> tuple[np.ndarray, int]:
        """Group of every node (open regions, then components): components touching an open region join it."""
        if k == 0 or top is None:
            return np.arange(k + m), k + m
        ids = prev.ids
        a_parts, b_parts = [], []
        for a, b in ((ids[:-1], top[1:]), (ids, top), (ids[1:], top[:-1])):  # 8-adjacency across the rows
            sel = (a >= 0) & (b > 0)
            a_parts.append(a[sel])
            b_parts.append(b[sel])
        a = np.concatenate(a_parts)
        if len(a) == 0:
            return np.arange(k + m), k + m
        b = np.concatenate(b_parts).astype(np.int64) + (k - 1)
        return _components(a, b, k + m)

    # ---- tracing -----------------------------------------------------------------------------------------

    def _trace(self, mask: np.ndarray, x_off: int, y_off: int, cls: int) -> None:
        for geom in geometry.trace_regions(mask, x_off, y_off, self.scale, min_area=self.min_px,
                                           max_hole=self.max_hole_px, scratch=True):
            self.regions += 1
            self.emit(geom, cls)

    def _trace_spanning(self, cls: int, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray,
                        sx: np.ndarray, sy: np.ndarray, area: np.ndarray, keys: np.ndarray) -> None:
        """Trace regions closing now that span chunks: in one pass over their joint box when they fill a
        fair part of it (many regions: one OpenCV call), else one by one (few regions far apart). Regions
        with early holes are traced one by one, with those holes filled."""
        import cv2

        if self.owned:
            holed = np.isin(keys, np.fromiter(self.owned, np.int64, len(self.owned)))
            if holed.any():
                for i in np.flatnonzero(holed).tolist():
                    self._trace_holed(cls, int(x0[i]), int(y0[i]), int(x1[i]), int(y1[i]), int(sx[i]), int(sy[i]),
                                      int(area[i]), int(keys[i]))
                rest = ~holed
                if rest.any():
                    self._trace_spanning(cls, x0[rest], y0[rest], x1[rest], y1[rest], sx[rest], sy[rest], area[rest],
                                         keys[rest])
                return
        bx0, by0, bx1, by1 = int(x0.min()), int(y0.min()), int(x1.max()), int(y1.max())
        # Cost model: tracing touches the box's pixels, and each trace has a fixed cost of about
        # TRACE_OVERHEAD_PX pixels' worth of work.
        joint = (bx1 - bx0) * (by1 - by0)
        separate = int(((x1 - x0) * (y1 - y0)).sum()) + TRACE_OVERHEAD_PX * len(x0)
        if len(x0) > 1 and joint > 4 * separate:
            for i in range(len(x0)):
                self._trace_spanning(cls, x0[i:i + 1], y0[i:i + 1], x1[i:i + 1], y1[i:i + 1], sx[i:i + 1],
                                     sy[i:i + 1], area[i:i + 1], keys[i:i + 1])
            return
        crop = self._crop(bx0, by0, bx1, by1)
        fg = crop == cls
        if (area < self.min_px).any():
            keep = self._can_reach_min_area(fg, area, x0 - bx0, y0 - by0, x1 - bx0, y1 - by0)
            if not keep.any():
                return
            sx, sy = sx[keep], sy[keep]
        # Only the regions holding the seeds: other regions of the class may share the box.
        if len(sx) <= FLOOD_SEEDS:
            # A few regions (a smooth map): flood fills touch only their pixels.
            self._trace(_flood(crop, sx - bx0, sy - by0), bx0 - 1, by0 - 1, cls)
        else:
            # Many (a noisy map): one labelling of the box serves every seed. A region lies wholly inside
            # its box, so its component in the box is the region itself.
            _, labels = cv2.connectedComponents(fg.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            lut = np.zeros(int(labels.max()) + 1, np.uint8)
            lut[labels[sy - by0, sx - bx0]] = 1
            lut[0] = 0
            self._trace(lut.take(np.asarray(labels), mode="clip"), bx0, by0, cls)

    def _trace_holed(self, cls: int, x0: int, y0: int, x1: int, y1: int, sx: int, sy: int, area: int,
                     key: int) -> None:
        """Trace one region that had early holes, from its seed pixel, with those holes filled."""
        import cv2

        owners = sorted(self.owned.pop(key))
        contours = [item for o in owners for item in self.hole_contours.pop(o, [])]
        crop = self._crop(x0, y0, x1, y1)
        # (painted holes are no longer background there, which the bound counts: the trace decides exactly)
        if area < self.min_px and not self.paint_holes and not self._can_reach_min_area(
                crop == cls, np.array([area]), np.array([0]), np.array([0]), np.array([x1 - x0]),
                np.array([y1 - y0]))[0]:
            return
        mask = _flood(crop, np.array([sx - x0]), np.array([sy - y0]))
        for row, found in contours:
            cv2.drawContours(mask, found, -1, 1, thickness=cv2.FILLED, offset=(1 - x0, 1 + row - y0))
        for geom in geometry.trace_regions(mask, x0 - 1, y0 - 1, self.scale, min_area=self.min_px,
                                           max_hole=self.max_hole_px, scratch=True):
            self.regions += 1
            self.emit(HoledRegion(geom, tuple(owners)), cls)

    def _can_reach_min_area(self, fg: np.ndarray, area: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray,
                            y1: np.ndarray) -> np.ndarray:
        """Whether regions of ``area`` pixels with boxes [x0, x1) x [y0, y1) in class mask ``fg`` can reach
        ``min_area``: with too few pixels, only if holes make up the difference. A region's holes lie inside
        its box and away from the mask's edges, so the enclosed background there bounds them."""
        return area + _box_sums(_enclosed(fg), x0, y0, x1, y1) >= self.min_px

    def _crop(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        parts = [r[max(y0 - ry, 0):y1 - ry, x0:x1] for ry, r in self.rows if ry < y1 and ry + r.shape[0] > y0]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _trim(self) -> None:
        """Forget raster rows above every open region."""
        tops = [int(o.y0.min()) for o in self.open.values() if len(o)]
        keep_from = min(tops) if tops else self.labelled
        while self.rows and self.rows[0][0] + self.rows[0][1].shape[0] <= keep_from:
            self.rows.popleft()


def _flood(crop: np.ndarray, sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """The 8-connected regions of ``crop``'s class values holding the seed pixels (sx, sy), as a 0/1 mask with
    a frame of one background pixel around the crop (OpenCV's flood fill mask)."""
    import cv2

    crop = np.ascontiguousarray(crop)
    mask = np.zeros((crop.shape[0] + 2, crop.shape[1] + 2), np.uint8)
    flags = 8 | cv2.FLOODFILL_MASK_ONLY | (1 << 8)
    for x, y in zip(sx.tolist(), sy.tolist(), strict=True):
        if not mask[y + 1, x + 1]:
            cv2.floodFill(crop, mask, (x, y), 0, 0, 0, flags)
    mask[0] = mask[-1] = 0  # OpenCV marks the mask's frame as filled
    mask[:, 0] = mask[:, -1] = 0
    return mask


FEW_COMPONENTS = 4  # components of a strip up to which boxes from projections beat OpenCV's statistics


def _label(strip: np.ndarray, cls: int, many: bool = False) -> tuple[int, np.ndarray, np.ndarray]:
    """8-connected components of class ``cls`` in ``strip``: their count + 1 (OpenCV's count, background
    included), the label image and each component's box and pixel count (x, y, width, height, area), int64.

    OpenCV's statistics (area, centroid and box of every component) cost about four times the labelling
    itself. A strip of a smooth map holds a handful of components, whose boxes come cheaper from one row and
    one column projection each; a noisy strip holds thousands and is labelled again with statistics, or
    with statistics at once when ``many`` are expected."""
    import cv2

    fg = (strip == cls).view(np.uint8)
    if not many:
        n, labels = cv2.connectedComponents(fg, connectivity=8, ltype=cv2.CV_32S)
        if n - 1 <= FEW_COMPONENTS:
            boxes = np.zeros((n - 1, 5), np.int64)
            for lab in range(1, n):
                mask = fg if n == 2 else labels == lab
                rows = np.flatnonzero(mask.any(axis=1))
                cols = np.flatnonzero(mask.any(axis=0))
                boxes[lab - 1] = (cols[0], rows[0], cols[-1] + 1 - cols[0], rows[-1] + 1 - rows[0],
                                  np.count_nonzero(mask))
            return n, labels, boxes
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8, ltype=cv2.CV_32S)
    return n, labels, stats[1:].astype(np.int64)


def _enclosed(fg: np.ndarray) -> np.ndarray:
    """Summed-area table (OpenCV's ``integral``) of the background of boolean mask ``fg`` that is enclosed: its
    4-connected components that do not reach the mask's edge. Every hole of a region lies there."""
    import cv2

    # Labelled inside a frame of background, every component reaching the edge is the frame's.
    bg = cv2.copyMakeBorder((~fg).view(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=1)
    _, labels = cv2.connectedComponents(bg, connectivity=4, ltype=cv2.CV_32S)
    inner = (labels[1:-1, 1:-1] != labels[0, 0]) & bg[1:-1, 1:-1].view(bool)
    table: np.ndarray = cv2.integral(inner.view(np.uint8))
    return table


def _box_sums(table: np.ndarray, x0: np.ndarray, y0: np.ndarray, x1: np.ndarray, y1: np.ndarray) -> np.ndarray:
    """Sums over boxes [x0, x1) x [y0, y1) from a summed-area table."""
    return (table[y1, x1] - table[y0, x1] - table[y1, x0] + table[y0, x0]).astype(np.int64)


SMALL_GRAPH = 512  # nodes + distinct edges below which a union-find in Python beats scipy's fixed cost


def _components(a: np.ndarray, b: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """Connected components of the undirected graph on ``n`` nodes with edges ``a[i] - b[i]``: each node's
    component, numbered by its smallest node (as scipy numbers them), and the count.

    Edges come one per adjacent pixel pair, so most repeat: they are made distinct first. A strip of a
    smooth map links a handful of regions, where scipy's sparse-graph set-up (about 0.4 ms) would cost more
    than the whole strip's tracing; large graphs (noisy maps) still go to scipy."""
    codes = a * n + b
    # Counting is linear where sorting is not: a smooth strip has few nodes and thousands of pixel pairs.
    pairs = np.flatnonzero(np.bincount(codes, minlength=n * n)) if n * n <= 1 << 16 else np.unique(codes)
    if n + len(pairs) > SMALL_GRAPH:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        graph = coo_matrix((np.ones(len(pairs), np.int32), (pairs // n, pairs % n)), shape=(n, n))
        count, group = connected_components(graph, directed=False)
        return group.astype(np.int64), int(count)
    parent = list(range(n))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for e in pairs.tolist():
        u, v = root(e // n), root(e % n)
        if u != v:  # the smaller node becomes the root, so each root is its component's smallest node
            parent[max(u, v)] = min(u, v)
    roots = np.fromiter((root(x) for x in range(n)), np.int64, n)
    firsts, group = np.unique(roots, return_inverse=True)
    return group.astype(np.int64), len(firsts)
