"""Whole-slide throughput vs the model-only ceiling, in one run: prints measured numbers (not a test).

    python bench/bench_slide.py [--device auto|cpu|cuda] [--size 32768] [--precision fp16 fp32]
                                [--compile [--no-eager]] [--compile-mode max-autotune|default] [--batch 256]
                                [--model-only-tiles 4096] [--readers 8] [--slide PATH] [--switch-interval S]
                                [--no-cuda-graphs] [--feeders N] [--queue-batches N]
                                [--trace auto|thread|process[N][-stacked|-collect] ...]

Builds SegFormer-B0 with random weights (speed only; HOTSPoT's architecture, 3 classes, 256 px tiles at
1 µm/px), saves it as a save_pretrained folder and serves it through the real card/engine path. Writes a
synthetic JPEG-compressed pyramidal TIFF of --size x --size px at 0.5 µm/px, then for each precision and
mode (eager, whose full batches replay a CUDA graph on a GPU unless --no-cuda-graphs; compiled too with
--compile, timed once the background compile is warm; the random weights are seeded, so every run traces
the same class maps):
- model-only: the same model fed ready uint8 tiles already in memory, from as many threads as a run feeds
  it, outputs as the run takes them (native resolution, left on the GPU), synchronised at the end (tiles/s);
- end to end: `annotate_slide` on the slide (pipelined block reads, model, device-side blending, linear
  vectorising, features), tiles/s, the ratio of the two, each stage's busy time, the GPU's idle fraction,
  the limiting stage, peak host RSS and peak GPU memory; then the time to write the run's features as the
  GeoJSON file `qpbridge annotate` writes (after the run, so not in its tiles/s).
Exits non-zero if any run fails. fp16/bf16 run on CUDA only (skipped on a CPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np


def synthetic_slide(path: Path, size: int) -> Path:
    """Tissue-like texture with large blobs, pyramidal, JPEG tiles (what a scanner writes)."""
    import cv2
    import tifffile

    rng = np.random.default_rng(0)
    small = rng.integers(120, 235, (size // 64, size // 64, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    for y in range(0, size, 1024):  # grain, band by band so memory stays near the image's own size
        band = img[y:y + 1024].astype(np.int16)
        band += rng.integers(-12, 12, band.shape, dtype=np.int16)
        img[y:y + 1024] = np.clip(band, 0, 255)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        levels = 3
        for lvl in range(levels):
            ds = 2 ** lvl
            level = img if ds == 1 else cv2.resize(img, (size // ds, size // ds), interpolation=cv2.INTER_AREA)
            res = (1e4 / (0.5 * ds), 1e4 / (0.5 * ds))
            if lvl == 0:
                tw.write(level, subifds=levels - 1, resolution=res, **opts)
            else:
                tw.write(level, subfiletype=1, resolution=res, **opts)
    return path


def write_slide(path: Path, size: int) -> Path:
    """``synthetic_slide`` in a child process, so that its memory does not count in this one's peak RSS."""
    import subprocess

    subprocess.run([sys.executable, __file__, "--write-slide", str(path), str(size)], check=True)
    return path


def make_card(root: Path, precision: str, batch: int, compiled: bool, compile_mode: str = "max-autotune",
              graphs: bool = True) -> str:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    weights = root / "b0-weights"
    if not weights.exists():
        import torch

        torch.manual_seed(0)  # the same random network every run: its class maps set the stitching work
        SegformerForSemanticSegmentation(SegformerConfig(num_labels=3)).save_pretrained(weights)  # B0 defaults
    name = f"segformer-b0-{precision}-{'compiled' if compiled else 'eager'}{'' if graphs else '-nographs'}"
    folder = root / "models" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "schema_version": 1, "name": name, "family": "segformer-hf", "task": "semantic-segmentation",
        "object_type": "annotation",
        "classes": [{"name": "Background", "color": [255, 255, 255], "emit": False},
                    {"name": "Lobule", "color": [222, 120, 160]}, {"name": "Portal tract", "color": [30, 110, 220]}],
        "tile": {"size": 256, "overlap": 64, "batch_size": batch}, "mpp": 1.0,
        "postprocess": {"simplify_um": 2.0, "min_area_um2": 500.0, "max_hole_area_um2": 100.0},
        "params": {"precision": precision, "tissue_filter": False, "compile": compiled, "compile_mode": compile_mode,
                   "cuda_graphs": graphs},
        "weights": str(weights),
    }))
    return name


