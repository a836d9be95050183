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
from qpbridge.engine import Engine
from qpbridge.engine.features import FeatureBuilder
from qpbridge.engine.plan import TilePlan, make_plan
from qpbridge.engine.reading import BLOCK_PX, ReadBox, blocks_of, read_block
from qpbridge.engine.session import PlanRun, Progress, RunOptions, RunStats, make_stitcher
from qpbridge.slides import Slide

log = logging.getLogger("qpbridge")

TISSUE_MODEL = "tissue"

__all__ = ["BLOCK_PX", "TISSUE_MODEL", "AnnotateResult", "PlanRun", "Progress", "RunOptions", "RunStats",
           "annotate_slide", "blocks_of", "make_stitcher", "read_block", "run_plan", "tissue_geometry"]


def run_plan(engine: Engine, model_name: str, plan: TilePlan, read_box: ReadBox, builder: FeatureBuilder, *,
             readers: int = 2, prefetch_blocks: int = 8,
             on_progress: Callable[[Progress], None] | None = None,
             should_stop: Callable[[], bool] | None = None,
             sink: Callable[[dict[str, Any]], None] | None = None) -> tuple[list[dict[str, Any]], RunStats]:
    """Run a model over a plan and return stitched features (full resolution) and timings.

    With ``sink``, each feature goes to it as soon as it is final (and the returned list stays empty),
    so a server can page results out while the slide is still running.
    """
    features: list[dict[str, Any]] = []
    run = PlanRun(engine, model_name, plan, builder, sink if sink is not None else features.append)
    stats = run.run(read_box, options=RunOptions(readers=readers, prefetch_blocks=prefetch_blocks),
                    on_progress=on_progress, should_stop=should_stop)
    return features, stats


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
                   options: RunOptions | None = None,
                   on_progress: Callable[[Progress], None] | None = None,
                   should_stop: Callable[[], bool] | None = None,
                   on_plan: Callable[[TilePlan], None] | None = None,
                   sink: Callable[[dict[str, Any]], None] | None = None) -> AnnotateResult:
    """Annotate a whole slide (or the part inside ``roi``) with a model; features in full resolution.
    ``options`` (readers, queue depths) overrides ``readers``."""
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
    features: list[dict[str, Any]] = []
    run = PlanRun(engine, model_name, plan, builder, sink if sink is not None else features.append)
    stats = run.run(slide.read, options=options or RunOptions(readers=readers), on_progress=on_progress,
                    should_stop=should_stop)
    return AnnotateResult(features, plan, stats, slide)
