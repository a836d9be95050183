"""Filtering and tracing class strips in a process of its own.

A whole-slide run on a GPU is bound by host work, not by the device, and every batch passes through the
stitching thread, which shares one interpreter lock with the reading, model and feature threads. Tracing
(:class:`~qpbridge.engine.vectorise.RegionTracer`, with the card's
:class:`~qpbridge.engine.morphology.StripMorphology` in front of it) took most of that thread's time (2.6-5.7 s
of a 5-9 s run of a 7,225-tile slide on an H100): a long, strictly ordered run of small numpy and OpenCV calls
over every strip. Only one uint8 strip goes in and a few polygons come out, so it moves to a child process
cheaply: :class:`RemoteTracer` has the tracer's ``add_strip`` / ``finish``, sends each strip down a pipe and
emits the regions the child sends back (see :func:`pack`) on the caller's thread. A thread of the parent
receives them, so neither side can block the other on a full pipe. (Measured there: faster than tracing on the
stitching thread in each of 12 alternating pairs, by 1-31%.)

On machines with cores to spare, several children share out the classes (each traces its own classes of every
strip; see :class:`RemoteTracer`): a tissue class spanning the slide and a class of thousands of small regions
then trace side by side, and a child tracing one class fills its early holes as it finds them (see
:mod:`qpbridge.engine.vectorise`), so the spanning region's close at the end of a run is shorter. (Measured on
the recorded outputs of SegFormer-B0 over a 32,768² px slide, ``bench/bench_host.py --tracing``: the strips
traced in 0.73-0.78 s by one child, 0.47-0.48 s by two; the finish after the last strip 0.22-0.29 s, 0.11 s.)

The child is a fresh interpreter (safe beside CUDA and threads; nothing of the parent's main script runs in
it) on one end of a socket pair. It is kept for the next run when a run ends cleanly (``IDLE_PROCESSES`` at
most), so a server pays its start-up once. A run that fails or is cancelled ends its child. A child that dies,
or a tracer that raises in it, fails the run with the child's reason.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple

import numpy as np

from qpbridge.engine.morphology import Morphology, StripMorphology
from qpbridge.engine.vectorise import EarlyHoles, HoledRegion, RegionTracer
from qpbridge.errors import InternalError
from qpbridge.kernel_usage import kernel_usage

IDLE_PROCESSES = 4  # finished runs' children kept for the next runs
STRIPS_AHEAD = 8  # strips sent and not yet traced before add_strip waits for the child (held in its inbox)

EmitRegion = Callable[[Any, int], None]
CHILD_THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}


def strip_tracer(width: int, classes: list[int], emit: EmitRegion, *, scale: float, min_area: float,
                 max_hole: float, morphology: Morphology | None, early_holes: bool = False, key_start: int = 0,
                 key_step: int = 1) -> tuple[RegionTracer, StripMorphology | None]:
    """A tracer of class strips and, when the card asks for morphology, the filter strips go through first
    (feeding the tracer); the same chain on the stitching thread or in a tracing process."""
    tracer = RegionTracer(width, classes, emit, scale=scale, min_area=min_area, max_hole=max_hole,
                          early_holes=early_holes, key_start=key_start, key_step=key_step)
    return tracer, StripMorphology(morphology, tracer.add_strip) if morphology is not None else None


# ---- the child ------------------------------------------------------------------------------------------------

def pack(geoms: np.ndarray) -> tuple[Any, ...]:
    """Geometries for the pipe: polygons as shapely's ragged arrays (coordinates, ring and polygon offsets),
    which the parent's stitching thread turns back into geometries three times faster than WKB (either holds
    the interpreter lock throughout); anything else as WKB."""
    import shapely

    if len(geoms) and (shapely.get_type_id(geoms) == shapely.GeometryType.POLYGON).all():
        _, coords, offsets = shapely.to_ragged_array(geoms)
        return ("ragged", coords, *offsets)
    return ("wkb", shapely.to_wkb(geoms).tolist())


def unpack(packed: tuple[Any, ...]) -> np.ndarray:
    """The geometries :func:`pack` packed, as an object array."""
    import shapely

    if packed[0] == "ragged":
        return np.asarray(shapely.from_ragged_array(shapely.GeometryType.POLYGON, packed[1], packed[2:]))
    return np.asarray(shapely.from_wkb(packed[1]))


def _child_main(fd: int) -> None:
    """Entry point of the tracing process: serve on the socket the parent handed over as ``fd``."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it ends this process
    _serve(Connection(fd))


