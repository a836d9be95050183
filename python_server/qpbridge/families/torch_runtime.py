"""Shared torch runtime for model families: the device, and a worker thread that batches across callers.

One :class:`DeviceWorker` owns one loaded model on one device. Any number of threads (server workers, jobs,
clients) call :meth:`DeviceWorker.submit` with a batch of uint8 RGB tiles and get a ``Future``; the worker
thread takes the oldest waiting request, adds every other waiting request whose tiles have the same size
until ``max_batch`` tiles are gathered (waiting at most ``max_wait_s`` for more when the batch is not full),
runs one forward pass and hands each caller its own slice of the output. So tiles from several jobs and
clients share forward passes and the GPU sees large batches even when each caller sends a few tiles.

Preprocessing happens on the device, not in the callers: uint8 NHWC tiles are copied once into a pinned
host buffer (on CUDA; a small ring of them is reused, each only once its previous copy to the device has
finished), moved with a non-blocking copy, viewed as NCHW (which is exactly the channels-last layout),
converted and normalised as ``(x / scale - mean) / std`` in one fused multiply-subtract. The model runs
under ``torch.inference_mode``. On CUDA with ``fp16``/``bf16`` the weights themselves are converted to that
dtype and to channels-last (``weights="cast"``); a model that cannot run so is run under autocast instead
(``weights="autocast"``: the family retries), and fp32 is the last resort. CPU always runs fp32.

Output: per-class softmax probabilities ``(N, C, h, w)``. A request asks either for the tile's own size
(logits smaller than the input, such as SegFormer's quarter-size ones, are upsampled bilinearly on the
device) or, with ``native=True``, for the model's own output resolution whenever the input is a whole
multiple of it (16x fewer values for SegFormer, which the stitcher blends on that grid). The arrays are
float32 from a CPU model and float16 from a CUDA model. On CUDA the copy back goes into reused pinned
buffers, asynchronously, and a second thread hands results to callers, so the next batch is prepared and
launched while the previous one is still being copied; with ``on_device=True`` the probabilities stay on
the GPU as a tensor (for blending there) and nothing is copied back. On CUDA the model runs on a stream of
its own, so a caller's GPU work never queues behind the next batch; results are handed over once their
pass is complete, and a caller that queues work on them passes them through :func:`handed_over` first.

``compile_shape`` (N, H, W) opts in to ``torch.compile``: the model is compiled and warmed on that batch
shape on a background thread while the eager model serves, and batches of exactly that shape switch to
the compiled model once it is ready (other shapes stay eager, so a compiled model never recompiles
mid-job). A compile failure is logged and the eager model goes on serving.

``graph_shape`` (N, H, W; on CUDA, without ``head``, ``autograd`` or compiling) captures the eager forward pass
of batches of exactly that shape as a CUDA graph at the first such batch, and replays it after: the batch is
copied into the graph's input, the graph launched once, and its output copied out (the next replay overwrites
it). The eager pass launches hundreds of kernels from Python, each call giving up the GIL and waiting to take
it back while a run's other threads hold it, so the device starves between kernels (measured on an H200: the
forward passes of a 7,225-tile slide took 1.4-1.6 s of GPU time end to end, against 0.9 s replayed and 0.9 s
model-only). A model that cannot be captured (one that reads a value back to the host mid-pass) is logged and
runs eagerly.

Other output kinds. A family whose model does not return per-pixel class logits (instance branches, translated
images, boxes) passes ``head``: a callable ``head(output, x) -> dict[str, Tensor]`` that turns the model's raw
output (and its normalised input ``x``) into named tensors whose first dimension is the batch. The worker then
copies each of them back the same way (asynchronously into pinned buffers on CUDA) and each caller's Future
gives a dict of numpy arrays, its own rows of each (tensors on the device with ``on_device``). ``autograd``
runs the forward pass with gradients enabled instead of under ``inference_mode``, for models that compute
gradients of their own (Grad-CAM); such a model should set ``requires_grad`` on what it needs.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from qpbridge.errors import ModelCardError, ModelLoadError, QPBridgeError, TileError
from qpbridge.families.params import bool_param, choice_param, float_param, int_param

if TYPE_CHECKING:
    from qpbridge.cards import ModelCard

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
    return choice_param(params, "precision", tuple(PRECISIONS), "fp32")


def worker_settings(card: ModelCard, *, channels_last: bool = True, compile: bool = False) -> dict[str, Any]:
    """The :class:`DeviceWorker` settings a torch card's ``params`` give, checked: ``precision``, ``max_batch``
    (default the card's batch size), ``batch_wait_ms``, ``channels_last`` (default ``channels_last``) and,
    for families that can compile, ``compile`` (full batches of the card's tile size; off by default),
    ``compile_mode`` (:data:`COMPILE_MODES`) and ``cuda_graphs`` (full batches of the card's tile size replayed
    from a CUDA graph; on by default, and off while ``compile`` is on)."""
    params = card.params
    max_batch = int_param(params, "max_batch", max(1, card.batch_size), 1)
    settings: dict[str, Any] = {
        "precision": precision_param(params), "max_batch": max_batch,
        "max_wait_s": float_param(params, "batch_wait_ms", DEFAULT_MAX_WAIT_S * 1000.0, 0.0) / 1000.0,
        "channels_last": bool_param(params, "channels_last", channels_last)}
    if compile:
        on = bool_param(params, "compile", False)
        full = (max_batch, card.tile_size, card.tile_size)
        settings["compile_shape"] = full if on else None
        settings["compile_mode"] = choice_param(params, "compile_mode", COMPILE_MODES, "max-autotune")
        settings["graph_shape"] = full if bool_param(params, "cuda_graphs", True) and not on else None
    return settings


# Card ``compile_mode``: "max-autotune" benchmarks kernel choices for the GPU (minutes, the fastest model);
# "default" compiles without autotuning (faster to warm up). Modes with CUDA graphs are not offered: a
# graph replay reuses its output memory, which results handed to callers must not share.
COMPILE_MODES = ("max-autotune", "default")


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
    # (n, H, W, 3) uint8, C-contiguous; on CUDA also a list of n (H, W, 3) tiles, copied into the pinned
    # buffer run by run (``contiguous_runs``: rows of a block's stack go in one copy; no stacked copy first)
    tiles: np.ndarray | list[np.ndarray]
    future: Future[Any]
    native: bool = False
    on_device: bool = False

    @property
    def n(self) -> int:
        return len(self.tiles)

    @property
    def size(self) -> tuple[int, int]:
        first = self.tiles[0]
        return int(first.shape[0]), int(first.shape[1])

    @property
    def kind(self) -> tuple[int, int, bool, bool]:
        """Requests of one kind share a forward pass."""
        return (*self.size, self.native, self.on_device)


@dataclass
class _Pending:
    """A launched batch whose (host) output may still be in flight."""

    requests: list[_Request]
    output: torch.Tensor | dict[str, torch.Tensor] | None
    event: Any = None  # torch.cuda.Event when the copy back is asynchronous
    error: BaseException | None = None
    buffers: tuple[torch.Tensor, ...] = ()  # pinned buffers to give back to the pool once delivered
    on_device: bool = False  # ``output`` stays on the device: callers get it once ``event`` has completed


@dataclass
class _Graph:
    """A captured forward pass: copy a batch into ``static_in``, replay, read ``static_out``."""

    graph: Any  # torch.cuda.CUDAGraph
    static_in: torch.Tensor
    static_out: torch.Tensor


_STOP = object()

Head = Callable[[Any, torch.Tensor], dict[str, torch.Tensor]]


class DeviceWorker:
    """A daemon thread that owns ``model`` on ``device`` and runs batches submitted from any thread.

    ``model`` is called with one float tensor (N, 3, H, W); without ``head`` its output is anything
    :func:`extract_logits` understands, with logits (N, C, h, w), and ``n_outputs`` (the card's class count),
    when given, is checked on every batch; with ``head``, results are ``head(output, x)``'s named tensors.
    ``forward_passes`` and ``tiles_processed`` count the work done, ``compiled_passes`` the passes that ran
    the compiled model (for tests and stats).
    """

    def __init__(self, model: Callable[[torch.Tensor], Any], device: torch.device, *, name: str = "model",
                 n_outputs: int | None = None, normalization: Normalization | None = None,
                 precision: str = "fp32", max_batch: int = 32, max_wait_s: float = DEFAULT_MAX_WAIT_S,
                 channels_last: bool = True, weights: str = "cast",
                 compile_shape: tuple[int, int, int] | None = None, compile_mode: str = "max-autotune",
                 graph_shape: tuple[int, int, int] | None = None, head: Head | None = None,
                 autograd: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ModelCardError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        if max_batch < 1 or max_wait_s < 0:
            raise ModelCardError(f"need max_batch >= 1 and max_wait_s >= 0, got {max_batch}, {max_wait_s}")
        if weights not in ("cast", "autocast"):
            raise ModelCardError(f"weights must be 'cast' or 'autocast', got {weights!r}")
        self.name = name
        self.device = device
        self.n_outputs = n_outputs
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.normalization = normalization or Normalization()
        self.cuda = device.type == "cuda"
        self.precision = precision if self.cuda else "fp32"
        half = self.precision != "fp32"
        self.weights = weights if half else "fp32"
        self.autocast = half and weights == "autocast"
        # the dtype the model's input (and, with cast weights, its parameters) are in
        self.input_dtype = PRECISIONS[self.precision] if half and weights == "cast" else torch.float32
        self.out_dtype = torch.float16 if self.cuda else torch.float32
        self.channels_last = channels_last
        self.head = head
        self.autograd = autograd
        self.forward_passes = 0
        self.compiled_passes = 0
        self.tiles_processed = 0
        self.busy_s = 0.0  # time spent in forward passes on this thread (their launch, on CUDA)
        self._gpu_spans: list[tuple[Any, Any]] = []  # CUDA events around each forward pass
        self._gpu_busy_s = 0.0

        if isinstance(model, torch.nn.Module):
            model.eval()
            model.to(device)
            if self.input_dtype != torch.float32:
                model.to(self.input_dtype)
            if channels_last:
                model.to(memory_format=torch.channels_last)
        self.model: Callable[[torch.Tensor], Any] | None = model
        self._compiled: Callable[[torch.Tensor], Any] | None = None
        self.compile_shape = compile_shape
        self.compile_mode = compile_mode
        self.compile_state = "off" if compile_shape is None else "compiling"
        # Full batches of ``graph_shape`` replay a CUDA graph of the whole forward pass (captured at the first
        # such batch): one launch, where the eager pass launches hundreds of kernels from Python, each giving
        # up the GIL and waiting to take it back while the run's other threads hold it, so the device starves.
        usable = self.cuda and head is None and not autograd and compile_shape is None
        self.graph_shape = graph_shape if usable else None
        self.graph_state = "off" if self.graph_shape is None else "waiting"  # then "ready", or "failed"
        self.graph_passes = 0
        self._graphs: dict[bool, _Graph] = {}  # by ``native``
        norm = self.normalization
        std = torch.tensor(norm.std, dtype=torch.float32)
        mean = torch.tensor(norm.mean, dtype=torch.float32)
        # (x / scale - mean) / std == x * mul - sub
        self._mul = (1.0 / (norm.scale * std)).view(1, 3, 1, 1).to(device, self.input_dtype)
        self._sub = (mean / std).view(1, 3, 1, 1).to(device, self.input_dtype)
        # Reused pinned host buffers (CUDA): inputs by shape, each with the event of its last copy out.
        self._in_pool: dict[tuple[int, ...], deque[tuple[torch.Tensor, Any]]] = {}
        self._out_pool: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._pool_lock = threading.Lock()

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
        log.info("model %s runs on %s, %s (%s), batches of up to %d tiles", name, where, self.precision,
                 {"cast": "weights cast", "autocast": "autocast", "fp32": "fp32 weights"}[self.weights],
                 self.max_batch)
        if compile_shape is not None:
            threading.Thread(target=self._compile, name=f"qpbridge-{name}-compile", daemon=True).start()

    # ---- callers' side ------------------------------------------------------------------------------

    def submit(self, batch: np.ndarray | Sequence[np.ndarray], *, native: bool = False,
               on_device: bool = False) -> Future[Any]:
        """Queue tiles (N, H, W, 3) uint8 (or a list of same-sized (H, W, 3) tiles); the Future gives their
        probabilities (N, C, H, W) as a numpy array, at the model's own output resolution with ``native``,
        as a tensor on the device with ``on_device`` (CUDA only). Batches above ``max_batch`` are split and
        their results joined again."""
        tiles = self._as_list(batch) if self.cuda and isinstance(batch, list) and batch else self._as_batch(batch)
        n = len(tiles)
        on_device = on_device and self.cuda
        if n == 0:
            if self.head is not None:
                raise TileError(f"model '{self.name}': an empty batch has no outputs")
            empty: Future[Any] = Future()
            empty.set_result(np.zeros((0, self.n_outputs or 0, *np.shape(tiles)[1:3]), dtype=self._np_out_dtype()))
            return empty
        parts: list[Future[Any]] = []
        with self._cond:
            if self._closed:
                raise ModelLoadError(f"model '{self.name}' is closed")
            for start in range(0, n, self.max_batch):
                fut: Future[Any] = Future()
                self._queue.append(_Request(tiles[start:start + self.max_batch], fut, native, on_device))
                parts.append(fut)
            self._cond.notify_all()
        return parts[0] if len(parts) == 1 else _join(parts)

    def run(self, batch: np.ndarray | Sequence[np.ndarray], timeout: float | None = None, *,
            native: bool = False) -> Any:
        """``submit(batch).result()``: an array of probabilities, or a dict of arrays with ``head``."""
        return self.submit(batch, native=native).result(timeout)

    def warm_up(self, size: int) -> DeviceWorker:
        """Run one blank ``size`` px tile, so that a model whose outputs do not fit its card fails at load, not
        mid-job (and the device warms up); a worker that fails is closed. Returns the worker."""
        try:
            self.run(np.zeros((1, size, size, 3), dtype=np.uint8))
        except BaseException:
            self.close()
            raise
        return self

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
    def _as_list(batch: list[np.ndarray]) -> list[np.ndarray]:
        """Same-sized uint8 (H, W, 3) tiles, each C-contiguous, kept as a list."""
        shape = getattr(batch[0], "shape", None)
        out = []
        for t in batch:
            if not isinstance(t, np.ndarray) or t.shape != shape:
                raise TileError(f"tiles of one batch must have the same shape, got {getattr(t, 'shape', t)} "
                                f"and {shape}")
            if t.dtype != np.uint8 or t.ndim != 3 or t.shape[2] != 3 or min(t.shape[:2]) < 1:
                raise TileError(f"tiles must be uint8 (H, W, 3), got {t.dtype} {tuple(t.shape)}")
            out.append(np.ascontiguousarray(t))
        return out

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
            # The model's own stream: a consumer's work on its stream (the stitcher's blending and its copy of a
            # class strip to the host) never waits behind the next batch's forward pass, as it would in the
            # one default stream.
            with torch.cuda.stream(torch.cuda.Stream(self.device)):
                self._serve()
        else:
            self._serve()

    def _serve(self) -> None:
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
            batch, total, kind = [first], first.n, first.kind
            deadline = time.monotonic() + self.max_wait_s
            while total < self.max_batch and not self._closed:
                for req in list(self._queue):
                    if req.kind == kind and total + req.n <= self.max_batch:
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
        t0 = time.perf_counter()
        try:
            host, release = self._host_input(batch, n, h, w)
            if self.cuda:
                begin = torch.cuda.Event(enable_timing=True)
                begin.record(torch.cuda.current_stream(self.device))
            out = self._forward_split(host, batch[0].native)
            if self.cuda:
                end = torch.cuda.Event(enable_timing=True)
                end.record(torch.cuda.current_stream(self.device))
                with self._pool_lock:
                    self._gpu_spans.append((begin, end))
            release()
            self.forward_passes += 1
            self.tiles_processed += n
            if not self.cuda:
                return _Pending(batch, out)
            if batch[0].on_device:
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
                return _Pending(batch, out, ready, on_device=True)
            if isinstance(out, dict):
                host_outs = {k: self._out_buffer(tuple(v.shape), v.dtype) for k, v in out.items()}
                for k, v in out.items():
                    host_outs[k].copy_(v, non_blocking=True)
                buffers = tuple(host_outs.values())
                back: torch.Tensor | dict[str, torch.Tensor] = host_outs
            else:
                back = self._out_buffer(tuple(out.shape), out.dtype)
                back.copy_(out, non_blocking=True)
                buffers = (back,)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            return _Pending(batch, back, event, buffers=buffers)
        except BaseException as exc:
            return _Pending(batch, None, error=self._wrap(exc, n, h, w))
        finally:
            self.busy_s += time.perf_counter() - t0

    def device_busy_s(self) -> float:
        """Seconds the device has spent in forward passes so far (GPU time from CUDA events; on the CPU,
        the forward passes' wall time)."""
        if not self.cuda:
            return self.busy_s
        with self._pool_lock:
            spans, self._gpu_spans = self._gpu_spans, []
        for begin, end in spans:
            end.synchronize()
            self._gpu_busy_s += begin.elapsed_time(end) / 1000.0
        return self._gpu_busy_s

    def _out_buffer(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        with self._pool_lock:
            free = self._out_pool.setdefault((shape, dtype), [])
            if free:
                return free.pop()
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def _finish_loop(self) -> None:
        assert self._done is not None
        while True:
            item = self._done.get()
            if item is _STOP:
                return
            self._deliver(item)

    def _deliver(self, pending: _Pending) -> None:
        error = pending.error
        out: Any = None  # arrays, or tensors left on the device
        if error is None and pending.output is not None:
            try:
                if pending.event is not None:
                    pending.event.synchronize()
                output = pending.output
                if pending.on_device:  # complete now: a caller may use it on any stream (see handed_over)
                    out = output
                else:
                    out = {k: v.numpy() for k, v in output.items()} if isinstance(output, dict) else output.numpy()
            except BaseException as exc:  # an asynchronous CUDA error surfaces here
                r0 = pending.requests[0]
                error = self._wrap(exc, sum(r.n for r in pending.requests), *r0.size)
        start = 0
        for req in pending.requests:
            if error is not None or out is None:
                req.future.set_exception(error or ModelLoadError(f"model '{self.name}' returned nothing"))
            elif pending.buffers:
                req.future.set_result(_rows(out, start, start + req.n, copy=True))  # pinned buffers are reused
            else:
                req.future.set_result(_rows(out, start, start + req.n))
            start += req.n
        for buffer in pending.buffers:
            with self._pool_lock:
                free = self._out_pool.setdefault((tuple(buffer.shape), buffer.dtype), [])
                if len(free) < 2:
                    free.append(buffer)

    def _host_input(self, batch: list[_Request], n: int, h: int, w: int) -> tuple[torch.Tensor, Callable[[], None]]:
        """The batch as one uint8 (n, h, w, 3) host tensor, and what to call once it has been sent."""
        if not self.cuda:
            arrays = [np.asarray(r.tiles) for r in batch]  # CPU requests hold stacked arrays
            if len(arrays) == 1 and arrays[0].flags.writeable:
                return torch.from_numpy(arrays[0]), _nothing  # no copy: the model reads a float copy of it
            return torch.from_numpy(np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()), _nothing
        key = (n, h, w)
        with self._pool_lock:
            ring = self._in_pool.setdefault(key, deque())
            reuse = ring.popleft() if len(ring) >= 2 else None  # keep the newest in flight
        if reuse is not None:
            host, event = reuse
            if event is not None:
                event.synchronize()  # its last copy to the device is done
        else:
            host = torch.empty((n, h, w, 3), dtype=torch.uint8, pin_memory=True)
        view = host.numpy()
        start = 0
        for req in batch:
            if isinstance(req.tiles, list):
                j = start
                for run in contiguous_runs(req.tiles):  # one copy per run, not per tile (see contiguous_runs)
                    view[j:j + len(run)] = run
                    j += len(run)
            else:
                view[start:start + req.n] = req.tiles
            start += req.n

        def release() -> None:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            with self._pool_lock:
                self._in_pool.setdefault(key, deque()).append((host, event))

        return host, release

    def _forward_split(self, host: torch.Tensor, native: bool = False) -> Any:
        """One forward pass; on GPU out-of-memory, the batch is halved (down to one tile) and retried."""
        try:
            return self._forward(host, native)
        except torch.cuda.OutOfMemoryError:
            if host.shape[0] <= 1:
                raise
        # outside the except block, so the failed attempt's tensors (held by its traceback) are freed first
        torch.cuda.empty_cache()
        half = host.shape[0] // 2
        log.warning("model %s: out of GPU memory on %d tiles; retrying in halves (lower tile.batch_size)",
                    self.name, host.shape[0])
        return _concat([self._forward_split(host[:half], native), self._forward_split(host[half:], native)])

    def _forward(self, host: torch.Tensor, native: bool = False) -> Any:
        n, h, w, _ = host.shape
        model = self.model
        if model is None:
            raise ModelLoadError(f"model '{self.name}' is closed")
        compiled = self._compiled
        if compiled is not None and (n, h, w) == self.compile_shape:
            model = compiled
            self.compiled_passes += 1
        elif (n, h, w) == self.graph_shape and self.graph_state != "failed":
            graph = self._graphs.get(native) or self._capture(model, host, native)
            if graph is not None:
                graph.static_in.copy_(host, non_blocking=True)
                graph.graph.replay()
                self.graph_passes += 1
                return graph.static_out.clone()  # the next replay overwrites the graph's own output
        with self._grad_mode(), self._autocast():
            return self._compute(model, host.to(self.device, non_blocking=True), native)

    def _capture(self, model: Callable[[torch.Tensor], Any], host: torch.Tensor, native: bool) -> _Graph | None:
        """The forward pass for batches shaped like ``host`` captured as a CUDA graph, or None (logged) where
        the model cannot be captured: it then runs eagerly, as before."""
        t0 = time.perf_counter()
        try:
            static_in = host.to(self.device, non_blocking=True)
            stream = torch.cuda.current_stream(self.device)
            side = torch.cuda.Stream(self.device)
            side.wait_stream(stream)
            # warm-up off the graph: lazy initialisation, cuDNN and cuBLAS plans, the allocator's blocks
            with torch.cuda.stream(side), self._grad_mode(), self._autocast():
                for _ in range(2):
                    self._compute(model, static_in, native)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            # thread-local: the run's other threads (the stitcher's blending) keep using the device meanwhile
            with torch.cuda.graph(graph, capture_error_mode="thread_local"), self._grad_mode(), self._autocast():
                static_out = self._compute(model, static_in, native)
        except Exception as exc:  # an optional speed-up: never a reason to stop serving
            self.graph_state = "failed"
            log.warning("model %s: no CUDA graph (%s: %s); running the model eagerly", self.name,
                        type(exc).__name__, exc)
            return None
        self._graphs[native] = captured = _Graph(graph, static_in, static_out)
        self.graph_state = "ready"
        log.info("model %s: CUDA graph of batches of %d tiles of %dx%d px captured in %.1f s", self.name,
                 *host.shape[:3], time.perf_counter() - t0)
        return captured

    def _compute(self, model: Callable[[torch.Tensor], Any], tiles: torch.Tensor, native: bool) -> Any:
        """The forward pass of uint8 (N, H, W, 3) tiles already on the device: probabilities, or the head's
        named outputs."""
        n, h, w, _ = tiles.shape
        x = tiles.permute(0, 3, 1, 2)  # NCHW view == channels_last
        if not self.channels_last:
            x = x.contiguous()
        x = x.to(self.input_dtype).mul_(self._mul).sub_(self._sub)
        if self.head is not None:
            named = self.head(model(x), x)
            return {k: v.detach().contiguous() for k, v in named.items()}
        logits = extract_logits(model(x))
        self._check_logits(logits, n, h, w)
        logits = logits.float()
        lh, lw = int(logits.shape[-2]), int(logits.shape[-1])
        whole = h % lh == 0 and w % lw == 0 and h // lh == w // lw
        if (lh, lw) != (h, w) and not (native and whole):
            logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        return torch.softmax(logits, dim=1).to(self.out_dtype).contiguous()

    def _compile(self) -> None:
        """Compile the model and warm it on ``compile_shape`` while the eager model serves."""
        assert self.compile_shape is not None
        n, h, w = self.compile_shape
        t0 = time.perf_counter()
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
            model = self.model
            if model is None:
                return
            mode = "max-autotune-no-cudagraphs" if self.cuda and self.compile_mode == "max-autotune" else None
            compiled = torch.compile(model, mode=mode, dynamic=False)
            with self._grad_mode(), self._autocast():
                x = torch.zeros((n, 3, h, w), dtype=self.input_dtype, device=self.device)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                compiled(x)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            self._compiled = compiled
            self.compile_state = "ready"
            log.info("model %s: compiled for batches of %d tiles of %dx%d px in %.0f s", self.name, n, h, w,
                     time.perf_counter() - t0)
        except Exception as exc:  # an optional speed-up: never a reason to stop serving
            self.compile_state = "failed"
            log.warning("model %s: torch.compile failed (%s: %s); serving the eager model", self.name,
                        type(exc).__name__, exc)

    def _grad_mode(self) -> contextlib.AbstractContextManager[Any]:
        return torch.enable_grad() if self.autograd else torch.inference_mode()

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


def contiguous_runs(tiles: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The tiles as runs of consecutive ones that lie one after another in one buffer (rows of a stack, as
    block reads give them), each run one (n, ...) array viewing that buffer; other tiles are runs of one.

    Copying a run is one numpy call, which gives up the GIL once: copying tile by tile gives it up per tile,
    and beside a thread running Python each hand-over waits for the interpreter's switch interval (5 ms)."""
    runs: list[np.ndarray] = []
    first: np.ndarray | None = None
    count = 0
    end = -1
    for t in tiles:
        ptr = t.__array_interface__["data"][0]
        if (first is not None and ptr == end and t.base is not None and t.base is first.base
                and t.flags.c_contiguous and first.flags.c_contiguous and t.shape == first.shape
                and t.dtype == first.dtype):
            count += 1
        else:
            if first is not None:
                runs.append(_run(first, count))
            first, count = t, 1
        end = ptr + t.nbytes
    if first is not None:
        runs.append(_run(first, count))
    return runs


def _run(first: np.ndarray, count: int) -> np.ndarray:
    if count == 1:
        return first[None]
    # checked by the caller: ``count`` tiles of ``first``'s shape lie back to back in its base array
    return np.lib.stride_tricks.as_strided(first, shape=(count, *first.shape), strides=(first.nbytes, *first.strides),
                                           writeable=False)


def _nothing() -> None:
    return None


def _rows(out: Any, start: int, stop: int, copy: bool = False) -> Any:
    """Rows ``start:stop`` of an output (array, tensor, or a dict of them)."""
    if isinstance(out, dict):
        return {k: _rows(v, start, stop, copy) for k, v in out.items()}
    part = out[start:stop]
    return part.copy() if copy else part


def _concat(results: list[Any]) -> Any:
    """The outputs of consecutive parts of a batch joined again (arrays, tensors, or dicts of them)."""
    first = results[0]
    if isinstance(first, dict):
        return {k: _concat([r[k] for r in results]) for k in first}
    if isinstance(first, torch.Tensor):
        return torch.cat([handed_over(r) for r in results])
    return np.concatenate(results)


def handed_over(t: Any) -> Any:
    """``t``, a tensor a worker computed on its own stream, made safe to use on the calling thread's stream:
    its memory is not given back to the worker's stream until the work queued here on it is done."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))
    return t


def _join(parts: list[Future[Any]]) -> Future[Any]:
    """One Future for the concatenated results of ``parts`` (the first failure, if any)."""
    joined: Future[Any] = Future()
    joined.set_running_or_notify_cancel()
    lock = threading.Lock()
    left = [len(parts)]

    def on_done(_: Future[Any]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        for part in parts:
            exc = part.exception() if not part.cancelled() else ModelLoadError("a part of the batch was cancelled")
            if exc is not None:
                joined.set_exception(exc)
                return
        joined.set_result(_concat([p.result() for p in parts]))

    for part in parts:
        part.add_done_callback(on_done)
    return joined

