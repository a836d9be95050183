"""Writing results into a QuPath project through paquo (QuPath's own Java classes, through JPype).

paquo, JPype and the JVM are imported only when a project is opened here. Objects are made by QuPath's own
GeoJSON reader (``PathIO.readObjectsFromGeoJSON``: classes with colours, measurements, cells with their nucleus,
the feature ids) and added in bulk. Each image's ``data.qpdata`` is written next to the old one, read back and
checked, then renamed over it (see :mod:`qpbridge.project_safety`).

Earlier results of a model are found as the QuPath scripts find them: objects whose metadata
``qpbridge.model`` names the model; objects that cannot carry metadata (detections and cells in QuPath 0.5)
count when their object type and class are ones the model emits. Annotations without the tag are never touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shapely.geometry.base import BaseGeometry

from qpbridge import project_safety as safety
from qpbridge.errors import ProjectError
from qpbridge.qpproj import ProjectImage

log = logging.getLogger("qpbridge")
MODEL_KEY = "qpbridge.model"
SIDECAR_HINT = ("Install the image reader QuPath used for it (e.g. libopenslide0 for OpenSlide), or write sidecar "
                "files with --sidecars and import them in QuPath")


class PaquoUnavailableError(ProjectError):
    """paquo cannot start (not installed, no QuPath found, no Java)."""

    code = "paquo_unavailable"


def qupath_for_paquo() -> tuple[str | None, str]:
    """(QuPath version or None, where/why) as paquo would find it, without starting Java."""
    try:
        from paquo._config import settings, to_kwargs
        from paquo.jpype_backend import find_qupath
    except ImportError as exc:
        return None, f"paquo is not installed ({exc}): pip install paquo"
    except Exception as exc:  # paquo's config can raise several types
        return None, f"paquo cannot read its configuration: {exc}"
    try:
        app_dir, _runtime, jvm_path, _opts = find_qupath(**to_kwargs(settings))
    except Exception as exc:
        return None, (f"paquo finds no QuPath ({exc}); set PAQUO_QUPATH_DIR to a QuPath installation (or install one "
                      "with `paquo get_qupath --install-path DIR 0.5.1`)")
    version = None
    for jar in Path(app_dir).glob("qupath-core-[0-9]*.jar"):
        version = jar.stem.split("qupath-core-")[-1].split("-")[0]
    if version is None:
        for jar in Path(app_dir).glob("qupath-*[0-9].jar"):
            version = jar.stem.rsplit("-", 1)[-1]
            break
    return version or "unknown", f"{app_dir} (Java: {jvm_path})"


def _start() -> Any:
    """Import paquo's project module (starts the JVM once per process); errors become PaquoUnavailableError."""
    version, where = qupath_for_paquo()
    if version is None:
        raise PaquoUnavailableError(where)
    if log.getEffectiveLevel() > logging.DEBUG:  # QuPath's own INFO lines only with --log-level debug
        for name in ("paquo", "qupath"):
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import paquo.projects
    except Exception as exc:  # JVM start failures come as several types
        raise PaquoUnavailableError(f"paquo cannot start QuPath from {where}: {type(exc).__name__}: {exc}") from None
    return paquo.projects


@contextlib.contextmanager
def _quiet_java() -> Iterator[None]:
    """Route Java's log lines into Python logging (shown at warning level and above)."""
    try:
        from paquo._logging import redirect
    except ImportError:  # pragma: no cover - paquo without its log redirection
        yield
        return
    with redirect(stderr=True, stdout=True):
        yield


def _jclass(name: str) -> Any:
    import jpype

    return jpype.JClass(name)


def object_type(o: Any) -> str:
    if o.isCell():
        return "cell"
    if o.isTile():
        return "tile"
    if o.isDetection():
        return "detection"
    if o.isAnnotation():
        return "annotation"
    return "other"


def model_tag(o: Any) -> str | None:
    with contextlib.suppress(Exception):
        value = o.getMetadata().get(MODEL_KEY)
        return None if value is None else str(value)
    return None


def is_previous_result(o: Any, model: str, object_types: Collection[str], class_names: Collection[str]) -> bool:
    tag = model_tag(o)
    if tag is not None:
        return tag == model
    if o.isAnnotation() or o.isRootObject():
        return False
    pc = o.getPathClass()
    return object_type(o) in object_types and pc is not None and str(pc.toString()) in class_names


