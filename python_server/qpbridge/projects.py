"""``qpbridge annotate-project``: run a model over every image of a QuPath project.

Images are listed from the ``.qpproj`` JSON (:mod:`qpbridge.qpproj`), each file is run through the engine (in this
process, or through a server that reads the file itself when it may), and the results go either into the project
through paquo (:mod:`qpbridge.paquo_io`, safe writes) or, without Java, into one sidecar GeoJSON per image that
QuPath's "Import qpbridge GeoJSON" script reads. One image failing is reported and the batch goes on; a stop
request (Ctrl-C) ends the batch after the current image.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import shapely
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from qpbridge.annotate import roi_region
from qpbridge.cards import ModelCard, require_weights
from qpbridge.engine.session import Progress
from qpbridge.errors import ProjectError, QPBridgeError, UnknownModelError
from qpbridge.qpproj import Placement, ProjectImage, QuPathProjectFile, read_project

log = logging.getLogger("qpbridge")
PLAIN_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
OnProgress = Callable[[Progress], None]


@dataclass
class BatchOptions:
    model: str
    images: str | None = None  # glob over image names (or file names)
    replace: bool = True
    dry_run: bool = False
    server: str | None = None
    mpp: float | None = None
    roi_class: str | None = None
    sidecars: bool | None = None  # None: through paquo when it starts, else sidecars
    sidecar_dir: Path | None = None
    models_dir: Path | None = None
    device: str = "auto"
    tissue_filter: bool = True
    readers: int | None = None  # slide-reading threads (None: the engine's default)
    timeout: float = 120.0
    force: bool = False


@dataclass
class ImageOutcome:
    name: str
    status: str = "pending"  # done | failed | skipped | not run | would run
    added: int = 0
    removed: int = 0
    tiles: int = 0
    seconds: float = 0.0
    note: str = ""


@dataclass
class BatchResult:
    project: QuPathProjectFile
    mode: str  # "paquo" | "sidecars"
    outcomes: list[ImageOutcome] = field(default_factory=list)
    stopped: bool = False
    dry_run: bool = False
    messages: list[str] = field(default_factory=list)

    @property
    def failed(self) -> list[ImageOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class StopFlag:
    """Set by the first Ctrl-C: the batch ends after the current image."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def select_images(project: QuPathProjectFile, pattern: str | None) -> list[ProjectImage]:
    """The entries whose image name (as QuPath shows it) matches the glob; case-insensitive."""
    if not pattern:
        return list(project.images)
    return [img for img in project.images if fnmatch.fnmatch(img.name.lower(), pattern.lower())]


# ---- running the model on one image file ---------------------------------------------------------
@dataclass
class FileResult:
    features: list[dict[str, Any]]
    width: int
    height: int
    tiles: int


class Runner(Protocol):
    def card(self) -> dict[str, Any]: ...

    def run(self, path: Path, mpp: float | None, roi: BaseGeometry | None,
            on_progress: OnProgress | None) -> FileResult:
        ...


class InProcessRunner:
    """The engine in this process: slides through tiffslide, PNG/JPEG in memory."""

    def __init__(self, model: str, models_dir: Path | None, device: str, tissue_filter: bool,
                 readers: int | None) -> None:
        from qpbridge.devices import resolve_device
        from qpbridge.engine import Engine

        self.model = model
        self.engine = Engine(models_dir, device=resolve_device(device), any_model_path=True)
        self.tissue_filter = tissue_filter
        self.readers = readers
        self._card: ModelCard = self.engine.card(model)
        require_weights(self._card.to_wire())

    def card(self) -> dict[str, Any]:
        return self._card.to_wire()

    def run(self, path: Path, mpp: float | None, roi: BaseGeometry | None,
            on_progress: OnProgress | None) -> FileResult:
        if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
            return self._run_plain(path, mpp, roi, on_progress)
        from qpbridge.annotate import annotate_slide

        result = annotate_slide(self.engine, path, self.model, mpp=mpp, roi=roi, tissue_filter=self.tissue_filter,
                                readers=self.readers, on_progress=on_progress)
        return FileResult(result.features, result.slide.width, result.slide.height, result.stats.tiles)

    def _run_plain(self, path: Path, mpp: float | None, roi: BaseGeometry | None,
                   on_progress: OnProgress | None) -> FileResult:
        from qpbridge.annotate import annotate_image
        from qpbridge.images import read_image

        rgb, file_mpp = read_image(path)
        features, stats = annotate_image(self.engine, self.model, rgb, mpp if mpp is not None else file_mpp,
                                         name=path.name, roi=roi, on_progress=on_progress)
        return FileResult(features, rgb.shape[1], rgb.shape[0], stats.tiles)


