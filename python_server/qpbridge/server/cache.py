"""A bounded on-disk cache of model results per tile, so a job re-run after a crash recomputes only what
is missing.

Keys are SHA-256 digests of everything a tile's result depends on (see ``tile_key``): the source (a slide
file's real path, size, mtime and inode; for tiles a client sends, the pixels themselves), the model card
and its weights file, and the tile's geometry in the plan. Entries are written whole (temporary file, then
rename), so a kill -9 leaves no half entry; an unreadable entry counts as a miss and is removed. The cache
holds at most ``max_bytes``; the least recently used entries go first.

Entries are pickles, so the folder must be private to the server's user: it is created mode 0700 and a
folder that other users can write to is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import stat
import tempfile
import threading
from pathlib import Path
from typing import Any

from qpbridge.errors import QPBridgeError

log = logging.getLogger("qpbridge")

SUFFIX = ".tile"


def card_digest(card: Any) -> bytes:
    """What a model's results depend on: its card and its weights file (size and mtime)."""
    h = hashlib.sha256(json.dumps(card.to_wire(), sort_keys=True, default=str).encode())
    h.update(json.dumps(card.params, sort_keys=True, default=str).encode())
    h.update(json.dumps(card.normalization, sort_keys=True, default=str).encode())
    weights = getattr(card, "weights", None)
    if weights is not None:
        try:
            st = os.stat(weights)
            h.update(f"{weights}:{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"weights-missing")
    return h.digest()


def slide_digest(real: Path, st: os.stat_result, mpp: float | None) -> bytes:
    """A slide file's identity: real path, size, modification time and inode, and the pixel size used."""
    return hashlib.sha256(f"{real}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0{mpp!r}".encode()).digest()


def tile_key(source: bytes | None, card: bytes, geometry: tuple[Any, ...], pixels: Any = None) -> str:
    """The cache key of one tile; ``pixels`` (hashed) stands in for ``source`` when the client sent them."""
    h = hashlib.sha256(card)
    h.update(repr(geometry).encode())
    if source is not None:
        h.update(source)
    else:
        h.update(memoryview(pixels).cast("B") if pixels is not None else b"")
    return h.hexdigest()


class TileCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max(0, int(max_bytes))
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = self.root.stat()
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or (hasattr(os, "getuid") and st.st_uid != os.getuid()):
            raise QPBridgeError(f"cache folder {self.root} must belong to this user and be writable only by it "
                                "(chmod 700)")
        self._lock = threading.Lock()
        self._sizes: dict[Path, tuple[int, int]] = {}  # path -> (size, mtime_ns)
        for p in self.root.glob(f"*/*{SUFFIX}"):
            try:
                s = p.stat()
            except OSError:
                continue
            self._sizes[p] = (s.st_size, s.st_mtime_ns)
        for p in self.root.glob("*/.tmp*"):  # left by a kill -9 during a write
            p.unlink(missing_ok=True)
        self.hits = self.misses = 0
        self._evict()

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return sum(s for s, _ in self._sizes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sizes)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SUFFIX}"

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                value = pickle.load(f)
            os.utime(path)  # least recently used goes first
        except FileNotFoundError:
            with self._lock:
                self.misses += 1
            return None
        except Exception as exc:  # a damaged entry is a miss, and goes
            log.warning("tile cache entry %s unreadable (%s): removed", path.name, type(exc).__name__)
            path.unlink(missing_ok=True)
            with self._lock:
                self._sizes.pop(path, None)
                self.misses += 1
            return None
        with self._lock:
            self.hits += 1
            if path in self._sizes:
                self._sizes[path] = (self._sizes[path][0], os.stat(path).st_mtime_ns)
        return value

    def put(self, key: str, value: Any) -> None:
        path = self._path(key)
        data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        if len(data) > self.max_bytes:
            return
        path.parent.mkdir(exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(prefix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        with self._lock:
            self._sizes[path] = (len(data), os.stat(path).st_mtime_ns)
        self._evict()

    def _evict(self) -> None:
        with self._lock:
            total = sum(s for s, _ in self._sizes.values())
            if total <= self.max_bytes:
                return
            for path, (size, _) in sorted(self._sizes.items(), key=lambda kv: kv[1][1]):
                if total <= self.max_bytes:
                    break
                path.unlink(missing_ok=True)
                del self._sizes[path]
                total -= size


class PlanResults:
    """The cache seen by one plan run (``engine.session.ResultStore``); counts the tiles it supplied."""

    def __init__(self, cache: TileCache, card: bytes, plan: Any, source: bytes | None) -> None:
        self.cache = cache
        self.card = card
        self.plan = plan
        self.source = source
        self.hits = 0
        self._lock = threading.Lock()

    def _key(self, tile: Any, px: Any) -> str:
        p = self.plan
        geometry = (p.ds, p.origin_x, p.origin_y, p.tile, p.overlap, tile.x, tile.y, tile.w, tile.h)
        return tile_key(self.source, self.card, geometry, None if self.source is not None else px)

    def get(self, tile: Any, px: Any) -> Any | None:
        found = self.cache.get(self._key(tile, px))
        if found is not None:
            with self._lock:
                self.hits += 1
        return found

    def put(self, tile: Any, px: Any, result: Any) -> None:
        try:
            self.cache.put(self._key(tile, px), result)
        except OSError as exc:  # a full disk must not fail the job: the result is simply not kept
            log.warning("tile cache write failed: %s", exc)
