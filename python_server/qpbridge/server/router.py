"""The ZeroMQ ROUTER server: one loop receives, parses, checks, routes and replies; ops run elsewhere.

The loop never plans, decodes, resamples or touches a file: op functions (``ops.OPS``) marked ``loop``
are O(1) bookkeeping; ``light`` ops (planning, ROI geometry, result pages, model folders, slide paths)
run on a small pool; ``model`` ops (predict, job.tiles) run on the worker pool behind a fair-share
admission check (per-client requests and tiles, a server-wide queue), past which the answer is
``busy`` with a retry time. Workers hand replies back over an inproc socket, because a ZeroMQ socket
must only be used by one thread.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import ipaddress
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import zmq

from qpbridge import PROTOCOL_VERSION, __version__
from qpbridge.engine import Engine
from qpbridge.errors import (
    BadRequestError,
    BusyError,
    InternalError,
    LimitExceededError,
    QPBridgeError,
    UnknownOpError,
)
from qpbridge.protocol import Limits, check_version, dumps_reply, parse_header, reply_error, reply_ok
from qpbridge.server.jobs import JobManager

log = logging.getLogger("qpbridge")

CAPABILITIES = ["predict", "translate", "jobs", "encoding:raw", "encoding:png", "encoding:jpeg", "busy-retry"]
SLIDE_CAPABILITY = "slide-jobs"
MAX_PAGE = 10000
MAX_ID_CHARS = 256
RETRY_AFTER_MS = 500


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


@dataclass
class Request:
    """One parsed request as the op functions see it."""

    op: str
    id: Any
    header: dict[str, Any]
    frames: list[Any]  # zmq.Frame payloads after the header
    client: bytes  # who asked: the CURVE public key when authenticated, else the ZeroMQ routing id
    envelope: list[bytes] = field(repr=False, default_factory=list)


@dataclass
class _Share:
    """What one client has queued or running on the model pool."""

    requests: int = 0
    tiles: int = 0


@dataclass
class _Queued:
    """A model request waiting for a worker: ``run`` it, or ``drop`` it (its client has gone)."""

    route: bytes  # the ZeroMQ routing id its reply would go to
    run: Callable[[], None]
    drop: Callable[[], None]


class _FairQueue:
    """Model requests, one queue per client; the next comes from the waiting client served longest ago (one
    never served first). A client's backlog delays another client's next request by at most the requests
    already running, never by the whole backlog, even when the backlog arrives one request at a time."""

    FORGET_AFTER = 4096  # clients remembered when last served; past that only waiting ones are kept

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queues: dict[bytes, deque[_Queued]] = {}  # waiting clients, in order of arrival
        self._served: dict[bytes, int] = {}  # client -> tick of the request last taken from it
        self._tick = 0
        self._closed = False

    def put(self, client: bytes, item: _Queued) -> None:
        with self._cond:
            self._queues.setdefault(client, deque()).append(item)
            self._cond.notify()

    def get(self) -> _Queued | None:
        with self._cond:
            while not self._queues and not self._closed:
                self._cond.wait()
            if not self._queues:
                return None
            # min() keeps the first of equals: ties go by arrival. A client whose queue emptied when its last
            # request was taken re-enters at the back of the dict, and its tick keeps it behind newcomers.
            client = min(self._queues, key=lambda c: self._served.get(c, -1))
            queue = self._queues[client]
            item = queue.popleft()
            if not queue:
                del self._queues[client]
            self._tick += 1
            self._served[client] = self._tick
            if len(self._served) > self.FORGET_AFTER:
                self._served = {c: t for c, t in self._served.items() if c in self._queues}
            return item

    def remove(self, routes: set[bytes]) -> list[_Queued]:
        """Take out every waiting request whose reply would go to one of ``routes``."""
        out: list[_Queued] = []
        with self._cond:
            for client in list(self._queues):
                queue = self._queues[client]
                keep = deque(q for q in queue if q.route not in routes)
                out.extend(q for q in queue if q.route in routes)
                if keep:
                    self._queues[client] = keep
                else:
                    del self._queues[client]
        return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queues.clear()
            self._cond.notify_all()


MAX_PEERS = 10_000  # routing ids remembered with their connection (least recently heard from forgotten)


def _peer_name(fd: int) -> str | None:
    """The remote address of the connection on socket ``fd`` now, or None (closed, or not a socket).

    A duplicate of the descriptor is inspected, so the connection libzmq owns is never touched."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        return repr(sock.getpeername())
    except OSError:
        return None
    finally:
        sock.close()