def _serve(conn: Any) -> None:
    """The child's loop: one run at a time, opened, fed strips, finished."""
    import cv2
    import scipy.sparse.csgraph  # noqa: F401  (the tracer's large graphs: 0.3 s of CPU to import, not mid-run)
    import shapely  # noqa: F401  (pack's import, at start rather than in the first answer)

    # One strip at a time: OpenCV's worker threads would only spin on strips this small, on cores the
    # parent's readers and feature builders use.
    cv2.setNumThreads(1)
    tracer: RegionTracer | None = None
    add: Callable[[np.ndarray, bool], None] | None = None
    found: list[tuple[Any, int]] = []
    cpu0 = thread0 = system0 = 0.0
    faults0 = 0

    def usage() -> tuple[float, float, int, float, int]:
        """CPU seconds of this process and of its tracing thread since the run opened, and its threads now (the
        rest of the CPU is the inbox thread's, or thread pools' that should not be there); of the CPU, the
        kernel's, and the page faults taken (first touches of memory: what a fresh process pays, a warm one not)."""
        system, faults = kernel_usage()
        return (time.process_time() - cpu0, time.thread_time() - thread0, _native_threads(), system - system0,
                faults - faults0)

    def send_plain(plain: list[tuple[Any, int]]) -> None:
        geoms = np.empty(len(plain), dtype=object)
        geoms[:] = [g for g, _ in plain]
        conn.send(("regions", pack(geoms), [c for _, c in plain]))

    def answer(reply: tuple[Any, ...]) -> None:
        """Send the regions (and early holes) traced since the last answer, in order, then ``reply``."""
        plain: list[tuple[Any, int]] = []
        for g, c in found:
            if isinstance(g, (EarlyHoles, HoledRegion)):
                if plain:
                    send_plain(plain)
                    plain = []
                if isinstance(g, EarlyHoles):
                    conn.send(("holes", c, pack(g.holes), g.owners.tobytes(), g.row))
                else:
                    conn.send(("holed", c, pack(np.array([g.polygon], dtype=object)), list(g.owners)))
            else:
                plain.append((g, c))
        if plain:
            send_plain(plain)
        found.clear()
        conn.send(reply)

    # A thread takes the strips off the socket as they come: a strip (a few hundred kB) does not fit the socket's
    # buffer, so unread it would block the parent's stitching thread in send until this one finished a chunk.
    inbox: queue.Queue[tuple[Any, ...] | None] = queue.Queue()

    def receive() -> None:
        while True:
            try:
                inbox.put(conn.recv())
            except (EOFError, OSError):  # the parent is gone
                inbox.put(None)
                return

    threading.Thread(target=receive, name="qpbridge-trace-inbox", daemon=True).start()
    while True:
        msg = inbox.get()
        if msg is None:
            return
        kind = msg[0]
        try:
            if kind == "open":
                _, width, classes, scale, min_area, max_hole, morphology, early_holes, key_start, key_step = msg
                tracer, filt = strip_tracer(width, classes, lambda g, c: found.append((g, c)), scale=scale,
                                            min_area=min_area, max_hole=max_hole, morphology=morphology,
                                            early_holes=early_holes, key_start=key_start, key_step=key_step)
                add = (filt or tracer).add_strip
                found.clear()
                cpu0, thread0 = time.process_time(), time.thread_time()
                system0, faults0 = kernel_usage()
            elif kind == "strip":
                _, seq, shape, data, last = msg
                assert tracer is not None and add is not None, "a strip before the run was opened"
                add(np.frombuffer(data, np.uint8).reshape(shape), last)
                answer(("traced", seq + 1, tracer.peak_rows, tracer.regions, *usage()))
            elif kind == "flush":
                _, seq = msg
                assert tracer is not None, "flush before the run was opened"
                tracer.flush()
                answer(("traced", seq + 1, tracer.peak_rows, tracer.regions, *usage()))
            elif kind == "finish":
                assert tracer is not None, "finish before the run was opened"
                tracer.finish()
                answer(("finished", -1, tracer.peak_rows, tracer.regions, *usage()))
                tracer = add = None
            elif kind == "exit":
                return
        except Exception:
            found.clear()
            tracer = add = None
            conn.send(("error", traceback.format_exc(limit=8)))


