"""The host side of a whole-slide run at model speed, without the model: prints measured numbers (not a test).

    python bench/bench_host.py [--size 32768] [--slide PATH] [--outputs PATH] [--batch 256] [--readers 8]
                               [--trace process process2-collect thread ...] [--decode]
    python bench/bench_host.py --tracing thread process1 process2 [...]

A GPU run is as fast as its host side lets it be: the pipeline, blending, class strips, tracing and features have
to keep up with thousands of tiles a second. This bench measures that side on any machine, with the class maps
a GPU run of ``bench_slide.py`` traces:

1. record (once): SegFormer-B0 with ``bench_slide.py``'s seeded random weights runs over the synthetic slide on
   this machine's device (fp32), and each tile's native-resolution probabilities (3 x 64 x 64) are kept in ``--outputs``
   (float16, 24 KiB a tile; reused when present, so record once and replay many times);
2. replay: the engine session runs the same plan, and the model stage takes each tile's recorded output from a
   result store (the mechanism a server's tile cache uses) instead of the model. Reading returns blank blocks
   (the store ignores pixels), unless ``--decode`` reads the slide: what is left is the host side itself.
   One difference from a GPU run: the recorded outputs are host arrays, so tiles are blended on the host
   (numpy) where a GPU run blends them on the device; the stitching thread's blending and class strips cost
   more here. Tracing, features and the pipeline are the same code.

Per run it prints tiles/s, the busy time of each stage and the run's timeline (the first and last output at the
stitcher, when the last was stitched, and the tail after it). ``--tracing`` instead feeds the run's class strips
(host blending of the recorded outputs) to the tracer alone, on this thread or in N processes sharing out the
classes, and prints how long the strips took to hand over and the finish.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = 64  # SegFormer's output side for a 256 px tile
CLASSES = 3


class Recorder:
    """A result store that finds nothing and keeps what the model returns, by tile index."""

    def __init__(self, path: Path, n: int) -> None:
        self.out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, CLASSES, OUT, OUT))
        self.seen = np.zeros(n, bool)

    def get(self, tile: Any, px: np.ndarray) -> Any:
        return None

    def put(self, tile: Any, px: np.ndarray, result: Any) -> None:
        probs = result.probs
        if not isinstance(probs, np.ndarray):
            probs = probs.float().cpu().numpy()
        self.out[tile.index] = probs
        self.seen[tile.index] = True


class Replay:
    """A result store that has every tile's recorded output."""

    def __init__(self, outputs: np.ndarray) -> None:
        from qpbridge.families import SemanticResult

        self.result = SemanticResult
        self.outputs = outputs  # float32, as a family's batch outputs: consecutive tiles in rows

    def get(self, tile: Any, px: np.ndarray) -> Any:
        i = tile.index
        return self.result(probs=self.outputs[i], scale=4, batch=(self.outputs, i))

    def put(self, tile: Any, px: np.ndarray, result: Any) -> None:
        raise AssertionError("every tile is replayed")


def record(engine: Any, name: str, slide: Path, path: Path) -> None:
    from qpbridge.annotate import annotate_slide
    from qpbridge.slides import Slide

    opened = Slide(slide, None)
    stores: list[Recorder] = []

    def store(_slide: Any, plan: Any) -> Recorder:
        stores.append(Recorder(path.with_suffix(".part.npy"), len(plan.tiles)))
        return stores[0]

    t = time.perf_counter()
    result = annotate_slide(engine, slide, name, tissue_filter=False, slide=opened, results=store)
    rec = stores[0]
    if not rec.seen.all():
        raise SystemExit(f"recording missed {int((~rec.seen).sum())} tiles")
    rec.out.flush()
    del rec.out
    path.with_suffix(".part.npy").rename(path)
    print(f"recorded {len(result.plan.tiles)} tiles' outputs in {time.perf_counter() - t:.0f} s "
          f"({len(result.features)} features) to {path}")


def blank_reader() -> Any:
    """A slide's ``read`` signature returning white blocks of the asked size, without decoding."""

    def read_box(x0: int, y0: int, x1: int, y1: int, out_w: int | None = None, out_h: int | None = None
                 ) -> np.ndarray:
        w = out_w if out_w is not None else x1 - x0
        h = out_h if out_h is not None else y1 - y0
        return np.full((h, w, 3), 255, np.uint8)

    return read_box


def replay(engine: Any, name: str, slide: Path, outputs: np.ndarray, trace: str, readers: int,
           decode: bool) -> None:
    from bench_slide import GCTime, trace_options

    from qpbridge.annotate import _reader, roi_region, run_plan
    from qpbridge.engine.features import FeatureBuilder
    from qpbridge.engine.plan import make_plan
    from qpbridge.engine.session import RunOptions
    from qpbridge.slides import Slide

    opened = Slide(slide, None)
    card = engine.card(name)
    plan = make_plan(card, roi_region(None, opened.width, opened.height), opened.mpp, None)
    if len(plan.tiles) != len(outputs):
        raise SystemExit(f"the outputs hold {len(outputs)} tiles, the plan {len(plan.tiles)}: record again")
    builder = FeatureBuilder(card, opened.mpp, None, (opened.width, opened.height))
    opts = RunOptions(readers=readers, **trace_options(trace))
    with GCTime() as collected:
        features, st = run_plan(engine, name, plan, _reader(opened, plan) if decode else blank_reader(), builder,
                                options=opts, results=Replay(outputs))
    tail = st.seconds - st.stitched_s
    print(f"replay, trace {trace}, {'decoding' if decode else 'blank reads'}: {st.tiles} tiles in "
          f"{st.seconds:.2f} s = {st.tiles / st.seconds:.0f} tiles/s; {len(features)} features; outputs reached "
          f"the stitcher from {st.first_output_s:.2f} to {st.last_output_s:.2f} s "
          f"({st.tiles / max(1e-9, st.last_output_s - st.first_output_s):.0f} tiles/s), stitched at "
          f"{st.stitched_s:.2f} s, tail {tail:.2f} s; {collected}")
    print(st.table())


