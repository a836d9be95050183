"""Stitching + vectorising speed on one core, without a model: prints measured numbers (not a test).

    python bench/bench_stitch.py [--sizes 25 50 100] [--cases smooth noisy]
    python bench/bench_stitch.py --end-to-end [--size 8192] [--slide PATH] [--readers 2]
                                 [--trace auto|thread|process ...]
    python bench/bench_stitch.py --tracer-memory
    python bench/bench_stitch.py --features-contended [--sizes 25] [--cases smooth noisy]
    python bench/bench_stitch.py --feeding-contended [TILES]
    python bench/bench_stitch.py --reading-contended [SWITCH_S ...] [--slide PATH] [--size 8192]

Stitch mode feeds a :class:`SemanticStitcher` precomputed SegFormer-shaped outputs (3 classes, 64 x 64
softmax probabilities per 256 px tile with 64 px overlap, HOTSPoT's card) for an N x N tile plan, and
builds the GeoJSON features as a run does. Two cases:

- smooth: one class (lobule) crosses every tile and holds a hole around each disc of a second class
  (portal tracts) laid on a lattice, with background in the corners: a few large regions;
- noisy: independent random logits per output pixel (the worst case for the tracer).

Tiles go to the stitcher in the card's batches (``add_batch``), as an engine run hands them over. Each
size runs in its own process, so the peak RSS printed is that size's own. Times cover ``add_batch`` and
``finish`` (stitching and vectorising) and, apart, building the features from the polygons, which a run
does on its post-processing threads (tile outputs are generated outside the clock).

End-to-end mode runs the engine session on a generated JPEG pyramid with a zero-cost model that returns
fixed quarter-resolution probabilities, so reading, the pipeline and stitching are what is measured; it
prints tiles/s, the busy time of each stage and which stage limits, then the time to write the features as
the GeoJSON file ``qpbridge annotate`` writes.

Tracer-memory mode measures (``tracemalloc``: numpy's and OpenCV's arrays) the peak memory the region tracer
takes beyond the raster rows it keeps: for one chunk of 256 rows of a 9,375 px wide class raster (a smooth
map, and independent random classes, the worst case), and for the trace of one region spanning a whole
4,096 x 4,096 raster.

Feeding-contended mode fills a model batch from block reads tile by tile and in runs, alone and beside a
thread running Python: what the model's feeders and device worker face beside a run's other threads.

Reading-contended mode reads a run's first band of blocks through the engine's slide reader, alone and beside
a thread running Python, at several GIL switch intervals: what a run's reading threads face beside its others.

Features-contended mode builds each case's features in the engine's chunks, alone and beside a thread running
Python bytecode: what a run's post-processing threads face beside its other threads.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

CARD = {
    "schema_version": 1, "name": "hotspot-shaped", "family": "bench-fixed", "task": "semantic-segmentation",
    "object_type": "annotation",
    "classes": [{"name": "Background", "color": [255, 255, 255], "emit": False},
                {"name": "Lobule", "color": [222, 120, 160]}, {"name": "Portal tract", "color": [30, 110, 220]}],
    "tile": {"size": 256, "overlap": 64, "batch_size": 64}, "mpp": 1.0,
    "postprocess": {"simplify_um": 2.0, "min_area_um2": 500.0, "max_hole_area_um2": 100.0},
    "params": {"tissue_filter": False},
}
OUT = 64  # output pixels per tile side (a quarter of 256)


def smooth_tile(ox: int, oy: int, n: int, extent: int) -> np.ndarray:
    """Probabilities of one tile at output pixel (ox, oy) of the smooth map."""
    ys, xs = np.mgrid[oy:oy + n, ox:ox + n].astype(np.float32)
    period, radius = 150.0, 22.0
    dx = (xs % period) - period / 2
    dy = (ys % period) - period / 2
    disc = radius - np.sqrt(dx * dx + dy * dy)  # > 0 inside a portal tract
    c = extent / 2
    corner = np.hypot(xs - c, ys - c) - 0.62 * extent  # > 0 in the background corners
    logits = np.stack([corner / 4, -corner / 4 - disc / 4, disc / 4 - corner / 4])
    e = np.exp(logits - logits.max(axis=0))
    out: np.ndarray = (e / e.sum(axis=0)).astype(np.float32)
    return out


def batches(plan, card, case: str, side: int):  # type: ignore[no-untyped-def]
    """The plan's tiles with their precomputed outputs, in the card's batches, as a run stitches them."""
    from qpbridge.families import SemanticResult

    rng = np.random.default_rng(0)
    pool = []
    if case == "noisy":
        for _ in range(64):
            logits = rng.standard_normal((3, OUT, OUT)).astype(np.float32) * 2
            e = np.exp(logits - logits.max(axis=0))
            pool.append((e / e.sum(axis=0)).astype(np.float32))
    extent = side // 4
    for start in range(0, len(plan.tiles), card.batch_size):
        tiles = plan.tiles[start:start + card.batch_size]
        yield tiles, [SemanticResult(probs=pool[(start + i) % len(pool)] if pool else
                                     smooth_tile(t.x // 4, t.y // 4, OUT, extent), scale=4)
                      for i, t in enumerate(tiles)]


def setup(size: int):  # type: ignore[no-untyped-def]
    """The card, an N x N tile plan, its side in px and a feature builder, as a run makes them."""
    import cv2  # noqa: F401  (imported here so that first-use imports stay off the clock)
    import scipy.sparse.csgraph  # noqa: F401

    from qpbridge import gc_policy
    from qpbridge.cards import ModelCard
    from qpbridge.engine.features import FeatureBuilder
    from qpbridge.engine.plan import make_plan

    gc_policy.relax()  # as every engine run does
    card = ModelCard.from_dict(CARD)
    step = card.tile_size - card.overlap
    side = card.tile_size + (size - 1) * step
    plan = make_plan(card, (0, 0, side, side), 1.0)
    assert len(plan.tiles) == size * size
    return card, plan, side, FeatureBuilder(card, 1.0, None, (side, side))


def stitcher_for(card, plan, emit, early_holes: bool = True):  # type: ignore[no-untyped-def]
    """The stitcher a run builds for the card's plan (classes 1 and 2 emitted, holes of open regions early),
    polygons going to ``emit``."""
    from qpbridge.engine.stitching import SemanticStitcher

    return SemanticStitcher(plan, 3, [1, 2], emit, min_area=card.min_area_um2 / card.mpp ** 2,
                            max_hole=card.max_hole_area_um2 / card.mpp ** 2, early_holes=early_holes)


def run_one(size: int, case: str) -> dict[str, float]:
    import gc

    from qpbridge import gc_policy

    card, plan, side, builder = setup(size)
    features = []
    build_s = 0.0
    pending: list = []

    def emit(geom, cls, extra):  # type: ignore[no-untyped-def]
        pending.append((geom, cls, extra))

    def flush() -> None:  # features are built in batches, as a run builds them
        nonlocal build_s
        t = time.perf_counter()
        built = builder.build_many([g for g, _, _ in pending], [c for _, c, _ in pending], 0, 0, 1.0, 1.0,
                                   [e for _, _, e in pending])
        build_s += time.perf_counter() - t
        features.extend(f for f in built if f is not None)
        pending.clear()

    stitcher = stitcher_for(card, plan, emit)
    elapsed = 0.0
    with gc_policy.paused_during_runs():  # as every engine run does
        for tiles, results in batches(plan, card, case, side):
            t0 = time.perf_counter()
            stitcher.add_batch(tiles, results)
            flush()
            elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        stitcher.finish()
        flush()
        elapsed += time.perf_counter() - t0
        t0 = time.perf_counter()
        gc.collect(0)  # what the run left to the first collection after it
        collect_s = time.perf_counter() - t0
    assert stitcher.tracer is not None
    return {"tiles": len(plan.tiles), "ms_per_tile": 1000 * elapsed / len(plan.tiles),
            "build_ms_per_tile": 1000 * build_s / len(plan.tiles),
            "collect_ms_per_tile": 1000 * collect_s / len(plan.tiles),
            "stitch_ms_per_tile": 1000 * (elapsed - build_s) / len(plan.tiles), "features": len(features),
            "raster_rows_peak": stitcher.tracer.peak_rows, "rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stitch_table(sizes: list[int], cases: list[str]) -> int:
    print("stitching + vectorising, 3 classes, 64x64 outputs per 256 px tile (overlap 64), one process per row;")
    print("ms per tile: stitching and vectorising (blending, class strips, labelling, tracing to polygons), then")
    print("building the GeoJSON features from the polygons (a run does that on its post-processing threads);")
    print("garbage collection is paused as in a run, and the young collection it leaves for after is timed apart")
    print(f"{'case':<7} {'plan':>9} {'tiles':>7} {'stitch+vectorise':>17} {'features':>9} {'total':>7} "
          f"{'collect after':>13} {'features':>9} {'raster rows kept':>17} {'peak RSS MiB':>13}")
    for case in cases:
        per_tile = []
        for size in sizes:
            proc = subprocess.run([sys.executable, __file__, "--one", str(size), case], capture_output=True,
                                  text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return 1
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            per_tile.append(r["stitch_ms_per_tile"])
            print(f"{case:<7} {size:>4}x{size:<4} {r['tiles']:>7} {r['stitch_ms_per_tile']:>17.3f} "
                  f"{r['build_ms_per_tile']:>9.3f} {r['ms_per_tile']:>7.3f} {r['collect_ms_per_tile']:>13.3f} "
                  f"{r['features']:>9} "
                  f"{r['raster_rows_peak']:>17} {r['rss_mib']:>13.0f}")
        print(f"{case:<7} stitching + vectorising, largest / smallest plan, ms per tile: "
              f"{per_tile[-1] / per_tile[0]:.2f}")
    return 0


def end_to_end(size: int, readers: int, batch: int, trace: list[str], reuse: Path | None = None) -> int:
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_slide import trace_options, write_geojson, write_slide

    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine
    from qpbridge.engine.session import RunOptions
    from qpbridge.families import ModelFamily, SemanticResult, register_family

    probs = smooth_tile(40, 40, OUT, 160)  # a portal tract inside lobule, background in a corner

    @register_family("bench-fixed")
    class Fixed(ModelFamily):
        """Zero-cost model: the same quarter-resolution probabilities for every tile."""

        def predict(self, tiles):  # type: ignore[no-untyped-def]
            return [SemanticResult(probs=probs[:, :(t.shape[0] + 3) // 4, :(t.shape[1] + 3) // 4], scale=4)
                    for t in tiles]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        slide = reuse or root / "slide.tif"
        if not slide.exists():
            write_slide(slide, size)
            print(f"slide {size}x{size} px at 0.5 µm/px written in {time.perf_counter() - t:.1f} s")
        card_dir = root / "models" / CARD["name"]
        card_dir.mkdir(parents=True)
        card = {**CARD, "tile": {**CARD["tile"], "batch_size": batch}}
        (card_dir / "config.json").write_text(json.dumps(card))
        engine = Engine(root / "models")
        for where in trace:  # alternately, on the same slide and engine
            opts = RunOptions(readers=readers, **trace_options(where))
            result = annotate_slide(engine, slide, CARD["name"], tissue_filter=False, options=opts)
            st = result.stats
            child = st.extra.get("trace_process_cpu_s")
            print(f"end to end, zero-cost model, trace {where}: {st.tiles} tiles in {st.seconds:.2f} s = "
                  f"{st.tiles / st.seconds:.1f} tiles/s; {len(result.features)} features; "
                  f"peak RSS {peak_rss_mib():.0f} MiB"
                  + (f"; tracing process CPU {child:.2f} s" if child is not None else ""))
            print(st.table())
            write_s, mb = write_geojson(root / "out.geojson", result.features)
            print(f"GeoJSON of the features written in {write_s:.2f} s ({mb:.1f} MB)")
    return 0


def tracer_memory() -> int:
    import tracemalloc

    from qpbridge.engine.vectorise import RegionTracer

    def tracer(width: int) -> RegionTracer:  # a card's min_area 500 µm², max_hole 100 µm² at 4 µm per pixel
        return RegionTracer(width, [1, 2], lambda g, c: None, scale=4, min_area=500, max_hole=100, chunk_rows=rows)

    def lattice(h: int, w: int) -> np.ndarray:  # class 1 around a lattice of class-2 discs
        ys, xs = np.mgrid[0:h, 0:w]
        return np.where((xs % 150 - 75) ** 2 + (ys % 150 - 75) ** 2 < 22 ** 2, 2, 1).astype(np.uint8)

    def peak(tracer: RegionTracer, strip: np.ndarray) -> int:
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        tracer.add_strip(strip, last=True)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top - base

    width, rows = 9375, 256
    cases = {"smooth": lattice(2 * rows, width),
             "random": np.random.default_rng(0).integers(0, 3, (2 * rows, width)).astype(np.uint8)}
    print(f"tracer memory beyond the raster rows kept: one chunk of {rows} x {width} px (min_area 31, max_hole 6 px)")
    for name, raster in cases.items():
        chunked = tracer(width)
        chunked.add_strip(raster[:rows])
        used = peak(chunked, raster[rows:])
        print(f"  {name:<7} {used / 1e6:7.1f} MB = {used / (rows * width):5.1f} bytes per chunk pixel")
    side = 4096
    raster = lattice(side, side)
    raster[:, :5] = 0  # class 1 spans every row: one region, traced at the end from the rows kept
    spanning = tracer(side)
    for y in range(0, side - rows, rows):
        spanning.add_strip(raster[y:y + rows])
    used = peak(spanning, raster[side - rows:])
    print(f"one region spanning a {side} x {side} raster: {used / 1e6:.1f} MB = {used / side ** 2:.1f} bytes per "
          "pixel of its box")
    return 0


def _traced(size: int, case: str):  # type: ignore[no-untyped-def]
    """The feature builder and the polygons a run traces for the case's N x N plan."""
    card, plan, side, builder = setup(size)
    traced: list = []
    # whole regions: the builder builds them again for each repeat, and keeps no early holes between them
    stitcher = stitcher_for(card, plan, lambda g, c, e: traced.append((g, c, e)), early_holes=False)
    for tiles, results in batches(plan, card, case, side):
        stitcher.add_batch(tiles, results)
    stitcher.finish()
    return builder, traced


