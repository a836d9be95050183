"""Regions of interest from GeoJSON files (QuPath exports, single geometries, feature collections)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import shapely
import shapely.errors
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from qpbridge.errors import BadRequestError


def geometry_from_geojson(data: Any, *, max_repair_vertices: int | None = None) -> BaseGeometry:
    """Union of the polygonal geometries in a GeoJSON object (Feature, FeatureCollection, list, geometry).

    Invalid (self-intersecting) polygons are repaired; repair time grows steeply with the number of
    crossings, so a server passes ``max_repair_vertices``: invalid polygons with more vertices in all are
    refused instead of repaired."""
    budget = [max_repair_vertices]
    return _geometry(data, budget)


def _geometry(data: Any, budget: list[int | None]) -> BaseGeometry:
    if isinstance(data, list):
        parts = [_geometry(d, budget) for d in data]
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
        if not isinstance(features, list):
            raise BadRequestError("ROI FeatureCollection: 'features' must be a list")
        parts = [_geometry(f, budget) for f in features]
    elif isinstance(data, dict) and data.get("type") == "Feature":
        if not data.get("geometry"):
            raise BadRequestError("ROI feature has no geometry")
        parts = [_geometry(data["geometry"], budget)]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon"):
        try:
            geom = shape(data)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError, shapely.errors.GEOSException) as exc:
            raise BadRequestError(f"ROI geometry is not valid GeoJSON: {str(exc)[:200]}") from None
        if geom.is_valid:
            return geom
        if budget[0] is not None:
            budget[0] -= int(shapely.get_num_coordinates(geom))
            if budget[0] < 0:
                raise BadRequestError("ROI polygon crosses itself and has too many vertices to repair here; "
                                      "send a valid polygon (QuPath's own ROIs are)")
        return shapely.make_valid(geom)
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise BadRequestError(f"ROI must be a Polygon/MultiPolygon GeoJSON geometry, Feature or FeatureCollection, "
                              f"got {str(kind)[:40]}")
    parts = [p for p in parts if not p.is_empty]
    if not parts:
        raise BadRequestError("ROI holds no polygon")
    return shapely.union_all(parts)


def read_roi(path: Path) -> BaseGeometry:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadRequestError(f"ROI file {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise BadRequestError(f"ROI file {path} is not JSON: {exc}") from None
    return geometry_from_geojson(data)
