"""Whole-slide annotation: tissue detection, the tile plan, and a :class:`~qpbridge.engine.session.PlanRun`.

Reading, the model and stitching run as a pipeline in :mod:`qpbridge.engine.session`; this module decides what
to run (tissue filter, ROI, region) and collects the features.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from qpbridge.cards import ModelCard
from qpbridge.engine import Engine, trace_process
from qpbridge.engine.features import FeatureBuilder
from qpbridge.engine.plan import TilePlan, grid_tiles, make_plan
from qpbridge.engine.reading import ReadBox
from qpbridge.engine.session import PlanRun, Progress, ResultStore, RunOptions, RunStats
from qpbridge.slides import Slide

log = logging.getLogger("qpbridge")

TISSUE_MODEL = "tissue"

__all__ = ["TISSUE_MODEL", "AnnotateResult", "annotate_image", "annotate_slide", "roi_region", "run_plan",
           "tissue_geometry"]


def roi_region(roi: BaseGeometry | None, width: int, height: int) -> tuple[int, int, int, int]:
    """The region ``(x, y, w, h)`` to plan over: the ROI's bounding box cut to the image, or the whole image."""
    if roi is None or roi.is_empty:
        return (0, 0, width, height)
    bx0, by0, bx1, by1 = roi.bounds
    x0, y0 = max(0, int(bx0)), max(0, int(by0))
    return (x0, y0, min(width, int(np.ceil(bx1))) - x0, min(height, int(np.ceil(by1))) - y0)


def run_plan(engine: Engine, model_name: str, plan: TilePlan, read_box: ReadBox, builder: FeatureBuilder, *,
             options: RunOptions | None = None,
             on_progress: Callable[[Progress], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             sink: Callable[[dict[str, Any]], None] | None = None,
             results: ResultStore | None = None) -> tuple[list[dict[str, Any]], RunStats]:
    """Run a model over a plan and return stitched features (full resolution) and timings.

    With ``sink``, each feature goes to it as soon as it is final (and the returned list stays empty),
    so a server can page results out while the slide is still running. ``results``: a store of tile
    results (a server's cache) that a re-run takes instead of running the model again.
    """
    features: list[dict[str, Any]] = []
    run = PlanRun(engine, model_name, plan, builder, sink if sink is not None else features.append, results)
    stats = run.run(read_box, options=options, on_progress=on_progress, should_stop=should_stop)
    stats.extra["cached_tiles"] = run.cached
    return features, stats


def _reader(slide: Slide, plan: TilePlan) -> ReadBox:
    """The slide's reads for a run of ``plan``, whose blocks overlap by the plan's overlap (the slide keeps the
    stored tiles there decoded for the next block)."""
    slide.read_overlap = plan.overlap * plan.ds
    return slide.read


def tissue_geometry(engine: Engine, slide: Slide, roi: BaseGeometry | None = None) -> BaseGeometry:
    """Tissue of the slide (full-resolution geometry) from the built-in tissue model at low resolution."""
    import shapely
    from shapely.geometry import shape

    card = engine.card(TISSUE_MODEL)
    mpp = slide.require_mpp()
    region = (0, 0, slide.width, slide.height)
    plan = make_plan(card, region, mpp, roi)
    feats, _ = run_plan(engine, TISSUE_MODEL, plan, _reader(slide, plan),
                        FeatureBuilder(card, mpp, roi, (slide.width, slide.height)))
    return shapely.union_all([shape(f["geometry"]) for f in feats]) if feats else shapely.Polygon()


@dataclass
class AnnotateResult:
    features: list[dict[str, Any]]
    plan: TilePlan
    stats: RunStats
    slide: Slide


def annotate_slide(engine: Engine, path: Path, model_name: str, *, mpp: float | None = None,
                   roi: BaseGeometry | None = None, tissue_filter: bool = True, readers: int | None = None,
                   options: RunOptions | None = None,
                   on_progress: Callable[[Progress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   on_plan: Callable[[TilePlan], None] | None = None,
                   sink: Callable[[dict[str, Any]], None] | None = None,
                   slide: Slide | None = None,
                   results: Callable[[Slide, TilePlan], ResultStore] | None = None) -> AnnotateResult:
    """Annotate a whole slide (or the part inside ``roi``) with a model; features in full resolution.
    ``options`` (readers, queue depths) overrides ``readers``; ``slide``: the slide already opened;
    ``results``: makes the store of tile results for the slide's plan (a server's cache)."""
    slide = slide or Slide(path, mpp)
    card: ModelCard = engine.card(model_name)
    fullres_mpp = slide.require_mpp() if card.requires_mpp else slide.mpp
    if options is None:
        options = RunOptions() if readers is None else RunOptions(readers=readers)
    region = roi_region(roi, slide.width, slide.height)
    emitted = len(card.emit_classes)
    if card.task == "semantic-segmentation" and emitted and options.traces_in_process(
            grid_tiles(card, region, fullres_mpp)):
        # a large run will trace in processes: started now, their start-up overlaps the tissue run and planning
        trace_process.prestart(min(emitted, options.tracing_processes()))
    keep = roi
    if tissue_filter and card.name != TISSUE_MODEL and card.params.get("tissue_filter", True):
        tissue = tissue_geometry(engine, slide, roi)
        keep = tissue if roi is None else tissue.intersection(roi)
        log.info("tissue covers %.1f%% of %s", 100 * tissue.area / (slide.width * slide.height), slide.name)
        if tissue.is_empty:
            log.warning("no tissue found in %s: nothing to run (use --no-tissue-filter to run anyway)", slide.name)
    plan = make_plan(card, region, fullres_mpp, keep)
    log.info("%s: %d of %d tiles to run (%d px at %.3g µm/px, overlap %d)", slide.name, len(plan.tiles),
             plan.rows * plan.cols, plan.tile, card.mpp, plan.overlap)
    if on_plan is not None:
        on_plan(plan)
    builder = FeatureBuilder(card, fullres_mpp, roi, (slide.width, slide.height))
    features, stats = run_plan(engine, model_name, plan, _reader(slide, plan), builder,
                               options=options, on_progress=on_progress,
                               should_stop=should_stop, sink=sink,
                               results=results(slide, plan) if results is not None else None)
    return AnnotateResult(features, plan, stats, slide)


def annotate_image(engine: Engine, model_name: str, rgb: np.ndarray, mpp: float | None, *, name: str = "",
                   roi: BaseGeometry | None = None,
                   on_progress: Callable[[Progress], None] | None = None) -> tuple[list[dict[str, Any]], RunStats]:
    """A model over an image held in memory (PNG/JPEG/TIFF read whole): planned, run and stitched as a slide is."""
    from qpbridge.images import ArrayImage
    from qpbridge.protocol import ImageInfo

    source = ArrayImage(rgb)
    card = engine.check_image(model_name, ImageInfo(name=name, mpp=mpp, width=source.width, height=source.height))
    plan = make_plan(card, roi_region(roi, source.width, source.height), mpp, roi)
    return run_plan(engine, model_name, plan, source.read,
                    FeatureBuilder(card, mpp, roi, (source.width, source.height)), on_progress=on_progress)
