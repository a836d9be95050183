"""One engine run session: a model over a tile plan, from pixels to stitched features.

Every planned run goes through :class:`PlanRun`: ``annotate`` and ``predict`` in process, the server's
planned tile jobs (tiles arrive from clients in any order and batches: :meth:`PlanRun.process`) and its
slide jobs (the server reads the slide: :meth:`PlanRun.run`).

:meth:`PlanRun.run` is a pipeline of three stages joined by bounded queues, so memory stays flat and the
model is fed the next batch while the previous one is stitched:

1. reading: blocks of tiles a few plan rows tall (:mod:`qpbridge.engine.reading`) on a thread pool, at
   least ``prefetch_blocks`` and at least two model batches' worth of tiles ahead (so the next batch is
   read while the model runs this one); each band of rows goes on in plan order once it is read;
2. the model: one thread gathers tiles into the card's batches and hands them to ``feeders`` threads
   that call the model (so the next batch is stacked and handed over while the device worker launches
   this one; the worker batches further across callers); results go on in plan order;
   ``thread_safe = False`` families are called one at a time;
3. stitching (blending, class strips and tracing), on the calling thread, at most ``queue_batches``
   batches behind the model. Large plans on machines with cores to spare trace in a child process
   (:mod:`qpbridge.engine.trace_process`, ``RunOptions.trace_process``): the run's threads share one GIL,
   and tracing is a long run of small numpy calls. Tracing on a thread of its own was measured slower
   than inline (it only moves the work under the same lock). On machines with many cores, several
   processes share out the classes (``RunOptions.trace_processes``): a class spanning the slide and a class
   of thousands of small regions trace side by side;
4. features: the traced polygons of each batch are cleaned, measured and turned into GeoJSON in chunks on
   the shared post-processing pool (vectorised shapely calls, which release the GIL), at most a few chunks
   per thread behind the stitcher, and handed to the sink in the order they were traced. (Building them in
   worker processes was measured no faster: the features travel back pickled.) The holes of a region still
   open come early (``vectorise.EarlyHoles``) and are built in tasks of their own; the region, when it
   closes, waits for those tasks and joins them, so the one region spanning a slide, closed last, no longer
   brings all its holes to build at the end.

Each stage's busy time is measured; the model's idle fraction (1 - busy / wall) says how much of the
run the model (the GPU, for a torch family on CUDA) waited for the other stages.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from qpbridge import gc_policy
from qpbridge.engine.features import FeatureBuilder
from qpbridge.engine.morphology import Morphology
from qpbridge.engine.plan import PlannedTile, TilePlan
from qpbridge.engine.reading import ReadBox, band_of, blocks_of, read_block
from qpbridge.engine.stitching import BLEND_WINDOWS, InstanceCollector, SemanticStitcher
from qpbridge.engine.vectorise import EarlyHoles, HoledRegion
from qpbridge.errors import BadRequestError
from qpbridge.families import InstanceResult, SemanticResult, TileResult
from qpbridge.families.params import choice_param
from qpbridge.gil_policy import RUN_SWITCH_INTERVAL_S, run_switch_interval
from qpbridge.kernel_usage import kernel_usage
from qpbridge.pools import pool_size, postprocess_pool, reader_threads
from qpbridge.protocol import TileSpec, planned_tile_spec

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard
    from qpbridge.engine import Engine

Sink = Callable[[dict[str, Any]], None]


@dataclass
class Progress:
    tiles_done: int
    tiles_total: int
    elapsed_s: float

    @property
    def tiles_per_s(self) -> float:
        return self.tiles_done / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        rate = self.tiles_per_s
        return (self.tiles_total - self.tiles_done) / rate if rate > 0 else None


# Tracing moves to a process of its own (:mod:`qpbridge.engine.trace_process`) for plans this large, on machines
# with cores to spare: below that, the process's start and the pipe cost more than the lock it frees.
TRACE_PROCESS_TILES = 2048
TRACE_PROCESS_CORES = 4
# Classes are shared out over several tracing processes on machines with this many cores per process (a GPU
# machine's 16 cores: two), at most TRACE_PROCESSES_MAX: a tissue class spanning the slide and a class of
# thousands of small regions then trace side by side.
TRACE_CORES_PER_PROCESS = 8
TRACE_PROCESSES_MAX = 4


@dataclass
class RunOptions:
    readers: int = field(default_factory=reader_threads)  # threads reading blocks
    prefetch_blocks: int = 8  # block reads in flight (at least two batches' worth)
    queue_batches: int = 2  # model outputs waiting to be stitched
    feeders: int = 2  # threads calling the model, each with one batch
    # Trace class strips in a child process (semantic models): None decides by the plan's size and the cores.
    trace_process: bool | None = None
    # How many processes share out the classes to trace (at most one per emitted class): None decides by the cores.
    trace_processes: int | None = None
    # The interpreter's thread switch interval during the run, at most (:mod:`qpbridge.gil_policy`); None: as is.
    switch_interval_s: float | None = RUN_SWITCH_INTERVAL_S
    # Automatic garbage collection paused during the run (:mod:`qpbridge.gc_policy`).
    pause_gc: bool = True

    def traces_in_process(self, plan: TilePlan | int) -> bool:
        """Whether a run of ``plan`` (or of that many tiles) traces its class strips in processes."""
        if self.trace_process is not None:
            return self.trace_process
        tiles = plan if isinstance(plan, int) else len(plan.tiles)
        return tiles >= TRACE_PROCESS_TILES and (os.cpu_count() or 1) >= TRACE_PROCESS_CORES

    def tracing_processes(self) -> int:
        """Processes tracing a run's classes, when it traces in processes."""
        if self.trace_processes is not None:
            return max(1, self.trace_processes)
        return max(1, min(TRACE_PROCESSES_MAX, (os.cpu_count() or 1) // TRACE_CORES_PER_PROCESS))


@dataclass
class RunStats:
    """Wall time and per-stage busy time of a run (reading is summed over its threads)."""

    tiles: int = 0
    seconds: float = 0.0
    read_s: float = 0.0
    read_wait_s: float = 0.0  # time the model stage waited for pixels: > 0 means reading is the wall
    model_s: float = 0.0  # in model calls, summed over the feeder threads
    feeders: int = 1
    stitch_s: float = 0.0
    stitch_cpu_s: float = 0.0  # of which on a CPU: the rest waited (for the GIL, or for the device)
    stitch_wait_s: float = 0.0  # time the stitching stage waited for model outputs
    features_s: float = 0.0  # building features, summed over the pool's threads
    features: int = 0
    readers: int = 1
    device_s: float | None = None  # time the model's device computed (GPU time on CUDA), when known
    # the run's timeline, seconds from its start: the first block read, the first batch handed to the model, the
    # first and the last model output reaching the stitcher, and the last of them stitched (what follows is the
    # tail: the regions left open, and their features)
    first_read_s: float = 0.0
    first_batch_s: float = 0.0
    first_output_s: float = 0.0
    last_output_s: float = 0.0
    stitched_s: float = 0.0
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_idle_fraction(self) -> float:
        """The part of the run the model (its device when known: the GPU's idle fraction) was not computing."""
        busy = self.device_s if self.device_s is not None else self.model_s / max(1, self.feeders)
        return max(0.0, 1.0 - busy / self.seconds) if self.seconds > 0 else 0.0

    @property
    def limit(self) -> str:
        """The stage that bounds the throughput: the busiest one (reading per reader thread)."""
        busy = {"reading": self.read_s / max(1, self.readers), "model": self.model_s / max(1, self.feeders),
                "stitching": self.stitch_s,
                "features": self.features_s / pool_size()}
        return max(busy, key=lambda k: busy[k])

    def table(self) -> str:
        rate = self.tiles / self.seconds if self.seconds > 0 else 0.0
        device = f" (device {self.device_s:.2f} s)" if self.device_s is not None else ""
        parts = f"{self.stitch_cpu_s:.2f} s on a CPU"
        if "tracing_s" in self.extra:
            parts += (f"; blending {self.extra.get('blending_s', 0.0):.2f} s on {self.extra.get('blend_on') or '-'}, "
                      f"class strips {self.extra['class_strips_s']:.2f} s, tracing {self.extra['tracing_s']:.2f} s")
            if "trace_wait_s" in self.extra:
                n = self.extra["trace_processes"]
                # (the rest of the children's CPU is off their tracing threads)
                parts += (f" (waiting for its {'process' if n == 1 else f'{n} processes'} "
                          f"{self.extra['trace_wait_s']:.2f} s; their CPU {self.extra['trace_process_cpu_s']:.2f} s, "
                          f"tracing threads {self.extra['trace_thread_cpu_s']:.2f} s, the kernel "
                          f"{self.extra['trace_system_cpu_s']:.2f} s, {self.extra['trace_page_faults']:,} page faults, "
                          f"at most {self.extra['trace_process_threads']} threads each)")
        if "handing_features_s" in self.extra:
            parts += f", handing features on {self.extra['handing_features_s']:.2f} s"
        if "finishing_s" in self.extra:
            closing = self.extra.get("closing_s")
            parts += (f"; finishing {self.extra['finishing_s']:.2f} s"
                      + (f" (closing the regions left open {closing:.2f} s)" if closing is not None else "")
                      + f", the slowest feature chunk {self.extra.get('slowest_feature_chunk_s', 0.0):.2f} s")
        if self.extra.get("early_holes"):
            parts += f"; {self.extra['early_holes']} holes traced early"
        kernel = ""
        if "page_faults" in self.extra:  # the process's (tracing processes apart, above)
            kernel = (f"; the process: kernel CPU {self.extra['system_cpu_s']:.2f} s, "
                      f"{self.extra['page_faults']:,} page faults")
        timeline = ""
        if self.last_output_s > 0:
            timeline = (f"; first block read at {self.first_read_s:.2f} s, first batch to the model at "
                        f"{self.first_batch_s:.2f} s, model outputs from {self.first_output_s:.2f} s to "
                        f"{self.last_output_s:.2f} s, stitched at {self.stitched_s:.2f} s")
        return (f"{self.tiles} tiles in {self.seconds:.2f} s ({rate:.1f} tiles/s{timeline}); busy: reading "
                f"{self.read_s:.2f} s over {self.readers} threads, model {self.model_s:.2f} s over {self.feeders} "
                f"feeders{device}, stitching {self.stitch_s:.2f} s ({parts}), features {self.features_s:.2f} s over "
                f"{pool_size()} threads ({self.features} features); model idle "
                f"{100 * self.model_idle_fraction:.0f}% of the run (waiting for pixels {self.read_wait_s:.2f} s); "
                f"limit: {self.limit}{kernel}")


def make_stitcher(card: ModelCard, plan: TilePlan, emit: Callable[[Any, int, dict[str, Any] | None], None]
                  ) -> SemanticStitcher | InstanceCollector:
    """The stitcher of a run; a semantic one emits early holes (built by the run's ``FeatureBuilder``)."""
    if card.task == "instance-segmentation":
        largest = card.max_object_um
        return InstanceCollector(plan, emit, max_object=largest / card.mpp if largest else None)
    return SemanticStitcher(plan, len(card.classes), card.emit_classes, emit,
                            min_area=card.min_area_um2 / card.mpp ** 2,
                            max_hole=card.max_hole_area_um2 / card.mpp ** 2,
                            window=blend_window_param(card), morphology=Morphology.from_card(card),
                            early_holes=True)


def blend_window_param(card: ModelCard) -> str:
    """The card's ``params.blend_window`` (default ``cosine``), checked."""
    return choice_param(card.params, "blend_window", BLEND_WINDOWS, "cosine")


_END = object()
FEATURE_CHUNK = 512  # polygons per feature-building task


class ResultStore(Protocol):
    """Model results kept per tile (a server's on-disk cache): a re-run takes them instead of the model."""

    def get(self, tile: PlannedTile, px: np.ndarray) -> TileResult | None: ...

    def put(self, tile: PlannedTile, px: np.ndarray, result: TileResult) -> None: ...


class _Traced:
    """The stitcher's emit: what it traced, kept for the run's next dispatch. Held apart from the run, so that
    the stitcher holding it makes no reference cycle with the run: a finished run, its buffers and its sink's
    features are freed as soon as its caller lets go of them, not at the next full collection."""

    def __init__(self) -> None:
        self.items: list[tuple[Any, int, dict[str, Any] | None]] = []
        self.early_holes = 0

    def __call__(self, geom: Any, cls: int, extra: dict[str, Any] | None) -> None:
        if isinstance(geom, EarlyHoles):
            self.early_holes += len(geom.holes)
        self.items.append((geom, cls, extra))

    def take(self) -> list[tuple[Any, int, dict[str, Any] | None]]:
        items, self.items = self.items, []
        return items


class PlanRun:
    """A model over one plan: tiles in any order and batches, stitched into features for ``sink``."""

    def __init__(self, engine: Engine, model_name: str, plan: TilePlan, builder: FeatureBuilder,
                 sink: Sink, results: ResultStore | None = None) -> None:
        gc_policy.relax()
        self.engine = engine
        self.model_name = model_name
        self.card = engine.card(model_name)
        self.plan = plan
        self.sink = sink
        self.results = results
        self.cached = 0  # tiles whose result came from ``results``
        self.builder = builder
        self._lock = threading.Lock()
        self._by_origin: dict[tuple[int, int], PlannedTile] | None = None
        self._traced = _Traced()
        self._building: deque[Future[list[dict[str, Any] | None]]] = deque()
        self._early: list[Future[list[dict[str, Any] | None]]] = []  # early holes being built
        self._stats_lock = threading.Lock()
        self.features_s = 0.0
        self.features = 0
        self.handing_s = 0.0  # the stitching thread's time waiting for built features and handing them to the sink
        self.slowest_chunk_s = 0.0  # the longest feature-building task (one region spanning a slide is built alone)
        self.closing_s = 0.0  # the stitcher's finish: the last strips, and closing the regions left open
        self.stitcher = make_stitcher(self.card, plan, self._traced)

    @property
    def early_holes(self) -> int:
        """Holes traced (and built) before their region closed."""
        return self._traced.early_holes

    # ---- features, built off the stitching thread --------------------------------------------------------

    def _build(self, items: list[tuple[Any, int, dict[str, Any] | None]],
               after: Sequence[Future[Any]] = ()) -> list[dict[str, Any] | None]:
        for earlier in after:  # tasks submitted before this one: started already, so this never waits on itself
            earlier.result()
        t = time.perf_counter()
        plan = self.plan
        out = self.builder.build_many([g for g, _, _ in items], [c for _, c, _ in items], plan.origin_x,
                                      plan.origin_y, plan.ds, plan.ds, [e for _, _, e in items])
        took = time.perf_counter() - t
        with self._stats_lock:
            self.features_s += took
            self.slowest_chunk_s = max(self.slowest_chunk_s, took)
        return out

    def _dispatch(self, wait: bool = False) -> None:
        """Send the polygons traced so far to the pool, and the features built so far (in order) to the
        sink; with ``wait``, all of them. Called with ``_lock`` held."""
        traced = self._traced.take()
        pool = postprocess_pool()
        self._early = [f for f in self._early if not f.done()]
        chunk: list[tuple[Any, int, dict[str, Any] | None]] = []

        def submit() -> None:
            # a region with early holes is built once they are
            after = list(self._early) if any(isinstance(g, HoledRegion) for g, _, _ in chunk) else []
            self._building.append(pool.submit(self._build, chunk, after))

        for item in traced:
            if isinstance(item[0], EarlyHoles):  # a task of their own, thousands of holes at a time
                fut = pool.submit(self._build, [item])
                self._building.append(fut)
                self._early.append(fut)
                continue
            chunk.append(item)
            if len(chunk) == FEATURE_CHUNK:
                submit()
                chunk = []
        if chunk:
            submit()
        backlog = 4 * pool_size()  # bounded: the stitcher waits rather than queue without limit
        t = time.perf_counter()
        while self._building and (wait or self._building[0].done() or len(self._building) > backlog):
            for f in self._building.popleft().result():
                if f is not None:
                    self.features += 1
                    self.sink(f)
        self.handing_s += time.perf_counter() - t

    # ---- tiles sent by a client --------------------------------------------------------------------------

    def planned(self, spec: TileSpec, px: np.ndarray) -> tuple[PlannedTile, np.ndarray]:
        """The plan's tile for a tile a client sent: by its ``index``, else by its full-resolution origin.
        A tile read a pixel or two off the planned size (rounding in the client's reader) is resized."""
        tile = self._find(spec)
        if px.shape[:2] != (tile.h, tile.w):
            if abs(px.shape[0] - tile.h) > 2 or abs(px.shape[1] - tile.w) > 2:
                raise BadRequestError(f"tile at ({spec.x}, {spec.y}) is {px.shape[1]}x{px.shape[0]} px; the plan "
                                      f"has {tile.w}x{tile.h} at downsample {self.plan.ds:.6g}")
            import cv2

            px = cv2.resize(np.ascontiguousarray(px), (tile.w, tile.h), interpolation=cv2.INTER_LINEAR)
        return tile, px

    def _find(self, spec: TileSpec) -> PlannedTile:
        tiles = self.plan.tiles
        if spec.index is not None:
            if spec.index >= len(tiles):
                raise BadRequestError(f"tile index {spec.index} is not in this job's plan of {len(tiles)} tiles")
            tile = tiles[spec.index]
            expect = planned_tile_spec(self.plan, tile)
            if abs(expect.x - spec.x) > 1 or abs(expect.y - spec.y) > 1:
                raise BadRequestError(f"tile {spec.index} of the plan is at ({expect.x}, {expect.y}), not "
                                      f"({spec.x}, {spec.y})")
            return tile
        if self._by_origin is None:
            self._by_origin = {(s.x, s.y): t for t in tiles for s in (planned_tile_spec(self.plan, t),)}
        found = self._by_origin.get((spec.x, spec.y))
        if found is None:
            raise BadRequestError(f"tile at ({spec.x}, {spec.y}) is not in this job's plan: send the tiles "
                                  "job.open returned")
        return found

    def process(self, tiles: Sequence[tuple[PlannedTile, np.ndarray]], should_stop: Callable[[], bool] | None = None,
                on_tile: Callable[[int], None] | None = None) -> int:
        """Run the model over ``tiles`` in the card's batches and stitch them; returns how many were done
        (fewer when ``should_stop`` turned true). ``on_tile(i)`` follows each stitched tile."""
        done = 0
        batch = max(1, self.card.batch_size)
        with run_switch_interval(), gc_policy.paused_during_runs():
            for start in range(0, len(tiles), batch):
                if should_stop is not None and should_stop():
                    break
                chunk = range(start, min(start + batch, len(tiles)))
                results = self.infer([tiles[i][0] for i in chunk], [tiles[i][1] for i in chunk])
                self.stitch_batch([tiles[i][0] for i in chunk], results)
                for i in chunk:
                    done += 1
                    if on_tile is not None:
                        on_tile(i)
            with self._lock:  # a client's request is the unit: its features are in before the reply
                self._dispatch(wait=True)
        return done

    def infer(self, tiles: Sequence[PlannedTile], pixels: Sequence[np.ndarray]) -> list[TileResult]:
        """Results of one batch: from the result store where it has them, else from the model (and stored)."""
        if self.results is None:
            return self.engine.infer(self.model_name, pixels)
        found: list[TileResult | None] = [self.results.get(t, px) for t, px in zip(tiles, pixels, strict=True)]
        missing = [i for i, r in enumerate(found) if r is None]
        with self._stats_lock:  # batches may run on several feeder threads
            self.cached += len(tiles) - len(missing)
        if missing:
            fresh = self.engine.infer(self.model_name, [pixels[i] for i in missing])
            for i, result in zip(missing, fresh, strict=True):
                self.results.put(tiles[i], pixels[i], result)
                found[i] = result
        return [r for r in found if r is not None]

    def stitch(self, tile: PlannedTile, result: TileResult) -> None:
        with self._lock:
            _add(self.stitcher, tile, result)
            self._dispatch()

    def stitch_batch(self, tiles: Sequence[PlannedTile], results: Sequence[TileResult]) -> None:
        """Several tiles at once: instance tiles are polygonised in parallel."""
        if isinstance(self.stitcher, InstanceCollector) and all(isinstance(r, InstanceResult) for r in results):
            items = [(t, r) for t, r in zip(tiles, results, strict=True) if isinstance(r, InstanceResult)]
            with self._lock:
                self.stitcher.add_batch(items)
                self._dispatch()
            return
        with self._lock:
            if isinstance(self.stitcher, SemanticStitcher) and all(isinstance(r, SemanticResult) for r in results):
                self.stitcher.add_batch(tiles, [r for r in results if isinstance(r, SemanticResult)])
            else:
                for tile, result in zip(tiles, results, strict=True):
                    _add(self.stitcher, tile, result)
            self._dispatch()

    def finish(self) -> None:
        """Close every region and hand every feature to the sink."""
        with self._lock:
            t = time.perf_counter()
            self.stitcher.finish()
            self.closing_s += time.perf_counter() - t
            self._dispatch(wait=True)

    # ---- the whole plan, read by the engine --------------------------------------------------------------

    def run(self, read_box: ReadBox, *, options: RunOptions | None = None,
            on_progress: Callable[[Progress], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunStats:
        """Read, run and stitch every tile of the plan as a pipeline; features go to the sink."""
        opts = options or RunOptions()
        with run_switch_interval(opts.switch_interval_s), gc_policy.paused_during_runs(opts.pause_gc):
            return self._run(read_box, opts, on_progress, should_stop)

    def _run(self, read_box: ReadBox, opts: RunOptions, on_progress: Callable[[Progress], None] | None,
             should_stop: Callable[[], bool] | None) -> RunStats:
        stats = RunStats(readers=max(1, opts.readers), feeders=max(1, opts.feeders))
        plan = self.plan
        batch_size = max(1, self.card.batch_size)
        outputs: queue.Queue[Any] = queue.Queue(maxsize=max(1, opts.queue_batches))
        stop = threading.Event()
        read_lock = threading.Lock()
        t0 = time.perf_counter()
        system0, faults0 = kernel_usage()

        def timed_read(block: list[PlannedTile]) -> list[tuple[PlannedTile, np.ndarray]]:
            t = time.perf_counter()
            out = read_block(plan, block, read_box)
            with read_lock:
                stats.read_s += time.perf_counter() - t
            return out

        def stopped() -> bool:
            return stop.is_set() or (should_stop is not None and should_stop())

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    outputs.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def timed_infer(tiles: list[PlannedTile], pixels: list[np.ndarray]) -> list[TileResult]:
            t = time.perf_counter()
            results = self.infer(tiles, pixels)
            with read_lock:
                stats.model_s += time.perf_counter() - t
            return results

        def model_stage(pool: ThreadPoolExecutor, feed: ThreadPoolExecutor) -> None:
            inflight: deque[tuple[list[PlannedTile], Future[list[TileResult]]]] = deque()
            try:
                pending: list[tuple[PlannedTile, np.ndarray]] = []

                def deliver(keep: int) -> bool:
                    """Results of the oldest batches in flight, in order, until ``keep`` are left."""
                    while len(inflight) > keep:
                        tiles, fut = inflight.popleft()
                        if not put((tiles, fut.result())):
                            return False
                    return True

                def flush() -> bool:
                    if not stats.first_batch_s:
                        stats.first_batch_s = time.perf_counter() - t0
                    tiles = [tile for tile, _ in pending]
                    inflight.append((tiles, feed.submit(timed_infer, tiles, [px for _, px in pending])))
                    pending.clear()
                    return deliver(stats.feeders - 1)

                blocks = blocks_of(plan)
                per_block = max(1, len(plan.tiles) // max(1, len(blocks)))
                depth = max(opts.prefetch_blocks, -(-2 * batch_size // per_block))
                reads = _ahead(pool, blocks, timed_read, depth)
                band: list[tuple[PlannedTile, np.ndarray]] = []  # a band's tiles, to the model in plan order

                def feed_band() -> bool:
                    band.sort(key=lambda item: item[0].index)
                    for item in band:
                        pending.append(item)
                        if len(pending) >= batch_size and not flush():
                            return False
                    band.clear()
                    return True

                try:
                    for fut in reads:
                        if stopped():
                            return
                        t = time.perf_counter()
                        tiles = fut.result()
                        stats.read_wait_s += time.perf_counter() - t
                        if not stats.first_read_s:
                            stats.first_read_s = time.perf_counter() - t0
                        if tiles and band and band_of(tiles[0][0]) != band_of(band[0][0]) and not feed_band():
                            return
                        band.extend(tiles)
                    if not stopped() and not feed_band():
                        return
                finally:
                    reads.close()  # cancels reads not started
                if pending and not stopped():
                    flush()
                if not stopped():
                    deliver(0)
            except BaseException as exc:
                put(exc)
            finally:
                for _, waiting in inflight:
                    waiting.cancel()
                put(_END)

        if isinstance(self.stitcher, SemanticStitcher) and opts.traces_in_process(plan):
            # before the model loads: a new tracing process imports its libraries (most of a second) meanwhile
            self.stitcher.trace_in_process(opts.tracing_processes())
        try:
            model = self.engine.model(self.model_name)
            device_before = model.device_busy_s()
            done = self._pipeline(opts, stats, model_stage, outputs, stop, t0, on_progress)
            stats.cancelled = done < len(plan.tiles)
            t, c = time.perf_counter(), time.thread_time()
            parts = self._stitch_parts()
            if not stats.cancelled:
                self.finish()
            else:
                # Nothing already found is lost: features traced so far, and instances held back for neighbour
                # tiles that will never come now.
                with self._lock:
                    if isinstance(self.stitcher, InstanceCollector):
                        self.stitcher.finish()
                    else:
                        self.stitcher.sync()
                    self._dispatch(wait=True)
        finally:
            self._close_stitcher()  # after a clean finish there is nothing left to close
        # what is left open to the end (regions reaching the last strip, and their features), beyond the parts
        # counted on their own
        stats.extra["finishing_s"] = time.perf_counter() - t - (self._stitch_parts() - parts)
        stats.stitch_s += time.perf_counter() - t
        stats.stitch_cpu_s += time.thread_time() - c
        stats.tiles = done
        stats.seconds = time.perf_counter() - t0
        system, faults = kernel_usage()  # the process's, over the run
        stats.extra["system_cpu_s"], stats.extra["page_faults"] = system - system0, faults - faults0
        stats.features_s, stats.features = self.features_s, self.features
        device_after = model.device_busy_s()
        if device_before is not None and device_after is not None:
            stats.device_s = device_after - device_before
        if isinstance(self.stitcher, SemanticStitcher):
            stats.extra["stitch_buffer_bytes"] = self.stitcher.buffer_bytes
            stats.extra["blend_on"] = self.stitcher.blend_on
            stats.extra["class_strips_s"] = self.stitcher.classes_s
            stats.extra["tracing_s"] = self.stitcher.trace_s
            stats.extra["blending_s"] = self.stitcher.blend_s
            remote = self.stitcher.remote  # tracing in processes: their CPU, the wait for them
            if remote is not None:
                stats.extra.update(trace_process_cpu_s=remote.busy_s, trace_wait_s=remote.wait_s,
                                   trace_processes=remote.processes, trace_thread_cpu_s=remote.thread_s,
                                   trace_process_threads=remote.threads, trace_system_cpu_s=remote.system_s,
                                   trace_page_faults=remote.faults)
        stats.extra["handing_features_s"] = self.handing_s
        stats.extra["early_holes"] = self.early_holes
        stats.extra["slowest_feature_chunk_s"] = self.slowest_chunk_s
        stats.extra["closing_s"] = self.closing_s
        return stats

    def _stitch_parts(self) -> float:
        st = self.stitcher
        counted = st.blend_s + st.classes_s + st.trace_s if isinstance(st, SemanticStitcher) else 0.0
        return counted + self.handing_s

    def _close_stitcher(self) -> None:
        if isinstance(self.stitcher, SemanticStitcher):
            self.stitcher.close()

    def _pipeline(self, opts: RunOptions, stats: RunStats,
                  model_stage: Callable[[ThreadPoolExecutor, ThreadPoolExecutor], None], outputs: queue.Queue[Any],
                  stop: threading.Event, t0: float, on_progress: Callable[[Progress], None] | None) -> int:
        """Start reading and the model, stitch what comes out on this thread; returns the tiles stitched."""
        plan = self.plan
        done = 0
        with ThreadPoolExecutor(stats.readers, thread_name_prefix="qpbridge-reader") as pool, \
                ThreadPoolExecutor(stats.feeders, thread_name_prefix="qpbridge-feed") as feed:
            worker = threading.Thread(target=model_stage, args=(pool, feed), name="qpbridge-model-feed",
                                      daemon=True)
            worker.start()
            try:
                while True:
                    t = time.perf_counter()
                    item = outputs.get()
                    stats.stitch_wait_s += time.perf_counter() - t
                    if item is _END:
                        break
                    stats.last_output_s = time.perf_counter() - t0
                    if not stats.first_output_s:
                        stats.first_output_s = stats.last_output_s
                    if isinstance(item, BaseException):
                        raise item
                    tiles, results = item
                    t, c = time.perf_counter(), time.thread_time()
                    self.stitch_batch(tiles, results)
                    stats.stitch_s += time.perf_counter() - t
                    stats.stitch_cpu_s += time.thread_time() - c
                    done += len(tiles)
                    stats.stitched_s = time.perf_counter() - t0
                    if on_progress is not None:
                        on_progress(Progress(done, len(plan.tiles), time.perf_counter() - t0))
            finally:
                stop.set()
                worker.join()
        return done


def _ahead(pool: ThreadPoolExecutor, blocks: list[list[PlannedTile]],
           read: Callable[[list[PlannedTile]], list[tuple[PlannedTile, np.ndarray]]],
           depth: int) -> Generator[Future[list[tuple[PlannedTile, np.ndarray]]], None, None]:
    """Futures of block reads in plan order, keeping at most ``depth`` reads in flight."""
    waiting: list[Future[list[tuple[PlannedTile, np.ndarray]]]] = []
    try:
        for b in blocks:
            waiting.append(pool.submit(read, b))
            if len(waiting) >= depth:
                yield waiting.pop(0)
        while waiting:
            yield waiting.pop(0)
    finally:
        for f in waiting:
            f.cancel()


def _add(stitcher: SemanticStitcher | InstanceCollector, tile: PlannedTile, result: Any) -> None:
    if isinstance(stitcher, InstanceCollector):
        if not isinstance(result, InstanceResult):
            raise TypeError("an instance-segmentation card needs a family returning InstanceResult")
        stitcher.add(tile, result)
    else:
        if not isinstance(result, SemanticResult):
            raise TypeError("a semantic card needs a family returning SemanticResult")
        stitcher.add(tile, result)

