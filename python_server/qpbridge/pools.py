"""Shared thread pools: one thread per core for per-tile CPU work (OpenCV, scipy and numpy release the
GIL, so threads use every core without the cost of sending tiles to other processes)."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

R = TypeVar("R")

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


def split_map(func: Callable[[Any], R], items: Any, min_chunk: int) -> list[R]:
    """``func`` of consecutive slices of ``items`` (at least ``min_chunk`` long), in order: the slices run on the
    post-processing pool beside the calling thread, for work that gives up the GIL (vectorised shapely calls
    over the rings of one huge polygon, say, whose build would otherwise be one thread's work).

    Safe from a task of that pool itself: the caller runs every slice no thread has started, and waits only for
    slices running on threads that wait for nothing."""
    n = len(items)
    parts = min(pool_size(), n // max(1, min_chunk))
    if parts <= 1:
        return [func(items)]
    bounds = [n * k // parts for k in range(parts + 1)]
    slices = [items[a:b] for a, b in itertools.pairwise(bounds)]
    pool = postprocess_pool()
    futures = [pool.submit(func, part) for part in slices[1:]]
    out = [func(slices[0])]
    for fut, part in zip(futures, slices[1:], strict=True):
        out.append(func(part) if fut.cancel() else fut.result())
    return out
