"""Regions of interest from GeoJSON files (QuPath exports, single geometries, feature collections)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import shapely
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from qpbridge.errors import BadRequestError


def geometry_from_geojson(data: Any) -> BaseGeometry:
    """Union of the polygonal geometries in a GeoJSON object (Feature, FeatureCollection, list, geometry)."""
    if isinstance(data, list):
        parts = [geometry_from_geojson(d) for d in data]
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        parts = [geometry_from_geojson(f) for f in data.get("features", [])]
    elif isinstance(data, dict) and data.get("type") == "Feature":
        if not data.get("geometry"):
            raise BadRequestError("ROI feature has no geometry")
        parts = [geometry_from_geojson(data["geometry"])]
    elif isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon"):
        try:
            geom = shape(data)
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise BadRequestError(f"ROI geometry is not valid GeoJSON: {exc}") from None
        return shapely.make_valid(geom) if not geom.is_valid else geom
    else:
        kind = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise BadRequestError(f"ROI must be a Polygon/MultiPolygon GeoJSON geometry, Feature or FeatureCollection, "
                              f"got {kind}")
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