class ServerRunner:
    """A qpbridge server: it reads the file itself when the file lies below its slide roots, else this process
    reads the tiles and sends them (a planned, stitched job)."""

    def __init__(self, model: str, address: str, timeout: float, tissue_filter: bool) -> None:
        from qpbridge.client import Client

        self.model = model
        self.client = Client(address, timeout_s=timeout)
        self.tissue_filter = tissue_filter
        hello = self.client.hello()
        self.slide_roots = [Path(r) for r in hello.get("slide_roots", [])] \
            if "slide-jobs" in hello.get("capabilities", []) else []
        cards = {c["name"]: c for c in self.client.models()}
        if model not in cards:
            raise UnknownModelError(f"the server at {address} has no model '{model}'; it has: "
                                    f"{', '.join(sorted(cards))}")
        self._card = cards[model]
        require_weights(self._card, f" on the server at {address}")

    def close(self) -> None:
        self.client.close()

    def card(self) -> dict[str, Any]:
        return self._card

    def _server_reads(self, path: Path) -> bool:
        real = path.resolve()
        return any(real == r or r in real.parents for r in (root.resolve() for root in self.slide_roots))

    def run(self, path: Path, mpp: float | None, roi: BaseGeometry | None,
            on_progress: OnProgress | None) -> FileResult:
        if self._server_reads(path) and path.suffix.lower() not in PLAIN_IMAGE_SUFFIXES:
            return self._slide_job(path, mpp, roi, on_progress)
        return self._planned(path, mpp, roi, on_progress)

    def _slide_job(self, path: Path, mpp: float | None, roi: BaseGeometry | None,
                   on_progress: OnProgress | None) -> FileResult:
        from qpbridge.errors import RemoteError
        from qpbridge.slides import Slide

        slide = Slide(path, mpp)  # for the size; the server reads the pixels
        header: dict[str, Any] = {"op": "job.slide", "model": self.model, "path": str(path.resolve()),
                                  "tissue_filter": self.tissue_filter}
        if mpp is not None:
            header["mpp"] = mpp
        if roi is not None:
            header["roi"] = mapping(roi)
        job = str(self.client.request(header)["job"])
        t0 = time.monotonic()
        try:
            while True:
                st = self.client.job_status(job)
                if on_progress is not None and st.get("tiles_expected"):
                    on_progress(Progress(int(st["tiles_done"]), int(st["tiles_expected"]), time.monotonic() - t0))
                if st["state"] != "running":
                    break
                time.sleep(0.2)
            if st["state"] == "failed":
                err = st.get("error") or {}
                raise RemoteError(err.get("code", "error"), err.get("message", "slide job failed"))
            features = list(self.client.job_results(job))
        finally:
            with contextlib.suppress(QPBridgeError):
                self.client.job_close(job)
        return FileResult(features, slide.width, slide.height, int(st.get("tiles_done") or 0))

    def _planned(self, path: Path, mpp: float | None, roi: BaseGeometry | None,
                 on_progress: OnProgress | None) -> FileResult:
        from qpbridge.protocol import ImageInfo

        if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
            from qpbridge.images import ArrayImage, read_image

            rgb, file_mpp = read_image(path)
            source: Any = ArrayImage(rgb)
            mpp = mpp if mpp is not None else file_mpp
        else:
            from qpbridge.slides import Slide

            source = Slide(path, mpp)
            mpp = source.mpp
        image = ImageInfo(name=path.name, mpp=mpp, width=source.width, height=source.height)
        region = roi_region(roi, source.width, source.height)
        t0 = time.monotonic()

        done: list[int] = []

        def progress(reply: dict[str, Any]) -> None:
            done.append(int(reply.get("tiles_done", 0)))
            if on_progress is not None and reply.get("tiles_expected"):
                on_progress(Progress(int(reply["tiles_done"]), int(reply["tiles_expected"]), time.monotonic() - t0))

        features = self.client.run_planned(self.model, image, region, source.read,
                                           roi=mapping(roi) if roi is not None else None, on_progress=progress)
        return FileResult(features, source.width, source.height, done[-1] if done else 0)