def gone_routes(peers: dict[bytes, tuple[int, str | None]], fd: int, now_on_fd: str | None) -> set[bytes]:
    """Routing ids whose connection closed, told that socket ``fd`` disconnected: those heard from on
    ``fd`` from another remote address than the connection on ``fd`` now (descriptors are reused, and the
    event may arrive after a new client's first message on the same number)."""
    return {route for route, (f, name) in peers.items() if f == fd and name is not None and name != now_on_fd}


def _malloc_trim() -> None:
    """Give freed heap back to the OS (glibc keeps it otherwise, and RSS would never come down)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class Server:
    def __init__(self, engine: Engine, bind: str = "tcp://127.0.0.1:5555", *, limits: Limits | None = None,
                 workers: int = 2, allow_remote: bool = False, slide_roots: list[Path] | None = None,
                 slide_jobs: int = 1, curve_secret: Path | None = None, curve_clients: Path | None = None,
                 cache: Any = None) -> None:
        from qpbridge.server.ops import OPS

        check_bind_address(bind)
        insecure = allow_remote
        if not is_loopback_address(bind) and curve_secret is None and not insecure:
            raise QPBridgeError(
                f"refusing to bind {bind} without authentication: it is reachable from other machines. Create "
                "keys with `qpbridge keys new DIR` and pass --curve-secret DIR/server.key_secret (and "
                "--curve-clients DIR of allowed client keys), or bind tcp://127.0.0.1:PORT; --insecure serves "
                "anyone who reaches the port")
        if curve_clients is not None and curve_secret is None:
            raise QPBridgeError("--curve-clients needs --curve-secret (the server's own key pair)")
        self.engine = engine
        self.bind_address = bind
        self.limits = limits or Limits()
        self.jobs = JobManager(self.limits.job_ttl_s, self.limits.job_grace_s)
        self.workers = max(1, workers)
        self.cache = cache
        self.ops = OPS
        self.slide_roots = [Path(r) for r in (slide_roots or [])]
        for root in self.slide_roots:
            if not root.is_dir():
                raise QPBridgeError(f"slide root {root} is not a directory")
        self._ctx = zmq.Context()
        self._auth: Any = None
        self.curve = curve_secret is not None
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        # libzmq refuses a larger frame before allocating it (the peer is disconnected). It keeps a whole
        # multipart message before handing over its first frame, so the total is checked as frames are read.
        self._router.setsockopt(zmq.MAXMSGSIZE, self.limits.max_frame_bytes)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        if curve_secret is not None:
            self._setup_curve(Path(curve_secret), Path(curve_clients) if curve_clients else None)
        elif not is_loopback_address(bind):
            log.warning("*** INSECURE: serving %s WITHOUT authentication: anyone who reaches this port can run "
                        "models%s. Use --curve-secret. ***", bind,
                        " and read slides below the slide roots" if self.slide_roots else "")
        try:
            self._router.bind(bind)
        except zmq.ZMQError as exc:
            self._close_sockets()
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
        self._fair = _FairQueue()
        self._workers = [threading.Thread(target=self._worker, name=f"qpbridge-worker-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._workers:
            t.start()
        self._light_pool = ThreadPoolExecutor(4, thread_name_prefix="qpbridge-light")
        # Slide jobs read and run whole slides; they queue here so they never starve tile requests.
        self._slide_pool = ThreadPoolExecutor(max(1, slide_jobs), thread_name_prefix="qpbridge-slide")
        self._shares: dict[bytes, _Share] = {}
        self._light: dict[bytes, int] = {}
        self._queued = 0
        self._queued_bytes = 0
        self._share_lock = threading.Lock()
        self._stop = threading.Event()
        self._trim_due = False
        # Who is still connected: a request queued by a client that has gone can never be answered (its
        # routing id dies with its connection), so it is dropped instead of run. libzmq tells which socket
        # each message came from (SRCFD) and when a socket disconnects (the monitor).
        self._peers: OrderedDict[bytes, tuple[int, str | None]] = OrderedDict()
        self._monitor: zmq.Socket | None = self._router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.dropped_requests = 0

    def _setup_curve(self, secret_file: Path, clients: Path | None) -> None:
        from qpbridge.keys import load_secret

        public, secret = load_secret(secret_file)
        if clients is not None:
            from zmq.auth import load_certificates
            from zmq.auth.thread import ThreadAuthenticator

            if not clients.is_dir() or not load_certificates(clients):
                self._close_sockets()
                raise QPBridgeError(f"--curve-clients {clients} holds no client public key (*.key files from "
                                    "`qpbridge keys new`)")
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("qpbridge.auth"))
            self._auth.start()
            self._auth.configure_curve(domain="*", location=str(clients))
        self._router.setsockopt(zmq.CURVE_SERVER, 1)
        self._router.setsockopt(zmq.CURVE_SECRETKEY, secret)
        self._router.setsockopt(zmq.CURVE_PUBLICKEY, public)
        self.public_key = public.decode("ascii")

    def _close_sockets(self) -> None:
        monitor = getattr(self, "_monitor", None)
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._router.disable_monitor()
            monitor.close(linger=0)
            self._monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        self._router.close(linger=0)
        self._ctx.term()

    # ---- lifecycle -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()

    def serve_forever(self) -> None:
        log.info("qpbridge %s serving on %s (protocol %d, device %s, %d workers, %s)", __version__, self.address,
                 PROTOCOL_VERSION, self.engine.device, self.workers,
                 "CURVE authentication" + (" with a client allow-list" if self._auth else "")
                 if self.curve else "no authentication")
        if self.slide_roots:
            log.info("slide jobs read files below: %s", ", ".join(str(r) for r in self.slide_roots))
        log.info("models: %s", ", ".join(
            f"{n} ({c.task}, {c.mpp} µm/px{'' if c.to_wire()['available'] else ', weights missing'})"
            for n, c in sorted(self.engine.cards.items())))
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        if self._monitor is not None:
            poller.register(self._monitor, zmq.POLLIN)
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
                        frames = self._receive()
                        if frames is None:
                            break
                        self._dispatch(*frames)
                if self._monitor is not None and self._monitor in events:
                    self._disconnected()
                if time.monotonic() >= next_sweep:
                    self._sweep()
                    next_sweep = time.monotonic() + 1.0
        finally:
            self._shutdown()

    def _sweep(self) -> None:
        gone = self.jobs.expire()
        for jid, why in gone:
            log.info("job %s %s", jid, why)
        with self._share_lock:
            idle = self._queued == 0
        if gone:
            self._trim_due = True
        if idle and self._trim_due:
            self._trim_due = False
            # A dropped job's stitcher and its run refer to each other: only the cycle collector frees them,
            # and an idle server would not run it for a long time.
            gc.collect()
            _malloc_trim()

    def _shutdown(self) -> None:
        self.jobs.cancel_all()
        self._slide_pool.shutdown(wait=True, cancel_futures=True)
        self._fair.close()
        for t in self._workers:
            t.join()
        self._light_pool.shutdown(wait=True, cancel_futures=True)
        with self._pushers_lock:
            for s in self._pushers:
                s.close(linger=0)
        self._replies.close(linger=0)
        self._close_sockets()
        log.info("qpbridge server stopped")

    # ---- receive, parse, check, route ------------------------------------------------------------
    def _receive(self) -> tuple[list[Any], QPBridgeError | None] | None:
        """One message, frame by frame: past the frame count or byte total, the rest is read and dropped
        at once (never held), and the request is answered ``limit_exceeded``."""
        try:
            first = self._router.recv(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return None
        self._heard_from(first)
        frames, total, err = [first], 0, None
        max_frames = self.limits.max_tiles_per_request + 3  # routing id, delimiter, header, tiles
        more = first.more
        while more:
            frame = self._router.recv(copy=False)
            more = frame.more
            if err is not None:
                continue
            total += len(frame)
            if len(frames) >= max_frames:
                err = LimitExceededError(f"more than {max_frames - 3} payload frames; the limit is "
                                         f"{self.limits.max_tiles_per_request} tiles per request",
                                         limit=self.limits.max_tiles_per_request)
            elif total > self.limits.max_request_bytes:
                err = LimitExceededError(f"request is over {self.limits.max_request_bytes} bytes, the limit")
            if err is not None:
                del frames[3:]  # keep what the reply needs (envelope and header), drop the payload
            else:
                frames.append(frame)
        return frames, err

    def _heard_from(self, first: Any) -> None:
        """Remember which connection (socket and remote address) a routing id speaks through."""
        try:
            fd = int(first.get(zmq.SRCFD))
        except (zmq.ZMQError, AttributeError, TypeError, ValueError):
            return
        route = first.bytes
        known = self._peers.get(route)
        if known is not None and known[0] == fd:
            self._peers.move_to_end(route)
            return
        self._peers[route] = (fd, _peer_name(fd))
        while len(self._peers) > MAX_PEERS:
            self._peers.popitem(last=False)

    def _disconnected(self) -> None:
        """Drop the waiting requests of clients whose connection closed (the monitor said so)."""
        from zmq.utils.monitor import recv_monitor_message

        assert self._monitor is not None
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] != zmq.EVENT_DISCONNECTED:
                continue
            fd = int(event["value"])
            routes = gone_routes(self._peers, fd, _peer_name(fd))
            for route in routes:
                del self._peers[route]
            if not routes:
                continue
            dropped = self._fair.remove(routes)
            for item in dropped:
                item.drop()
            if dropped:
                self.dropped_requests += len(dropped)
                log.info("dropped %d queued requests of a client that disconnected", len(dropped))

    @staticmethod
    def _client_key(first: Any) -> bytes:
        # With a CURVE allow-list, the ZAP handler names the client by its public key: one person's
        # several connections share one fair share.
        try:
            user = first.get("User-Id")
        except (zmq.ZMQError, AttributeError, TypeError):
            user = None
        return ("key:" + user).encode() if user else b"id:" + first.bytes

    def _dispatch(self, frames: list[Any], recv_err: QPBridgeError | None) -> None:
        # REQ and DEALER-with-delimiter clients put an empty frame after the identity; bare DEALER does not.
        if len(frames) >= 2 and len(frames[1]) == 0:
            envelope, body = [frames[0].bytes, b""], frames[2:]
        else:
            envelope, body = [frames[0].bytes], frames[1:]
        if not body:
            self._send(envelope, reply_error(BadRequestError("message has no header frame")))
            return
        op: str | None = None
        req_id: Any = None
        try:
            if len(body[0]) > self.limits.max_request_bytes:
                raise LimitExceededError("header frame over the request limit")
            header = parse_header(body[0].buffer)
            req_id = header.get("id")
            if req_id is not None and (not isinstance(req_id, (str, int)) or isinstance(req_id, bool)
                                       or (isinstance(req_id, str) and len(req_id) > MAX_ID_CHARS)):
                req_id = None
                raise BadRequestError(f"field 'id' must be a string of at most {MAX_ID_CHARS} characters or an "
                                      "integer")
            spec = self.ops.get(header["op"])
            op = header["op"] if spec is not None else header["op"][:64]
            check_version(header)  # after reading the id, so a mismatch reply still reaches its request
            if recv_err is not None:
                raise recv_err
            if spec is None:
                raise UnknownOpError(f"unknown op '{op}'; known ops: {', '.join(self.ops)}", known_ops=list(self.ops))
            req = Request(op=header["op"], id=req_id, header=header, frames=body[1:],
                          client=self._client_key(frames[0]), envelope=envelope)
            if spec.where == "loop":
                self._send(envelope, reply_ok(op, req_id, **spec.run(self, req)))
            elif spec.where == "light":
                self._submit_light(req, spec.run)
            else:
                self._submit_model(req, spec.run)
        except QPBridgeError as err:
            self._send(envelope, reply_error(err, op, req_id))
        except Exception as exc:  # a bug must not kill the server
            log.exception("internal error handling %s", op)
            self._send(envelope, reply_error(InternalError(f"internal error: {type(exc).__name__}"), op, req_id))

    def _send(self, envelope: list[bytes], reply: dict[str, Any]) -> None:
        self._router.send_multipart([*envelope, dumps_reply(reply)])

    # ---- pools -----------------------------------------------------------------------------------
    def _submit_light(self, req: Request, run: Callable[[Server, Request], dict[str, Any]]) -> None:
        with self._share_lock:
            mine = self._light.get(req.client, 0)
            if mine >= 2 or sum(self._light.values()) >= self.limits.max_queued_requests:
                raise BusyError(f"busy: {mine} requests of this client are being prepared; retry after "
                                f"{RETRY_AFTER_MS} ms", retry_after_ms=RETRY_AFTER_MS)
            self._light[req.client] = mine + 1

        def done() -> None:
            with self._share_lock:
                left = self._light[req.client] - 1
                if left:
                    self._light[req.client] = left
                else:
                    del self._light[req.client]

        self._light_pool.submit(self._work, req, run, done)

    def _submit_model(self, req: Request, run: Callable[[Server, Request], dict[str, Any]]) -> None:
        tiles = req.header.get("tiles")
        n = len(tiles) if isinstance(tiles, list) else 0
        size = sum(len(f) for f in req.frames)
        job = self.jobs.peek(req.header.get("job"))
        with self._share_lock:
            share = self._shares.setdefault(req.client, _Share())
            why = None
            if share.requests >= self.limits.max_client_requests:
                why = f"this client has {share.requests} model requests queued or running (at most " \
                      f"{self.limits.max_client_requests})"
            elif share.tiles + n > self.limits.max_client_tiles and share.requests:
                why = f"this client has {share.tiles} tiles queued (at most {self.limits.max_client_tiles})"
            elif self._queued >= self.limits.max_queued_requests:
                why = f"the server has {self._queued} model requests queued"
            elif self._queued_bytes + size > self.limits.max_queued_bytes and self._queued:
                why = f"the server holds {self._queued_bytes >> 20} MiB of queued requests"
            if why is not None:
                if not share.requests:
                    del self._shares[req.client]
                retry = RETRY_AFTER_MS * (1 + self._queued // max(1, self.workers))
                raise BusyError(f"busy: {why}; retry after {retry} ms", retry_after_ms=retry)
            share.requests += 1
            share.tiles += n
            self._queued += 1
            self._queued_bytes += size
            if job is not None:
                with job.lock:
                    job.inflight += 1

        def done() -> None:
            with self._share_lock:
                share.requests -= 1
                share.tiles -= n
                self._queued -= 1
                self._queued_bytes -= size
                if share.requests == 0 and self._shares.get(req.client) is share:
                    del self._shares[req.client]
                if self._queued == 0:
                    self._trim_due = True
            if job is not None:
                with job.lock:
                    job.inflight -= 1
                    job.last_seen = time.monotonic()

        def drop() -> None:
            req.frames = []
            done()

        self._fair.put(req.client, _Queued(req.envelope[0] if req.envelope else b"",
                                           lambda: self._work(req, run, done), drop))

    def _worker(self) -> None:
        while (item := self._fair.get()) is not None:
            item.run()

    def _work(self, req: Request, run: Callable[[Server, Request], dict[str, Any]],
              done: Callable[[], None]) -> None:
        """Run one op on a pool thread; its reply (or error) goes back through the inproc socket."""
        try:
            reply = reply_ok(req.op, req.id, **run(self, req))
        except QPBridgeError as err:
            reply = reply_error(err, req.op, req.id)
        except Exception as exc:
            log.exception("internal error in %s", req.op)
            reply = reply_error(InternalError(f"internal error: {type(exc).__name__}: {exc}"), req.op, req.id)
        finally:
            req.frames = []  # the request's pixels go now, not when the next request replaces them
            done()
        self._pusher().send_multipart([*req.envelope, dumps_reply(reply)])

    def submit_slide(self, fn: Callable[[], None]) -> None:
        self._slide_pool.submit(fn)

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
