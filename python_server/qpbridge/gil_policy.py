"""The interpreter's thread switch interval while engine runs are on.

A run's threads spend most of their time in C (JPEG decoding, numpy, torch, shapely, OpenCV), which gives up
the GIL; taking it back while another thread runs Python waits until that thread is made to let go, which
happens only once the switch interval has passed (CPython's default: 5 ms). A run makes thousands of such
calls a second on every thread, so at the default they queue behind whichever thread is running Python,
while cores stand idle. Measured with ``bench/bench_stitch.py --reading-contended`` (the engine's reader, a
run's first band of 8 blocks of a JPEG-tiled slide): 75 ms alone; beside one thread running Python 3,090 ms
at 5 ms, 697 ms at 1 ms, 406 ms at 0.5 ms. A shorter interval costs a thread running Python only the more
frequent hand-overs.

So while any run is on, the interval is at most ``RUN_SWITCH_INTERVAL_S``; the process's own setting comes
back when the last run ends (an application embedding the engine keeps its own outside runs).
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

RUN_SWITCH_INTERVAL_S = 0.0005

_lock = threading.Lock()
_runs = 0
_saved = 0.0


@contextlib.contextmanager
def run_switch_interval(interval: float | None = RUN_SWITCH_INTERVAL_S) -> Iterator[None]:
    """While the block runs, the switch interval is at most ``interval`` (None or 0: left alone). Runs may
    overlap: the first one in sets it (never longer than the process had), the last one out restores it."""
    if not interval:
        yield
        return
    global _runs, _saved
    with _lock:
        if _runs == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(interval, _saved))
        _runs += 1
    try:
        yield
    finally:
        with _lock:
            _runs -= 1
            if _runs == 0:
                sys.setswitchinterval(_saved)