# ---- coordinates between the file and the project entry -------------------------------------------
def _map_geometry(geom: BaseGeometry, fn: Callable[[Any], Any]) -> BaseGeometry:
    out = shapely.transform(geom, fn)
    return out if out.is_valid else shapely.make_valid(out)


def features_to_entry(features: list[dict[str, Any]], placement: Placement, width: int,
                      height: int) -> list[dict[str, Any]]:
    """Features in file coordinates moved to the entry's (rotated / cropped) coordinates."""
    if placement.identity:
        return features
    from qpbridge.geometry import geojson_geometry

    fn = placement.transform(width, height)
    out = []
    for f in features:
        g = dict(f)
        g["geometry"] = geojson_geometry(_map_geometry(shape(f["geometry"]), fn))
        if f.get("nucleusGeometry"):
            g["nucleusGeometry"] = geojson_geometry(_map_geometry(shape(f["nucleusGeometry"]), fn))
        out.append(g)
    return out


def file_region_of(placement: Placement, width: int, height: int) -> BaseGeometry | None:
    """The part of the file the entry shows (None: all of it)."""
    if placement.crop is None:
        return None
    x, y, w, h = placement.crop
    return shapely.box(max(0, x), max(0, y), min(width, x + w), min(height, y + h))


# ---- writers ---------------------------------------------------------------------------------------
class Writer(Protocol):
    mode: str

    def begin_image(self, image: ProjectImage) -> Any: ...

    def rois(self, handle: Any, class_name: str) -> list[tuple[Any, BaseGeometry]]: ...

    def write(self, handle: Any, groups: list[tuple[Any, list[dict[str, Any]]]]) -> tuple[int, int, str]: ...


