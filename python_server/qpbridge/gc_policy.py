"""The garbage collector's schedule for runs that build features.

A run builds hundreds of thousands of small containers (features, their rings and measurements) and keeps
them alive until the run ends (positions are tuples of floats, which the collector stops tracking once seen:
``geometry.points``). With CPython's default schedule (a collection every 700 net
allocations) the collector scans those live objects over and over: on a noisy map (``bench/bench_stitch.py``)
a third of the stitching and feature time went to it. None of these containers can form a cycle, so
collecting less often loses nothing; the few cycles a run leaves behind are freed by the next collection,
which the server also forces when it goes idle.

While a run is on, automatic collection is paused altogether (``paused_during_runs``). Every young collection
stops all of the run's threads while it scans what was allocated since the last: mostly the positions of
rings, each scanned once and then no longer tracked. In a run those stops come every 50,000 allocations, while
readers, the model's feeders and the feature threads wait behind them; after the run, one collection scans the
same objects once, with nothing waiting. Measured with ``bench/bench_host.py`` (SegFormer's recorded outputs
for a 32,768 px slide, 7,225 tiles, 2 cores): collecting, 19 collections took 0.16-0.19 s of a 1.5 s run;
paused, the one collection after the run took 0.08-0.10 s (it grows with the objects the run made, in
proportion). A run leaves almost no cyclic garbage (7 to 39 unreachable objects
after that run), so pausing costs no memory, however long the run. When runs overlap back to back for longer
than ``PAUSE_MAX_S``, the one that ends collects the young generations (the cycles made meanwhile: those of
the server's other work) and the pause goes on.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator

# Net allocations between young-generation collections while runs are possible, and how many young (then
# middle) collections make one of the next generation. CPython's defaults are (700, 10, 10).
THRESHOLDS = (50_000, 20, 20)


def relax() -> None:
    """Collect less often (never more often than the process already does); idempotent and cheap."""
    current = gc.get_threshold()
    if current[0] == 0:  # automatic collection is off: leave it so
        return
    wanted = tuple(max(c, t) for c, t in zip(current, THRESHOLDS, strict=True))
    if wanted != current:
        gc.set_threshold(*wanted)


def freeze_startup() -> None:
    """Move everything alive now (imported modules, loaded models) out of every future collection's scan:
    a long-running server then never rescans the torch and model objects it holds for good."""
    gc.collect()
    gc.freeze()


# Longest stretch of overlapping runs without a collection (see the module docstring).
PAUSE_MAX_S = 60.0

_lock = threading.Lock()
_runs = 0
_resume = False  # whether collection was on when the first run in paused it
_since = 0.0  # when the pause began, or its last collection


@contextlib.contextmanager
def paused_during_runs(pause: bool = True) -> Iterator[None]:
    """Automatic collection off while the block runs (with ``pause``). Runs may overlap: the first one in
    pauses it, the last one out turns it back on, if it was on (a process that turned it off keeps it off)."""
    if not pause:
        yield
        return
    global _runs, _resume, _since
    with _lock:
        if _runs == 0:
            _resume = gc.isenabled()
            _since = time.monotonic()
            gc.disable()
        _runs += 1
    try:
        yield
    finally:
        collect = False
        with _lock:
            _runs -= 1
            if _runs == 0:
                if _resume:
                    gc.enable()
            elif _resume and time.monotonic() - _since > PAUSE_MAX_S:
                collect = True
                _since = time.monotonic()
        if collect:  # outside the lock: finalizers the collection runs may start or end runs themselves
            gc.collect(1)
