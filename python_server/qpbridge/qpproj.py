"""Reading a QuPath project (``project.qpproj``) as plain JSON: no Java, no paquo.

QuPath 0.2-0.6 write one JSON file listing the images (``images[].serverBuilder``); each image's data lives in
``data/<entryID>/``. A server builder either names an image by URI (``builderType: "uri"``) or wraps other
builders (``rotated``, ``cropped``, ``pyramidize``, ``sparse``, ...). This module lists the entries, finds each
image file (also when the project or the images were moved: QuPath's own rule of resolving the path relative to
the project's previous location), and says how full-resolution pixels of the file map to the entry's pixels
(``rotated`` by a multiple of 90 degrees and ``cropped`` are handled; other geometry-changing wrappers are not).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlparse

from qpbridge.errors import ProjectError

PROJECT_FILE = "project.qpproj"
# Wrappers that change only pixel values or the pyramid, never coordinates.
_SAME_GEOMETRY = {"pyramidize", "color", "channels", "reorderRGB", "colorDeconvolved"}
_ROTATIONS = {"ROTATE_NONE": 0, "ROTATE_90": 90, "ROTATE_180": 180, "ROTATE_270": 270}


def project_file(path: str | Path) -> Path:
    """The ``.qpproj`` file of a project given as the file or as its folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / PROJECT_FILE
    if p.suffix != ".qpproj":
        raise ProjectError(f"{path}: not a QuPath project (give the project folder or its project.qpproj)")
    if not p.is_file():
        raise ProjectError(f"{p}: no such QuPath project file")
    return p


@dataclass
class Placement:
    """How a point (x, y) of the image file's full resolution maps to the project entry's pixels."""

    rotation: int = 0  # clockwise degrees, as QuPath's RotatedImageServer
    crop: tuple[int, int, int, int] | None = None  # x, y, width, height in file pixels (``cropped``)

    @property
    def identity(self) -> bool:
        return self.rotation == 0 and self.crop is None

    def transform(self, file_width: int, file_height: int) -> Callable[[Any], Any]:
        """A function mapping an (N, 2) array of file coordinates to entry coordinates."""
        import numpy as np

        ox, oy, w, h = self.crop if self.crop is not None else (0, 0, file_width, file_height)
        rot = self.rotation

        def apply(xy: Any) -> Any:
            x = xy[:, 0] - ox
            y = xy[:, 1] - oy
            if rot == 90:  # clockwise: the top-left corner goes to the top right
                x, y = h - y, x
            elif rot == 180:
                x, y = w - x, h - y
            elif rot == 270:
                x, y = y, w - x
            return np.stack([x, y], axis=1)

        return apply

    def inverse(self, file_width: int, file_height: int) -> Callable[[Any], Any]:
        """The inverse of :meth:`transform`: entry coordinates to file coordinates."""
        import numpy as np

        ox, oy, w, h = self.crop if self.crop is not None else (0, 0, file_width, file_height)
        rot = self.rotation

        def apply(xy: Any) -> Any:
            u = xy[:, 0]
            v = xy[:, 1]
            if rot == 90:
                u, v = v, h - u
            elif rot == 180:
                u, v = w - u, h - v
            elif rot == 270:
                u, v = w - v, u
            return np.stack([u + ox, v + oy], axis=1)

        return apply


@dataclass
class ProjectImage:
    """One image entry of a project, as far as it can be known without Java."""

    entry_id: str
    name: str
    entry_dir: Path
    uris: list[str]
    builder_types: list[str]  # outermost first, e.g. ["rotated", "uri"]
    provider: str | None
    path: Path | None = None  # the image file found on this machine
    moved_from: str | None = None  # the URI's path when the file was found elsewhere
    problem: str | None = None  # why this entry cannot be annotated (no file, unsupported builder)
    placement: Placement = field(default_factory=Placement)
    mpp: float | None = None  # QuPath's stored pixel size in µm, when it has one
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_file(self) -> Path:
        return self.entry_dir / "data.qpdata"


@dataclass
class QuPathProjectFile:
    path: Path
    version: str | None
    previous_uri: str | None
    images: list[ProjectImage]

    @property
    def folder(self) -> Path:
        return self.path.parent


def _uri_path(uri: str) -> Path | None:
    """The local path of a ``file:`` URI (None for other schemes)."""
    parsed = urlparse(uri)
    if parsed.scheme.lower() != "file":
        return None
    path = unquote(parsed.path)
    if os.name == "nt" and path.startswith("/") and len(path) > 2 and path[2] == ":":
        path = path[1:]
    return Path(path)


