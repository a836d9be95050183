"""Shared torch runtime for model families: the device, and a worker thread that batches across callers.

One :class:`DeviceWorker` owns one loaded model on one device. Any number of threads (server workers, jobs,
clients) call :meth:`DeviceWorker.submit` with a batch of uint8 RGB tiles and get a ``Future``; the worker
thread takes the oldest waiting request, adds every other waiting request whose tiles have the same size
until ``max_batch`` tiles are gathered (waiting at most ``max_wait_s`` for more when the batch is not full),
runs one forward pass and hands each caller its own slice of the output. So tiles from several jobs and
clients share forward passes and the GPU sees large batches even when each caller sends a few tiles.

Preprocessing happens on the device, not in the callers: uint8 NHWC tiles are copied once into a (pinned,
on CUDA) host tensor, moved with a non-blocking copy, viewed as NCHW (which is exactly the channels-last
layout), converted to float and normalised as ``(x / scale - mean) / std`` in one fused multiply-subtract.
The model runs under ``torch.inference_mode`` and, on CUDA only, under autocast in the card's precision
(``fp16`` or ``bf16``; ``fp32`` means no autocast). CPU always runs fp32.

Output: per-class softmax probabilities ``(N, C, H, W)`` at the *input* tile size; logits smaller than the
input (SegFormer's are a quarter of it) are upsampled bilinearly on the device before the softmax. The
arrays are float32 from a CPU model and float16 from a CUDA model: probabilities only need about three
decimals for blending and argmax, and float16 halves the device-to-host traffic, which at tens of
thousands of tiles per second is what limits throughput. On CUDA the copy back is asynchronous and a
second thread hands results to callers, so the next batch is prepared and launched while the previous one
is still being copied.

Errors inside a forward pass (including GPU out-of-memory after halving the batch down to one tile) are
set on every waiting ``Future`` as :class:`~qpbridge.errors.ModelLoadError` with the model, batch and
device in the message; the worker thread survives and serves the next requests.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from qpbridge.errors import ModelCardError, ModelLoadError, QPBridgeError, TileError

log = logging.getLogger("qpbridge")

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MAX_WAIT_S = 0.002


def resolve_torch_device(device: str) -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> a ``torch.device`` that exists on this machine.

    'auto' picks the first GPU when torch sees one; asking for CUDA without one is an error (never a silent
    fall back to the CPU, which would make a whole-slide job a hundred times slower without saying so).
    """
    from qpbridge.devices import resolve_device

    name = resolve_device(device)
    dev = torch.device(name)
    if dev.type == "cuda":
        index = 0 if dev.index is None else dev.index
        count = torch.cuda.device_count()
        if index >= count:
            raise QPBridgeError(f"device {device} was asked for but torch sees {count} CUDA device(s)")
        dev = torch.device("cuda", index)
    return dev


@dataclass(frozen=True)
class Normalization:
    """``(x / scale - mean) / std`` per RGB channel."""

    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 255.0

    @classmethod
    def from_card(cls, values: dict[str, Any], default_mean: Sequence[float] = (0.0, 0.0, 0.0),
                  default_std: Sequence[float] = (1.0, 1.0, 1.0)) -> Normalization:
        """The card's ``normalization`` block; keys it leaves out take the family's defaults."""
        mean = tuple(float(v) for v in values.get("mean", default_mean))
        std = tuple(float(v) for v in values.get("std", default_std))
        scale = float(values.get("scale", 255.0))
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0 or scale <= 0:
            raise ModelCardError(f"normalization needs 3 means, 3 positive stds and a positive scale, got "
                                 f"mean={mean}, std={std}, scale={scale}")
        return cls((mean[0], mean[1], mean[2]), (std[0], std[1], std[2]), scale)


