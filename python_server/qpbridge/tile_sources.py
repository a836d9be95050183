"""Where ``export-tiles`` finds images and their annotations: files, folders, or a QuPath project (through paquo,
or the sidecar GeoJSON files beside its images when Java is not available)."""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qpbridge.annotation_files import AnnotatedObject, annotation_file_for, read_annotations
from qpbridge.errors import BadRequestError, ProjectError
from qpbridge.tile_export import Source

log = logging.getLogger("qpbridge")

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".svs", ".ndpi", ".scn", ".bif", ".qptiff"}
OBJECT_KINDS = ("all", "annotations", "detections")

__all__ = ["OBJECT_KINDS", "is_project", "project_sources", "sources_from_paths"]


def _keep(objects: list[AnnotatedObject], kind: str) -> list[AnnotatedObject]:
    if kind == "annotations":
        return [o for o in objects if o.object_type == "annotation"]
    if kind == "detections":
        return [o for o in objects if o.object_type != "annotation"]
    return objects


def is_project(path: Path) -> bool:
    return path.suffix == ".qpproj" or (path.is_dir() and (path / "project.qpproj").is_file())


def sources_from_paths(inputs: list[Path], annotations: Path | None, *, mpp: float | None = None,
                       objects: str = "all", nuclei: bool = False) -> list[Source]:
    """Images given as files or folders. ``annotations``: the file of a single image, or a folder holding each
    image's file (``<image name>.qpbridge.geojson``, ``<stem>.geojson``, ``<stem>.json`` or ``<stem>.xml``);
    default: beside each image."""
    images: list[Path] = []
    for p in inputs:
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            found = [f for f in found if annotation_file_for(f, annotations if annotations and
                                                             annotations.is_dir() else None)]
            if not found:
                raise BadRequestError(f"{p} holds no image with an annotation file beside it (<stem>.xml, "
                                      "<stem>.geojson or <image>.qpbridge.geojson)")
            images += found
        elif p.is_file():
            images.append(p)
        else:
            raise BadRequestError(f"{p}: no such image, folder or QuPath project")
    if annotations is not None and annotations.is_file() and len(images) != 1:
        raise BadRequestError(f"--annotations {annotations} is one file but {len(images)} images are given: give a "
                              "folder of annotation files (named after the images) instead")
    out = []
    for img in images:
        if annotations is not None and annotations.is_file():
            ann: Path | None = annotations
        else:
            ann = annotation_file_for(img, annotations if annotations is not None else None)
        if ann is None:
            where = annotations if annotations is not None else img.parent
            raise BadRequestError(f"{img.name}: no annotation file in {where} ({img.name}.qpbridge.geojson, "
                                  f"{img.stem}.geojson, {img.stem}.json or {img.stem}.xml); give --annotations FILE")
        objs = _keep(read_annotations(ann, use_nuclei=nuclei), objects)
        if not objs:
            log.warning("%s: no polygonal %s in %s", img.name, "object" if objects == "all" else objects, ann)
        out.append(Source(name=img.stem, path=img, objects=objs, annotations=str(ann.resolve()), mpp=mpp))
    return out


def _paquo_objects(project_path: Path) -> Callable[[str], list[AnnotatedObject]]:
    """A reader of each entry's objects through paquo (QuPath's own classes); starts the JVM once."""
    from qpbridge.paquo_io import _jclass, _quiet_java, _start, roi_geometry

    projects = _start()
    with _quiet_java():
        try:
            qp = projects.QuPathProject(project_path, mode="r")
        except Exception as exc:
            raise ProjectError(f"QuPath (through paquo) cannot open {project_path}: {type(exc).__name__}: {exc}; "
                               "--sidecars reads sidecar GeoJSON files instead") from None
    entries = {str(e.entry_id): e for e in qp.images}
    color_tools = _jclass("qupath.lib.common.ColorTools")

    def read(entry_id: str) -> list[AnnotatedObject]:
        e = entries.get(entry_id)
        if e is None:
            raise ProjectError(f"entry {entry_id} is not in the project QuPath loaded")
        out = []
        with _quiet_java():
            hierarchy = e.java_object.readHierarchy()
        for o in hierarchy.getObjects(None, None):
            if o.isRootObject() or o.getROI() is None or not o.getROI().isArea():
                continue
            pc = o.getPathClass()
            name = None if pc is None else str(pc.toString())
            color = None
            if pc is not None and pc.getColor() is not None:
                c = int(pc.getColor())
                color = (int(color_tools.red(c)), int(color_tools.green(c)), int(color_tools.blue(c)))
            kind = "cell" if o.isCell() else ("detection" if o.isDetection() else "annotation")
            out.append(AnnotatedObject(roi_geometry(o), name, color, kind))
        return out

    return read


def project_sources(project: Path, *, images: str | None = None, sidecar_dir: Path | None = None,
                    use_paquo: bool | None = None, mpp: float | None = None, objects: str = "all",
                    out: Callable[[str], None] = print) -> list[Source]:
    """The images of a QuPath project and their objects: through paquo when it starts (or ``use_paquo``), else
    from sidecar GeoJSON files (``<image>.qpbridge.geojson`` beside each image, or in ``sidecar_dir``)."""
    from qpbridge.qpproj import read_project

    proj = read_project(project)
    entries = [im for im in proj.images if images is None or fnmatch.fnmatch(im.name, images)]
    if not entries:
        raise ProjectError(f"no image of {proj.path} matches --images {images!r}" if images else
                           f"{proj.path} has no images")
    reader: Callable[[str], list[AnnotatedObject]] | None = None
    if use_paquo is not False and sidecar_dir is None:
        from qpbridge.paquo_io import PaquoUnavailableError

        try:
            reader = _paquo_objects(proj.path)
        except PaquoUnavailableError as exc:
            if use_paquo:
                raise
            out(f"{exc}: reading sidecar GeoJSON files beside the images instead")
    sources: list[Source] = []
    used: set[str] = set()
    for im in entries:
        if im.path is None or im.problem:
            out(f"  skipped {im.name}: {im.problem or 'image file not found'}")
            continue
        if not im.placement.identity:
            out(f"  skipped {im.name}: a rotated or cropped view of {im.path.name}; export from the plain entry")
            continue
        objs: list[AnnotatedObject]
        where: Any
        if reader is not None:
            objs, where = reader(im.entry_id), f"{proj.path}#{im.entry_id}"
        else:
            from qpbridge.sidecars import sidecar_path

            side = sidecar_path(im.path, sidecar_dir)
            if not side.is_file():
                side2 = annotation_file_for(im.path, sidecar_dir)
                if side2 is None:
                    out(f"  skipped {im.name}: no sidecar {side.name} in {side.parent}")
                    continue
                side = side2
            objs, where = read_annotations(side), str(side.resolve())
        objs = _keep(objs, objects)
        # Tiles are named after the entry without its extension, as QuPath's TileExporter names them.
        base = Path(im.name).stem if Path(im.name).suffix.lower() in IMAGE_SUFFIXES else im.name
        name = base if base not in used else f"{base} ({im.entry_id})"
        used.add(name)
        sources.append(Source(name=name, path=im.path, objects=objs, annotations=where,
                              mpp=mpp if mpp is not None else im.mpp))
    if not sources:
        raise ProjectError(f"no image of {proj.path} could be exported (see above)")
    return sources
