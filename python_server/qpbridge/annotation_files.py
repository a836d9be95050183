"""Annotations read from files, for training and evaluation: QuPath GeoJSON and Aperio ImageScope XML.

QuPath GeoJSON as QuPath exports it (a FeatureCollection, or a bare list of Features; ``classification`` with
``name`` and ``color`` or the older ``colorRGB``; Polygon or MultiPolygon with holes; cells with a
``nucleusGeometry``) and as ``qpbridge annotate`` writes it. ImageScope XML as MoNuSeg ships it: one
``<Region>`` per object, vertices in full-resolution pixels; a region with ``NegativeROA="1"`` is a hole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapely.geometry.base import BaseGeometry

from qpbridge.errors import BadRequestError

__all__ = ["AnnotatedObject", "annotation_file_for", "read_annotations", "read_geojson_objects",
           "read_imagescope_xml"]

ANNOTATION_SUFFIXES = (".qpbridge.geojson", ".geojson", ".json", ".xml")


@dataclass
class AnnotatedObject:
    """One object: polygonal geometry in full-resolution pixels, its class (None: unclassified), colour."""

    geometry: BaseGeometry
    class_name: str | None
    color: tuple[int, int, int] | None = None
    object_type: str = "annotation"


def _valid_polygonal(geom: BaseGeometry) -> BaseGeometry:
    """Polygons only, repaired when self-intersecting (hand-drawn outlines often are)."""
    import shapely
    from shapely.geometry import MultiPolygon, Polygon

    if not geom.is_valid:
        geom = shapely.make_valid(geom)
    if isinstance(geom, (Polygon, MultiPolygon)):
        return geom
    polys = [g for g in getattr(geom, "geoms", []) if isinstance(g, (Polygon, MultiPolygon))]
    return shapely.union_all(polys) if polys else Polygon()


def _color(value: Any) -> tuple[int, int, int] | None:
    if isinstance(value, list) and len(value) >= 3:
        return (int(value[0]), int(value[1]), int(value[2]))
    if isinstance(value, int):  # QuPath 0.2's packed colorRGB (ARGB int)
        v = value & 0xFFFFFF
        return ((v >> 16) & 255, (v >> 8) & 255, v & 255)
    return None


def _features(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, list):
        return [f for f in data if isinstance(f, dict)]
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        return list(data.get("features") or [])
    if isinstance(data, dict) and data.get("type") == "Feature":
        return [data]
    if isinstance(data, dict) and data.get("type") in ("Polygon", "MultiPolygon"):
        return [{"type": "Feature", "geometry": data, "properties": {}}]
    raise BadRequestError(f"{path}: not QuPath GeoJSON (expected a FeatureCollection or a list of Features)")


def read_geojson_objects(data: Any, path: Path, *, use_nuclei: bool = False) -> list[AnnotatedObject]:
    """Objects of QuPath GeoJSON; lines and points are skipped (they have no area to learn from).
    ``use_nuclei``: a cell's nucleus outline instead of the cell's."""
    from shapely.geometry import shape

    out = []
    for i, f in enumerate(_features(data, path)):
        props = f.get("properties") or {}
        geometry = f.get("nucleusGeometry") if use_nuclei and f.get("nucleusGeometry") else f.get("geometry")
        if not geometry or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        try:
            geom = _valid_polygonal(shape(geometry))
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
            raise BadRequestError(f"{path}: feature {i} has an invalid geometry: {exc}") from None
        if geom.is_empty:
            continue
        cls = props.get("classification") or {}
        if isinstance(cls, str):
            cls = {"name": cls}
        name = cls.get("name") or (cls.get("names") or [None])[0] if isinstance(cls, dict) else None
        color = _color(cls.get("color", cls.get("colorRGB"))) if isinstance(cls, dict) else None
        out.append(AnnotatedObject(geom, name, color, str(props.get("objectType", "annotation"))))
    return out


def read_imagescope_xml(path: Path) -> list[AnnotatedObject]:
    """Objects of an Aperio ImageScope annotation file. The class is the ``<Annotation>``'s Name (or its
    first non-empty attribute value); MoNuSeg's files name none, so their objects are unclassified."""
    import xml.etree.ElementTree as ET

    from shapely.geometry import Polygon

    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise BadRequestError(f"{path}: not valid XML: {exc}") from None
    if root.tag != "Annotations":
        raise BadRequestError(f"{path}: not an ImageScope annotation file (root <{root.tag}>, not <Annotations>)")
    out = []
    for ann in root.iter("Annotation"):
        name = (ann.get("Name") or "").strip() or None
        if name is None:
            for attr in ann.iter("Attribute"):
                if (attr.get("Value") or "").strip():
                    name = attr.get("Value", "").strip()
                    break
        line = ann.get("LineColor")
        color = None
        if line and line.lstrip("-").isdigit():
            v = int(line) & 0xFFFFFF  # Windows COLORREF: 0x00BBGGRR
            color = (v & 255, (v >> 8) & 255, (v >> 16) & 255)
        holes: list[BaseGeometry] = []
        shells: list[BaseGeometry] = []
        for region in ann.iter("Region"):
            pts = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
            if len(pts) < 3:
                continue
            poly = _valid_polygonal(Polygon(pts))
            if poly.is_empty:
                continue
            (holes if region.get("NegativeROA") == "1" else shells).append(poly)
        for poly in shells:
            for h in holes:
                if poly.intersects(h):
                    poly = _valid_polygonal(poly.difference(h))
            if not poly.is_empty:
                out.append(AnnotatedObject(poly, name, color))
    return out


def read_annotations(path: Path, *, use_nuclei: bool = False) -> list[AnnotatedObject]:
    """Objects of a QuPath GeoJSON (``.geojson``/``.json``) or ImageScope XML (``.xml``) file."""
    path = Path(path)
    if not path.is_file():
        raise BadRequestError(f"annotation file {path} does not exist")
    if path.suffix.lower() == ".xml":
        return read_imagescope_xml(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"{path}: not JSON ({exc}); annotations must be QuPath GeoJSON or ImageScope XML") \
            from None
    return read_geojson_objects(data, path, use_nuclei=use_nuclei)


def annotation_file_for(image: Path, folder: Path | None = None) -> Path | None:
    """The annotation file of an image in ``folder`` (default: beside it): ``<name>.qpbridge.geojson``,
    ``<stem>.geojson``, ``<stem>.json`` or ``<stem>.xml``, the first that exists."""
    folder = folder if folder is not None else image.parent
    for candidate in (image.name + ".qpbridge.geojson", image.stem + ".geojson", image.stem + ".json",
                      image.stem + ".xml"):
        if (folder / candidate).is_file():
            return folder / candidate
    return None