def _native_threads() -> int:
    """Threads of this process, native ones too (Linux; else the interpreter's)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return threading.active_count()


# ---- the parent -----------------------------------------------------------------------------------------------

class _Child:
    """A tracing process, its pipe and the thread that receives what it sends."""

    def __init__(self) -> None:
        # A fresh interpreter on one end of a socket pair. Not multiprocessing's spawn: that re-imports the
        # parent's main script in the child, which runs a user's unguarded script a second time.
        ours, theirs = socket.socketpair()
        # One thread of work: thread pools of numpy's and scipy's BLAS (a thread per core, spinning after use)
        # would only take cores from the parent's readers and feature builders.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p), **CHILD_THREADS)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", f"from qpbridge.engine.trace_process import _child_main; "
                                       f"_child_main({theirs.fileno()})"],
                pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        except OSError as exc:
            ours.close()
            raise InternalError(f"cannot start the tracing process: {exc}") from None
        finally:
            theirs.close()
        self.conn = Connection(ours.detach())
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.receiver = threading.Thread(target=self._receive, name="qpbridge-trace-receive", daemon=True)
        self.receiver.start()

    def _receive(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.inbox.put(("died",))
                return
            self.inbox.put(msg)

    def send(self, msg: tuple[Any, ...]) -> None:
        self.send_pickled(ForkingPickler.dumps(msg))

    def send_pickled(self, payload: bytes | memoryview) -> None:
        """A message pickled already (what ``Connection.send`` sends; the child's ``recv`` unpickles it)."""
        try:
            self.conn.send_bytes(payload)
        except (BrokenPipeError, OSError):
            raise self.died() from None

    def died(self) -> InternalError:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=1.0)
        return InternalError(f"the tracing process ended unexpectedly (exit code {self.proc.returncode})")

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def end(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            self.conn.send(("exit",))
        try:
            self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=2.0)
        self.conn.close()


_IDLE: list[_Child] = []
_IDLE_LOCK = threading.Lock()


def _acquire() -> _Child:
    with _IDLE_LOCK:
        while _IDLE:
            child = _IDLE.pop()
            if child.alive and child.inbox.empty():
                return child
            child.end()
    return _Child()


def _release(child: _Child) -> None:
    with _IDLE_LOCK:
        if len(_IDLE) < IDLE_PROCESSES and child.alive:
            _IDLE.append(child)
            return
    child.end()


def prestart(processes: int) -> None:
    """Start tracing processes now, idle, up to ``processes`` idle ones in all: a run about to need them then
    does not wait for their start-up (a fresh interpreter's imports, most of a second). Returns at once."""
    with _IDLE_LOCK:
        missing = min(processes, IDLE_PROCESSES) - sum(1 for child in _IDLE if child.alive)
    for _ in range(missing):
        _release(_Child())


@atexit.register
def _end_idle() -> None:
    with _IDLE_LOCK:
        children, _IDLE[:] = list(_IDLE), []
    for child in children:
        child.end()


class _ChildStats(NamedTuple):
    """What a child's last answer said of its run: its tracer's state and its ``usage()`` since the run opened."""

    peak_rows: int = 0
    regions: int = 0
    cpu_s: float = 0.0
    thread_s: float = 0.0
    threads: int = 0
    system_s: float = 0.0
    faults: int = 0


