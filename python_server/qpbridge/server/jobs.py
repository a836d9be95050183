"""Server-side jobs: one model on one image, tiles in batches, progress, paged results, cancel, expiry."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from qpbridge.errors import JobStateError, QPBridgeError, UnknownJobError
from qpbridge.protocol import ImageInfo, TileSpec

RUNNING, DONE, CANCELLED, FAILED = "running", "done", "cancelled", "failed"


@dataclass
class Job:
    id: str
    model: str
    image: ImageInfo
    expected: int | None
    kind: str = "tiles"  # "tiles": the client sends tiles; "slide": the server reads the slide itself
    owner: bytes = b""  # the client that opened it (ZeroMQ routing id, or its CURVE key)
    inflight: int = 0  # requests naming this job that are queued or running
    created: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    state: str = RUNNING
    error: dict[str, Any] | None = None
    features: list[dict[str, Any]] = field(default_factory=list)
    tiles_done: int = 0
    first_tile_at: float | None = None
    last_tile_at: float | None = None
    claimed: set[tuple[int, int, float, int, int]] = field(default_factory=set)
    stitch: Any = None  # session.PlanRun when the server planned the tiles (seam-free results)
    results: Any = None  # cache.PlanResults when the server keeps tile results on disk
    reserved: int = 0  # bytes of blending buffers reserved for ``stitch`` (released when it goes)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    cancel_event: threading.Event = field(default_factory=threading.Event, repr=False)

    def claim(self, specs: list[TileSpec]) -> tuple[list[int], int]:
        """Indices of tiles this batch must process; tiles done or in flight elsewhere are skipped."""
        with self.lock:
            if self.kind != "tiles":
                raise JobStateError(f"job {self.id} reads its slide on the server; it takes no tiles")
            if self.state != RUNNING:
                raise JobStateError(f"job {self.id} is {self.state}; it takes no more tiles")
            todo, skipped = [], 0
            for i, spec in enumerate(specs):
                if spec.key in self.claimed:
                    skipped += 1
                else:
                    self.claimed.add(spec.key)
                    todo.append(i)
            return todo, skipped

    def release(self, specs: list[TileSpec]) -> None:
        """Give back claims of tiles that were not processed (cancel, failure), so a re-send works."""
        with self.lock:
            for spec in specs:
                self.claimed.discard(spec.key)

    def record(self, features: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        with self.lock:
            self.features.extend(features)
            self.tiles_done += 1
            if self.first_tile_at is None:
                self.first_tile_at = now
            self.last_tile_at = now

    def add_feature(self, feature: dict[str, Any]) -> None:
        with self.lock:
            self.features.append(feature)

    def set_progress(self, done: int, expected: int | None = None) -> None:
        now = time.monotonic()
        with self.lock:
            if expected is not None:
                self.expected = expected
            self.tiles_done = done
            if done and self.first_tile_at is None:
                self.first_tile_at = now
            self.last_tile_at = now

    def complete(self) -> None:
        """A server-side job ran to its end (a cancelled or failed job keeps that state)."""
        with self.lock:
            if self.state == RUNNING:
                self.state = DONE
            self.last_seen = time.monotonic()

    def fail(self, err: QPBridgeError) -> None:
        with self.lock:
            if self.state == RUNNING:
                self.state = FAILED
                self.error = err.to_wire()
            self.last_seen = time.monotonic()

    def cancel(self) -> None:
        with self.lock:
            if self.state == RUNNING:
                self.state = CANCELLED
            self.cancel_event.set()

    def drop(self) -> None:
        """Cancel and let go of everything the job holds (its client is gone: nobody will read it)."""
        self.cancel()
        with self.lock:
            self.features = []
            self.claimed = set()
            self.stitch, self.reserved = None, 0

    def running(self) -> bool:
        with self.lock:
            return self.state == RUNNING

    def finish(self) -> None:
        with self.lock:
            if self.kind != "tiles":
                raise JobStateError(f"job {self.id} reads its slide on the server and finishes by itself")
            if self.state != RUNNING:
                raise JobStateError(f"job {self.id} is {self.state}; only a running job can be finished")
            if self.stitch is not None:
                if self.tiles_done < (self.expected or 0):
                    raise JobStateError(f"job {self.id} has {self.tiles_done} of its {self.expected} planned tiles; "
                                        "send the rest before job.finish")
                self.stitch.finish()
                self.stitch, self.reserved = None, 0  # its buffers go now, not when the job is closed
            self.state = DONE

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        with self.lock:
            rate = None
            if self.first_tile_at is not None and self.tiles_done > 0:
                # Time from the job's start: the first tile's own processing time counts too.
                span = max((self.last_tile_at or now) - self.created, 1e-6)
                rate = self.tiles_done / span
            eta = None
            if self.state == RUNNING and rate and self.expected is not None:
                eta = max(self.expected - self.tiles_done, 0) / rate
            return {
                "job": self.id,
                "kind": self.kind,
                "model": self.model,
                "state": self.state,
                "tiles_done": self.tiles_done,
                "tiles_expected": self.expected,
                "features": len(self.features),
                "elapsed_s": round(now - self.created, 3),
                "tiles_per_s": round(rate, 3) if rate else None,
                "eta_s": round(eta, 3) if eta is not None else None,
                "error": self.error,
                "cached_tiles": self.results.hits if self.results is not None else 0,
            }

    def page(self, offset: int, limit: int) -> dict[str, Any]:
        with self.lock:
            total = len(self.features)
            page = self.features[offset:offset + limit]
            end = offset + len(page)
            more = end < total or self.state == RUNNING
            return {"features": page, "offset": offset, "total": total,
                    "next_offset": end if more else None, "state": self.state}


class JobManager:
    """All open jobs. A running job no request has named for ``grace_s`` seconds (and with no request of
    its own queued) is cancelled and dropped: its client is gone. Any job untouched for ``ttl_s`` expires."""

    def __init__(self, ttl_s: float = 600.0, grace_s: float | None = None) -> None:
        self.ttl_s = ttl_s
        self.grace_s = ttl_s if grace_s is None else grace_s
        self._jobs: dict[str, Job] = {}
        self._expired: dict[str, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def open(self, model: str, image: ImageInfo, expected: int | None, kind: str = "tiles", owner: bytes = b"",
             job_id: str | None = None) -> Job:
        job = Job(id=job_id or secrets.token_hex(8), model=model, image=image, expected=expected, kind=kind,
                  owner=owner)
        with self._lock:
            old = self._jobs.pop(job.id, None)
            self._jobs[job.id] = job
        if old is not None:
            old.drop()
        return job

    def reserve(self, nbytes: int, budget: int) -> bool:
        """Whether ``nbytes`` more of blending buffers fit in ``budget`` beside the running jobs' ones."""
        with self._lock:
            held = sum(j.reserved for j in self._jobs.values() if j.state == RUNNING)
            return held + nbytes <= budget

    def running_of(self, owner: bytes) -> int:
        with self._lock:
            return sum(1 for j in self._jobs.values() if j.owner == owner and j.state == RUNNING)

    def peek(self, job_id: Any) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id) if isinstance(job_id, str) else None

    def get(self, job_id: Any) -> Job:
        if not isinstance(job_id, str):
            raise UnknownJobError("field 'job' must be the job id string returned by job.open")
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                if job_id in self._expired:
                    raise UnknownJobError(f"job {job_id[:64]} {self._expired[job_id][1]}; open a new job")
                raise UnknownJobError(f"no job {job_id[:64]} on this server (never opened, or closed)")
            job.last_seen = time.monotonic()
            return job

    def close(self, job_id: Any) -> None:
        job = self.get(job_id)
        with self._lock:
            self._jobs.pop(job.id, None)
        job.drop()

    def expire(self) -> list[tuple[str, str]]:
        """Drop abandoned and expired jobs; returns (id, why) of each."""
        now = time.monotonic()
        gone: list[tuple[str, str]] = []
        dropped: list[Job] = []
        with self._lock:
            for jid, j in list(self._jobs.items()):
                idle = now - j.last_seen
                running = j.state == RUNNING
                if running and j.inflight == 0 and idle > self.grace_s:
                    why = f"was cancelled after {self.grace_s:g} s without a request from its client"
                elif idle > self.ttl_s and (not running or (j.kind == "tiles" and j.inflight == 0)):
                    why = f"expired after {self.ttl_s:.0f} s without requests"
                else:
                    continue
                dropped.append(self._jobs.pop(jid))
                self._expired[jid] = (now, why)
                gone.append((jid, why))
            # Remember expired ids for a while so a late client hears "expired", not "unknown".
            for jid in [k for k, (t, _) in self._expired.items() if now - t > 10 * self.ttl_s]:
                del self._expired[jid]
        for job in dropped:
            job.drop()
        return gone

    def cancel_all(self) -> None:
        with self._lock:
            for job in self._jobs.values():
                job.cancel()

    def __len__(self) -> int:
        with self._lock:
            return len(self._jobs)