def _build_all(builder, chunks: list) -> int:  # type: ignore[no-untyped-def]
    n = 0
    for chunk in chunks:
        built = builder.build_many([g for g, _, _ in chunk], [c for _, c, _ in chunk], 0, 0, 1.0, 1.0,
                                   [e for _, _, e in chunk])
        n += sum(f is not None for f in built)
    return n


def _spin(stop) -> None:  # type: ignore[no-untyped-def]
    """Run Python bytecode until ``stop`` is set: it gives up the GIL only when the interpreter forces it."""
    n = 0
    while not stop.is_set():
        n += 1


def _alone_and_beside(work: Callable[[], Any]) -> tuple[float, float, Any]:
    """Seconds of ``work``: the best of 3 runs alone, then one run beside a thread running Python (see
    ``_spin``); and what it returned."""
    import threading

    alone = []
    for _ in range(3):
        t0 = time.perf_counter()
        out = work()
        alone.append(time.perf_counter() - t0)
    stop = threading.Event()
    spinner = threading.Thread(target=_spin, args=(stop,))
    spinner.start()
    try:
        t0 = time.perf_counter()
        work()
        beside = time.perf_counter() - t0
    finally:
        stop.set()
        spinner.join()
    return min(alone), beside, out


def features_contended(size: int, cases: list[str]) -> int:
    """Build the features of each case's N x N plan in the engine's chunks, alone and beside a thread that
    runs Python bytecode (as a run's other threads do). Each call into C that gives up the GIL waits up to
    the interpreter's switch interval to take it back beside such a thread, so the time beside it grows
    with the number of such calls, not with the work."""
    from qpbridge.engine.session import FEATURE_CHUNK

    print(f"building features in chunks of {FEATURE_CHUNK} polygons, {size}x{size} plan; seconds, best of 3 "
          f"alone, then once beside a thread running Python (switch interval {sys.getswitchinterval() * 1000:g} ms)")
    print(f"{'case':<7} {'polygons':>9} {'features':>9} {'alone s':>8} {'beside s':>9} {'ratio':>6}")
    for case in cases:
        builder, traced = _traced(size, case)
        chunks = [traced[k:k + FEATURE_CHUNK] for k in range(0, len(traced), FEATURE_CHUNK)]
        alone, beside, n_features = _alone_and_beside(functools.partial(_build_all, builder, chunks))
        print(f"{case:<7} {len(traced):>9} {n_features:>9} {alone:>8.3f} {beside:>9.3f} {beside / alone:>6.1f}")
    return 0