def precision_param(params: dict[str, Any]) -> str:
    value = params.get("precision", "fp32")
    if value not in PRECISIONS:
        raise ModelCardError(f"card parameter 'precision' must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return str(value)


def extract_logits(output: Any) -> torch.Tensor:
    """The logits tensor of a model's output: the tensor itself, a dict's ``logits`` (else first) entry,
    an object's ``logits`` attribute, or the first element of a tuple/list."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict):
        if "logits" in output:
            return extract_logits(output["logits"])
        if output:
            return extract_logits(next(iter(output.values())))
    if hasattr(output, "logits"):
        return extract_logits(output.logits)
    if isinstance(output, (tuple, list)) and output:
        return extract_logits(output[0])
    raise ModelLoadError(f"model output of type {type(output).__name__} holds no logits tensor")


@dataclass
class _Request:
    tiles: np.ndarray  # (n, H, W, 3) uint8, C-contiguous
    future: Future[np.ndarray]

    @property
    def n(self) -> int:
        return int(self.tiles.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.tiles.shape[1]), int(self.tiles.shape[2])


@dataclass
class _Pending:
    """A launched batch whose (host) output may still be in flight."""

    requests: list[_Request]
    output: torch.Tensor | None
    event: Any = None  # torch.cuda.Event when the copy back is asynchronous
    error: BaseException | None = None


_STOP = object()


class DeviceWorker:
    """A daemon thread that owns ``model`` on ``device`` and runs batches submitted from any thread.

    ``model`` is called with one float tensor (N, 3, H, W); its output is anything :func:`extract_logits`
    understands, with logits (N, C, h, w). ``n_outputs`` (the card's class count), when given, is checked on
    every batch. ``forward_passes`` and ``tiles_processed`` count the work done (for tests and stats).
    """

    def __init__(self, model: Callable[[torch.Tensor], Any], device: torch.device, *, name: str = "model",
                 n_outputs: int | None = None, normalization: Normalization | None = None,
                 precision: str = "fp32", max_batch: int = 32, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 channels_last: bool = True) -> None:
        if precision not in PRECISIONS:
            raise ModelCardError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if max_batch < 1 or max_wait_s < 0:
            raise ModelCardError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        self.name = name
        self.device = device
        self.n_outputs = n_outputs
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.normalization = normalization or Normalization()
        self.cuda = device.type == "cuda"
        self.precision = precision if self.cuda else "fp32"
        self.autocast = self.cuda and precision != "fp32"
        self.out_dtype = torch.float16 if self.cuda else torch.float32
        self.channels_last = channels_last
        self.forward_passes = 0
        self.tiles_processed = 0

        if isinstance(model, torch.nn.Module):
            model.eval()
            model.to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
        self.model: Callable[[torch.Tensor], Any] | None = model
        norm = self.normalization
        std = torch.tensor(norm.std, dtype=torch.float32)
        mean = torch.tensor(norm.mean, dtype=torch.float32)
        # (x / scale - mean) / std == x * mul - sub
        self._mul = (1.0 / (norm.scale * std)).view(1, 3, 1, 1).to(device)
        self._sub = (mean / std).view(1, 3, 1, 1).to(device)

        self._queue: deque[_Request] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._done: queue.Queue[Any] | None = queue.Queue(maxsize=2) if self.cuda else None
        self._thread = threading.Thread(target=self._loop, name=f"qpbridge-{name}-{device}", daemon=True)
        self._finisher: threading.Thread | None = None
        if self._done is not None:
            self._finisher = threading.Thread(target=self._finish_loop, name=f"qpbridge-{name}-results", daemon=True)
            self._finisher.start()
        self._thread.start()
        where = str(device)
        if self.cuda:
            where += f" ({torch.cuda.get_device_name(device)})"
        if precision != self.precision:
            log.info("model %s: precision %s asked for, but %s runs fp32", name, precision, device)
        log.info("model %s runs on %s, %s, batches of up to %d tiles", name, where, self.precision, self.max_batch)

    # ---- callers' side ------------------------------------------------------------------------------

    def submit(self, batch: np.ndarray | Sequence[np.ndarray]) -> Future[np.ndarray]:
        """Queue tiles (N, H, W, 3) uint8 (or a list of same-sized (H, W, 3) tiles); the Future gives their
        probabilities (N, C, H, W). Batches above ``max_batch`` are split and their results joined again."""
        tiles = self._as_batch(batch)
        n = tiles.shape[0]
        if n == 0:
            empty: Future[np.ndarray] = Future()
            empty.set_result(np.zeros((0, self.n_outputs or 0, *tiles.shape[1:3]), dtype=self._np_out_dtype()))
            return empty
        parts: list[Future[np.ndarray]] = []
        with self._cond:
            if self._closed:
                raise ModelLoadError(f"model '{self.name}' is closed")
            for start in range(0, n, self.max_batch):
                fut: Future[np.ndarray] = Future()
                self._queue.append(_Request(tiles[start:start + self.max_batch], fut))
                parts.append(fut)
            self._cond.notify_all()
        return parts[0] if len(parts) == 1 else _join(parts)

    def run(self, batch: np.ndarray | Sequence[np.ndarray], timeout: float | None = None) -> np.ndarray:
        """``submit(batch).result()``."""
        return self.submit(batch).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker: requests not yet started fail with ModelLoadError; the model is released."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for req in left:
            if not req.future.done():
                req.future.set_exception(ModelLoadError(f"model '{self.name}' was closed before this batch ran"))
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("model %s: worker still busy after %.0f s at close", self.name, timeout)
        if self._done is not None and self._finisher is not None:
            self._done.put(_STOP)
            self._finisher.join(timeout)
        self.model = None

    def __enter__(self) -> DeviceWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _as_batch(batch: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
        if not isinstance(batch, np.ndarray):
            sizes = {getattr(t, "shape", None) for t in batch}
            if len(sizes) > 1:
                raise TileError(f"tiles of one batch must have the same shape, got {sorted(map(str, sizes))}")
            batch = np.stack(list(batch)) if len(batch) else np.zeros((0, 1, 1, 3), np.uint8)
        if batch.dtype != np.uint8 or batch.ndim != 4 or batch.shape[3] != 3 or min(batch.shape[1:3]) < 1:
            raise TileError(f"a batch must be uint8 (N, H, W, 3), got {batch.dtype} {tuple(batch.shape)}")
        return np.ascontiguousarray(batch)

    def _np_out_dtype(self) -> type[np.floating[Any]]:
        return np.float16 if self.out_dtype == torch.float16 else np.float32

    # ---- worker thread ------------------------------------------------------------------------------

    def _loop(self) -> None:
        if self.cuda:
            torch.cuda.set_device(self.device)  # so streams and events of this thread are the model's device
        while True:
            batch = self._gather()
            if batch is None:
                return
            try:
                pending = self._launch(batch)
                if self._done is not None:
                    self._done.put(pending)  # bounded: at most two batches in flight
                else:
                    self._deliver(pending)
            except Exception as exc:  # a bug here must not leave callers waiting forever
                log.exception("model %s: worker error", self.name)
                for req in batch:
                    if not req.future.done():
                        req.future.set_exception(ModelLoadError(f"model '{self.name}' worker error: {exc}"))

    def _gather(self) -> list[_Request] | None:
        """The oldest request plus same-sized waiting ones, up to max_batch tiles; None once closed."""
        with self._cond:
            while True:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return None
                first = self._queue.popleft()
                if first.future.set_running_or_notify_cancel():
                    break
            batch, total, size = [first], first.n, first.size
            deadline = time.monotonic() + self.max_wait_s
            while total < self.max_batch and not self._closed:
                for req in list(self._queue):
                    if req.size == size and total + req.n <= self.max_batch:
                        self._queue.remove(req)
                        if req.future.set_running_or_notify_cancel():
                            batch.append(req)
                            total += req.n
                remaining = deadline - time.monotonic()
                if total >= self.max_batch or remaining <= 0:
                    break
                self._cond.wait(remaining)
            return batch

    def _launch(self, batch: list[_Request]) -> _Pending:
        n = sum(r.n for r in batch)
        h, w = batch[0].size
        try:
            host = self._host_input(batch, n, h, w)
            out = self._forward_split(host)
            self.forward_passes += 1
            self.tiles_processed += n
            if not self.cuda:
                return _Pending(batch, out)
            host_out = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host_out.copy_(out, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            return _Pending(batch, host_out, event)
        except BaseException as exc:
            return _Pending(batch, None, error=self._wrap(exc, n, h, w))

    def _finish_loop(self) -> None:
        assert self._done is not None
        while True:
            item = self._done.get()
            if item is _STOP:
                return
            self._deliver(item)

    def _deliver(self, pending: _Pending) -> None:
        error = pending.error
        out: np.ndarray | None = None
        if error is None and pending.output is not None:
            try:
                if pending.event is not None:
                    pending.event.synchronize()
                out = pending.output.numpy()
            except BaseException as exc:  # an asynchronous CUDA error surfaces here
                r0 = pending.requests[0]
                error = self._wrap(exc, sum(r.n for r in pending.requests), *r0.size)
        start = 0
        for req in pending.requests:
            if error is not None or out is None:
                req.future.set_exception(error or ModelLoadError(f"model '{self.name}' returned nothing"))
            else:
                req.future.set_result(out[start:start + req.n])
            start += req.n

    def _host_input(self, batch: list[_Request], n: int, h: int, w: int) -> torch.Tensor:
        if len(batch) == 1 and not self.cuda and batch[0].tiles.flags.writeable:
            return torch.from_numpy(batch[0].tiles)  # no copy: the model reads a float copy of it
        host = torch.empty((n, h, w, 3), dtype=torch.uint8, pin_memory=self.cuda)
        view = host.numpy()
        start = 0
        for req in batch:
            view[start:start + req.n] = req.tiles
            start += req.n
        return host

    def _forward_split(self, host: torch.Tensor) -> torch.Tensor:
        """One forward pass; on GPU out-of-memory, the batch is halved (down to one tile) and retried."""
        try:
            return self._forward(host)
        except torch.cuda.OutOfMemoryError:
            if host.shape[0] <= 1:
                raise
        # outside the except block, so the failed attempt's tensors (held by its traceback) are freed first
        torch.cuda.empty_cache()
        half = host.shape[0] // 2
        log.warning("model %s: out of GPU memory on %d tiles; retrying in halves (lower tile.batch_size)",
                    self.name, host.shape[0])
        return torch.cat([self._forward_split(host[:half]), self._forward_split(host[half:])])

    def _forward(self, host: torch.Tensor) -> torch.Tensor:
        n, h, w, _ = host.shape
        model = self.model
        if model is None:
            raise ModelLoadError(f"model '{self.name}' is closed")
        with torch.inference_mode(), self._autocast():
            x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2)  # NCHW view == channels_last
            if not self.channels_last:
                x = x.contiguous()
            x = x.float().mul_(self._mul).sub_(self._sub)
            logits = extract_logits(model(x))
            self._check_logits(logits, n, h, w)
            logits = logits.float()
            if tuple(logits.shape[-2:]) != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            probs = torch.softmax(logits, dim=1).to(self.out_dtype).contiguous()
        return probs

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if not self.autocast:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=PRECISIONS[self.precision])

    def _check_logits(self, logits: torch.Tensor, n: int, h: int, w: int) -> None:
        if logits.ndim == 2:
            raise ModelLoadError(
                f"model '{self.name}' returns one score vector per tile (shape {tuple(logits.shape)}): it is a "
                "patch classifier, but this family needs per-pixel logits N x C x h x w")
        if logits.ndim != 4 or logits.shape[0] != n:
            raise ModelLoadError(f"model '{self.name}' returned shape {tuple(logits.shape)} for {n} tiles of "
                                 f"{h}x{w} px; expected logits N x C x h x w")
        if self.n_outputs is not None and logits.shape[1] != self.n_outputs:
            raise ModelLoadError(
                f"model '{self.name}' outputs {logits.shape[1]} channels but its card lists {self.n_outputs} "
                "classes; the card's classes must match the model's outputs, in order")

    def _wrap(self, exc: BaseException, n: int, h: int, w: int) -> BaseException:
        if isinstance(exc, QPBridgeError):
            return exc
        if not isinstance(exc, Exception):  # KeyboardInterrupt, SystemExit: do not swallow
            return exc
        what = "ran out of GPU memory" if isinstance(exc, torch.cuda.OutOfMemoryError) else "failed"
        err = ModelLoadError(f"model '{self.name}' {what} on a batch of {n} tiles of {h}x{w} px on {self.device}: "
                             f"{type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err


def _join(parts: list[Future[np.ndarray]]) -> Future[np.ndarray]:
    """One Future for the concatenated results of ``parts`` (the first failure, if any)."""
    joined: Future[np.ndarray] = Future()
    joined.set_running_or_notify_cancel()
    lock = threading.Lock()
    left = [len(parts)]

    def on_done(_: Future[np.ndarray]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        for part in parts:
            exc = part.exception() if not part.cancelled() else ModelLoadError("a part of the batch was cancelled")
            if exc is not None:
                joined.set_exception(exc)
                return
        joined.set_result(np.concatenate([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(on_done)
    return joined

