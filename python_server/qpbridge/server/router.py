"""The ZeroMQ ROUTER server: one loop receives and answers; model work runs on a thread pool.

Cheap ops (hello, models, job bookkeeping) are answered in the loop. ``predict`` and ``job.tiles`` run
on worker threads, which hand their replies back to the loop over an inproc socket, because a ZeroMQ
socket must only be used by one thread.
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from qpbridge import PROTOCOL_VERSION, __version__
from qpbridge.engine import Engine
from qpbridge.errors import (
    BadRequestError,
    InternalError,
    LimitExceededError,
    QPBridgeError,
    UnknownOpError,
)
from qpbridge.protocol import (
    Limits,
    check_version,
    decode_tile,
    dumps,
    parse_header,
    parse_image,
    parse_tiles,
    plan_to_wire,
    reply_error,
    reply_ok,
)
from qpbridge.server import translate_op
from qpbridge.server.jobs import Job, JobManager

log = logging.getLogger("qpbridge")

CAPABILITIES = ["predict", "translate", "jobs", "encoding:raw", "encoding:png", "encoding:jpeg"]
SLIDE_CAPABILITY = "slide-jobs"
MAX_PAGE = 10000


def check_bind_address(address: str) -> None:
    """A ZeroMQ endpoint as the server takes it: tcp://HOST:PORT, ipc://PATH or inproc://NAME."""
    if address.startswith(("ipc://", "inproc://")):
        return
    if not address.startswith("tcp://") or ":" not in address[len("tcp://"):]:
        raise QPBridgeError(f"invalid address {address!r}: write it as tcp://HOST:PORT, e.g. tcp://127.0.0.1:5555")


def is_loopback_address(address: str) -> bool:
    """True for tcp://127.x, tcp://[::1], tcp://localhost and ipc:// / inproc:// endpoints."""
    if not address.startswith("tcp://"):
        return address.startswith(("ipc://", "inproc://"))
    host = urlsplit(address).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name or a host name


def _field(header: dict[str, Any], key: str, kind: type) -> Any:
    value = header.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequestError(f"field '{key}' must be a {kind.__name__}")
    return value


