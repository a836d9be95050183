"""Shared thread pools: one thread per core for per-tile CPU work (OpenCV, scipy and numpy release the
GIL, so threads use every core without the cost of sending tiles to other processes)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

_POOL: ThreadPoolExecutor | None = None
_LOCK = threading.Lock()


def pool_size() -> int:
    """Threads of the post-processing pool."""
    return max(1, os.cpu_count() or 1)


def reader_threads() -> int:
    """Default slide-reading threads: half the cores, 2 to 8 (JPEG decoding releases the GIL; the other half
    is left to the model's feeders, stitching and features)."""
    return max(2, min(8, (os.cpu_count() or 1) // 2))


def postprocess_pool() -> ThreadPoolExecutor:
    """The process-wide pool for per-tile post-processing, created on first use."""
    global _POOL
    with _LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(pool_size(), thread_name_prefix="qpbridge-post")
        return _POOL