_DETECTION_METADATA: list[bool] = []


def detections_keep_metadata() -> bool:
    """Whether this QuPath stores metadata on detections (QuPath 0.5 does not: its map is read-only)."""
    if not _DETECTION_METADATA:
        try:
            roi = _jclass("qupath.lib.roi.ROIs").createRectangleROI(0.0, 0.0, 1.0, 1.0,
                                                                     _jclass("qupath.lib.regions.ImagePlane")
                                                                     .getDefaultPlane())
            det = _jclass("qupath.lib.objects.PathObjects").createDetectionObject(roi)
            det.getMetadata().put(MODEL_KEY, "probe")
            _DETECTION_METADATA.append(str(det.getMetadata().get(MODEL_KEY)) == "probe")
        except Exception:
            _DETECTION_METADATA.append(False)
    return _DETECTION_METADATA[0]


def roi_geometry(o: Any) -> BaseGeometry:
    """A QuPath object's ROI as a shapely geometry (full-resolution pixels)."""
    import shapely

    wkb = _jclass("org.locationtech.jts.io.WKBWriter")()
    return shapely.from_wkb(bytes(wkb.write(o.getROI().getGeometry())))


@dataclass
class WriteResult:
    added: int
    removed: int
    backup: Path | None
    note: str | None = None


class PaquoProject:
    """A QuPath project opened through paquo; entries are read and written one at a time."""

    def __init__(self, path: Path, *, writable: bool = True) -> None:
        projects = _start()
        with _quiet_java():
            try:
                self.qp = projects.QuPathProject(path, mode="r+" if writable else "r")
            except Exception as exc:
                raise ProjectError(f"QuPath {qupath_for_paquo()[0]} (through paquo) cannot open the project {path}: "
                                   f"{type(exc).__name__}: {exc}; --sidecars writes sidecar files without "
                                   "opening it") from None
        self.writable = writable
        self._entries = {str(e.entry_id): e for e in self.qp.images}
        self.version = str(self.qp.version)

    def ensure_classes(self, classes: Sequence[tuple[str, tuple[int, int, int]]]) -> list[str]:
        """Add the model's classes (with colours) to the project's class list; returns the names added."""
        from paquo.classes import QuPathPathClass

        present = {pc.name for pc in self.qp.path_classes}
        missing = [(n, c) for n, c in classes if n not in present]
        if not missing or not self.writable:
            return []
        with _quiet_java():
            self.qp.path_classes = [*self.qp.path_classes,
                                    *(QuPathPathClass(n, color="#{:02x}{:02x}{:02x}".format(*c)) for n, c in missing)]
            self.qp.save(images=False)
        return [n for n, _ in missing]

    def open_entry(self, image: ProjectImage) -> EntryData:
        entry = self._entries.get(image.entry_id)
        if entry is None:
            raise ProjectError(f"{image.name}: entry {image.entry_id} is not in the project QuPath loaded")
        note = self._follow_moved_image(entry.java_object, image) if image.moved_from else None
        data = EntryData(self, entry.java_object, image)
        if note:
            data.note = " ".join(n for n in (note, data.note) if n)
        return data

    def _follow_moved_image(self, entry: Any, image: ProjectImage) -> str | None:
        """Point the entry at the image file where it was found (what QuPath asks to do for a moved project);
        QuPath needs the file to write the entry's data."""
        if not self.writable or image.path is None:
            return None
        uri = _jclass("java.net.URI")
        mapping = _jclass("java.util.HashMap")()
        for u in entry.getURIs():
            if str(u.getScheme()).lower() == "file" and str(u.getPath()) == image.moved_from:
                mapping.put(u, uri(image.path.resolve().as_uri()))
        if mapping.isEmpty():
            return None
        with _quiet_java():
            entry.updateURIs(mapping)
            self.qp.save(images=False)
        return f"(the project now points to {image.path})"