def feeding_contended(n_tiles: int) -> int:
    """Fill a model batch from block reads, alone and beside a thread running Python: tile by tile (tiles as
    views of their block, each copied on its own, then into the batch: how batches were filled before) and in
    runs (each block's tiles gathered in one copy, the batch filled run by run: ``read_block`` and
    ``contiguous_runs``). Every numpy copy gives up the GIL, and beside such a thread waits up to the switch
    interval to take it back, so the time beside it grows with the number of copies, not with the bytes."""
    from qpbridge.engine.plan import PlannedTile, TilePlan
    from qpbridge.engine.reading import blocks_of, read_block
    from qpbridge.families.torch_runtime import contiguous_runs

    tile, step, cols = 256, 192, 10
    rows = -(-n_tiles // cols)
    h, w = step * (rows - 1) + tile, step * (cols - 1) + tile
    canvas = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    plan = TilePlan(width=w, height=h, tile=tile, overlap=tile - step, ds=1.0, origin_x=0, origin_y=0, rows=rows,
                    cols=cols)
    plan.tiles = [PlannedTile(r * cols + c, r, c, c * step, r * step, tile, tile) for r in range(rows)
                  for c in range(cols)][:n_tiles]
    blocks = blocks_of(plan)
    batch = np.empty((len(plan.tiles), tile, tile, 3), np.uint8)

    def read_box(x0, y0, x1, y1, out_w, out_h):  # type: ignore[no-untyped-def]
        return canvas[int(y0):int(y0) + out_h, int(x0):int(x0) + out_w]  # pixels already decoded

    def tile_by_tile() -> None:
        for j, t in enumerate(t for block in blocks for t in block):
            batch[j] = np.ascontiguousarray(canvas[t.y:t.y + tile, t.x:t.x + tile])  # a view of its block

    def in_runs() -> None:
        j = 0
        for run in contiguous_runs([px for block in blocks for _, px in read_block(plan, block, read_box)]):
            batch[j:j + len(run)] = run
            j += len(run)

    print(f"filling a batch of {len(plan.tiles)} tiles of {tile} px from {len(blocks)} blocks; ms, best of 3 alone, "
          f"then once beside a thread running Python (switch interval {sys.getswitchinterval() * 1000:g} ms)")
    print(f"{'way':<13} {'alone ms':>9} {'beside ms':>10} {'ratio':>6}")
    for name, fill in (("tile by tile", tile_by_tile), ("in runs", in_runs)):
        alone, beside, _ = _alone_and_beside(fill)
        print(f"{name:<13} {1000 * alone:>9.1f} {1000 * beside:>10.1f} {beside / alone:>6.1f}")
    return 0


def reading_contended(slide_path: Path | None, size: int, intervals: list[float]) -> int:
    """Read blocks of a JPEG-tiled slide through the engine's reader (as a run's first band: 2,048 x 832 level
    pixels each), alone and beside a thread running Python, at several switch intervals. Each stored tile's
    read and decode gives up the GIL; beside such a thread, taking it back waits up to the switch interval."""
    import tempfile

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_slide import write_slide

    from qpbridge.slides import Slide

    with tempfile.TemporaryDirectory() as tmp:
        path = slide_path or Path(tmp) / "slide.tif"
        if not path.exists():
            write_slide(path, size)
        slide = Slide(path)
        ds = 2.0  # 1 µm/px from 0.5 µm/px: the level a run at the bench card's pixel size reads
        cols = max(1, min(8, int(slide.width / ds) // 2048))
        boxes = [(c * 2048 * ds, 0.0, (c + 1) * 2048 * ds, 832 * ds) for c in range(cols)]

        def read_all() -> int:
            return sum(slide.read(*box, 2048, 832).shape[0] for box in boxes)

        print(f"reading {len(boxes)} blocks of 2048x832 px (level downsample {ds:g}) of {path.name}; ms, best of 3 "
              "alone, then once beside a thread running Python")
        print(f"{'switch interval ms':>18} {'alone ms':>9} {'beside ms':>10} {'ratio':>6}")
        before = sys.getswitchinterval()
        try:
            for interval in intervals:
                sys.setswitchinterval(interval)
                alone, beside, _ = _alone_and_beside(read_all)
                print(f"{interval * 1000:>18g} {1000 * alone:>9.1f} {1000 * beside:>10.1f} {beside / alone:>6.1f}")
        finally:
            sys.setswitchinterval(before)
            slide.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100])
    ap.add_argument("--cases", nargs="+", default=["smooth", "noisy"], choices=["smooth", "noisy"])
    ap.add_argument("--one", nargs=2, metavar=("SIZE", "CASE"), help=argparse.SUPPRESS)
    ap.add_argument("--end-to-end", action="store_true")
    ap.add_argument("--tracer-memory", action="store_true")
    ap.add_argument("--features-contended", action="store_true",
                    help="build each case's features alone and beside a thread running Python (--sizes: the first)")
    ap.add_argument("--feeding-contended", type=int, metavar="TILES", nargs="?", const=256,
                    help="fill a model batch (default 256 tiles) tile by tile and in runs, alone and beside a thread "
                         "running Python")
    ap.add_argument("--reading-contended", type=float, nargs="*", metavar="SWITCH_S",
                    help="read blocks of the slide alone and beside a thread running Python, at these switch "
                         "intervals (default 0.005 0.001 0.0005 0.0002 s)")
    ap.add_argument("--size", type=int, default=8192, help="end-to-end slide side in px at 0.5 µm/px")
    ap.add_argument("--slide", type=Path, help="end to end: reuse this synthetic slide (written first if missing)")
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--trace", nargs="+", default=["auto"],
                    choices=["auto", "thread", "process", *(f"process{n}" for n in range(1, 5))],
                    help="end to end: where class strips are traced, one run per value in this order (processN: N "
                         "processes sharing out the classes)")
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1])))
        return 0
    if args.tracer_memory:
        return tracer_memory()
    if args.reading_contended is not None:
        return reading_contended(args.slide, args.size, args.reading_contended or [0.005, 0.001, 0.0005, 0.0002])
    if args.feeding_contended:
        return feeding_contended(args.feeding_contended)
    if args.features_contended:
        return features_contended(args.sizes[0], args.cases)
    if args.end_to_end:
        return end_to_end(args.size, args.readers, args.batch, args.trace, args.slide)
    return stitch_table(args.sizes, args.cases)


if __name__ == "__main__":
    sys.exit(main())