class SidecarWriter:
    """One ``<image file>.qpbridge.geojson`` per image (see :mod:`qpbridge.sidecars`); earlier results of the model
    in it are replaced (``--replace``) or kept (``--append``), other models' results are always kept."""

    mode = "sidecars"

    def __init__(self, model: str, replace: bool, folder: Path | None) -> None:
        self.model = model
        self.replace = replace
        self.folder = folder
        self.claimed: dict[Path, str] = {}

    def target(self, image: ProjectImage) -> Path:
        from qpbridge.sidecars import sidecar_path

        assert image.path is not None
        return sidecar_path(image.path, self.folder)

    def begin_image(self, image: ProjectImage) -> Any:
        target = self.target(image)
        other = self.claimed.get(target)
        if other is not None and other != image.entry_id:
            raise ProjectError(f"{image.name} shares its image file with another entry of this batch; one sidecar "
                               f"file ({target.name}) cannot hold both: annotate this project through paquo")
        self.claimed[target] = image.entry_id
        return (image, target)

    def rois(self, handle: Any, class_name: str) -> list[tuple[Any, BaseGeometry]]:
        raise ProjectError("--roi-class needs the project's annotations, which only paquo (Java) can read")

    def write(self, handle: Any, groups: list[tuple[Any, list[dict[str, Any]]]]) -> tuple[int, int, str]:
        import json

        from qpbridge.files import write_json_atomic

        _image, target = handle
        new = [f for _, feats in groups for f in feats]
        kept: list[dict[str, Any]] = []
        removed = 0
        if target.is_file():
            try:
                old = json.loads(target.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise ProjectError(f"{target}: existing sidecar is not readable JSON ({exc}); move it away") from None
            old_features = old.get("features", []) if isinstance(old, dict) else old
            for f in old_features:
                tag = ((f.get("properties") or {}).get("metadata") or {}).get("qpbridge.model")
                if self.replace and tag == self.model:
                    removed += 1
                else:
                    kept.append(f)
        from qpbridge.geometry import feature_collection

        try:
            write_json_atomic(target, feature_collection(kept + new))
        except OSError as exc:
            raise ProjectError(f"cannot write {target}: {exc} (choose a writable folder with --sidecar-dir)") from None
        return len(new), removed, f"-> {target}"


class PaquoWriter:
    mode = "paquo"

    def __init__(self, project: QuPathProjectFile, card: dict[str, Any], model: str, replace: bool) -> None:
        from qpbridge.paquo_io import PaquoProject

        self.project = PaquoProject(project.path, writable=True)
        self.model = model
        self.replace = replace
        self.classes = [(str(c["name"]), (int(c["color"][0]), int(c["color"][1]), int(c["color"][2])))
                        for c in card["classes"] if c.get("emit", True)]
        self.class_names = [n for n, _ in self.classes]
        self.object_types = {card["object_type"]}
        added = self.project.ensure_classes(self.classes)
        if added:
            log.info("added classes to the project: %s", ", ".join(added))

    def begin_image(self, image: ProjectImage) -> Any:
        return self.project.open_entry(image)

    def rois(self, handle: Any, class_name: str) -> list[tuple[Any, BaseGeometry]]:
        return list(handle.annotations_of_class(class_name))

    def write(self, handle: Any, groups: list[tuple[Any, list[dict[str, Any]]]]) -> tuple[int, int, str]:
        res = handle.write(groups, self.model, self.object_types, self.class_names, self.replace)
        return res.added, res.removed, res.note or ""


# ---- the batch -----------------------------------------------------------------------------------
def annotate_project(project_path: Path, opts: BatchOptions, *, out: Callable[[str], None] = print,
                     progress_factory: Callable[[str], OnProgress | None] | None = None,
                     stop: StopFlag | None = None, after_setup: Callable[[], None] | None = None) -> BatchResult:
    """Annotate the selected images of a project; returns what happened to each (never raises for one image).

    ``after_setup`` is called once the model and the project are open, before the first image (the JVM that
    paquo starts installs its own Ctrl-C handler: the CLI puts its own back there)."""
    from qpbridge import project_safety as safety

    project = read_project(project_path)
    images = select_images(project, opts.images)
    if not images:
        raise ProjectError(f"no image of {project.path} matches --images {opts.images!r}" if opts.images else
                           f"{project.path} has no images")
    stop = stop or StopFlag()

    mode, why = _choose_mode(opts)
    result = BatchResult(project=project, mode=mode)
    if why:
        out(why)

    runner: Runner = (ServerRunner(opts.model, opts.server, opts.timeout, opts.tissue_filter) if opts.server else
                   InProcessRunner(opts.model, opts.models_dir, opts.device, opts.tissue_filter, opts.readers))
    card = runner.card()
    try:
        if opts.dry_run:
            return _dry_run(result, images, opts, card, mode, out)
        if mode == "paquo" and not opts.force:
            safety.check_not_open_in_qupath(project.folder, warn=out)
        lock = safety.ProjectLock(project.folder) if mode == "paquo" else None
        if lock is not None:
            lock.acquire()
        try:
            if mode == "paquo":
                for p in safety.clean_leftovers(project.folder):
                    out(f"removed {p} (left by an interrupted run; the data file it was meant for is unchanged)")
            writer: Writer | None = None
            if mode == "paquo":
                from qpbridge.paquo_io import PaquoUnavailableError

                try:
                    writer = PaquoWriter(project, card, opts.model, opts.replace)
                except PaquoUnavailableError as exc:  # QuPath was found but Java did not start
                    if opts.sidecars is False or opts.roi_class:
                        raise
                    mode = result.mode = "sidecars"
                    out(f"{exc}: writing sidecar GeoJSON files instead, for QuPath's Import script")
            if writer is None:
                writer = SidecarWriter(opts.model, opts.replace, opts.sidecar_dir)
            if after_setup is not None:
                after_setup()
            for i, image in enumerate(images, 1):
                outcome = ImageOutcome(image.name)
                result.outcomes.append(outcome)
                if stop.is_set():
                    outcome.status = "not run"
                    outcome.note = "stopped before this image"
                    continue
                out(f"[{i}/{len(images)}] {image.name}")
                t0 = time.perf_counter()
                try:
                    outcome.status = _one_image(image, opts, runner, writer, outcome,
                                                progress_factory(f"  {image.name}") if progress_factory else None)
                except QPBridgeError as exc:
                    outcome.status = "failed"
                    outcome.note = str(exc)
                except Exception as exc:  # one broken image never stops the batch
                    outcome.status = "failed"
                    outcome.note = f"{type(exc).__name__}: {exc}"
                    log.debug("%s failed:\n%s", image.name, traceback.format_exc())
                outcome.seconds = time.perf_counter() - t0
                if outcome.status == "failed":
                    out(f"  failed: {outcome.note}")
                elif outcome.status == "skipped":
                    out(f"  skipped: {outcome.note}")
                else:
                    out(f"  {outcome.added} objects added, {outcome.removed} earlier ones removed "
                        f"({outcome.seconds:.1f} s){' ' + outcome.note if outcome.note else ''}")
            result.stopped = stop.is_set()
        finally:
            if lock is not None:
                lock.release()
    finally:
        if isinstance(runner, ServerRunner):
            runner.close()
    if mode == "sidecars" and any(o.status == "done" for o in result.outcomes):
        result.messages.append(import_instructions(opts.sidecar_dir))
    return result


def import_instructions(sidecar_dir: Path | None) -> str:
    where = (f"set SIDECAR_DIR = '{sidecar_dir.resolve()}' at the top of the script" if sidecar_dir
             else "the files lie beside the images, where the script looks by default")
    return ("To bring the results into QuPath: open the project, then Automate > User scripts > qpbridge > "
            "'Import qpbridge GeoJSON', and in the script editor Run > Run for project (select the images); "
            f"{where}. Installed by `qpbridge install-qupath`. Headless: QuPath script -p PROJECT.qpproj -s "
            "'Import qpbridge GeoJSON.groovy'.")


def _choose_mode(opts: BatchOptions) -> tuple[str, str | None]:
    if opts.sidecars:
        return "sidecars", None
    from qpbridge.paquo_io import qupath_for_paquo

    version, where = qupath_for_paquo()
    if version is not None:
        # --sidecar-dir alone asks for sidecar files
        return ("sidecars", None) if opts.sidecar_dir is not None and opts.sidecars is None else ("paquo", None)
    if opts.sidecars is False:
        from qpbridge.paquo_io import PaquoUnavailableError

        raise PaquoUnavailableError(where)
    if opts.roi_class:
        raise ProjectError(f"--roi-class needs paquo, which cannot start: {where}")
    return "sidecars", (f"paquo cannot start ({where}): writing sidecar GeoJSON files instead, for QuPath's "
                        "Import script")


def _dry_run(result: BatchResult, images: list[ProjectImage], opts: BatchOptions, card: dict[str, Any], mode: str,
             out: Callable[[str], None]) -> BatchResult:
    from qpbridge import project_safety as safety

    result.dry_run = True
    action = "replace" if opts.replace else "append to"
    target = ("the project through paquo" if mode == "paquo" else
              f"sidecar files ({'in ' + str(opts.sidecar_dir) if opts.sidecar_dir else 'beside the images'})")
    out(f"dry run: model {card['name']} ({card['object_type']}s of "
        f"{', '.join(c['name'] for c in card['classes'] if c.get('emit', True))}) would {action} earlier results, "
        f"written to {target}; nothing is run or written")
    for image in images:
        outcome = ImageOutcome(image.name)
        if image.problem:
            outcome.status = "skipped"
            outcome.note = image.problem
        else:
            outcome.status = "would run"
            notes = [str(image.path)]
            if image.moved_from:
                notes.append(f"(moved from {image.moved_from})")
            if not image.placement.identity:
                notes.append(f"(entry {'/'.join(image.builder_types)})")
            problem = safety.data_file_problem(image.data_file) if mode == "paquo" else None
            if problem:
                notes.append(f"({problem}: would be restored from QuPath's data.qpdata.bkp when intact)")
            outcome.note = " ".join(notes)
        result.outcomes.append(outcome)
    if mode == "paquo":
        for pid, has_it, why in safety.qupath_processes(result.project.folder):
            out(f"note: QuPath (pid {pid}) " + (f"has this project open ({why}): close it before the real run"
                                                if has_it else "is running: close this project in it first"))
    return result


def _one_image(image: ProjectImage, opts: BatchOptions, runner: Runner, writer: Writer, outcome: ImageOutcome,
               on_progress: OnProgress | None) -> str:
    """Run and write one image; returns its status ("done", or "skipped" when there was nothing to run on)."""
    if image.problem:
        raise ProjectError(image.problem)
    assert image.path is not None
    if image.moved_from:
        outcome.note = f"(image found at {image.path}, the project names {image.moved_from})"
    handle = writer.begin_image(image)
    mpp = opts.mpp if opts.mpp is not None else image.mpp
    groups: list[tuple[Any, list[dict[str, Any]]]] = []
    if opts.roi_class:
        rois = writer.rois(handle, opts.roi_class)
        if not rois:
            outcome.note = f"no '{opts.roi_class}' annotation: nothing to do"
            return "skipped"
        for parent, geom in rois:
            res = _run_entry(runner, image, mpp, geom, on_progress)
            outcome.tiles += res[1]
            groups.append((parent, res[0]))
    else:
        feats, tiles = _run_entry(runner, image, mpp, None, on_progress)
        outcome.tiles += tiles
        groups.append((None, feats))
    added, removed, note = writer.write(handle, groups)
    outcome.added, outcome.removed = added, removed
    outcome.note = " ".join(n for n in (outcome.note, note) if n)
    return "done"


def _run_entry(runner: Runner, image: ProjectImage, mpp: float | None, entry_roi: BaseGeometry | None,
               on_progress: OnProgress | None) -> tuple[list[dict[str, Any]], int]:
    """Run on the image file with an ROI given in entry coordinates; features back in entry coordinates."""
    assert image.path is not None
    placement = image.placement
    roi = entry_roi
    if not placement.identity:
        size = _file_size(image.path)
        if roi is not None:
            roi = _map_geometry(roi, placement.inverse(*size))
        crop = file_region_of(placement, *size)
        if crop is not None:
            roi = crop if roi is None else roi.intersection(crop)
    res = runner.run(image.path, mpp, roi, on_progress)
    return features_to_entry(res.features, placement, res.width, res.height), res.tiles


def _file_size(path: Path) -> tuple[int, int]:
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        from qpbridge.images import read_image

        rgb, _ = read_image(path)
        return int(rgb.shape[1]), int(rgb.shape[0])
    from qpbridge.slides import Slide

    s = Slide(path)
    return s.width, s.height


def summary_table(result: BatchResult) -> str:
    """The end-of-batch table: one row per image, then totals."""
    rows = [("image", "status", "objects", "removed", "tiles", "time", "note")]
    for o in result.outcomes:
        rows.append((o.name, o.status, str(o.added), str(o.removed), str(o.tiles), f"{o.seconds:.1f} s", o.note))
    widths = [min(max(len(r[i]) for r in rows), 48) for i in range(6)]
    lines = []
    for r in rows:
        cells = [r[i][:widths[i]].ljust(widths[i]) if i in (0, 1) else r[i].rjust(widths[i]) for i in range(6)]
        lines.append("  ".join(cells) + ("  " + r[6] if r[6] else ""))
    if result.dry_run:
        would = sum(1 for o in result.outcomes if o.status == "would run")
        lines.append(f"dry run: {would} of {len(result.outcomes)} images would be annotated "
                     f"{'into the project' if result.mode == 'paquo' else 'as sidecar files'}; nothing was written")
        return "\n".join(lines)
    done = sum(1 for o in result.outcomes if o.status == "done")
    total_objects = sum(o.added for o in result.outcomes)
    skipped = sum(1 for o in result.outcomes if o.status == "skipped")
    lines.append(f"{done} of {len(result.outcomes)} images annotated, {total_objects} objects, "
                 + (f"{skipped} skipped, " if skipped else "")
                 + f"{len(result.failed)} failed" + (" (stopped early)" if result.stopped else "")
                 + f"; written {'into the project' if result.mode == 'paquo' else 'as sidecar files'}")
    return "\n".join(lines)
