"""Whole-slide annotation: plan tiles, read them in blocks on a thread pool while the model runs, stitch.

Reading one 256 px tile at a time decodes each JPEG tile of the slide several times, so tiles of one
row are read together as blocks of up to ``BLOCK_PX`` canvas pixels and sliced. Blocks are read ahead
by a thread pool (bounded, so memory stays flat) while the calling thread runs the model and stitches.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpbridge.cards import ModelCard
from qpbridge.engine import Engine
from qpbridge.errors import BadRequestError
from qpbridge.families import InstanceResult, SemanticResult
from qpbridge.plan import PlannedTile, TilePlan, make_plan
from qpbridge.postprocess import FeatureBuilder
from qpbridge.protocol import TileSpec
from qpbridge.slides import Slide
from qpbridge.stitching import Emit, InstanceCollector, SemanticStitcher

log = logging.getLogger("qpbridge")

BLOCK_PX = 2048
TISSUE_MODEL = "tissue"

ReadBox = Callable[[float, float, float, float, int, int], np.ndarray]


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


@dataclass
class RunStats:
    tiles: int = 0
    seconds: float = 0.0
    read_wait_s: float = 0.0  # time the model thread waited for pixels: >0 means reading is the wall
    model_s: float = 0.0
    stitch_s: float = 0.0
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def make_stitcher(card: ModelCard, plan: TilePlan, emit: Emit) -> SemanticStitcher | InstanceCollector:
    if card.task == "instance-segmentation":
        return InstanceCollector(plan, emit)
    emit_classes = [i for i, c in enumerate(card.classes) if c.emit]
    return SemanticStitcher(plan, len(card.classes), emit_classes, emit,
                            min_area=card.min_area_um2 / card.mpp ** 2,
                            max_hole=card.max_hole_area_um2 / card.mpp ** 2)


class PlanStitch:
    """Stitching for a job whose client sends the tiles of a plan the server made (any order, any batch).

    Tiles are matched to the plan by their full-resolution origin; a tile read a pixel larger or smaller
    than planned (rounding in the client's reader) is resized to the planned size.
    """

    def __init__(self, card: ModelCard, plan: TilePlan, builder: FeatureBuilder,
                 sink: Callable[[dict[str, Any]], None]) -> None:
        self.card = card
        self.plan = plan
        specs = [(plan.tile_spec(t), t) for t in plan.tiles]
        self.by_origin = {(spec.x, spec.y): t for spec, t in specs}
        self._lock = threading.Lock()

        def emit(geom: BaseGeometry, cls: int, extra: dict[str, Any] | None) -> None:
            f = builder.build(geom, cls, plan.origin_x, plan.origin_y, plan.ds, plan.ds, extra)
            if f is not None:
                sink(f)

        self.stitcher = make_stitcher(card, plan, emit)

    def planned(self, spec: TileSpec, px: np.ndarray) -> tuple[PlannedTile, np.ndarray]:
        tile = self.by_origin.get((spec.x, spec.y))
        if tile is None:
            raise BadRequestError(f"tile at ({spec.x}, {spec.y}) is not in this job's plan: send the tiles "
                                  "job.open returned")
        if px.shape[:2] != (tile.h, tile.w):
            if abs(px.shape[0] - tile.h) > 2 or abs(px.shape[1] - tile.w) > 2:
                raise BadRequestError(f"tile at ({spec.x}, {spec.y}) is {px.shape[1]}x{px.shape[0]} px; the plan "
                                      f"has {tile.w}x{tile.h} at downsample {self.plan.ds:.6g}")
            import cv2

            px = cv2.resize(np.ascontiguousarray(px), (tile.w, tile.h), interpolation=cv2.INTER_LINEAR)
        return tile, px

    def add(self, tile: PlannedTile, result: Any) -> None:
        with self._lock:
            _add(self.stitcher, tile, result)

    def finish(self) -> None:
        with self._lock:
            self.stitcher.finish()


def blocks_of(plan: TilePlan, block_px: int = BLOCK_PX) -> list[list[PlannedTile]]:
    """Tiles grouped into row blocks of consecutive tiles spanning at most ``block_px`` canvas pixels."""
    blocks: list[list[PlannedTile]] = []
    current: list[PlannedTile] = []
    for t in plan.tiles:  # plan order is row-major
        if current and (t.row != current[0].row or t.col != current[-1].col + 1
                        or t.x + t.w - current[0].x > block_px):
            blocks.append(current)
            current = []
        current.append(t)
    if current:
        blocks.append(current)
    return blocks


def read_block(plan: TilePlan, block: list[PlannedTile], read_box: ReadBox) -> list[tuple[PlannedTile, np.ndarray]]:
    """Read the block's bounding box once, at canvas resolution, and slice its tiles."""
    x0 = block[0].x
    x1 = max(t.x + t.w for t in block)
    y0 = block[0].y
    y1 = max(t.y + t.h for t in block)
    ds = plan.ds
    px = read_box(plan.origin_x + x0 * ds, plan.origin_y + y0 * ds, plan.origin_x + x1 * ds,
                  plan.origin_y + y1 * ds, x1 - x0, y1 - y0)
    return [(t, np.ascontiguousarray(px[t.y - y0:t.y - y0 + t.h, t.x - x0:t.x - x0 + t.w])) for t in block]


def run_plan(engine: Engine, model_name: str, plan: TilePlan, read_box: ReadBox, builder: FeatureBuilder, *,
             readers: int = 2, prefetch_blocks: int = 4,
             on_progress: Callable[[Progress], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             sink: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], RunStats]:
    """Run a model over a plan and return stitched features (full resolution) and timings.

    With ``sink``, each feature goes to it as soon as it is final (and the returned list stays empty),
    so a server can page results out while the slide is still running.
    """
    card = engine.card(model_name)
    model = engine.model(model_name)
    features: list[dict[str, Any]] = []
    put = sink if sink is not None else features.append
    stats = RunStats()

    def emit(geom: BaseGeometry, cls: int, extra: dict[str, Any] | None) -> None:
        f = builder.build(geom, cls, plan.origin_x, plan.origin_y, plan.ds, plan.ds, extra)
        if f is not None:
            put(f)

    stitcher = make_stitcher(card, plan, emit)

    t0 = time.perf_counter()
    blocks = blocks_of(plan)
    batch_size = max(1, card.batch_size)
    done = 0
    pending: list[tuple[PlannedTile, np.ndarray]] = []

    def flush() -> None:
        nonlocal done
        t = time.perf_counter()
        results = model.predict([px for _, px in pending])
        stats.model_s += time.perf_counter() - t
        t = time.perf_counter()
        for (tile, _), result in zip(pending, results, strict=True):
            _add(stitcher, tile, result)
        stats.stitch_s += time.perf_counter() - t
        done += len(pending)
        pending.clear()
        if on_progress is not None:
            on_progress(Progress(done, len(plan.tiles), time.perf_counter() - t0))

    with ThreadPoolExecutor(max(1, readers), thread_name_prefix="qpbridge-reader") as pool:
        for fut in _ahead(pool, blocks, plan, read_box, prefetch_blocks):
            if should_stop is not None and should_stop():
                stats.cancelled = True
                break
            t = time.perf_counter()
            tiles = fut.result()
            stats.read_wait_s += time.perf_counter() - t
            for item in tiles:
                pending.append(item)
                if len(pending) >= batch_size:
                    flush()
        if pending and not stats.cancelled:
            flush()
    if not stats.cancelled:
        t = time.perf_counter()
        stitcher.finish()
        stats.stitch_s += time.perf_counter() - t
    stats.tiles = done
    stats.seconds = time.perf_counter() - t0
    if isinstance(stitcher, SemanticStitcher):
        stats.extra["stitch_buffer_bytes"] = stitcher.buffer_bytes
    return features, stats


def _ahead(pool: ThreadPoolExecutor, blocks: list[list[PlannedTile]], plan: TilePlan, read_box: ReadBox,
           depth: int) -> Iterator[Future[list[tuple[PlannedTile, np.ndarray]]]]:
    """Futures of block reads in plan order, keeping at most ``depth`` reads in flight."""
    queue: list[Future[list[tuple[PlannedTile, np.ndarray]]]] = []
    it = iter(blocks)
    try:
        for b in it:
            queue.append(pool.submit(read_block, plan, b, read_box))
            if len(queue) >= depth:
                yield queue.pop(0)
        while queue:
            yield queue.pop(0)
    finally:
        for f in queue:
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


def tissue_geometry(engine: Engine, slide: Slide, roi: BaseGeometry | None = None) -> BaseGeometry:
    """Tissue of the slide (full-resolution geometry) from the built-in tissue model at low resolution."""
    import shapely
    from shapely.geometry import shape

    card = engine.card(TISSUE_MODEL)
    mpp = slide.require_mpp()
    region = (0, 0, slide.width, slide.height)
    plan = make_plan(card, region, mpp, roi)
    feats, _ = run_plan(engine, TISSUE_MODEL, plan, slide.read,
                        FeatureBuilder(card, mpp, roi, (slide.width, slide.height)))
    return shapely.union_all([shape(f["geometry"]) for f in feats]) if feats else shapely.Polygon()


@dataclass
class AnnotateResult:
    features: list[dict[str, Any]]
    plan: TilePlan
    stats: RunStats
    slide: Slide


def annotate_slide(engine: Engine, path: Path, model_name: str, *, mpp: float | None = None,
                   roi: BaseGeometry | None = None, tissue_filter: bool = True, readers: int = 2,
                   on_progress: Callable[[Progress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   on_plan: Callable[[TilePlan], None] | None = None,
                   sink: Callable[[dict[str, Any]], None] | None = None) -> AnnotateResult:
    """Annotate a whole slide (or the part inside ``roi``) with a model; features in full resolution."""
    slide = Slide(path, mpp)
    card: ModelCard = engine.card(model_name)
    fullres_mpp = slide.require_mpp() if card.requires_mpp else slide.mpp
    keep = roi
    if tissue_filter and card.name != TISSUE_MODEL and card.params.get("tissue_filter", True):
        tissue = tissue_geometry(engine, slide, roi)
        keep = tissue if roi is None else tissue.intersection(roi)
        log.info("tissue covers %.1f%% of %s", 100 * tissue.area / (slide.width * slide.height), path.name)
        if tissue.is_empty:
            log.warning("no tissue found in %s: nothing to run (use --no-tissue-filter to run anyway)", path.name)
    region = (0, 0, slide.width, slide.height)
    if roi is not None and not roi.is_empty:
        bx0, by0, bx1, by1 = roi.bounds
        x0, y0 = max(0, int(bx0)), max(0, int(by0))
        region = (x0, y0, min(slide.width, int(np.ceil(bx1))) - x0, min(slide.height, int(np.ceil(by1))) - y0)
    plan = make_plan(card, region, fullres_mpp, keep)
    log.info("%s: %d of %d tiles to run (%d px at %.3g µm/px, overlap %d)", path.name, len(plan.tiles),
             plan.rows * plan.cols, plan.tile, card.mpp, plan.overlap)
    if on_plan is not None:
        on_plan(plan)
    builder = FeatureBuilder(card, fullres_mpp, roi, (slide.width, slide.height))
    features, stats = run_plan(engine, model_name, plan, slide.read, builder, readers=readers,
                               on_progress=on_progress, should_stop=should_stop, sink=sink)
    return AnnotateResult(features, plan, stats, slide)