class EntryData:
    """One image's data (hierarchy) in memory, and its safe write-back."""

    def __init__(self, project: PaquoProject, entry: Any, image: ProjectImage) -> None:
        self.project = project
        self.entry = entry
        self.image = image
        self.entry_dir = image.entry_dir
        ok, note = safety.repair_truncated(self.entry_dir)
        self.note = note
        if not ok:
            raise ProjectError(f"{image.name}: {note}")
        self.image_data = self._read()
        self.hierarchy = self.image_data.getHierarchy()
        try:
            server = self.image_data.getServer()
        except Exception as exc:
            server, why = None, f"{type(exc).__name__}: {exc}"
        else:
            why = "no image server"
        if server is None:  # QuPath cannot write an entry without its image server
            raise ProjectError(f"{image.name}: QuPath cannot open the image file here ({why}; reader "
                               f"{image.provider or '?'}); nothing written. {SIDECAR_HINT}")

    def _read(self) -> Any:
        path_io = _jclass("qupath.lib.io.PathIO")
        with _quiet_java():
            try:
                return self.entry.readImageData()
            except Exception as first:
                data = self.entry_dir / safety.DATA_FILE
                if not data.is_file():
                    raise ProjectError(f"{self.image.name}: QuPath cannot open this image here ({first}) and the "
                                       f"entry has no data yet; nothing written. {SIDECAR_HINT}") from None
                try:  # the data file carries its own server description: use it (as paquo does)
                    return path_io.readImageData(_jclass("java.io.File")(str(data)), None, None,
                                                 _jclass("java.awt.image.BufferedImage"))
                except Exception as exc:
                    raise ProjectError(f"{self.image.name}: QuPath cannot read {data}: {exc}") from None

    def annotations_of_class(self, class_name: str) -> list[tuple[Any, BaseGeometry]]:
        out = []
        for o in self.hierarchy.getAnnotationObjects():
            pc = o.getPathClass()
            if pc is not None and str(pc.toString()) == class_name and o.getROI() is not None:
                out.append((o, roi_geometry(o)))
        return out

    def _to_objects(self, features: list[dict[str, Any]]) -> list[Any]:
        """QuPath objects from QuPath GeoJSON, by QuPath's own reader. Metadata is kept only where this QuPath can
        store it (annotations; detections too in versions that allow it), else QuPath logs a warning per object."""
        keep_all = detections_keep_metadata()
        cleaned = []
        for f in features:
            props = f.get("properties") or {}
            if not keep_all and props.get("objectType", "annotation") != "annotation" and "metadata" in props:
                f = {**f, "properties": {k: v for k, v in props.items() if k != "metadata"}}
            cleaned.append(f)
        payload = json.dumps({"type": "FeatureCollection", "features": cleaned}, allow_nan=False).encode("utf-8")
        stream = _jclass("java.io.ByteArrayInputStream")(payload)
        with _quiet_java():
            objs = _jclass("qupath.lib.io.PathIO").readObjectsFromGeoJSON(stream)
        if len(objs) != len(features):
            raise ProjectError(f"{self.image.name}: QuPath read {len(objs)} of {len(features)} objects")
        return list(objs)

    def previous_results(self, parent: Any | None, model: str, object_types: Collection[str],
                         class_names: Collection[str]) -> list[Any]:
        """Earlier results of the model: anywhere in the image, or below ``parent``."""
        candidates = self.hierarchy.getObjects(None, None) if parent is None else parent.getDescendantObjects(None)
        return [o for o in candidates if is_previous_result(o, model, object_types, class_names)]

    def count_results(self, hierarchy: Any, model: str, object_types: Collection[str],
                      class_names: Collection[str]) -> int:
        return sum(1 for o in hierarchy.getObjects(None, None)
                   if is_previous_result(o, model, object_types, class_names))

    def write(self, groups: Sequence[tuple[Any | None, list[dict[str, Any]]]], model: str,
              object_types: Collection[str], class_names: Collection[str], replace: bool) -> WriteResult:
        """Replace (or add to) the model's results below each parent (None: the whole image), then write the data
        file safely. Raises ProjectError with the entry as it was before when anything fails."""
        h = self.hierarchy
        removed = 0
        added = 0
        new_objects = []
        for parent, features in groups:
            if replace:
                old = self.previous_results(parent, model, object_types, class_names)
                if old:
                    h.removeObjects(_jclass("java.util.ArrayList")(old), True)  # keep what users put inside
                    removed += len(old)
            objs = self._to_objects(features)
            new_objects.append((parent, objs))
            added += len(objs)
        for parent, objs in new_objects:
            if not objs:
                continue
            jlist = _jclass("java.util.ArrayList")(objs)
            if parent is None:
                h.addObjects(jlist)
            else:
                parent.addChildObjects(jlist)
        h.fireHierarchyChangedEvent(h.getRootObject())
        expected_total = int(h.nObjects())
        expected_results = self.count_results(h, model, object_types, class_names)
        backup = self._save(expected_total, expected_results, model, object_types, class_names)
        return WriteResult(added=added, removed=removed, backup=backup, note=self.note)

    def _save(self, expected_total: int, expected_results: int, model: str, object_types: Collection[str],
              class_names: Collection[str]) -> Path | None:
        path_io = _jclass("qupath.lib.io.PathIO")
        tmp = safety.tmp_data_path(self.entry_dir)
        self.entry_dir.mkdir(parents=True, exist_ok=True)
        try:
            with _quiet_java():
                path_io.writeImageData(_jclass("java.io.File")(str(tmp)), self.image_data)
            self._verify(tmp, expected_total, expected_results, model, object_types, class_names)
        except BaseException as exc:
            tmp.unlink(missing_ok=True)
            if isinstance(exc, ProjectError):
                raise
            if isinstance(exc, Exception):
                raise ProjectError(f"{self.image.name}: writing the data failed ({type(exc).__name__}: {exc}); "
                                   "the image is as before") from None
            raise
        backup = safety.backup_data(self.entry_dir)
        size = tmp.stat().st_size
        safety.install_data(self.entry_dir, tmp)
        try:
            final = self.entry_dir / safety.DATA_FILE
            problem = safety.data_file_problem(final)
            if problem is None and final.stat().st_size != size:
                problem = f"{final} has {final.stat().st_size} bytes after the rename, {size} were written"
            if problem is not None:
                raise ProjectError(f"{self.image.name}: {problem}")
            self._check_final(final, expected_total)
        except BaseException:
            safety.restore_data(self.entry_dir, backup)
            raise
        self._update_summary(expected_total)
        return backup

    def _read_hierarchy(self, path: Path) -> Any:
        stream = _jclass("java.io.FileInputStream")(str(path))
        try:
            with _quiet_java():
                return _jclass("qupath.lib.io.PathIO").readHierarchy(stream)
        finally:
            stream.close()

    def _verify(self, path: Path, expected_total: int, expected_results: int, model: str,
                object_types: Collection[str], class_names: Collection[str]) -> None:
        problem = safety.data_file_problem(path)
        if problem is not None:
            raise ProjectError(f"{self.image.name}: the data QuPath wrote is unusable ({problem}); the image is as "
                               "before")
        try:
            back = self._read_hierarchy(path)
        except Exception as exc:
            raise ProjectError(f"{self.image.name}: the data QuPath wrote cannot be read back ({exc}); the image is "
                               "as before") from None
        total = int(back.nObjects())
        results = self.count_results(back, model, object_types, class_names)
        if total != expected_total or results != expected_results:
            raise ProjectError(f"{self.image.name}: read back {total} objects ({results} results of {model}), "
                               f"expected {expected_total} ({expected_results}); the image is as before")

    def _check_final(self, path: Path, expected_total: int) -> None:
        """The installed data file, read back once more."""
        total = int(self._read_hierarchy(path).nObjects())
        if total != expected_total:
            raise ProjectError(f"{self.image.name}: {path} holds {total} objects after the rename, expected "
                               f"{expected_total}; the backup was restored")

    def _update_summary(self, n_objects: int) -> None:
        """QuPath's ``summary.json`` (object counts shown in its project pane); best effort."""
        path = self.entry_dir / "summary.json"
        try:
            summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
            tools = _jclass("qupath.lib.objects.PathObjectTools")
            types: dict[str, int] = {}
            ann: dict[str, int] = {}
            det: dict[str, int] = {}
            for o in self.hierarchy.getObjects(None, None):
                key = str(tools.getSuitableName(o.getClass(), True))
                types[key] = types.get(key, 0) + 1
                pc = o.getPathClass()
                name = "Unclassified" if pc is None else str(pc.toString())
                if o.isAnnotation():
                    ann[name] = ann.get(name, 0) + 1
                elif o.isDetection():
                    det[name] = det.get(name, 0) + 1
            summary["timestamp"] = int(time.time() * 1000)
            summary["hierarchy"] = {"nObjects": n_objects, "objectTypeCounts": types,
                                    "annotationClassificationCounts": ann, "detectionClassificationCounts": det}
            safety.write_json_atomic(path, summary)
        except Exception as exc:  # the counts are cosmetic; the data file is what matters
            log.debug("summary.json of %s not updated: %s", self.image.name, exc)
