"""The garbage collector's schedule for runs that build features.

A run builds hundreds of thousands of small containers (features, their rings and measurements) and keeps
them alive until the run ends (positions are tuples of floats, which the collector stops tracking once seen:
``geometry.points``). With CPython's default schedule (a collection every 700 net
allocations) the collector scans those live objects over and over: on a noisy map (``bench/bench_stitch.py``)
a third of the stitching and feature time went to it. None of these containers can form a cycle, so
collecting less often loses nothing; the few cycles a run leaves behind (a stitcher and its run) are freed
by the next collection, which the server also forces when it goes idle.
"""

from __future__ import annotations

import gc

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