class Server:
    def __init__(self, engine: Engine, bind: str = "tcp://127.0.0.1:5555", *, limits: Limits | None = None,
                 workers: int = 2, allow_remote: bool = False, slide_roots: list[Path] | None = None,
                 slide_jobs: int = 1) -> None:
        check_bind_address(bind)
        if not is_loopback_address(bind) and not allow_remote:
            raise QPBridgeError(
                f"refusing to bind {bind}: it is reachable from other machines and the protocol has no "
                "authentication; bind tcp://127.0.0.1:PORT, or pass --allow-remote on a trusted network")
        self.engine = engine
        self.bind_address = bind
        self.limits = limits or Limits()
        self.jobs = JobManager(self.limits.job_ttl_s)
        self.workers = max(1, workers)
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # libzmq refuses larger frames before allocating them (the peer is disconnected).
        self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_request_bytes)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        try:
            self._router.bind(bind)
        except zmq.ZMQError as exc:
            self._router.close(linger=0)
            self._ctx.term()
            hint = (" (another qpbridge server, or another program, uses it: stop that one or choose another port "
                    "with --bind)" if exc.errno == zmq.EADDRINUSE else "")
            raise QPBridgeError(f"cannot bind {bind}: {exc.strerror}{hint}") from None
        self.address = str(self._router.getsockopt_string(zmq.LAST_ENDPOINT))
        self._reply_addr = f"inproc://qpbridge-replies-{id(self)}"
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.bind(self._reply_addr)
        self._local = threading.local()
        self._pushers: list[zmq.Socket] = []
        self._pushers_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="qpbridge-worker")
        self.slide_roots = [Path(r) for r in (slide_roots or [])]
        for root in self.slide_roots:
            if not root.is_dir():
                raise QPBridgeError(f"slide root {root} is not a directory")
        # Slide jobs read and run whole slides; they queue here so they never starve tile requests.
        self._slide_pool = ThreadPoolExecutor(max(1, slide_jobs), thread_name_prefix="qpbridge-slide")
        self._stop = threading.Event()
        self._current_envelope: list[bytes] = []
        self._handlers: dict[str, Callable[[dict[str, Any], list[Any]], dict[str, Any] | None]] = {
            "hello": self._hello,
            "models": self._models,
            "predict": self._predict,
            "job.open": self._job_open,
            "job.tiles": self._job_tiles,
            "job.status": self._job_status,
            "job.results": self._job_results,
            "job.finish": self._job_finish,
            "job.cancel": self._job_cancel,
            "job.close": self._job_close,
            "job.slide": self._job_slide,
            "translate": lambda header, frames: translate_op.handle(self, header, frames),
        }

    # ---- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        log.info("qpbridge %s serving on %s (protocol %d, device %s, %d workers)", __version__, self.address,
                 PROTOCOL_VERSION, self.engine.device, self.workers)
        if self.slide_roots:
            log.info("slide jobs read files below: %s", ", ".join(str(r) for r in self.slide_roots))
        log.info("models: %s", ", ".join(
            f"{n} ({c.task}, {c.mpp} µm/px{'' if c.to_wire()['available'] else ', weights missing'})"
            for n, c in sorted(self.engine.cards.items())))
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        next_sweep = time.monotonic() + 1.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(200))
                if self._replies in events:
                    while True:
                        try:
                            self._router.send_multipart(self._replies.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                if self._router in events:
                    for _ in range(64):  # bounded so replies are never starved
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._dispatch(frames)
                if time.monotonic() >= next_sweep:
                    for jid in self.jobs.expire():
                        log.info("job %s expired (no request for %.0f s)", jid, self.jobs.ttl_s)
                    next_sweep = time.monotonic() + 1.0
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.jobs.cancel_all()
        self._slide_pool.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._pushers_lock:
            for s in self._pushers:
                s.close(linger=0)
        self._replies.close(linger=0)
        self._router.close(linger=0)
        self._ctx.term()
        log.info("qpbridge server stopped")

    # ---- dispatch --------------------------------------------------------------------------------
    def _dispatch(self, frames: list[Any]) -> None:
        # REQ and DEALER-with-delimiter clients put an empty frame after the identity; bare DEALER does not.
        if len(frames) >= 2 and len(frames[1]) == 0:
            envelope, body = [frames[0].bytes, b""], frames[2:]
        else:
            envelope, body = [frames[0].bytes], frames[1:]
        if not body:
            log.warning("dropping a message with no header frame")
            self._send(envelope, reply_error(BadRequestError("message has no header frame")))
            return
        op: str | None = None
        req_id: Any = None
        try:
            total = sum(len(f) for f in body)
            if total > self.limits.max_request_bytes:
                raise LimitExceededError(f"request is {total} bytes; the limit is {self.limits.max_request_bytes}")
            header = parse_header(body[0].buffer)
            op, req_id = header["op"], header.get("id")
            if req_id is not None and not isinstance(req_id, (str, int)):
                req_id = None
                raise BadRequestError("field 'id' must be a string or an integer")
            check_version(header)  # after reading the id, so a mismatch reply still reaches its request
            self._current_envelope = envelope
            handler = self._handlers.get(op)
            if handler is None:
                raise UnknownOpError(f"unknown op '{op}'; known ops: {', '.join(self._handlers)}",
                                     known_ops=list(self._handlers))
            reply = handler(header, body[1:])
            if reply is None:
                return  # a worker replies later
            self._send(envelope, reply_ok(op, req_id, **reply))
        except QPBridgeError as err:
            self._send(envelope, reply_error(err, op, req_id))
        except Exception as exc:  # a bug must not kill the server
            log.exception("internal error handling %s", op)
            self._send(envelope, reply_error(InternalError(f"internal error: {type(exc).__name__}: {exc}"), op, req_id))

    def _send(self, envelope: list[bytes], reply: dict[str, Any]) -> None:
        self._router.send_multipart([*envelope, dumps(reply)])

    def _in_worker(self, header: dict[str, Any], work: Callable[[], dict[str, Any]]) -> None:
        """Run ``work`` on the pool; its reply (or error) goes back through the inproc socket."""
        op, req_id = header["op"], header.get("id")
        envelope = self._current_envelope

        def run() -> None:
            try:
                reply = reply_ok(op, req_id, **work())
            except QPBridgeError as err:
                reply = reply_error(err, op, req_id)
            except Exception as exc:
                log.exception("internal error in %s", op)
                reply = reply_error(InternalError(f"internal error: {type(exc).__name__}: {exc}"), op, req_id)
            try:
                payload = dumps(reply)
            except ValueError as exc:  # NaN slipped through: report it rather than send invalid JSON
                payload = dumps(reply_error(InternalError(f"internal error: reply not serialisable: {exc}"),
                                            op, req_id))
            self._pusher().send_multipart([*envelope, payload])

        self._pool.submit(run)

    def _pusher(self) -> zmq.Socket:
        sock = getattr(self._local, "push", None)
        if sock is None:
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._reply_addr)
            self._local.push = sock
            with self._pushers_lock:
                self._pushers.append(sock)
        return sock

    # ---- ops -------------------------------------------------------------------------------------
    def _hello(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        client = header.get("client")
        if isinstance(client, dict):
            log.info("hello from %s %s", client.get("name", "?"), client.get("version", "?"))
        caps = CAPABILITIES + ([SLIDE_CAPABILITY] if self.slide_roots else [])
        return {"protocol": PROTOCOL_VERSION, "server_version": __version__, "device": self.engine.device,
                "capabilities": caps, "models": sorted(self.engine.cards),
                "limits": self.limits.to_wire(), "slide_roots": [str(r) for r in self.slide_roots]}

    def _models(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        return {"models": [c.to_wire() for _, c in sorted(self.engine.cards.items())]}

    def _model_name(self, header: dict[str, Any]) -> str:
        name = header.get("model")
        if not isinstance(name, str) or not name:
            raise BadRequestError("field 'model' must name a model; the 'models' op lists them")
        return name

    def _predict(self, header: dict[str, Any], frames: list[Any]) -> None:
        name = self._model_name(header)
        image = parse_image(header.get("image"))
        specs = parse_tiles(header, frames, self.limits)
        self.engine.check_image(name, image)

        def work() -> dict[str, Any]:
            t0 = time.perf_counter()
            tiles = [(s, decode_tile(s, f.buffer)) for s, f in zip(specs, frames, strict=True)]
            features = self.engine.predict(name, image, tiles)
            return {"features": features,
                    "stats": {"tiles": len(tiles), "seconds": round(time.perf_counter() - t0, 6)}}

        self._in_worker(header, work)
        return None

    def _job_open(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        name = self._model_name(header)
        image = parse_image(header.get("image"))
        card = self.engine.check_image(name, image)
        expected = header.get("expected_tiles")
        if expected is not None and (isinstance(expected, bool) or not isinstance(expected, int) or expected < 0):
            raise BadRequestError("expected_tiles must be a non-negative integer")
        region = header.get("region")
        if region is None:
            job = self.jobs.open(name, image, expected)
            log.info("job %s opened: model %s, image %r, %s tiles expected", job.id, name, image.name, expected)
            return {"job": job.id, "model": card.to_wire()}
        plan, stitch_factory = self._plan_for(name, card, image, region, header.get("roi"))
        job = self.jobs.open(name, image, len(plan.tiles))
        job.stitch = stitch_factory(job.add_feature)
        log.info("job %s opened: model %s, image %r, planned %d tiles", job.id, name, image.name, len(plan.tiles))
        return {"job": job.id, "model": card.to_wire(), "plan": plan_to_wire(plan)}

    def _plan_for(self, name: str, card: Any, image: Any, region: Any, roi: Any) -> tuple[Any, Any]:
        """The server's tile plan over a region, and a factory of the engine run fed by the job's tiles."""
        import shapely

        from qpbridge.engine.features import FeatureBuilder
        from qpbridge.engine.plan import make_plan
        from qpbridge.engine.session import PlanRun
        from qpbridge.roi import geometry_from_geojson

        if not isinstance(region, dict):
            raise BadRequestError("region must be {\"x\", \"y\", \"width\", \"height\"} in full-resolution pixels")
        box = tuple(_field(region, k, int) for k in ("x", "y", "width", "height"))
        roi_geom = geometry_from_geojson(roi) if roi is not None else None
        plan = make_plan(card, box, image.mpp, roi_geom)
        if len(plan.tiles) > 1_000_000:
            raise LimitExceededError(f"region needs {len(plan.tiles)} tiles; split it into smaller regions")
        x, y, w, h = box
        clip = shapely.box(x, y, x + w, y + h)
        clip = clip if roi_geom is None else clip.intersection(roi_geom)
        size = (image.width, image.height) if image.width and image.height else None
        builder = FeatureBuilder(card, image.mpp, clip, size)
        return plan, lambda sink: PlanRun(self.engine, name, plan, builder, sink)

    def _job_tiles(self, header: dict[str, Any], frames: list[Any]) -> None:
        job = self.jobs.get(header.get("job"))
        specs = parse_tiles(header, frames, self.limits)
        todo, skipped = job.claim(specs)

        def work() -> dict[str, Any]:
            return self._run_job_batch(job, [specs[i] for i in todo], [frames[i] for i in todo], skipped)

        self._in_worker(header, work)
        return None

    def _run_job_batch(self, job: Job, specs: list[Any], frames: list[Any], skipped: int) -> dict[str, Any]:
        processed: list[Any] = []

        def on_tile(spec: Any, feats: list[dict[str, Any]]) -> None:
            job.record(feats)
            processed.append(spec)

        try:
            tiles = [(s, decode_tile(s, f.buffer)) for s, f in zip(specs, frames, strict=True)]
            if job.stitch is not None:
                run = job.stitch
                planned = [run.planned(spec, px) for spec, px in tiles]

                def stitched(i: int) -> None:
                    job.record([])
                    processed.append(specs[i])

                run.process(planned, should_stop=job.cancel_event.is_set, on_tile=stitched)
            else:
                self.engine.predict(job.model, job.image, tiles, should_stop=job.cancel_event.is_set,
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

    def _job_slide(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        from qpbridge.annotate import annotate_slide
        from qpbridge.protocol import ImageInfo
        from qpbridge.roi import geometry_from_geojson
        from qpbridge.slides import resolve_slide_path

        name = self._model_name(header)
        card = self.engine.card(name)
        path = resolve_slide_path(_field(header, "path", str), self.slide_roots)
        mpp = header.get("mpp")
        if mpp is not None and (isinstance(mpp, bool) or not isinstance(mpp, (int, float)) or mpp <= 0):
            raise BadRequestError("mpp must be a positive number of µm per pixel")
        roi = geometry_from_geojson(header["roi"]) if header.get("roi") is not None else None
        tissue_filter = header.get("tissue_filter", True)
        if not isinstance(tissue_filter, bool):
            raise BadRequestError("tissue_filter must be true or false")
        job = self.jobs.open(name, ImageInfo(name=path.name, mpp=mpp), None, kind="slide")

        def run() -> None:
            try:
                annotate_slide(self.engine, path, name, mpp=mpp, roi=roi, tissue_filter=tissue_filter,
                               on_plan=lambda plan: job.set_progress(0, len(plan.tiles)),
                               on_progress=lambda p: job.set_progress(p.tiles_done),
                               should_stop=job.cancel_event.is_set, sink=job.add_feature)
                job.complete()
                log.info("slide job %s %s: %s", job.id, job.status()["state"], path.name)
            except QPBridgeError as err:
                job.fail(err)
                log.warning("slide job %s failed: %s", job.id, err)
            except Exception as exc:
                log.exception("slide job %s failed", job.id)
                job.fail(InternalError(f"slide job failed: {type(exc).__name__}: {exc}"))

        self._slide_pool.submit(run)
        log.info("slide job %s opened: model %s, slide %s", job.id, name, path)
        return {"job": job.id, "model": card.to_wire()}

    def _job_status(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        return self.jobs.get(header.get("job")).status()

    def _job_results(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        job = self.jobs.get(header.get("job"))
        offset = header.get("offset", 0)
        limit = header.get("limit", 1000)
        for key, value in (("offset", offset), ("limit", limit)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise BadRequestError(f"{key} must be a non-negative integer")
        return job.page(offset, min(max(limit, 1), MAX_PAGE))

    def _job_finish(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        job = self.jobs.get(header.get("job"))
        job.finish()
        status = job.status()
        log.info("job %s done: %d tiles, %d features", job.id, status["tiles_done"], status["features"])
        return {"state": status["state"], "tiles_done": status["tiles_done"], "features": status["features"]}

    def _job_cancel(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        job = self.jobs.get(header.get("job"))
        job.cancel()
        log.info("job %s cancelled", job.id)
        return {"state": job.status()["state"]}

    def _job_close(self, header: dict[str, Any], frames: list[Any]) -> dict[str, Any]:
        self.jobs.close(header.get("job"))
        return {"closed": True}
