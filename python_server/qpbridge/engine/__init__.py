"""The engine: model cards and loaded models (``models``), tile plans (``plan``), reading slides in
blocks (``reading``), the run session that pipelines reading, the model and stitching (``session``),
blending tiles (``stitching``), class rasters to polygons (``vectorise``) and polygons to QuPath
features (``features``)."""

from qpbridge.engine.models import RESAMPLE_TOLERANCE, Engine
from qpbridge.engine.plan import PlannedTile, TilePlan, make_plan
from qpbridge.engine.session import PlanRun, Progress, RunOptions, RunStats

__all__ = ["RESAMPLE_TOLERANCE", "Engine", "PlanRun", "PlannedTile", "Progress", "RunOptions", "RunStats",
           "TilePlan", "make_plan"]