def _collect_uris(node: Any, out: list[str]) -> None:
    """Every ``uri`` string anywhere below a builder (QuPath collects them the same way)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "uri" and isinstance(value, str):
                out.append(value)
            else:
                _collect_uris(value, out)
    elif isinstance(node, list):
        for item in node:
            _collect_uris(item, out)


def _unwrap(builder: dict[str, Any]) -> tuple[list[str], str | None, Placement, str | None, dict[str, Any] | None]:
    """Builder types from the outside in, the innermost provider, the placement, a problem, and the
    metadata stored with the outermost builder that has one."""
    types: list[str] = []
    placement = Placement()
    problem: str | None = None
    meta: dict[str, Any] | None = None
    node: Any = builder
    while isinstance(node, dict):
        kind = str(node.get("builderType", "?"))
        types.append(kind)
        if meta is None and isinstance(node.get("metadata"), dict):
            meta = node["metadata"]
        if kind == "uri":
            return types, node.get("providerClassName"), placement, problem, meta
        if kind == "rotated":
            rot = _ROTATIONS.get(str(node.get("rotation", "ROTATE_NONE")))
            if rot is None:
                problem = problem or f"unknown rotation {node.get('rotation')!r}"
            elif placement.crop is not None:
                problem = problem or "a rotation inside a crop is not supported"
            else:
                placement.rotation = (placement.rotation + rot) % 360
        elif kind == "cropped":
            region = node.get("region") or {}
            try:
                crop = tuple(int(region[k]) for k in ("x", "y", "width", "height"))
            except (KeyError, TypeError, ValueError):
                problem = problem or "a crop without a region"
            else:
                if placement.rotation or placement.crop is not None:
                    problem = problem or "a crop inside a rotation is not supported"
                placement.crop = crop  # type: ignore[assignment]
        elif kind not in _SAME_GEOMETRY:
            problem = problem or f"QuPath builder '{kind}' changes image coordinates in a way qpbridge does not map"
        node = node.get("builder")
    return types, None, placement, problem or "no image URI in the server builder", meta


def _stored_mpp(meta: dict[str, Any] | None) -> float | None:
    try:
        pw = meta["pixelCalibration"]["pixelWidth"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None
    unit = str(pw.get("unit", ""))
    value = pw.get("value")
    if unit in ("µm", "um", "micron", "microns", "\u00b5m") and isinstance(value, (int, float)) and value > 0:
        return float(value)
    return None


def resolve_image_path(uri_path: Path, project_dir: Path, previous_project: Path | None) -> Path | None:
    """The image file on this machine: where the URI says, else at the same place relative to the project
    as it was relative to the project's previous location (a moved folder of project + images)."""
    if uri_path.is_file():
        return uri_path
    if previous_project is not None:
        old_dir = previous_project.parent
        try:
            rel = PurePosixPath(uri_path.as_posix()).relative_to(PurePosixPath(old_dir.as_posix()))
        except ValueError:
            rel = None
        if rel is not None:
            cand = project_dir / Path(*rel.parts)
            if cand.is_file():
                return cand
        # QuPath also tries the path relative to the old project folder one level up (images beside it)
        try:
            rel_up = PurePosixPath(uri_path.as_posix()).relative_to(PurePosixPath(old_dir.parent.as_posix()))
        except ValueError:
            rel_up = None
        if rel_up is not None:
            cand = project_dir.parent / Path(*rel_up.parts)
            if cand.is_file():
                return cand
    return None


def read_project(path: str | Path) -> QuPathProjectFile:
    """The project's image entries with their files resolved on this machine."""
    file = project_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ProjectError(f"{file}: cannot read the project file: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images", []), list):
        raise ProjectError(f"{file}: not a QuPath project file (no 'images' list)")
    prev_uri = data.get("uri") if isinstance(data.get("uri"), str) else None
    prev_path = _uri_path(prev_uri) if prev_uri else None
    project_dir = file.parent.resolve()
    images: list[ProjectImage] = []
    for raw in data.get("images", []):
        if not isinstance(raw, dict):
            continue
        entry_id = str(raw.get("entryID", ""))
        builder = raw.get("serverBuilder")
        if not isinstance(builder, dict):
            # QuPath keeps the builder in data/<id>/server.json when the project file has none
            server_json = project_dir / "data" / entry_id / "server.json"
            try:
                builder = json.loads(server_json.read_text(encoding="utf-8")).get("builder")
            except (OSError, ValueError, AttributeError):
                builder = None
        uris: list[str] = []
        _collect_uris(builder, uris)
        types, provider, placement, problem, meta = (_unwrap(builder) if isinstance(builder, dict)
                                                     else ([], None, Placement(), "no server builder", None))
        name = str(raw.get("imageName") or (Path(unquote(urlparse(uris[0]).path)).name if uris else entry_id))
        image = ProjectImage(entry_id=entry_id, name=name, entry_dir=project_dir / "data" / entry_id, uris=uris,
                             builder_types=types, provider=provider, placement=placement, mpp=_stored_mpp(meta),
                             metadata={str(k): str(v) for k, v in (raw.get("metadata") or {}).items()})
        if len(set(uris)) > 1 and problem is None:
            problem = f"the image combines {len(set(uris))} files"
        if uris:
            local = _uri_path(uris[0])
            if local is None:
                problem = problem or f"not a local file: {uris[0]}"
            else:
                found = resolve_image_path(local, project_dir, prev_path)
                if found is None:
                    problem = problem or f"image file not found: {local} (moved? not found relative to the project)"
                else:
                    image.path = found
                    if found != local:
                        image.moved_from = str(local)
        image.problem = problem
        images.append(image)
    return QuPathProjectFile(path=file, version=data.get("version"), previous_uri=prev_uri, images=images)