class GCTime:
    """Garbage collections over a stretch of time (``gc.callbacks``): a run that pauses collection leaves its
    young objects to the first collection after it, which falls in the stretch (after the run's own timing)."""

    def __init__(self) -> None:
        self.took: list[float] = []
        self._started: dict[int, float] = {}

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        import threading

        if phase == "start":
            self._started[threading.get_ident()] = time.perf_counter()
        else:
            began = self._started.pop(threading.get_ident(), None)
            if began is not None:
                self.took.append(time.perf_counter() - began)

    def __enter__(self) -> GCTime:
        import gc

        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        gc.callbacks.remove(self._callback)

    def __str__(self) -> str:
        last = f", the last {self.took[-1]:.2f} s" if self.took else ""
        return f"{len(self.took)} garbage collections in {sum(self.took):.2f} s{last}"


class ThreadCPU:
    """CPU seconds of each group of this process's threads over a stretch of time (Linux: /proc), sampled by a
    thread of its own: shows which threads compute while the run waits (for the GIL, among others)."""

    def __init__(self, period_s: float = 0.05) -> None:
        import os
        import threading

        self.tick = os.sysconf("SC_CLK_TCK")
        self.period_s = period_s
        self.start: dict[int, float] = {}
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self, tid: int) -> float | None:
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def _sample(self) -> None:
        import re
        import threading

        for th in threading.enumerate():
            tid = th.native_id
            if tid is None or th is self._thread:
                continue
            cpu = self._cpu(tid)
            if cpu is not None:
                self.start.setdefault(tid, cpu)
                self.last[tid] = (re.sub(r"[_-]\d+$", "", th.name), cpu)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def __enter__(self) -> ThreadCPU:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sample()
        self._stop.set()
        self._thread.join()

    def groups(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for tid, (name, cpu) in self.last.items():
            out[name] = out.get(name, 0.0) + cpu - self.start.get(tid, cpu)
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


# --trace: where class strips are traced (RunOptions.trace_process; auto: the engine's rule); processN: in N
# processes sharing out the classes (RunOptions.trace_processes; process: the engine's rule for N)
TRACE_PROCESS = {"auto": None, "thread": False, "process": True}
TRACE_CHOICES = [*TRACE_PROCESS, *(f"process{n}" for n in range(1, 5))]


def trace_options(trace: str) -> dict[str, Any]:
    """``RunOptions`` fields for a ``--trace`` value: where class strips are traced, then flags (``-collect``:
    garbage collection left on during the run; others are the bench's own)."""
    where, *flags = trace.split("-")
    opts: dict[str, Any] = {"pause_gc": False} if "collect" in flags else {}
    if where in TRACE_PROCESS:
        return {**opts, "trace_process": TRACE_PROCESS[where]}
    return {**opts, "trace_process": True, "trace_processes": int(where.removeprefix("process"))}


@contextlib.contextmanager
def unsliced(model: object, on: bool) -> Iterator[None]:
    """With ``on``, the model's results lose their batch reference, so the stitcher stacks each run of tiles
    tile by tile (how it blended before it took runs as slices of the batch output)."""
    if not on:
        yield
        return
    native = model.predict_native  # type: ignore[attr-defined]

    def plain(*a: object, **k: object) -> list:
        out = native(*a, **k)
        for r in out:
            r.batch = None
        return out

    model.predict_native = plain  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del model.predict_native  # type: ignore[attr-defined]


def wait_compiled(model: object, timeout_s: float) -> float:
    worker = getattr(model, "worker", None)
    t = time.perf_counter()
    while worker is not None and worker.compile_state == "compiling":
        if time.perf_counter() - t > timeout_s:
            raise TimeoutError(f"torch.compile still warming after {timeout_s:.0f} s")
        time.sleep(1.0)
    if worker is not None and worker.compile_state == "failed":
        raise RuntimeError("torch.compile failed (see the log)")
    return time.perf_counter() - t


def one_run(root: Path, slide: Path, device: str, precision: str, compiled: bool,
            args: argparse.Namespace) -> list[dict]:
    import torch

    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine
    from qpbridge.engine.session import RunOptions

    name = make_card(root, precision, args.batch, compiled, args.compile_mode, not args.no_cuda_graphs)
    engine = Engine(root / "models", device=device)
    model = engine.model(name)
    cuda = device.startswith("cuda")
    compile_s = wait_compiled(model, args.compile_timeout) if compiled else 0.0
    rng = np.random.default_rng(1)
    tiles = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(args.batch)]
    on_device = cuda
    for _ in range(2):  # warm-up: kernels, allocator, pinned buffers
        model.predict_native(tiles, on_device=on_device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # Fed from as many threads as a run feeds it (RunOptions.feeders), so the next batch is handed over while
    # this one computes, as in the run: one caller alone would wait for each batch before sending the next.
    from concurrent.futures import ThreadPoolExecutor

    feeders = args.feeders
    batches = -(-args.model_only_tiles // len(tiles))
    t = time.perf_counter()
    with ThreadPoolExecutor(feeders) as pool:
        list(pool.map(lambda _: model.predict_native(tiles, on_device=on_device), range(batches)))
    if cuda:
        torch.cuda.synchronize()
    model_only = batches * len(tiles) / (time.perf_counter() - t)

    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()  # the calling thread: the stitching stage
        profiler.enable()
    rows = []
    for trace in args.trace:  # the same model, one end-to-end run per way of tracing, in the order given
        mode = f"{'compiled' if compiled else 'eager'}, trace {trace}"
        same = {"switch_interval_s": sys.getswitchinterval()} if hasattr(RunOptions(), "switch_interval_s") else {}
        opts = RunOptions(readers=args.readers, feeders=args.feeders, queue_batches=args.queue_batches,
                          **trace_options(trace), **same)  # (older trees: A/B runs)
        with GCTime() as collected, ThreadCPU() as cpu, unsliced(model, trace.endswith("-stacked")):
            result = annotate_slide(engine, slide, name, tissue_filter=False, options=opts)
        st = result.stats
        write_s, mb = write_geojson(root / "out.geojson", result.features)
        child = st.extra.get("trace_process_cpu_s")
        print(f"{precision} {mode}: GeoJSON of the features written in {write_s:.2f} s ({mb:.1f} MB); {collected}",
              flush=True)
        print(f"{precision} {mode}: CPU s by thread over the run: "
              + ", ".join(f"{k} {v:.2f}" for k, v in cpu.groups().items() if v >= 0.01)
              + (f"; tracing process {child:.2f}" if child is not None else ""), flush=True)
        rows.append({"precision": precision, "mode": mode, "compile_s": compile_s, "model_only": model_only,
                     "e2e": st.tiles / st.seconds, "stats": st, "features": len(result.features), "write_s": write_s,
                     "gpu_mib": torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else 0.0})
    worker = getattr(model, "worker", None)
    if cuda and hasattr(worker, "graph_state"):  # older trees (A/B runs) have no CUDA graphs
        print(f"{precision} {'compiled' if compiled else 'eager'}: CUDA graph {worker.graph_state}; "
              f"{worker.graph_passes} of {worker.forward_passes} forward passes replayed it", flush=True)
    if profiler is not None:
        import pstats

        profiler.disable()
        print(f"{precision} {'compiled' if compiled else 'eager'}: stitching thread, top {args.profile} by own time")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)
    close = getattr(model, "close", None)
    if close is not None:
        close()
    return rows


def write_geojson(path: Path, features: list) -> tuple[float, float]:
    """Write a run's features as ``qpbridge annotate`` writes them: seconds taken and MB written."""
    from qpbridge.files import write_json_atomic
    from qpbridge.geometry import feature_collection

    t = time.perf_counter()
    write_json_atomic(path, feature_collection(features))
    return time.perf_counter() - t, path.stat().st_size / 1e6


def timeline(st: Any) -> str:
    """When the first block was read, the first batch handed to the model and its output reached the
    stitcher; over how long the outputs came; the tail after the last was stitched (regions left open and their
    features), and of it the stitcher's finish (closing the regions left open)."""
    first, last = getattr(st, "first_output_s", 0.0), getattr(st, "last_output_s", 0.0)  # absent in older trees
    if not last:
        return "- | - | -"
    read, batch = getattr(st, "first_read_s", 0.0), getattr(st, "first_batch_s", 0.0)
    closing = st.extra.get("closing_s")
    return (f"{read:.2f}, {batch:.2f}, {first:.2f} | {last - first:.2f} | {st.seconds - st.stitched_s:.2f}"
            + (f" ({closing:.2f})" if closing is not None else ""))


def child(st: object) -> str:
    cpu = getattr(st, "extra", {}).get("trace_process_cpu_s")
    return f"; tracing process CPU {cpu:.2f}" if cpu is not None else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=32768, help="slide side in px at 0.5 µm/px")
    ap.add_argument("--precision", nargs="+", default=["fp16", "fp32"], choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--compile", action="store_true", help="also run with torch.compile (after its warm-up)")
    ap.add_argument("--no-eager", action="store_true", help="with --compile: the compiled runs only")
    ap.add_argument("--compile-mode", default="max-autotune", choices=["max-autotune", "default"],
                    help="the card's compile_mode: autotuned kernels (minutes) or Inductor's default")
    ap.add_argument("--compile-timeout", type=float, default=1800.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model-only-tiles", type=int, default=4096)
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="eager forward passes only (the card's cuda_graphs: false)")
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--feeders", type=int, default=None,
                    help="threads calling the model, in model-only and end to end (default: RunOptions')")
    ap.add_argument("--queue-batches", type=int, default=None,
                    help="model outputs that may wait to be stitched (default: RunOptions')")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the stitching thread of each end-to-end run, print its top N functions")
    ap.add_argument("--switch-interval", type=float, default=None, metavar="S",
                    help="GIL switch interval for model-only and the runs alike (how long a thread may hold the "
                         "GIL beside others; default: the engine's run setting, qpbridge.gil_policy)")
    ap.add_argument("--slide", type=Path, help="reuse this synthetic slide (written there first if missing)")
    ap.add_argument("--trace", nargs="+", default=["auto"],
                    choices=[w + f for w in TRACE_CHOICES for f in ("", "-stacked", "-collect")],
                    help="where class strips are traced: one end-to-end run per value, in this order, with the same "
                         "model (e.g. thread process thread process); processN: N processes sharing out the classes; "
                         "-stacked: each run of tiles stacked tile by tile instead of sliced from the batch output; "
                         "-collect: garbage collection left on during the run (RunOptions.pause_gc off)")
    ap.add_argument("--write-slide", nargs=2, metavar=("PATH", "SIZE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.write_slide:
        synthetic_slide(Path(args.write_slide[0]), int(args.write_slide[1]))
        return 0
    from qpbridge.engine.session import RunOptions

    defaults = RunOptions()
    args.feeders = args.feeders or defaults.feeders
    args.queue_batches = args.queue_batches or defaults.queue_batches

    import torch

    # model-only and the runs alike: a run sets the engine's interval (qpbridge.gil_policy) unless told otherwise
    engine_default = getattr(defaults, "switch_interval_s", None) or sys.getswitchinterval()
    sys.setswitchinterval(args.switch_interval if args.switch_interval is not None else engine_default)
    from qpbridge.devices import resolve_device
    from qpbridge.pools import pool_size

    device = resolve_device(args.device)
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"device {device} ({gpu}); torch {torch.__version__}; slide {args.size}x{args.size} px at 0.5 µm/px; "
          f"batch {args.batch}; {args.readers} readers; {args.feeders} feeders; {args.queue_batches} outputs "
          f"queued; GIL switch interval {sys.getswitchinterval() * 1e3:g} ms")
    rows, failed = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        slide = args.slide or root / "slide.tif"
        if not slide.exists():
            write_slide(slide, args.size)
            print(f"wrote synthetic slide in {time.perf_counter() - t:.1f} s ({slide.stat().st_size / 1e6:.1f} MB)",
                  flush=True)
        for precision in args.precision:
            if precision != "fp32" and not device.startswith("cuda"):
                print(f"{precision}: skipped (half precision runs on CUDA only)")
                continue
            for compiled in [m for m in (False, True) if (m and args.compile) or (not m and not args.no_eager)]:
                try:
                    runs = one_run(root, slide, device, precision, compiled, args)
                except Exception:
                    failed += 1
                    print(f"{precision} {'compiled' if compiled else 'eager'}: FAILED", file=sys.stderr)
                    traceback.print_exc()
                    continue
                rows.extend(runs)
                for r in runs:
                    print(f"{precision} {r['mode']}: {r['stats'].table()}", flush=True)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print()
    print("| precision | mode | model-only tiles/s | end-to-end tiles/s | ratio | tiles | wall s | reading s "
          "(threads) | model s | device s | stitching s (blending, class strips, tracing, handing features on, "
          "finishing; on a CPU) | features s (threads; slowest chunk) | "
          "GPU idle | limit | features | peak GPU MiB | first block read, batch to the model, output s | outputs s | "
          "tail s (closing regions) | GeoJSON written s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stats"]
        dev = f"{st.device_s:.2f}" if st.device_s is not None else "-"
        print(f"| {r['precision']} | {r['mode']} | {r['model_only']:.0f} | {r['e2e']:.0f} | "
              f"{r['e2e'] / r['model_only']:.2f} | {st.tiles} | {st.seconds:.2f} | {st.read_s:.2f} ({st.readers}) | "
              f"{st.model_s:.2f} | {dev} | {st.stitch_s:.2f} ({st.extra.get('blending_s', 0):.2f}, "
              f"{st.extra.get('class_strips_s', 0):.2f}, "
              f"{st.extra.get('tracing_s', 0):.2f}, {st.extra.get('handing_features_s', 0):.2f}, "
              f"{st.extra.get('finishing_s', 0):.2f}; CPU {st.stitch_cpu_s:.2f}{child(st)}) | "
              f"{st.features_s:.2f} ({pool_size()}; {st.extra.get('slowest_feature_chunk_s', 0):.2f}) | "
              f"{100 * st.model_idle_fraction:.0f}% | {st.limit} | "
              f"{r['features']} | {r['gpu_mib']:.0f} | {timeline(st)} | {r['write_s']:.2f} |")
    print(f"peak host RSS {rss:.0f} MiB")
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
