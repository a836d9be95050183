"""The server's ops, one function each, and the table the router routes by (``OPS``).

Every op checks every field it reads before it allocates, plans or opens anything. ``where`` says on
which thread an op runs: ``loop`` (O(1) bookkeeping, answered in the receiving loop), ``light``
(planning, ROI geometry, result pages, paths: a small pool) or ``model`` (decoding and model work:
the worker pool, behind the per-client fair share). To add an op, write ``def op_name(server, req)``
returning the reply's fields and add one line to ``OPS``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from qpbridge import PROTOCOL_VERSION, __version__
from qpbridge.errors import (
    BadRequestError,
    BusyError,
    InternalError,
    LimitExceededError,
    QPBridgeError,
    UnknownModelError,
)
from qpbridge.protocol import (
    MAX_COORD,
    MPP_RANGE,
    check_model_pixels,
    check_number,
    check_text,
    decode_tile,
    parse_image,
    parse_tiles,
    plan_to_wire,
)
from qpbridge.server import translate_op
from qpbridge.server.jobs import Job

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard
    from qpbridge.server.router import Request, Server

log = logging.getLogger("qpbridge")

Reply = dict[str, Any]
# Repairing a self-intersecting ROI takes time that grows steeply with its crossings (a random 100-vertex
# polygon: about 1.5 s; 400 vertices: over a minute), so a server repairs only small ones.
MAX_REPAIR_VERTICES = 100
BUSY_JOB_MS = 2000


# ---- shared checks --------------------------------------------------------------------------------
def _card(server: Server, header: dict[str, Any]) -> ModelCard:
    name = check_text(header.get("model"), "field 'model' (a model name; the 'models' op lists them)", empty=False)
    try:
        return server.engine.card(name)
    except QPBridgeError:
        raise
    except (OSError, RuntimeError, ValueError) as exc:  # a path that cannot be resolved: loops, too long
        raise UnknownModelError(f"model path {name[:200]} cannot be read: {type(exc).__name__}",
                                known_models=sorted(server.engine.cards)) from None


def _model_name(header: dict[str, Any]) -> str:
    return str(header["model"])


def _check_job_share(server: Server, client: bytes) -> None:
    running = server.jobs.running_of(client)
    if running >= server.limits.max_client_jobs:
        raise BusyError(f"busy: this client has {running} running jobs (at most {server.limits.max_client_jobs}); "
                        "finish or close one, or retry later", retry_after_ms=BUSY_JOB_MS)


def _count_vertices(roi: Any, limit: int) -> None:
    """Refuse an ROI with more than ``limit`` vertices before any geometry is built from it."""
    numbers, stack = 0, [roi]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            numbers += 1
            if numbers > 2 * limit:
                raise LimitExceededError(f"ROI has more than {limit} vertices; simplify it", limit=limit)


def _roi(server: Server, roi: Any) -> Any:
    from qpbridge.roi import geometry_from_geojson

    if roi is None:
        return None
    _count_vertices(roi, server.limits.max_roi_vertices)
    try:
        return geometry_from_geojson(roi, max_repair_vertices=MAX_REPAIR_VERTICES)
    except QPBridgeError:
        raise
    except Exception as exc:  # GEOS refuses some inputs with its own exception types
        raise BadRequestError(f"ROI is not a usable geometry: {type(exc).__name__}: {str(exc)[:200]}") from None


# ---- ops ------------------------------------------------------------------------------------------
def op_hello(server: Server, req: Request) -> Reply:
    client = req.header.get("client")
    if isinstance(client, dict):
        log.info("hello from %.64s %.32s", client.get("name", "?"), client.get("version", "?"))
    from qpbridge.server.router import CAPABILITIES, SLIDE_CAPABILITY

    caps = CAPABILITIES + ([SLIDE_CAPABILITY] if server.slide_roots else []) + (["curve"] if server.curve else [])
    caps += ["resume"] if server.cache is not None else []
    return {"protocol": PROTOCOL_VERSION, "server_version": __version__, "device": server.engine.device,
            "capabilities": caps, "models": sorted(server.engine.cards),
            "limits": server.limits.to_wire(), "slide_roots": [str(r) for r in server.slide_roots]}


def op_models(server: Server, req: Request) -> Reply:
    return {"models": [c.to_wire() for _, c in sorted(server.engine.cards.items())]}


def op_predict(server: Server, req: Request) -> Reply:
    card = _card(server, req.header)
    image = parse_image(req.header.get("image"))
    specs = parse_tiles(req.header, req.frames, server.limits)
    server.engine.check_image(_model_name(req.header), image)
    check_model_pixels(specs, image, card.mpp, server.limits)
    t0 = time.perf_counter()
    tiles = [(s, decode_tile(s, f.buffer)) for s, f in zip(specs, req.frames, strict=True)]
    features = server.engine.predict(_model_name(req.header), image, tiles)
    return {"features": features, "stats": {"tiles": len(tiles), "seconds": round(time.perf_counter() - t0, 6)}}


def _plan_size(card: ModelCard, box: tuple[int, int, int, int], mpp: float | None) -> int:
    """Tiles of the full grid make_plan would lay, from arithmetic alone (before any list is built)."""
    ds = card.mpp / mpp if mpp else 1.0
    step = max(1, card.tile_size - card.plan_overlap)

    def count(extent: int) -> int:
        px = max(1, math.ceil(extent / ds))
        return 1 if px <= card.tile_size else math.ceil((px - card.tile_size) / step) + 1

    return count(box[2]) * count(box[3])


def _stitch_bytes(card: ModelCard, box: tuple[int, int, int, int], mpp: float | None) -> int:
    """Blending buffers a planned job will hold: float32 per class over two tile rows of the region's
    width (semantic models; instance models keep only objects)."""
    if card.task == "instance-segmentation":
        return 0
    ds = card.mpp / mpp if mpp else 1.0
    width = max(1, math.ceil(box[2] / ds))
    return (len(card.classes) + 1) * 2 * card.tile_size * width * 4


def op_job_open(server: Server, req: Request) -> Reply:
    header = req.header
    card = _card(server, header)
    image = parse_image(header.get("image"))
    server.engine.check_image(_model_name(header), image)
    expected = header.get("expected_tiles")
    if expected is not None:
        check_number(expected, "expected_tiles", 0, MAX_COORD, integer=True)
    _check_job_share(server, req.client)
    region = header.get("region")
    if region is None:
        if header.get("roi") is not None:
            raise BadRequestError("roi needs a region")
        job = server.jobs.open(_model_name(header), image, expected, owner=req.client)
        log.info("job %s opened: model %s, image %r, %s tiles expected", job.id, job.model, image.name, expected)
        return {"job": job.id, "model": card.to_wire()}
    import shapely

    from qpbridge.engine.features import FeatureBuilder
    from qpbridge.engine.plan import make_plan
    from qpbridge.engine.session import PlanRun

    if not isinstance(region, dict):
        raise BadRequestError("region must be {\"x\", \"y\", \"width\", \"height\"} in full-resolution pixels")
    x, y = (check_number(region.get(k), f"region.{k}", -MAX_COORD, MAX_COORD, integer=True) for k in ("x", "y"))
    w, h = (check_number(region.get(k), f"region.{k}", 1, MAX_COORD, integer=True) for k in ("width", "height"))
    box = (x, y, w, h)
    n = _plan_size(card, box, image.mpp)
    if n > server.limits.max_plan_tiles:
        raise LimitExceededError(f"region needs {n} tiles at the model's {card.mpp:g} µm/px; the limit is "
                                 f"{server.limits.max_plan_tiles}: split it into smaller regions",
                                 limit=server.limits.max_plan_tiles)
    need = _stitch_bytes(card, box, image.mpp)
    if need > server.limits.max_stitch_bytes:
        raise LimitExceededError(f"region needs {need >> 20} MiB of blending buffers; the limit is "
                                 f"{server.limits.max_stitch_bytes >> 20} MiB: split it into narrower regions",
                                 limit=server.limits.max_stitch_bytes)
    if not server.jobs.reserve(need, server.limits.max_stitch_bytes):
        raise BusyError(f"busy: running jobs hold the server's blending memory; retry after {BUSY_JOB_MS} ms",
                        retry_after_ms=BUSY_JOB_MS)
    roi_geom = _roi(server, header.get("roi"))
    plan = make_plan(card, box, image.mpp, roi_geom)
    clip = shapely.box(x, y, x + w, y + h)
    clip = clip if roi_geom is None else clip.intersection(roi_geom)
    size = (image.width, image.height) if image.width and image.height else None
    builder = FeatureBuilder(card, image.mpp, clip, size)
    name = _model_name(header)
    job = server.jobs.open(name, image, len(plan.tiles), owner=req.client)
    if server.cache is not None:  # keyed by the pixels the client sends: a re-run need not run the model again
        from qpbridge.server.cache import PlanResults, card_digest

        job.results = PlanResults(server.cache, card_digest(card), plan, None)
    job.stitch = PlanRun(server.engine, name, plan, builder, job.add_feature, job.results)
    job.reserved = need
    log.info("job %s opened: model %s, image %r, planned %d tiles", job.id, name, image.name, len(plan.tiles))
    return {"job": job.id, "model": card.to_wire(), "plan": plan_to_wire(plan)}


def op_job_tiles(server: Server, req: Request) -> Reply:
    job = server.jobs.get(req.header.get("job"))
    specs = parse_tiles(req.header, req.frames, server.limits)
    check_model_pixels(specs, job.image, server.engine.card(job.model).mpp, server.limits)
    todo, skipped = job.claim(specs)
    return _run_job_batch(server, job, [specs[i] for i in todo], [req.frames[i] for i in todo], skipped)


def _run_job_batch(server: Server, job: Job, specs: list[Any], frames: list[Any], skipped: int) -> Reply:
    processed: list[Any] = []

    def on_tile(spec: Any, feats: list[dict[str, Any]]) -> None:
        job.record(feats)
        processed.append(spec)

    try:
        tiles = [(s, decode_tile(s, f.buffer)) for s, f in zip(specs, frames, strict=True)]
        run = job.stitch
        if run is not None:
            planned = [run.planned(spec, px) for spec, px in tiles]

            def stitched(i: int) -> None:
                job.record([])
                processed.append(specs[i])

            run.process(planned, should_stop=job.cancel_event.is_set, on_tile=stitched)
        elif job.running():
            server.engine.predict(job.model, job.image, tiles, should_stop=job.cancel_event.is_set,
                                  on_tile=on_tile)
    except QPBridgeError:
        job.release([s for s in specs if s not in processed])
        raise
    except Exception as exc:
        job.release([s for s in specs if s not in processed])
        err = InternalError(f"job failed: {type(exc).__name__}: {exc}")
        job.fail(err)
        raise err from exc
    finally:
        job.last_seen = time.monotonic()
    job.release([s for s in specs if s not in processed])  # cancelled part-way
    status = job.status()
    return {"accepted": len(processed), "skipped": skipped, "tiles_done": status["tiles_done"],
            "tiles_expected": status["tiles_expected"], "state": status["state"]}


def op_job_slide(server: Server, req: Request) -> Reply:
    from qpbridge.annotate import annotate_slide
    from qpbridge.protocol import ImageInfo
    from qpbridge.slides import Slide, open_in_roots

    header = req.header
    card = _card(server, header)
    name = _model_name(header)
    path = check_text(header.get("path"), "field 'path'", empty=False)
    mpp = header.get("mpp")
    if mpp is not None:
        check_number(mpp, "mpp (µm per full-resolution pixel)", *MPP_RANGE)
    tissue_filter = header.get("tissue_filter", True)
    if not isinstance(tissue_filter, bool):
        raise BadRequestError("tissue_filter must be true or false")
    roi = _roi(server, header.get("roi"))
    _check_job_share(server, req.client)
    opened = open_in_roots(path, server.slide_roots)
    try:
        slide = Slide(opened.handle_path, mpp, name=opened.real.name, by_handle=True)
    except BaseException:
        opened.close()
        raise
    job = server.jobs.open(name, ImageInfo(name=opened.real.name, mpp=mpp), None, kind="slide", owner=req.client)
    store: Callable[[Any, Any], Any] | None = None
    if server.cache is not None:  # keyed by the slide file's identity: a re-run reads, but runs no model
        from qpbridge.server.cache import PlanResults, card_digest, slide_digest

        def store(_slide: Any, plan: Any) -> Any:
            job.results = PlanResults(server.cache, card_digest(card), plan,
                                      slide_digest(opened.real, opened.stat, mpp))
            return job.results

    def run() -> None:
        try:
            if job.running():
                annotate_slide(server.engine, opened.handle_path, name, mpp=mpp, roi=roi, tissue_filter=tissue_filter,
                               on_plan=lambda plan: job.set_progress(0, len(plan.tiles)),
                               on_progress=lambda p: job.set_progress(p.tiles_done),
                               should_stop=job.cancel_event.is_set, sink=job.add_feature, slide=slide,
                               results=store)
            job.complete()
            log.info("slide job %s %s: %s", job.id, job.status()["state"], opened.real.name)
        except QPBridgeError as err:
            job.fail(err)
            log.warning("slide job %s failed: %s", job.id, err)
        except Exception as exc:
            log.exception("slide job %s failed", job.id)
            job.fail(InternalError(f"slide job failed: {type(exc).__name__}: {exc}"))
        finally:
            slide.close()
            opened.close()

    server.submit_slide(run)
    log.info("slide job %s opened: model %s, slide %s", job.id, name, opened.real)
    return {"job": job.id, "model": card.to_wire()}


def op_job_status(server: Server, req: Request) -> Reply:
    return server.jobs.get(req.header.get("job")).status()


def op_job_results(server: Server, req: Request) -> Reply:
    from qpbridge.server.router import MAX_PAGE

    job = server.jobs.get(req.header.get("job"))
    offset = check_number(req.header.get("offset", 0), "offset", 0, MAX_COORD, integer=True)
    limit = check_number(req.header.get("limit", 1000), "limit", 0, MAX_COORD, integer=True)
    return job.page(offset, min(max(limit, 1), MAX_PAGE))


def op_job_finish(server: Server, req: Request) -> Reply:
    job = server.jobs.get(req.header.get("job"))
    job.finish()
    status = job.status()
    log.info("job %s done: %d tiles, %d features", job.id, status["tiles_done"], status["features"])
    return {"state": status["state"], "tiles_done": status["tiles_done"], "features": status["features"]}


def op_job_cancel(server: Server, req: Request) -> Reply:
    job = server.jobs.get(req.header.get("job"))
    job.cancel()
    log.info("job %s cancelled", job.id)
    return {"state": job.status()["state"]}


def op_job_close(server: Server, req: Request) -> Reply:
    server.jobs.close(req.header.get("job"))
    return {"closed": True}


@dataclass(frozen=True)
class Op:
    run: Callable[[Server, Request], Reply]
    where: str  # "loop", "light" or "model"


OPS: dict[str, Op] = {
    "hello": Op(op_hello, "loop"),
    "models": Op(op_models, "loop"),
    "predict": Op(op_predict, "model"),
    "translate": Op(translate_op.op_translate, "model"),
    "job.open": Op(op_job_open, "light"),
    "job.tiles": Op(op_job_tiles, "model"),
    "job.status": Op(op_job_status, "loop"),
    "job.results": Op(op_job_results, "light"),
    "job.finish": Op(op_job_finish, "light"),
    "job.cancel": Op(op_job_cancel, "loop"),
    "job.close": Op(op_job_close, "loop"),
    "job.slide": Op(op_job_slide, "light"),
}
