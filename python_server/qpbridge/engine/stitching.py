"""Seam-free stitching of overlapping tiles, in bounded memory.

Tiles come from a :class:`~qpbridge.engine.plan.TilePlan` laid on a canvas at the model's pixel size.

Semantic models: each tile's class probabilities, at the model's own output resolution (a quarter of
the tile for SegFormer: ``SemanticResult.scale``; never upsampled first), are weighted by a window
(cosine ramps over the overlap by default; a card may name a spline or Gaussian window over the whole
tile, as overlap-tile inference with 3/4 overlap, "16-fold", uses) and added into a rolling accumulator a
little taller than one tile, on the host (numpy) or, for results that are still tensors on the model's
device, there (torch). Once every tile that touches a strip
(one grid step tall) is in, the strip's argmax is taken and only the uint8 class strip goes on (on a device,
copied to the host behind the work queued before it, and taken when the next strip is queued), to a
:class:`~qpbridge.engine.vectorise.RegionTracer`, which labels and traces it in linear time and emits one polygon
per connected region per class, however many tiles and strips the region crosses (holes kept). A card's
morphological opening/closing runs on the class strips on their way to the tracer, a few rows behind
(:mod:`qpbridge.engine.morphology`).

Memory: the accumulator is (classes + 1) x (tile + step) x width float32 at output resolution (for a
150,000 px wide slide at 0.25 µm/px and SegFormer at 1 µm/px: 4 x 112 x 9,375 x 4 B = 17 MB); the tracer
keeps at most one byte per output pixel (see :mod:`qpbridge.engine.vectorise`; 59 MB for a 150,000 x 100,000 px
slide at 0.25 µm/px; as much per tracing process, when several share out the classes), and only while a region
stays open over the rows.

Instance models: every tile has a *core*, the part of it closer to its own centre than to any
neighbour's (cores of all tiles partition the canvas). An instance is kept only by the tile whose core
holds its centroid, so a nucleus seen by two overlapping tiles is kept once, and (as long as it is
smaller than half the overlap) whole.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpbridge import geometry
from qpbridge.engine.morphology import Morphology, StripMorphology
from qpbridge.engine.plan import PlannedTile, TilePlan
from qpbridge.engine.trace_process import RemoteTracer, strip_tracer
from qpbridge.engine.vectorise import RegionTracer
from qpbridge.families import NO_CLASS, InstanceResult, SemanticResult
from qpbridge.pools import postprocess_pool

# Called with (geometry in canvas model pixels, class index, extra measurements or None); with early holes, the
# "geometry" may be a vectorise.EarlyHoles or vectorise.HoledRegion.
Emit = Callable[[Any, int, "dict[str, Any] | None"], None]

WINDOW_FLOOR = 1e-3  # edge pixels keep a little weight, so canvas borders without a neighbour still count


def cosine_window(h: int, w: int, overlap: int) -> np.ndarray:
    """Weights that fall from 1 to ~0 over ``overlap`` pixels at each edge (a Hann ramp)."""

    def ramp(n: int) -> np.ndarray:
        out = np.ones(n, np.float32)
        k = min(overlap, n // 2)
        if k > 0:
            t = (np.arange(k, dtype=np.float32) + 0.5) / k
            edge = 0.5 - 0.5 * np.cos(np.pi * t)
            out[:k] = edge
            out[n - k:] = edge[::-1]
        return np.maximum(out, WINDOW_FLOOR)

    return np.outer(ramp(h), ramp(w))


def spline_window(h: int, w: int) -> np.ndarray:
    """The squared-spline window of "smooth tiled predictions" (Chevalier, 2017), used with 50-75 % overlap:
    a piecewise quadratic bump over the whole tile, 1 at its centre and 0 at its edges (floored as above)."""

    def spline(n: int) -> np.ndarray:
        t = (np.arange(n, dtype=np.float64) + 0.5) / n  # pixel centres in (0, 1)
        tri = 1.0 - np.abs(2.0 * t - 1.0)  # 0 at the edges, 1 at the centre
        out = np.where(tri <= 0.5, 2.0 * tri ** 2, 1.0 - 2.0 * (1.0 - tri) ** 2)
        return np.maximum(out.astype(np.float32), WINDOW_FLOOR)

    return np.outer(spline(h), spline(w))


def gaussian_window(h: int, w: int, sigma_scale: float = 0.125) -> np.ndarray:
    """A Gaussian centred on the tile with sigma = ``sigma_scale`` x its size (nnU-Net's sliding-window
    weighting), normalised to 1 at the centre (floored as above)."""

    def gauss(n: int) -> np.ndarray:
        t = np.arange(n, dtype=np.float64) + 0.5 - n / 2.0
        out = np.exp(-0.5 * (t / max(sigma_scale * n, 1e-6)) ** 2)
        return np.maximum(out.astype(np.float32), WINDOW_FLOOR)

    return np.outer(gauss(h), gauss(w))


BLEND_WINDOWS = ("cosine", "spline", "gaussian")


def blend_window(kind: str, h: int, w: int, overlap: int) -> np.ndarray:
    """The weights a tile's probabilities are blended with (card ``params.blend_window``): ``cosine`` (default: a
    Hann ramp over the overlap, flat in the middle; with an overlap of half the tile or more, a Hann window over
    the whole tile), ``spline`` or ``gaussian`` (over the whole tile, whatever the overlap)."""
    if kind == "cosine":
        return cosine_window(h, w, overlap)
    if kind == "spline":
        return spline_window(h, w)
    if kind == "gaussian":
        return gaussian_window(h, w)
    raise ValueError(f"unknown blend window {kind!r}; known: {', '.join(BLEND_WINDOWS)}")


def _is_tensor(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _held(x: Any) -> Any:
    """A model's output tensor made safe to blend on this thread's stream (the model runs on its own)."""
    if _is_tensor(x):
        from qpbridge.families.torch_runtime import handed_over

        return handed_over(x)
    return x


class _HostBlend:
    """The rolling accumulator in numpy, as a ring of rows: moving on by a strip zeroes the rows that were
    finalised and moves the start, where copying the buffer up would rewrite all of its rows per strip.

    Rows are addressed as the stitcher sees them (0 = the first row not finalised yet); ``acc`` holds them
    from physical row ``top`` on, wrapping around (:meth:`rows` gives them in order).

    The window weights are summed only once some tile leaves pixels to no class (``track_weights``):
    while every tile's probabilities sum to one, the weight sum is the sum over classes, and a pixel is
    covered where the best class has any mass.
    """

    def __init__(self, n_classes: int, h: int, w: int) -> None:
        import cv2

        self.cv2 = cv2
        self.acc = np.zeros((n_classes, h, w), np.float32)
        self.wsum = np.zeros((h, w), np.float32)
        self.top = 0
        self.tracking = False

    def track_weights(self) -> None:
        self.wsum[:] = self.acc.sum(axis=0)
        self.tracking = True

    @property
    def nbytes(self) -> int:
        return int(self.acc.nbytes + self.wsum.nbytes)

    def window(self, win: np.ndarray) -> np.ndarray:
        return win

    def _spans(self, y: int, h: int) -> list[tuple[int, int, int]]:
        """Rows y .. y + h - 1 as (offset in them, physical row, count): one span, or two across the wrap."""
        size = self.acc.shape[1]
        if y < 0 or y + h > size:
            raise ValueError(f"rows {y}..{y + h} are outside the blending buffer of {size} rows")
        p = (self.top + y) % size
        first = min(h, size - p)
        return [(0, p, first)] if first == h else [(0, p, first), (first, 0, h - first)]

    def rows(self, h: int) -> tuple[np.ndarray, np.ndarray]:
        """The accumulator and weight sums of rows 0 .. h - 1, in order (a copy only across the wrap)."""
        parts = self._spans(0, h)
        if len(parts) == 1:
            _, p, n = parts[0]
            return self.acc[:, p:p + n], self.wsum[p:p + n]
        return (np.concatenate([self.acc[:, p:p + n] for _, p, n in parts], axis=1),
                np.concatenate([self.wsum[p:p + n] for _, p, n in parts]))

    def add(self, probs: Any, win: np.ndarray, y: int, x: int) -> None:
        h, w = win.shape
        if _is_tensor(probs):
            probs = probs.cpu().numpy()
        probs = np.asarray(probs, np.float32)
        win = np.asarray(win, np.float32)
        for o, p, n in self._spans(y, h):
            rows = win[o:o + n]
            for c in range(probs.shape[0]):  # in place, one OpenCV call per class: half numpy's time
                self.cv2.accumulateProduct(probs[c, o:o + n], rows, self.acc[c, p:p + n, x:x + w])
            if self.tracking:
                self.wsum[p:p + n, x:x + w] += rows

    def classes(self, h: int) -> np.ndarray:
        cmap = np.empty((h, self.acc.shape[2]), np.uint8)
        for o, p, n in self._spans(0, h):
            cmap[o:o + n] = self._classes(self.acc[:, p:p + n], self.wsum[p:p + n])
        return cmap

    def classes_later(self, h: int) -> Callable[[], np.ndarray]:
        """:meth:`classes`, ready now (the device accumulator's strips are ready a strip later)."""
        ready = self.classes(h)
        return lambda: ready

    def _classes(self, acc: np.ndarray, wsum: np.ndarray) -> np.ndarray:
        # argmax class by class: one pass per class over contiguous rows beats a strided argmax, and uint8
        # arithmetic beats assigning through a boolean mask (ten times, on a noisy map)
        best = acc[0].copy()
        cmap = np.zeros(best.shape, np.uint8)
        better = np.empty(best.shape, bool)
        step = np.empty(best.shape, np.uint8)
        for c in range(1, acc.shape[0]):
            np.greater(acc[c], best, out=better)
            np.subtract(cmap, c, out=step)  # cmap - (cmap - c) = c where better, in uint8's modular arithmetic
            step *= better.view(np.uint8)
            cmap -= step
            np.maximum(best, acc[c], out=best)
        # Probability mass no class claims (one-hot maps with NO_CLASS pixels) competes as "none".
        covered = (wsum > 0) & (best >= wsum - acc.sum(axis=0)) if self.tracking else best > 0
        cmap |= (~covered).view(np.uint8) * np.uint8(NO_CLASS)
        return cmap

    def shift(self, step: int) -> None:
        for _, p, n in self._spans(0, step):
            self.acc[:, p:p + n] = 0
            if self.tracking:
                self.wsum[p:p + n] = 0
        self.top = (self.top + step) % self.acc.shape[1]


class _DeviceBlend:
    """The same accumulator as torch tensors on the model's device: only uint8 class strips leave it."""

    def __init__(self, n_classes: int, h: int, w: int, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.acc = torch.zeros((n_classes, h, w), dtype=torch.float32, device=device)
        self.wsum = torch.zeros((h, w), dtype=torch.float32, device=device)
        self._windows: dict[int, Any] = {}
        self.tracking = False

    def track_weights(self) -> None:
        self.wsum.copy_(self.acc.sum(dim=0))
        self.tracking = True

    @property
    def nbytes(self) -> int:
        return int(self.acc.numel() * 4 + self.wsum.numel() * 4)

    def window(self, win: np.ndarray) -> Any:
        key = id(win)
        if key not in self._windows:
            self._windows[key] = self.torch.from_numpy(win).to(self.device)
        return self._windows[key]

    def add(self, probs: Any, win: Any, y: int, x: int) -> None:
        h, w = win.shape
        if not _is_tensor(probs):
            probs = self.torch.from_numpy(np.asarray(probs))
        probs = probs.to(self.device, non_blocking=True)
        self.acc[:, y:y + h, x:x + w].addcmul_(probs, win)  # fp16 probabilities add into fp32 in place
        if self.tracking:
            self.wsum[y:y + h, x:x + w] += win

    def add_run(self, probs: Any, win: Any, y: int, x: int, step: int) -> None:
        """K same-sized tiles side by side, ``step`` apart from x (probs (K, C, h, w)), in a few kernels:
        windowed, then overlap-added by ``fold`` (what ``add`` does tile by tile, one launch per tile)."""
        k, c, h, w = (int(v) for v in probs.shape)
        if k == 1 or self.tracking:
            for i in range(k):
                self.add(probs[i], win, y, x + i * step)
            return
        import torch.nn.functional as F

        width = step * (k - 1) + w
        cols = (probs.to(self.device, non_blocking=True) * win).float().reshape(k, c * h * w).t()
        summed = F.fold(cols[None], output_size=(h, width), kernel_size=(h, w), stride=(h, step))
        self.acc[:, y:y + h, x:x + width] += summed[0]

    def classes(self, h: int) -> np.ndarray:
        return self.classes_later(h)()

    def classes_later(self, h: int) -> Callable[[], np.ndarray]:
        """:meth:`classes` queued on the device, copied to pinned host memory behind the work queued before it;
        the call returned waits for the copy. The stitching thread takes a strip when the next is queued, so it
        does not wait for each strip's blending and argmax on the device (on the CPU the strip is ready now)."""
        torch = self.torch
        acc, wsum = self.acc[:, :h], self.wsum[:h]
        best, cmap = acc.max(dim=0)
        covered = (wsum > 0) & (best >= wsum - acc.sum(dim=0)) if self.tracking else best > 0
        # masked_fill_, not cmap[~covered] = ...: a boolean index waits for the device to count the pixels
        cmap = cmap.to(torch.uint8).masked_fill_(~covered, NO_CLASS)
        if cmap.device.type != "cuda":
            ready: np.ndarray = cmap.numpy()
            return lambda: ready
        host = torch.empty(tuple(cmap.shape), dtype=torch.uint8, pin_memory=True)
        host.copy_(cmap, non_blocking=True)
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(cmap.device))

        def wait() -> np.ndarray:
            copied.synchronize()
            out: np.ndarray = host.numpy()
            return out

        return wait

    def shift(self, step: int) -> None:
        self.acc[:, :-step] = self.acc[:, step:].clone()
        self.acc[:, -step:] = 0
        if self.tracking:
            self.wsum[:-step] = self.wsum[step:].clone()
            self.wsum[-step:] = 0


class SemanticStitcher:
    """Blend probability tiles and emit one polygon per connected region per class.

    ``min_area`` and ``max_hole`` (canvas pixels²: the card's post-processing) let the tracer skip regions
    and holes that would be dropped or filled later anyway. With ``early_holes`` the tracer emits the final
    holes of regions still open as it goes (``vectorise.EarlyHoles``, then ``vectorise.HoledRegion``): what
    receives them must build them (``FeatureBuilder.build_many`` does). ``window`` names the blending window
    (:func:`blend_window`); ``morphology`` (radii in canvas pixels) filters the class raster strip by strip
    before it is traced (:mod:`qpbridge.engine.morphology`).
    """

    def __init__(self, plan: TilePlan, n_classes: int, emit_classes: list[int], emit: Emit, *,
                 min_area: float = 0.0, max_hole: float = 0.0, window: str = "cosine",
                 morphology: Morphology | None = None, early_holes: bool = False) -> None:
        if window not in BLEND_WINDOWS:
            raise ValueError(f"unknown blend window {window!r}; known: {', '.join(BLEND_WINDOWS)}")
        self.window_kind = window
        self.morphology = morphology
        self.early_holes = early_holes
        self.filter: StripMorphology | None = None
        self.plan = plan
        self.n_classes = n_classes
        self.emit_classes = emit_classes
        self.emit = emit
        self.min_area = min_area
        self.max_hole = max_hole
        self.scale = 0  # output pixel size in canvas pixels, fixed by the first tile added
        self.base_row = 0  # the next strip to finalise; the buffer starts at base_row * step
        self.remaining = plan.tiles_per_row()
        self.pending: dict[int, list[tuple[PlannedTile, Any]]] = {}
        self.windows: dict[tuple[int, int], np.ndarray] = {}
        self.peak_pending = 0
        self.partial = False  # some tile left pixels to no class
        self.blend: _HostBlend | _DeviceBlend | None = None
        self.tracer: RegionTracer | RemoteTracer | None = None
        self.remote: RemoteTracer | None = None  # tracing in a child process (:meth:`trace_in_process`)
        self._handed: Any = None  # the last batch output handed over to this thread's stream
        # the last class strip queued, not yet traced (the call that gives it, and whether it is the last strip)
        self._queued: tuple[Callable[[], np.ndarray], bool] | None = None
        # time taken by class strips (argmax, and on a device the wait for it and the copy to the host), and by
        # filtering and tracing them; the rest of the stitching time is blending
        self.classes_s = 0.0
        self.trace_s = 0.0
        self.blend_s = 0.0  # adding tiles into the accumulator (and, blending on a device, queueing that work)

    def trace_in_process(self, processes: int = 1) -> None:
        """Filter and trace the class strips in child processes (:mod:`qpbridge.engine.trace_process`; several
        share out the classes), taken now so that they start while the first tiles are read; before the first
        tile is added."""
        if self.blend is not None:
            raise RuntimeError("tracing can move to a process only before the first tile")
        if self.remote is None:
            self.remote = RemoteTracer(lambda g, c: self.emit(g, c, None),
                                       processes=max(1, min(processes, len(self.emit_classes))))

    def sync(self) -> None:
        """Emit every region the strips finalised so far close (the tracer waits for chunks of strips, and
        tracing in a process runs behind)."""
        self._take_queued()
        if self.remote is not None and self.remote.width:
            self.remote.sync()
        elif isinstance(self.tracer, RegionTracer):
            self.tracer.flush()

    def close(self) -> None:
        """End a stitching that will not be finished (a failed or cancelled run): its tracing process goes."""
        if self.remote is not None:
            self.remote.close()

    @property
    def blend_on(self) -> str:
        """Where tiles are blended: "device" (torch, the model's GPU), "host" (numpy), or "" before any tile."""
        if self.blend is None:
            return ""
        return "device" if isinstance(self.blend, _DeviceBlend) else "host"

    @property
    def buffer_bytes(self) -> int:
        return (self.blend.nbytes if self.blend is not None else 0) + \
            (self.tracer.peak_rows * self.tracer.width if self.tracer is not None else 0)

    def _start(self, scale: int, probs: Any) -> None:
        p = self.plan
        # Native-resolution blending needs the grid to fall on output pixels; else blend at canvas size.
        s = scale if scale >= 1 and p.tile % scale == 0 and p.step % scale == 0 else 1
        self.scale = s
        self.step, self.tile, self.overlap = p.step // s, p.tile // s, p.overlap // s
        self.width, self.height = math.ceil(p.width / s), math.ceil(p.height / s)
        self.buf_h = self.tile + self.step
        device = getattr(probs, "device", None)
        if _is_tensor(probs) and device is not None and device.type != "cpu":
            self.blend = _DeviceBlend(self.n_classes, self.buf_h, self.width, device)
        else:
            self.blend = _HostBlend(self.n_classes, self.buf_h, self.width)
        morphology = self.morphology.at_scale(s) if self.morphology is not None else None
        if self.remote is not None:
            self.remote.open(self.width, self.emit_classes, scale=s, min_area=self.min_area, max_hole=self.max_hole,
                             morphology=morphology, early_holes=self.early_holes)
            self.tracer = self.remote
            return
        self.tracer, self.filter = strip_tracer(self.width, self.emit_classes, lambda g, c: self.emit(g, c, None),
                                                scale=s, min_area=self.min_area, max_hole=self.max_hole,
                                                morphology=morphology, early_holes=self.early_holes)

    def _window(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        if key not in self.windows:
            self.windows[key] = blend_window(self.window_kind, h, w, self.overlap)
        return self.windows[key]

    def add(self, tile: PlannedTile, result: SemanticResult) -> None:
        self._blending(self._add, tile, result)

    def _blending(self, fn: Callable[..., None], *args: Any) -> None:
        """``fn(*args)``, its time counted as blending but for the strips it finalises (counted on their own)."""
        t0, before = time.perf_counter(), self.classes_s + self.trace_s
        fn(*args)
        self.blend_s += time.perf_counter() - t0 - (self.classes_s + self.trace_s - before)

    def _hand_over(self, batch: Any) -> None:
        """Hand a batch output over to this thread's stream once, not once per tile of it."""
        if batch is not self._handed:
            self._handed = _held(batch)

    def _add(self, tile: PlannedTile, result: SemanticResult) -> None:
        if result.probs is not None:
            probs: Any = result.probs
            if result.batch is None:
                probs = _held(probs)
            else:
                self._hand_over(result.batch[0])
        else:
            cmap = result.class_map()
            self.partial = self.partial or bool((cmap == NO_CLASS).any())
            probs = result.probabilities(self.n_classes)
        if self.blend is None:
            self._start(int(result.scale), probs)
        assert self.blend is not None
        if self.partial and not self.blend.tracking:
            self.blend.track_weights()
        s = self.scale
        shape = (math.ceil(tile.h / s), math.ceil(tile.w / s))
        if tuple(probs.shape[1:]) != shape:
            probs = _resize(probs, shape)
        if tile.row > self.base_row + 1:
            self.pending.setdefault(tile.row, []).append((tile, probs))
            self.peak_pending = max(self.peak_pending, sum(len(v) for v in self.pending.values()))
        else:
            self._accumulate(tile, probs)
        self.remaining[tile.row] -= 1
        self._advance()

    def add_batch(self, tiles: Sequence[PlannedTile], results: Sequence[SemanticResult]) -> None:
        """:meth:`add` of several tiles. Blending on the device, runs of whole tiles that sit side by side in
        one row and can be blended now are added together (:meth:`_DeviceBlend.add_run`), which takes the
        per-tile kernel launches off the stitching thread; the result is the same as adding them one by one."""
        self._blending(self._add_batch, tiles, results)

    def _add_batch(self, tiles: Sequence[PlannedTile], results: Sequence[SemanticResult]) -> None:
        i, n = 0, len(tiles)
        while i < n:
            t0, r0 = tiles[i], results[i]
            run = 1
            p0: Any = r0.probs
            if isinstance(self.blend, _DeviceBlend) and _is_tensor(p0) and t0.row <= self.base_row + 1:
                shape = tuple(p0.shape)
                while (i + run < n and tiles[i + run].row == t0.row and tiles[i + run].col == t0.col + run
                       and tiles[i + run].y == t0.y and _is_tensor(results[i + run].probs)
                       and tuple(getattr(results[i + run].probs, "shape", ())) == shape
                       and int(results[i + run].scale) == int(r0.scale)):
                    run += 1
                if run > 1 and not self._run_fits(tiles[i:i + run], shape):
                    run = 1
            if run == 1:
                self._add(t0, r0)
                i += 1
                continue
            assert isinstance(self.blend, _DeviceBlend)
            probs = self._run_probs(results[i:i + run])
            s = self.scale
            win = self.blend.window(self._window(int(probs.shape[2]), int(probs.shape[3])))
            self.blend.add_run(probs, win, t0.y // s - self.base_row * self.step, t0.x // s, self.step)
            self.remaining[t0.row] -= run
            self._advance()
            i += run

    def _run_probs(self, run: Sequence[SemanticResult]) -> Any:
        """The probabilities of a run of tiles as one (K, C, h, w) tensor: a slice of the batch output they are
        consecutive rows of (one call for the run, and one hand-over per batch, as every tensor call gives up the
        GIL and waits to take it back behind the run's other threads), else stacked."""
        b0 = run[0].batch
        if b0 is not None and all(r.batch is not None and r.batch[0] is b0[0] and r.batch[1] == b0[1] + k
                                  for k, r in enumerate(run)):
            self._hand_over(b0[0])
            return b0[0][b0[1]:b0[1] + len(run)]
        import torch

        return torch.stack([_held(r.probs) for r in run])

    def _run_fits(self, run: Sequence[PlannedTile], shape: tuple[int, ...]) -> bool:
        """Whole tiles (no resize), one grid step apart, at the stitcher's output scale."""
        s = self.scale
        if s == 0 or any(t.w != run[0].w or t.h != run[0].h for t in run):
            return False
        if (math.ceil(run[0].h / s), math.ceil(run[0].w / s)) != tuple(shape[1:]):
            return False
        return all(run[j + 1].x - run[j].x == self.step * s for j in range(len(run) - 1))

    def _accumulate(self, tile: PlannedTile, probs: Any) -> None:
        assert self.blend is not None
        s = self.scale
        y0 = tile.y // s - self.base_row * self.step
        win = self._window(probs.shape[1], probs.shape[2])
        self.blend.add(probs, self.blend.window(win), y0, tile.x // s)

    def _advance(self) -> None:
        rows = self.plan.rows
        while self.base_row < rows and self.remaining[self.base_row] == 0:
            self._finalise_strip(self.base_row)
            self.base_row += 1
            for t, p in self.pending.pop(self.base_row + 1, []):
                self._accumulate(t, p)

    def finish(self) -> None:
        """Close the stitching; every tile of the plan must have been added."""
        if self.blend is None:  # no tile at all: nothing to emit, but rows without tiles must still close
            if any(self.remaining):
                from qpbridge.errors import JobStateError

                raise JobStateError(f"{sum(self.remaining)} tiles of the plan were never sent; send them "
                                    "before finishing")
            if self.remote is not None:
                self.remote.finish()  # never opened: the process goes back for the next run
            return
        self._advance()  # rows without tiles at the end are closed here
        if self.base_row < self.plan.rows:
            from qpbridge.errors import JobStateError

            missing = sum(self.remaining[self.base_row:])
            raise JobStateError(f"{missing} tiles of the plan were never sent; send them before finishing")
        assert self.tracer is not None
        self._take_queued()
        self.tracer.finish()

    def _finalise_strip(self, row: int) -> None:
        assert self.blend is not None and self.tracer is not None
        step = self.step
        last = row == self.plan.rows - 1
        h = (self.height - row * step) if last else step
        h = max(0, min(h, self.buf_h))
        t0 = time.perf_counter()
        later = self.blend.classes_later(h)
        self.blend.shift(step)
        self.classes_s += time.perf_counter() - t0
        # On a device the strip is queued there, and the one queued before it is traced now (its copy had the
        # time of a strip's blending to finish); on the host, and the last strip, at once.
        self._take_queued()
        self._queued = (later, last)
        if last or not isinstance(self.blend, _DeviceBlend):
            self._take_queued()

    def _take_queued(self) -> None:
        """Trace the class strip queued (on a device, once its copy to the host is done)."""
        if self._queued is None:
            return
        later, last = self._queued
        self._queued = None
        t0 = time.perf_counter()
        classes = later()
        t1 = time.perf_counter()
        assert self.tracer is not None
        if self.filter is not None:
            self.filter.add_strip(classes, last=last)
        else:
            self.tracer.add_strip(classes, last=last)
        self.classes_s += t1 - t0
        self.trace_s += time.perf_counter() - t1


def _resize(probs: Any, shape: tuple[int, int]) -> Any:
    """Probabilities (C, h, w) resized to ``shape`` (a model whose outputs do not fall on the grid)."""
    if _is_tensor(probs):
        import torch.nn.functional as F

        return F.interpolate(probs[None].float(), size=shape, mode="bilinear", align_corners=False)[0]
    import cv2

    arr = np.ascontiguousarray(np.asarray(probs, np.float32).transpose(1, 2, 0))
    out = cv2.resize(arr, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)
    return out.reshape(shape[0], shape[1], -1).transpose(2, 0, 1)


# Instances of two tiles sharing more than this part of the smaller one's area are one object seen twice
# (neighbours within one tile share at most a simplified boundary, a few percent).
DUPLICATE_OVERLAP = 0.3


class InstanceCollector:
    """Keep each instance in the one tile whose core holds its centroid, and never one object twice.

    Tiles are polygonised in parallel (:meth:`add_batch`). The same object seen by two tiles can still be
    segmented a little differently by each, with centroids either side of the cores' border. So an
    instance near a border is held back until every tile that could also hold it has been added; two
    instances from different tiles that share more than ``DUPLICATE_OVERLAP`` of the smaller one's area
    are one object (any pair with an IoU above 0.5 is caught, and so is a fragment of an object another
    tile saw whole), and the larger is kept (then the lower tile index), so the result does not depend on
    the order tiles arrive in. Instances away from borders are emitted at once. Memory: the instances
    near borders of tiles whose neighbours have not arrived yet.
    """

    def __init__(self, plan: TilePlan, emit: Emit, *, max_object: float | None = None) -> None:
        self.plan = plan
        self.emit = emit
        self.kept = 0
        self.dropped = 0
        self.duplicates = 0
        # how far from a core border an object's copy in the next tile can reach (canvas px)
        self.reach = max_object if max_object is not None else plan.overlap / 2.0
        self.cell = max(1, plan.step)
        self.by_grid = {(t.row, t.col): t.index for t in plan.tiles}
        self.added: set[int] = set()
        self._held: dict[int, _Held] = {}  # instances waiting for their neighbour tiles
        self._waiting: dict[int, list[int]] = {}  # tile index -> held instances waiting for it
        self._cells: dict[tuple[int, int], set[int]] = {}
        self._next_id = 0

    def core(self, tile: PlannedTile) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) of the tile's core in canvas pixels; outer tiles reach to infinity."""
        p = self.plan
        half = p.overlap / 2.0
        x0 = -math.inf if tile.col == 0 else tile.col * p.step + half
        x1 = math.inf if tile.col == p.cols - 1 else (tile.col + 1) * p.step + half
        y0 = -math.inf if tile.row == 0 else tile.row * p.step + half
        y1 = math.inf if tile.row == p.rows - 1 else (tile.row + 1) * p.step + half
        return x0, y0, x1, y1

    def add(self, tile: PlannedTile, result: InstanceResult) -> None:
        self._commit(tile, self._prepare(tile, result))

    def add_batch(self, items: Sequence[tuple[PlannedTile, InstanceResult]]) -> None:
        """Polygonise the tiles on all cores, then keep their instances in order."""
        if len(items) <= 1:
            for tile, result in items:
                self.add(tile, result)
            return
        prepared = list(postprocess_pool().map(lambda it: self._prepare(*it), items))
        for (tile, _), found in zip(items, prepared, strict=True):
            self._commit(tile, found)

    def _prepare(self, tile: PlannedTile,
                 result: InstanceResult) -> list[tuple[BaseGeometry, int, dict[str, float] | None]]:
        """The instances of one tile whose centroid is in its core, as polygons in canvas pixels."""
        from scipy import ndimage

        x0, y0, x1, y1 = self.core(tile)
        labels = result.labels
        n = int(labels.max()) if labels.size else 0
        if n == 0:
            return []
        # Centroids from pixel moments first, so only the instances kept are traced into polygons.
        idx = np.arange(1, n + 1)
        com = np.asarray(ndimage.center_of_mass(np.ones(labels.shape, np.float32), labels, idx), np.float64)
        gx, gy = com[:, 1] + 0.5 + tile.x, com[:, 0] + 0.5 + tile.y
        inside = (x0 <= gx) & (gx < x1) & (y0 <= gy) & (gy < y1) & ~np.isnan(gx)
        keep = np.zeros(n + 1, bool)
        keep[1:] = inside
        masked = np.where(keep[labels], labels, 0)
        return [(geom, result.class_of.get(label, 0), result.measurements.get(label))
                for label, geom in geometry.labels_to_polygons(masked, (tile.x, tile.y)).items()]

    def _commit(self, tile: PlannedTile, found: list[tuple[BaseGeometry, int, dict[str, float] | None]]) -> None:
        self.added.add(tile.index)
        for geom, cls, extra in found:
            waiting = self._neighbours(geom.bounds, tile) if self._near_seam(geom.bounds) else []
            waiting = [i for i in waiting if i not in self.added]
            held = _Held(geom, cls, extra, tile.index, len(waiting))
            if not self._hold(held):
                self.duplicates += 1
                continue
            if not waiting:
                self._release(held.key)
            for i in waiting:
                self._waiting.setdefault(i, []).append(held.key)
        for key in self._waiting.pop(tile.index, []):
            h = self._held.get(key)
            if h is not None:
                h.waiting -= 1
                if h.waiting <= 0:
                    self._release(key)

    def _hold(self, new: _Held) -> bool:
        """Keep ``new`` among the held instances unless a better copy of the same object is held; copies it
        beats are dropped. Returns whether ``new`` is kept."""
        b = new.geom.bounds
        rivals: set[int] = set()
        for cell in self._cells_of(b):
            rivals |= self._cells.get(cell, set())
        beaten = []
        for key in rivals:
            other = self._held[key]
            if other.tile == new.tile:
                continue
            ob = other.geom.bounds
            if ob[0] > b[2] or ob[2] < b[0] or ob[1] > b[3] or ob[3] < b[1]:
                continue
            shared = new.geom.intersection(other.geom).area
            if shared <= DUPLICATE_OVERLAP * min(new.geom.area, other.geom.area):
                continue
            if other.rank <= new.rank:
                return False
            beaten.append(key)
        for key in beaten:
            self.duplicates += 1
            self._forget(key)
        new.key = self._next_id
        self._next_id += 1
        self._held[new.key] = new
        for cell in self._cells_of(b):
            self._cells.setdefault(cell, set()).add(new.key)
        return True

    def _release(self, key: int) -> None:
        h = self._forget(key)
        self.kept += 1
        self.emit(h.geom, h.cls, h.extra)

    def _forget(self, key: int) -> _Held:
        h = self._held.pop(key)
        for cell in self._cells_of(h.geom.bounds):
            members = self._cells.get(cell)
            if members is not None:
                members.discard(key)
                if not members:
                    del self._cells[cell]
        return h

    def _cells_of(self, bounds: tuple[float, float, float, float]) -> list[tuple[int, int]]:
        c = self.cell
        return [(i, j) for i in range(int(bounds[0] // c), int(bounds[2] // c) + 1)
                for j in range(int(bounds[1] // c), int(bounds[3] // c) + 1)]

    def _neighbours(self, bounds: tuple[float, float, float, float], tile: PlannedTile) -> list[int]:
        """Indices of the other planned tiles that overlap the box grown by ``reach``."""
        p = self.plan
        x0, y0 = bounds[0] - self.reach, bounds[1] - self.reach
        x1, y1 = bounds[2] + self.reach, bounds[3] + self.reach
        cols = range(max(0, math.floor((x0 - p.tile) / p.step) + 1), min(p.cols - 1, math.floor(x1 / p.step)) + 1)
        rows = range(max(0, math.floor((y0 - p.tile) / p.step) + 1), min(p.rows - 1, math.floor(y1 / p.step)) + 1)
        found = (self.by_grid.get((r, c)) for r in rows for c in cols)
        return [i for i in found if i is not None and i != tile.index]

    def _near_seam(self, bounds: tuple[float, float, float, float]) -> bool:
        """Whether the box comes within ``reach`` of a border between cores (where copies can be)."""
        p = self.plan
        half = p.overlap / 2.0
        for lo, hi, count in ((bounds[0], bounds[2], p.cols), (bounds[1], bounds[3], p.rows)):
            # borders at k * step + half, k = 1 .. count - 1
            first = max(1, math.ceil((lo - self.reach - half) / p.step))
            last = min(count - 1, math.floor((hi + self.reach - half) / p.step))
            if first <= last:
                return True
        return False

    def finish(self) -> None:
        """Emit what is still held (tiles of the plan that never came: a cancelled run)."""
        for key in sorted(self._held):
            self._release(key)
        self._waiting.clear()


@dataclass
class _Held:
    geom: BaseGeometry
    cls: int
    extra: dict[str, float] | None
    tile: int
    waiting: int
    key: int = -1

    @property
    def rank(self) -> tuple[float, int]:
        """Of two copies of one object, the lower rank is kept: the larger, then the lower tile index."""
        return (-round(self.geom.area, 6), self.tile)