def class_strips(engine: Any, name: str, slide: Path, outputs: np.ndarray) -> tuple[list[tuple[np.ndarray, bool]],
                                                                                    dict[str, Any]]:
    """The class strips a run of the recorded outputs traces (host blending), and the tracer's settings."""
    from qpbridge.engine.morphology import Morphology
    from qpbridge.engine.plan import make_plan
    from qpbridge.engine.session import make_stitcher
    from qpbridge.families import SemanticResult
    from qpbridge.slides import Slide

    opened = Slide(slide, None)
    card = engine.card(name)
    plan = make_plan(card, (0, 0, opened.width, opened.height), opened.mpp, None)
    strips: list[tuple[np.ndarray, bool]] = []
    st = make_stitcher(card, plan, lambda g, c, e: None)
    tiles = plan.tiles
    st.add(tiles[0], SemanticResult(probs=outputs[0], scale=4))  # sets the tracer up
    tracer = st.tracer
    assert tracer is not None
    tracer.add_strip = lambda strip, last=False: strips.append((strip.copy(), last))  # type: ignore[method-assign]
    for k in range(1, len(tiles), 256):
        chunk = tiles[k:k + 256]
        st.add_batch(chunk, [SemanticResult(probs=outputs[t.index], scale=4) for t in chunk])
    st.finish()  # (the tracer's own finish adds an empty last strip, as nothing reached it)
    strips = strips[:next(i for i, (_, last) in enumerate(strips) if last) + 1]
    morphology = Morphology.from_card(card)
    settings = {"classes": st.emit_classes, "scale": st.scale, "min_area": st.min_area, "max_hole": st.max_hole,
                "morphology": morphology.at_scale(st.scale) if morphology is not None else None, "early_holes": True}
    return strips, settings


def tracing(strips: list[tuple[np.ndarray, bool]], settings: dict[str, Any], how: list[str]) -> None:
    """The class strips through the tracer alone: on this thread, or in N processes (processN)."""
    from qpbridge.engine.trace_process import RemoteTracer, strip_tracer

    width = strips[0][0].shape[1]
    found = [0]

    def emit(g: Any, c: int) -> None:
        found[0] += 1

    for where in how:
        found[0] = 0
        t = time.perf_counter()
        if where == "thread":
            tracer, filt = strip_tracer(width, settings["classes"], emit, **{k: v for k, v in settings.items()
                                                                          if k != "classes"})
            add = (filt or tracer).add_strip
            for strip, last in strips:
                add(strip, last)
            t1 = time.perf_counter()
            tracer.finish()
            busy = None
        else:
            n = int(where.removeprefix("process") or 1)
            remote = RemoteTracer(emit, processes=n)
            remote.open(width, **settings)
            t = time.perf_counter()  # the processes are up (taken from the idle ones after the first round)
            for strip, last in strips:
                remote.add_strip(strip, last)
            t1 = time.perf_counter()
            remote.finish()
            busy = remote.busy_s
        end = time.perf_counter()
        print(f"tracing {len(strips)} strips of {width} px in {where}: {end - t:.3f} s (strips handed over in "
              f"{t1 - t:.3f} s, finish {end - t1:.3f} s); {found[0]} emitted"
              + (f"; process CPU {busy:.2f} s" if busy is not None else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    from bench_slide import TRACE_CHOICES

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=32768, help="slide side in px at 0.5 µm/px")
    ap.add_argument("--slide", type=Path, help="reuse this synthetic slide (written there first if missing)")
    ap.add_argument("--outputs", type=Path, help="recorded outputs (.npy; recorded there first if missing)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--readers", type=int, default=8)
    ap.add_argument("--trace", nargs="+", default=["process", "process"],
                    choices=[*TRACE_CHOICES, *(f"{w}-collect" for w in TRACE_CHOICES)],
                    help="where class strips are traced, one replay per value, in this order (-collect: garbage "
                         "collection left on during the run; processN: N processes "
                         "sharing out the classes)")
    ap.add_argument("--decode", action="store_true", help="read (decode) the slide in replays too")
    ap.add_argument("--tracing", nargs="+", metavar="WHERE", choices=["thread", *TRACE_CHOICES[3:]],
                    help="instead of replays: the run's class strips through the tracer alone, on this thread or in "
                         "processN, in this order")
    args = ap.parse_args(argv)

    from bench_slide import make_card, write_slide

    from qpbridge.engine import Engine

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        slide = args.slide or root / "slide.tif"
        if not slide.exists():
            t = time.perf_counter()
            write_slide(slide, args.size)
            print(f"slide {args.size}x{args.size} px at 0.5 µm/px written in {time.perf_counter() - t:.1f} s")
        name = make_card(root, "fp32", args.batch, compiled=False)
        engine = Engine(root / "models")
        outputs_path = args.outputs or root / "outputs.npy"
        if not outputs_path.exists():
            record(engine, name, slide, outputs_path)
        outputs = np.load(outputs_path, mmap_mode="r")
        # in memory as float32 (the replay reads no disk), converted once for every replay
        outputs = np.ascontiguousarray(outputs, dtype=np.float32)
        if args.tracing:
            strips, settings = class_strips(engine, name, slide, outputs)
            tracing(strips, settings, args.tracing)
            return 0
        for where in args.trace:
            replay(engine, name, slide, outputs, where, args.readers, args.decode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