class RemoteTracer:
    """A :class:`~qpbridge.engine.vectorise.RegionTracer` (and morphology filter) running in child processes.

    With ``processes`` > 1 the classes are shared out among that many children (contiguous groups, in order),
    each tracing its own classes of every strip in parallel: the classes of a raster are traced independently,
    so only the region keys need to be told apart (each child takes every n-th). Each strip goes to every child;
    their answers are taken in turn, request by request, so regions come out in the order one tracer of all the
    classes emits them. Each child keeps the raster rows its own open regions need (see
    :mod:`qpbridge.engine.vectorise`: at most one byte per output pixel each).

    ``emit(geometry, class)`` is called on the thread that calls :meth:`add_strip`, :meth:`sync` or
    :meth:`finish`, in the order the regions were traced. ``busy_s`` is the children's CPU time for this run
    (``system_s`` of it the kernel's, with ``faults`` page faults: what first touches of memory cost),
    ``wait_s`` the time :meth:`add_strip` waited for them (``STRIPS_AHEAD`` strips behind): above a few hundredths
    of a second, the children are what the stitching waits for.
    The processes are taken at construction (from the idle ones, or started), so they start up while the run's
    first tiles are read and run; :meth:`open` is called with the raster's width when the first tile sets it.
    """

    def __init__(self, emit: EmitRegion, processes: int = 1) -> None:
        self.emit = emit
        self.children: list[_Child] = []
        try:
            for _ in range(max(1, processes)):
                self.children.append(_acquire())
        except BaseException:
            self.close()
            raise
        self.width = 0
        self.processes = len(self.children)  # tracing this run (fewer once opened with fewer classes)
        self.sent = 0  # requests sent (strips and flushes), to every child
        self.traced = 0  # requests every child has answered, their regions emitted
        self.wait_s = 0.0
        self._stats: list[_ChildStats] = []  # per child, from its last answer
        self._partial: list[list[tuple[Any, ...]]] = []  # per child: messages of the answer being received
        self._answers: list[deque[list[tuple[Any, ...]]]] = []  # per child: whole answers not emitted yet
        self._turn = 0  # the child whose answer is emitted next
        self._finished = 0  # children whose finish was emitted

    @property
    def child(self) -> _Child | None:
        """The first tracing process (the only one, by default), or None once the run gave them back."""
        return self.children[0] if self.children else None

    # ---- the run's stats, summed over the children (as of their answers emitted so far) ----

    @property
    def peak_rows(self) -> int:
        """Raster rows retained at once, summed over the children (each at its own peak)."""
        return sum(s.peak_rows for s in self._stats)

    @property
    def regions(self) -> int:
        return sum(s.regions for s in self._stats)

    @property
    def busy_s(self) -> float:
        return sum(s.cpu_s for s in self._stats)

    @property
    def thread_s(self) -> float:
        """Of ``busy_s``, the children's tracing threads'."""
        return sum(s.thread_s for s in self._stats)

    @property
    def threads(self) -> int:
        """The most threads a child had."""
        return max((s.threads for s in self._stats), default=0)

    @property
    def system_s(self) -> float:
        """Of ``busy_s``, the kernel's."""
        return sum(s.system_s for s in self._stats)

    @property
    def faults(self) -> int:
        """Page faults the children took."""
        return sum(s.faults for s in self._stats)

    def open(self, width: int, classes: list[int], *, scale: float = 1.0, min_area: float = 0.0,
             max_hole: float = 0.0, morphology: Morphology | None = None, early_holes: bool = False) -> None:
        n = max(1, min(len(self.children), len(classes)))
        for child in self.children[n:]:  # more processes than classes: the rest go back
            _release(child)
        del self.children[n:]
        self.width = width
        self.processes = n
        self._stats = [_ChildStats()] * n
        self._partial = [[] for _ in range(n)]
        self._answers = [deque() for _ in range(n)]
        per = -(-len(classes) // n) if classes else 0
        for i, child in enumerate(self.children):
            self._send_to(child, ForkingPickler.dumps(("open", width, list(classes[i * per:(i + 1) * per]),
                                                       float(scale), float(min_area), float(max_hole), morphology,
                                                       bool(early_holes), i, n)))

    def add_strip(self, strip: np.ndarray, last: bool = False) -> None:
        strip = np.ascontiguousarray(strip, dtype=np.uint8)
        if strip.ndim != 2 or strip.shape[1] != self.width:
            raise ValueError(f"strips must be (h, {self.width}) uint8, got {strip.shape}")
        self._send(("strip", self.sent, strip.shape, strip.tobytes(), last))
        self.sent += 1
        self._take(block_until=self.sent - STRIPS_AHEAD)

    def sync(self) -> None:
        """Trace every strip sent so far, those waiting for a full chunk too, and emit their regions."""
        if self.width:
            self._send(("flush", self.sent))
            self.sent += 1
        self._take(block_until=self.sent)

    def finish(self) -> None:
        """Close every region (as ``RegionTracer.finish``), emit them and give the processes back for reuse."""
        if not self.children:
            return
        if self.width:  # opened: else there is nothing to finish
            self._send(("finish",))
            self._take(block_until=self.sent, finished=True)
        children, self.children = self.children, []
        for child in children:
            _release(child)

    def close(self) -> None:
        """End the run without finishing it (failed or cancelled): the processes are ended, not reused."""
        children, self.children = self.children, []
        for child in children:
            child.end()

    def _send(self, msg: tuple[Any, ...]) -> None:
        if not self.children:
            raise InternalError("the tracing process of this run was already closed")
        payload = ForkingPickler.dumps(msg)  # pickled once for every child (a strip is a few hundred kB)
        for child in self.children:
            self._send_to(child, payload)

    def _send_to(self, child: _Child, payload: bytes | memoryview) -> None:
        try:
            child.send_pickled(payload)
        except InternalError:
            self.close()
            raise

    def _take(self, block_until: int, finished: bool = False) -> None:
        """Emit the regions received, answer by answer in turn; block until ``block_until`` requests are answered
        by every child (and, with ``finished``, until each acknowledged the run's finish)."""
        if not self.width:  # never opened: nothing was sent
            return
        n = len(self.children)
        while True:
            for c in range(n):  # file what has come
                while True:
                    try:
                        msg = self.children[c].inbox.get_nowait()
                    except queue.Empty:
                        break
                    self._file(c, msg)
            self._emit_ready()
            if not (self.traced < block_until or (finished and self._finished < n)):
                return
            c = self._turn  # the answer needed next
            child = self.children[c]
            t = time.perf_counter()
            try:
                got = child.inbox.get(timeout=1.0)
            except queue.Empty:
                if not child.alive and child.inbox.empty():
                    self.close()
                    raise child.died() from None
                continue
            finally:
                if not finished:
                    self.wait_s += time.perf_counter() - t
            self._file(c, got)

    def _file(self, c: int, msg: tuple[Any, ...]) -> None:
        """Put a message of child ``c`` with the answer it belongs to (an answer ends with its acknowledgement)."""
        kind = msg[0]
        if kind == "error":
            self.close()
            raise InternalError(f"tracing failed in its process:\n{msg[1]}")
        if kind == "died":
            child = self.children[c]
            self.close()
            raise child.died()
        self._partial[c].append(msg)
        if kind in ("traced", "finished"):
            self._answers[c].append(self._partial[c])
            self._partial[c] = []

    def _emit_ready(self) -> None:
        """Emit whole answers in turn, child by child, as long as the next one has come."""
        n = len(self.children)
        while self._answers[self._turn]:
            c = self._turn
            for msg in self._answers[c].popleft():
                kind = msg[0]
                if kind == "regions":
                    for geom, cls in zip(unpack(msg[1]), msg[2], strict=True):
                        self.emit(geom, int(cls))
                elif kind == "holes":
                    self.emit(EarlyHoles(unpack(msg[2]), np.frombuffer(msg[3], np.int64).copy(), int(msg[4])),
                              int(msg[1]))
                elif kind == "holed":
                    self.emit(HoledRegion(unpack(msg[2])[0], tuple(msg[3])), int(msg[1]))
                else:  # (kind, requests answered or -1, peak rows, regions, then the child's usage())
                    self._stats[c] = _ChildStats(int(msg[2]), int(msg[3]), float(msg[4]), float(msg[5]), int(msg[6]),
                                                 float(msg[7]), int(msg[8]))
                    if kind == "finished":
                        self._finished += 1
            self._turn = (c + 1) % n
            if self._turn == 0 and msg[0] == "traced":  # every child answered this request
                self.traced = int(msg[1])
