"""Linear-time stitching: class rasters traced strip by strip against whole-raster references."""

from __future__ import annotations

import itertools

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from conftest import DARK_CARD
from qpbridge.cards import ModelCard
from qpbridge.engine.plan import TilePlan, make_plan
from qpbridge.engine.stitching import SemanticStitcher
from qpbridge.engine.vectorise import EarlyHoles, HoledRegion, RegionTracer
from qpbridge.families import NO_CLASS, SemanticResult
from qpbridge.geometry import PINCH, trace_regions


def blob_raster(h: int, w: int, classes: int, cell: int, seed: int) -> np.ndarray:
    """Random regions of ``classes`` classes, about ``cell`` px across, with holes and islands."""
    rng = np.random.default_rng(seed)
    small = rng.random((classes, h // cell + 2, w // cell + 2)).astype(np.float32)
    big = np.stack([cv2.resize(s, (w + 2 * cell, h + 2 * cell), interpolation=cv2.INTER_CUBIC)[cell:cell + h,
                                                                                                  cell:cell + w]
                    for s in small])
    return np.argmax(big, axis=0).astype(np.uint8)


def feed_strips(tracer: RegionTracer, raster: np.ndarray, seed: int, tallest: int) -> None:
    """The raster to the tracer in strips of random heights (1 to tallest - 1 rows), the last one closing it."""
    rng = np.random.default_rng(seed)
    y = 0
    while y < raster.shape[0]:
        h = int(rng.integers(1, tallest))
        tracer.add_strip(raster[y:y + h], last=y + h >= raster.shape[0])
        y += h


def components(raster: np.ndarray, cls: int) -> list[int]:
    _, labels = cv2.connectedComponents((raster == cls).astype(np.uint8), connectivity=8)
    return sorted(np.bincount(labels.ravel())[1:].tolist())


@pytest.mark.parametrize("flood_seeds", [0, 10 ** 9])  # spanning regions by labelling, by flood fills
@pytest.mark.parametrize("cell", [3, 12, 40])
def test_strips_trace_the_same_regions_as_the_whole_raster(cell, flood_seeds, monkeypatch):
    monkeypatch.setattr("qpbridge.engine.vectorise.FLOOD_SEEDS", flood_seeds)
    raster = blob_raster(230, 170, 3, cell, seed=cell)
    raster[100:110, 20:30] = NO_CLASS  # pixels no tile covered
    got: dict[int, list[shapely.Polygon]] = {1: [], 2: []}
    feed_strips(RegionTracer(170, [1, 2], lambda g, c: got[c].append(g)), raster, cell, 40)
    for cls in (1, 2):
        polys = got[cls]
        assert all(p.is_valid and p.geom_type == "Polygon" for p in polys)
        # one polygon per 8-connected region, covering exactly its pixels (holes cut out)
        assert sorted(round(p.area) for p in polys) == components(raster, cls)
        whole = shapely.union_all(polys)
        assert whole.area == pytest.approx(float((raster == cls).sum()), abs=0.05 * len(polys))


@pytest.mark.parametrize("chunk", [1, 16, 256])
@pytest.mark.parametrize("cell", [1, 2, 6])
def test_strips_keep_exactly_the_regions_the_whole_raster_keeps(cell, chunk):
    """With min_area and max_hole, the tracer's early filters (pixel counts, enclosed background in a box)
    drop only what tracing the whole raster at once drops: the same polygons, holes filled the same way."""
    raster = blob_raster(260, 190, 3, cell, seed=10 + cell)
    min_area, max_hole, scale = 18.0 * 16, 5.0 * 16, 4.0
    got: dict[int, list[shapely.Polygon]] = {1: [], 2: []}
    tracer = RegionTracer(190, [1, 2], lambda g, c: got[c].append(g), scale=scale, min_area=min_area,
                          max_hole=max_hole, chunk_rows=chunk)
    feed_strips(tracer, raster, cell, 30)
    key = lambda p: (round(p.area, 6), p.bounds)  # noqa: E731
    for cls in (1, 2):
        want = trace_regions((raster == cls).astype(np.uint8), 0, 0, scale, min_area=min_area / 16,
                             max_hole=max_hole / 16)
        assert len(want) > 5 and len(got[cls]) == len(want)
        for a, b in zip(sorted(got[cls], key=key), sorted(want, key=key), strict=True):
            # traced from crops at other offsets: the same up to float rounding
            assert shapely.hausdorff_distance(a, b) < 1e-9 and len(a.interiors) == len(b.interiors)
    # the filters did drop regions (most of a noisy map's)
    assert sum(len(v) for v in got.values()) < sum(len(components(raster, c)) for c in (1, 2)) / (3 if cell == 1 else 1)


def test_flush_traces_the_strips_waiting_for_a_chunk():
    """Strips wait for a full chunk; ``flush`` traces them now (what a cancelled run keeps), and going on
    afterwards gives the same regions as never flushing."""
    raster = blob_raster(120, 90, 3, 6, seed=4)
    plain: list[shapely.Polygon] = []
    feed_strips(RegionTracer(90, [1, 2], lambda g, c: plain.append(g), chunk_rows=256), raster, 1, 20)
    got: list[shapely.Polygon] = []
    tracer = RegionTracer(90, [1, 2], lambda g, c: got.append(g), chunk_rows=256)
    tracer.add_strip(raster[:60])
    assert got == [] and tracer.pending_rows == 60
    tracer.flush()
    closed = [p for p in plain if p.bounds[3] <= 59]  # regions that end above the last row given (59)
    assert len(got) == len(closed) > 0 and tracer.pending_rows == 0
    tracer.add_strip(raster[60:], last=True)
    key = lambda p: (round(p.area, 6), p.bounds)  # noqa: E731
    assert [key(p) for p in sorted(got, key=key)] == [key(p) for p in sorted(plain, key=key)]


def test_strips_of_a_very_wide_raster_are_not_held_back(monkeypatch):
    """Chunks are bounded in pixels too: on a raster this wide, each strip is labelled as it comes."""
    monkeypatch.setattr("qpbridge.engine.vectorise.CHUNK_PIXELS", 90 * 25)
    raster = blob_raster(120, 90, 3, 6, seed=4)
    tracer = RegionTracer(90, [1, 2], lambda g, c: None, chunk_rows=256)
    tracer.add_strip(raster[:20])
    assert tracer.pending_rows == 20  # 1,800 px: waits
    tracer.add_strip(raster[20:30])
    assert tracer.pending_rows == 0 and tracer.labelled == 30  # 2,700 px: labelled
    tracer.add_strip(raster[30:60])
    assert tracer.pending_rows == 0 and tracer.labelled == 60  # one strip over the budget goes on alone


def test_regions_spanning_many_strips_keep_their_holes():
    raster = np.zeros((300, 200), np.uint8)
    cv2.circle(raster, (100, 150), 90, 1, -1)
    for cx, cy in ((70, 120), (130, 190), (100, 100)):
        cv2.circle(raster, (cx, cy), 12, 2, -1)  # islands of another class: holes in class 1
    raster[150, 40] = 0  # a one-pixel hole
    got: list[shapely.Geometry] = []
    tracer = RegionTracer(200, [1], lambda g, c: got.append(g), max_hole=2.0)
    for y in range(0, 300, 7):
        tracer.add_strip(raster[y:y + 7], last=y + 7 >= 300)
    assert len(got) == 1 and got[0].geom_type == "Polygon"
    assert len(got[0].interiors) == 3  # the one-pixel hole is below max_hole: filled before tracing
    assert got[0].area == pytest.approx(float((raster == 1).sum()) + 1, abs=0.1)


@pytest.mark.parametrize("chunk", [1, 64])
def test_tracer_forgets_rows_once_regions_close(chunk):
    tracer = RegionTracer(100, [1], lambda g, c: None, chunk_rows=chunk)
    strip = np.zeros((10, 100), np.uint8)
    strip[3:6, 10:20] = 1
    for _ in range(200):
        tracer.add_strip(strip)
    tracer.finish()
    # strips wait until a chunk's worth has come, and a region closing at its bottom waits one more strip
    assert tracer.regions == 200 and tracer.peak_rows <= max(chunk, 10) + 10
    # a region open down the whole raster keeps its rows until it closes
    tall = RegionTracer(100, [1], lambda g, c: None, chunk_rows=chunk)
    strip[:, 50] = 1
    for _ in range(50):
        tall.add_strip(strip)
    tall.finish()
    assert tall.peak_rows == 500


def test_small_regions_are_dropped_before_tracing():
    mask = np.zeros((40, 40), np.uint8)
    mask[2:4, 2:4] = 1  # 4 px
    mask[10:20, 10:20] = 1  # 100 px
    areas = sorted(p.area for p in trace_regions(mask, min_area=5.0))
    assert areas == [100.0]
    assert sorted(p.area for p in trace_regions(mask, 1.0, 2.0, 4.0)) == [64.0, 1600.0]


def test_pixels_touching_at_corners_are_one_valid_polygon():
    rng = np.random.default_rng(3)
    for _ in range(50):
        mask = (rng.random((25, 30)) < 0.45).astype(np.uint8)
        polys = trace_regions(mask)
        assert all(p.is_valid and p.geom_type == "Polygon" for p in polys)
        assert sorted(round(p.area) for p in polys) == components(mask, 1)


def test_native_resolution_outputs_stitch_without_upsampling():
    """Quarter-resolution probabilities (SegFormer's) blend on their own grid; polygons come back in
    canvas pixels, one per region, with the area of the quarter-resolution truth times 16."""
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 16}})
    plan = make_plan(card, (0, 0, 600, 440), None)
    truth = blob_raster(110, 150, 3, 15, seed=9)  # at quarter resolution
    onehot = (truth[None] == np.arange(3)[:, None, None]).astype(np.float32)
    out: list[tuple[shapely.Geometry, int]] = []
    stitcher = SemanticStitcher(plan, 3, [1, 2], lambda g, c, e: out.append((g, c)))
    order = np.random.default_rng(1).permutation(len(plan.tiles))
    for i in order:
        t = plan.tiles[i]
        probs = onehot[:, t.y // 4:t.y // 4 + (t.h + 3) // 4, t.x // 4:t.x // 4 + (t.w + 3) // 4]
        stitcher.add(t, SemanticResult(probs=probs, scale=4))
    stitcher.finish()
    assert stitcher.scale == 4 and stitcher.width == 150
    for cls in (1, 2):
        areas = sorted(round(g.area / 16) for g, c in out if c == cls)
        assert areas == components(truth, cls)


def _device_blend_on_cpu(stitcher: SemanticStitcher, first: SemanticResult) -> None:
    """Start ``stitcher`` with the torch accumulator, on the CPU (the GPU path, testable here)."""
    import torch

    from qpbridge.engine.stitching import _DeviceBlend

    stitcher._start(int(first.scale), first.probs)
    stitcher.blend = _DeviceBlend(stitcher.n_classes, stitcher.buf_h, stitcher.width, torch.device("cpu"))


def _soft_blobs(seed: int, noise_seed: int) -> tuple[TilePlan, np.ndarray]:
    """A 64 px tile plan (overlap 16) over 600 x 440 px, and noisy quarter-resolution probabilities of 3
    classes over it whose argmax is a map of blobs."""
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 16}})
    plan = make_plan(card, (0, 0, 600, 440), None)
    truth = blob_raster(110, 150, 3, 15, seed=seed)
    rng = np.random.default_rng(noise_seed)
    soft = (truth[None] == np.arange(3)[:, None, None]).astype(np.float32) + 0.3 * rng.random((3, 110, 150))
    return plan, (soft / soft.sum(axis=0)).astype(np.float32)


def test_batched_device_blend_equals_tile_by_tile():
    """Runs of tiles side by side are windowed and overlap-added in a few kernels (fold); strips and
    polygons must equal those of adding the same tiles one at a time, with partial edge tiles, a gap in a
    row (a tile the tissue filter skipped) and batches that cross rows."""
    import torch

    plan, soft = _soft_blobs(seed=4, noise_seed=2)
    skip = {plan.tiles[7].index}  # a gap: its pixels get only the neighbours' windows
    tiles = [t for t in plan.tiles if t.index not in skip]

    def result(t):  # type: ignore[no-untyped-def]
        p = soft[:, t.y // 4:t.y // 4 + (t.h + 3) // 4, t.x // 4:t.x // 4 + (t.w + 3) // 4]
        return SemanticResult(probs=torch.from_numpy(np.ascontiguousarray(p)).half(), scale=4)

    def from_batch(chunk):  # type: ignore[no-untyped-def]
        """Results as a family hands them over: rows of one padded batch output; edge tiles cut from theirs."""
        full = np.zeros((len(chunk), 3, 16, 16), np.float32)
        for j, t in enumerate(chunk):
            p = np.asarray(result(t).probs.float())
            full[j, :, :p.shape[1], :p.shape[2]] = p
        base = torch.from_numpy(full).half()
        out = []
        for j, t in enumerate(chunk):
            oh, ow = (t.h + 3) // 4, (t.w + 3) // 4
            whole = (oh, ow) == (16, 16)
            out.append(SemanticResult(probs=base[j] if whole else base[j][:, :oh, :ow], scale=4,
                                      batch=(base, j) if whole else None))
        return out

    def run(batched: bool, sliced: bool = False):  # type: ignore[no-untyped-def]
        out: list[tuple[shapely.Geometry, int]] = []
        strips: list[np.ndarray] = []
        st = SemanticStitcher(plan, 3, [1, 2], lambda g, c, e: out.append((g, c)))
        runs.clear()
        st.remaining[plan.tiles[7].row] -= 1
        _device_blend_on_cpu(st, result(tiles[0]))
        assert st.tracer is not None
        add_strip = st.tracer.add_strip
        st.tracer.add_strip = lambda strip, last=False: (strips.append(strip.copy()), add_strip(strip, last))[1]
        blend_run = st.blend.add_run  # type: ignore[union-attr]
        st.blend.add_run = lambda p, *a: (runs.append(int(p.shape[0])), slices.append(p._base is not None),  # type: ignore[union-attr]
                                          blend_run(p, *a))[2]
        for k in range(0, len(tiles), 13):  # batches that start and end mid-row
            chunk = tiles[k:k + 13]
            if sliced:
                st.add_batch(chunk, from_batch(chunk))
            elif batched:
                st.add_batch(chunk, [result(t) for t in chunk])
            else:
                for t in chunk:
                    st.add(t, result(t))
        st.finish()
        return strips, sorted((c, round(g.area, 6)) for g, c in out)

    runs: list[int] = []
    slices: list[bool] = []
    strips_a, polys_a = run(batched=True)
    assert max(runs) >= 5 and sum(runs) > len(tiles) // 2  # most tiles went through the batched path
    assert not any(slices)  # tiles without their batch output are stacked
    strips_b, polys_b = run(batched=False)
    assert len(strips_a) == len(strips_b) == plan.rows
    for a, b in zip(strips_a, strips_b, strict=True):
        np.testing.assert_array_equal(a, b)
    assert polys_a == polys_b and len(polys_a) > 5
    slices.clear()
    strips_c, polys_c = run(batched=True, sliced=True)  # runs taken as slices of the batch output
    # every run of whole tiles is a slice (the bottom row's tiles are cut short, as a family cuts edge tiles)
    assert sum(n for n, sliced in zip(runs, slices, strict=True) if sliced) > len(tiles) // 2
    for a, c in zip(strips_a, strips_c, strict=True):
        np.testing.assert_array_equal(a, c)
    assert polys_c == polys_a


def test_device_class_strips_are_taken_one_strip_later_with_the_same_result():
    """Blending on a device, a class strip is queued there and taken when the next one is queued (the last at
    once): the tracer gets the strips host blending gives, in order, with the same ``last`` flags, and the same
    regions; ``sync`` takes the strip still queued, so it emits every region the finalised strips close."""
    import torch

    plan, soft = _soft_blobs(seed=6, noise_seed=5)

    def probs(t):  # type: ignore[no-untyped-def]
        return np.ascontiguousarray(soft[:, t.y // 4:t.y // 4 + (t.h + 3) // 4, t.x // 4:t.x // 4 + (t.w + 3) // 4])

    def run(device: bool, sync_after: int | None = None):  # type: ignore[no-untyped-def]
        out: list[tuple[shapely.Geometry, int]] = []
        strips: list[tuple[np.ndarray, bool]] = []
        st = SemanticStitcher(plan, 3, [1, 2], lambda g, c, e: out.append((g, c)))
        first = SemanticResult(probs=torch.from_numpy(probs(plan.tiles[0])) if device else probs(plan.tiles[0]),
                               scale=4)
        if device:
            _device_blend_on_cpu(st, first)
        else:
            st._start(4, first.probs)
        assert st.tracer is not None
        add_strip = st.tracer.add_strip
        st.tracer.add_strip = lambda strip, last=False: (strips.append((strip.copy(), last)), add_strip(strip, last))[1]
        synced = None
        for k, t in enumerate(plan.tiles):
            p = probs(t)
            st.add(t, SemanticResult(probs=torch.from_numpy(p) if device else p, scale=4))
            if k == sync_after:
                st.sync()
                synced = (len(strips), st.base_row, len(out))
        st.finish()
        return strips, sorted((c, round(g.area, 6), g.bounds) for g, c in out), synced

    host_strips, host_polys, _ = run(device=False)
    dev_strips, dev_polys, _ = run(device=True)
    assert len(host_strips) == plan.rows and host_strips[-1][1] and not any(last for _, last in host_strips[:-1])
    assert [last for _, last in dev_strips] == [last for _, last in host_strips]
    for (a, _), (b, _) in zip(host_strips, dev_strips, strict=True):
        np.testing.assert_array_equal(a, b)
    assert dev_polys == host_polys and len(host_polys) > 5
    # mid-run: every strip finalised so far has reached the tracer once sync returns
    mid = len(plan.tiles) // 2
    _, polys, synced = run(device=True, sync_after=mid)
    assert synced is not None and synced[0] == synced[1] > 0 and polys == host_polys


# ---- the engine run session --------------------------------------------------------------------------


def test_pipeline_reports_stage_times_and_the_limit(tmp_path, models_dir):
    from conftest import write_pyramid
    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine
    from qpbridge.engine.session import RunOptions

    img = np.full((700, 900, 3), 230, np.uint8)
    cv2.circle(img, (450, 350), 250, (20, 20, 20), -1)
    path = write_pyramid(tmp_path / "disc.tif", img, mpp=0.5, levels=1)
    done = []
    result = annotate_slide(Engine(models_dir), path, "seams", options=RunOptions(readers=2, queue_batches=1),
                            on_progress=lambda p: done.append(p.tiles_done))
    st = result.stats
    assert st.tiles == len(result.plan.tiles) > 50 and done[-1] == st.tiles and not st.cancelled
    assert st.read_s > 0 and st.model_s > 0 and st.stitch_s > 0 and 0 <= st.model_idle_fraction <= 1
    assert st.limit in {"reading", "model", "stitching", "features"} and "tiles/s" in st.table()
    assert 0 < st.extra["tracing_s"] < st.stitch_s and 0 < st.extra["class_strips_s"] < st.stitch_s
    parts = ("blending_s", "class_strips_s", "tracing_s", "handing_features_s", "finishing_s")
    assert all(st.extra[k] > 0 for k in parts[:-1]) and st.extra["finishing_s"] >= 0
    # the parts are disjoint spans of the stitching thread's time
    assert sum(st.extra[k] for k in parts) <= st.stitch_s * 1.01
    assert 0 < st.extra["slowest_feature_chunk_s"] <= st.features_s
    assert "finishing" in st.table() and "blending" in st.table()
    # the timeline: first block read, first batch handed to the model, outputs, the last stitched, the finish
    assert 0 < st.first_read_s <= st.first_batch_s <= st.first_output_s <= st.last_output_s <= st.stitched_s
    assert st.stitched_s <= st.seconds and 0 < st.extra["closing_s"] <= st.seconds - st.stitched_s
    assert len(result.features) == 1
    assert shapely.geometry.shape(result.features[0]["geometry"]).area == pytest.approx(np.pi * 250 ** 2, rel=0.02)


def test_runs_shorten_the_switch_interval_while_they_are_on(tmp_path, models_dir):
    """While any run is on, the GIL switch interval is at most the engine's (threads calling into C take the
    GIL back sooner beside threads running Python); the process's own comes back when the last run ends."""
    import sys

    from conftest import write_pyramid
    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine
    from qpbridge.engine.session import RunOptions
    from qpbridge.gil_policy import RUN_SWITCH_INTERVAL_S, run_switch_interval

    own = sys.getswitchinterval()
    assert own > RUN_SWITCH_INTERVAL_S  # CPython's 5 ms, unless a test changed it
    try:
        with run_switch_interval():
            assert sys.getswitchinterval() == pytest.approx(RUN_SWITCH_INTERVAL_S, rel=0.02)
            with run_switch_interval(0.002):  # overlapping runs: the first sets it, the last out restores it
                assert sys.getswitchinterval() == pytest.approx(RUN_SWITCH_INTERVAL_S, rel=0.02)
            assert sys.getswitchinterval() == pytest.approx(RUN_SWITCH_INTERVAL_S, rel=0.02)
        assert sys.getswitchinterval() == pytest.approx(own, rel=0.02)
        with run_switch_interval(None):
            assert sys.getswitchinterval() == pytest.approx(own, rel=0.02)
        sys.setswitchinterval(0.0001)  # never longer than the process already has
        with run_switch_interval():
            assert sys.getswitchinterval() == pytest.approx(0.0001, rel=0.02)
        sys.setswitchinterval(own)

        img = np.full((500, 600, 3), 230, np.uint8)
        cv2.circle(img, (300, 250), 150, (20, 20, 20), -1)
        path = write_pyramid(tmp_path / "disc.tif", img, mpp=0.5, levels=1)
        engine = Engine(models_dir)
        for opts, expect in ((RunOptions(readers=2), RUN_SWITCH_INTERVAL_S), (RunOptions(switch_interval_s=None), own)):
            seen: list[float] = []
            annotate_slide(engine, path, "seams", options=opts,
                           on_progress=lambda p, seen=seen: seen.append(sys.getswitchinterval()))
            assert seen and all(v == pytest.approx(expect, rel=0.02) for v in seen)
            assert sys.getswitchinterval() == pytest.approx(own, rel=0.02)
        # a run that fails restores it too
        with pytest.raises(RuntimeError), run_switch_interval():
            raise RuntimeError("the run failed")
        assert sys.getswitchinterval() == pytest.approx(own, rel=0.02)
    finally:
        sys.setswitchinterval(own)


def test_runs_pause_garbage_collection_and_the_last_one_out_resumes_it(monkeypatch):
    """Overlapping runs: the first in pauses automatic collection, the last out resumes it (unless the process
    had it off); a run that fails resumes it too; runs that keep overlapping past PAUSE_MAX_S collect the young
    generations as one of them ends."""
    import gc

    from qpbridge import gc_policy

    assert gc.isenabled()
    try:
        with gc_policy.paused_during_runs():
            assert not gc.isenabled()
            with gc_policy.paused_during_runs():
                assert not gc.isenabled()
            assert not gc.isenabled()  # the other run is still on
        assert gc.isenabled()
        with gc_policy.paused_during_runs(pause=False):
            assert gc.isenabled()
        with pytest.raises(RuntimeError), gc_policy.paused_during_runs():
            raise RuntimeError("the run failed")
        assert gc.isenabled()
        gc.disable()  # a process that turned collection off keeps it off
        with gc_policy.paused_during_runs():
            assert not gc.isenabled()
        assert not gc.isenabled()
        gc.enable()

        generations: list[int] = []

        def seen(phase: str, info: dict) -> None:
            if phase == "start":
                generations.append(info["generation"])

        monkeypatch.setattr(gc_policy, "PAUSE_MAX_S", 0.0)
        gc.callbacks.append(seen)
        try:
            with gc_policy.paused_during_runs():
                with gc_policy.paused_during_runs():
                    assert generations == []  # nothing collected while the runs are on
                assert generations == [1] and not gc.isenabled()  # collected as the inner run ended, still paused
                with gc_policy.paused_during_runs():
                    assert generations == [1]
                assert generations == [1, 1]
        finally:
            gc.callbacks.remove(seen)
        assert gc.isenabled()
    finally:
        gc.enable()


def test_a_run_collects_no_garbage_and_its_features_go_when_its_caller_lets_go(tmp_path, models_dir):
    """Collection is paused while the run is on (RunOptions.pause_gc), and the run leaves no reference cycle
    holding its features: they are freed by reference counting alone, once the caller lets go of them."""
    import gc
    import weakref

    from conftest import write_pyramid
    from qpbridge.annotate import _reader, run_plan
    from qpbridge.engine import Engine
    from qpbridge.engine.features import FeatureBuilder
    from qpbridge.engine.session import RunOptions
    from qpbridge.slides import Slide

    img = np.full((500, 600, 3), 230, np.uint8)
    for k in range(5):
        cv2.circle(img, (80 + 110 * k, 250), 40, (20, 20, 20), -1)
    slide = Slide(write_pyramid(tmp_path / "discs.tif", img, mpp=0.5, levels=1), None)
    engine = Engine(models_dir)
    card = engine.card("seams")
    plan = make_plan(card, (0, 0, slide.width, slide.height), slide.mpp, None)

    class Features(list):
        """A list that can be watched going away (a plain list takes no weak reference)."""

    for pause in (True, False):
        got = Features()
        gc.collect()
        gc.disable()  # from here, only reference counting frees anything
        try:
            _, st = run_plan(engine, "seams", plan, _reader(slide, plan), FeatureBuilder(card, slide.mpp),
                             options=RunOptions(readers=2, pause_gc=pause), sink=got.append)
            assert len(got) == 5 and st.tiles == len(plan.tiles)
            gone = weakref.ref(got)
            del got
            assert gone() is None, "a reference cycle holds the run's features"
        finally:
            gc.enable()
    got = Features()
    enabled: list[bool] = []
    run_plan(engine, "seams", plan, _reader(slide, plan), FeatureBuilder(card, slide.mpp),
             options=RunOptions(readers=2, pause_gc=False), sink=got.append,
             on_progress=lambda p: enabled.append(gc.isenabled()))
    assert enabled and all(enabled) and gc.isenabled()
    run_plan(engine, "seams", plan, _reader(slide, plan), FeatureBuilder(card, slide.mpp),
             options=RunOptions(readers=2), sink=got.append, on_progress=lambda p: enabled.append(gc.isenabled()))
    assert not enabled[-1] and gc.isenabled()  # paused during the run, back on after it
    st = run_plan(engine, "seams", plan, _reader(slide, plan), FeatureBuilder(card, slide.mpp),
                  options=RunOptions(readers=2))[1]
    assert st.extra["page_faults"] > 0 and st.extra["system_cpu_s"] >= 0.0 and "page faults" in st.table()


def test_families_that_are_not_thread_safe_are_called_one_at_a_time(tmp_path):
    import json
    import threading
    import time

    from qpbridge.engine import Engine
    from qpbridge.families import ModelFamily, register_family

    @register_family("test-single-threaded")
    class SingleThreaded(ModelFamily):
        thread_safe = False
        inside = 0
        overlaps = 0

        def predict(self, tiles):
            cls = type(self)
            cls.inside += 1
            cls.overlaps += cls.inside > 1
            time.sleep(0.02)
            cls.inside -= 1
            return [SemanticResult(classes=np.zeros(t.shape[:2], np.uint8)) for t in tiles]

    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_text(json.dumps(
        {**DARK_CARD, "name": "single", "family": "test-single-threaded"}))
    engine = Engine(tmp_path)
    tiles = [np.zeros((64, 64, 3), np.uint8)] * 2
    threads = [threading.Thread(target=engine.infer, args=("single", tiles)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert SingleThreaded.overlaps == 0


def test_pixels_no_tile_classifies_stay_out_of_every_region():
    """Class maps with NO_CLASS pixels: blended as 'no class' mass, they become holes, not regions."""
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 16}})
    plan = make_plan(card, (0, 0, 300, 200), None)
    truth = np.ones((200, 300), np.uint8)
    truth[80:120, 100:180] = NO_CLASS
    out: list[shapely.Geometry] = []
    stitcher = SemanticStitcher(plan, 2, [1], lambda g, c, e: out.append(g))
    for t in plan.tiles:
        stitcher.add(t, SemanticResult(classes=truth[t.y:t.y + t.h, t.x:t.x + t.w].copy()))
    stitcher.finish()
    assert len(out) == 1 and len(out[0].interiors) == 1
    assert out[0].area == pytest.approx(300 * 200 - 40 * 80, abs=1)


def test_region_links_match_scipy_components():
    """The union-find for small strip graphs numbers components exactly as scipy does (and big graphs go
    to scipy), so which path runs never changes the regions."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    from qpbridge.engine.vectorise import SMALL_GRAPH, _components

    rng = np.random.default_rng(7)
    for n, edges in [(1, 0), (2, 1), (5, 0), *[(int(rng.integers(2, 80)), int(rng.integers(0, 120)))
                                            for _ in range(300)], (SMALL_GRAPH, 4000)]:
        a, b = rng.integers(0, n, edges), rng.integers(0, n, edges)
        group, count = _components(a, b, n)
        expected_count, expected = connected_components(coo_matrix((np.ones(edges), (a, b)), shape=(n, n)),
                                                        directed=False)
        assert count == expected_count and np.array_equal(group, expected), (n, edges)


@pytest.mark.parametrize("few", [0, 4, 10**6])
def test_strip_labelling_boxes_match_opencv_statistics(few, monkeypatch):
    """Boxes and pixel counts from projections (few components) and from OpenCV's statistics (many) agree."""
    import cv2

    from qpbridge.engine import vectorise

    monkeypatch.setattr(vectorise, "FEW_COMPONENTS", few)
    rng = np.random.default_rng(11)
    for trial in range(60):
        strip = np.zeros((int(rng.integers(1, 40)), int(rng.integers(1, 90))), np.uint8)
        for _ in range(int(rng.integers(0, 7))):  # a few rectangles and blobs of classes 1 and 2
            y, x = int(rng.integers(0, strip.shape[0])), int(rng.integers(0, strip.shape[1]))
            strip[y:y + int(rng.integers(1, 12)), x:x + int(rng.integers(1, 30))] = rng.integers(1, 3)
        if trial % 5 == 0:
            strip = rng.integers(0, 3, strip.shape).astype(np.uint8)  # noisy: many components
        for cls, many in ((1, False), (2, False), (1, True)):
            n, labels, boxes = vectorise._label(strip, cls, many)
            n_cv, labels_cv, stats, _ = cv2.connectedComponentsWithStats((strip == cls).view(np.uint8),
                                                                         connectivity=8, ltype=cv2.CV_32S)
            assert n == n_cv and boxes.dtype == np.int64
            np.testing.assert_array_equal(labels, labels_cv)
            np.testing.assert_array_equal(boxes, stats[1:])


@pytest.mark.parametrize("tile,step", [(16, 12), (16, 8), (16, 5), (10, 10)])
def test_host_ring_sums_equal_a_copied_up_buffer_to_the_bit(tile, step):
    """The host accumulator is a ring of rows: tiles added across its wrap, after many shifts, hold the
    very same float sums and classes as in a buffer that is copied up by a strip each time (any overlap)."""
    from qpbridge.engine.stitching import _HostBlend, cosine_window

    rng = np.random.default_rng(tile * step)
    h, w, k = tile + step, 9 * step + tile, 9
    ring, plain = _HostBlend(3, h, w), _HostBlend(3, h, w)
    win = cosine_window(tile, tile, tile - step)
    tops = [0]
    for _ in range(7):
        for y in (0, step):  # this row of tiles and the next, as the stitcher may hold both
            for i in range(k):
                probs = rng.random((3, tile, tile)).astype(np.float32)
                ring.add(probs, win, y, i * step)
                plain.add(probs, win, y, i * step)
        np.testing.assert_array_equal(ring.rows(h)[0], plain.rows(h)[0])
        np.testing.assert_array_equal(ring.classes(step), plain.classes(step))
        ring.shift(step)
        plain.acc[:, :-step] = plain.acc[:, step:].copy()  # the copied-up buffer the ring replaced
        plain.acc[:, -step:] = 0
        tops.append(ring.top)
    assert any(b < a for a, b in itertools.pairwise(tops))  # the ring wrapped around



def whole_regions(items: list) -> tuple[list[tuple[shapely.Polygon, int]], int]:
    """What a tracer with early holes emitted, as whole regions: each HoledRegion with the EarlyHoles of its
    owners put back in; and how many early holes no region claimed."""
    early: dict[int, list[shapely.Polygon]] = {}
    for obj, _ in items:
        if isinstance(obj, EarlyHoles):
            for hole, owner in zip(obj.holes, obj.owners.tolist(), strict=True):
                early.setdefault(owner, []).append(hole)
    out = []
    for obj, cls in items:
        if isinstance(obj, HoledRegion):
            extra = [h.exterior for key in obj.owners for h in early.pop(key, [])]
            out.append((shapely.Polygon(obj.polygon.exterior, [*obj.polygon.interiors, *extra]), cls))
        elif not isinstance(obj, EarlyHoles):
            out.append((obj, cls))
    return out, sum(len(v) for v in early.values())


@pytest.mark.parametrize("chunk", [1, 16, 64])
@pytest.mark.parametrize("cell", [1, 3, 12])
def test_early_holes_make_the_same_regions(cell, chunk):
    """Holes of regions still open are emitted once final, and each region at its close traced with them filled:
    put back together, the regions are those traced without early holes (up to the corner cuts where a hole
    touched the outside at a corner: the outline no longer backs off there), holes and all."""
    raster = blob_raster(400, 190, 3, cell, seed=20 + cell)
    raster[:, :2] = 1
    raster[:2] = 1  # class 1 spans every chunk: its holes come early
    raster[:, 150:] = 1
    for y in range(80, 390, 15):  # a column of holes in it (whatever the blobs' size)
        raster[y:y + 4, 160:164] = 0
        raster[y + 5:y + 9, 175:179] = 2
    early_seen = 0
    for min_area, max_hole in ((0.0, 0.0), (18.0 * 16, 5.0 * 16)):
        kw = {"scale": 4.0, "min_area": min_area, "max_hole": max_hole, "chunk_rows": chunk}
        plain: list[tuple[shapely.Polygon, int]] = []
        feed_strips(RegionTracer(190, [1, 2], lambda g, c, out=plain: out.append((g, c)), **kw), raster, cell, 30)
        items: list = []
        tracer = RegionTracer(190, [1, 2], lambda g, c, out=items: out.append((g, c)), early_holes=True, **kw)
        feed_strips(tracer, raster, cell, 30)
        got, unclaimed = whole_regions(items)
        early_seen += sum(len(g.holes) for g, _ in items if isinstance(g, EarlyHoles))
        assert not tracer.owned and not tracer.hole_contours
        assert unclaimed == 0 or min_area > 0  # (a region too small to keep leaves its early holes)
        key = lambda gc: (gc[1], tuple(round(v) for v in gc[0].bounds), round(gc[0].area))  # noqa: E731
        assert len(got) == len(plain)
        for (a, ca), (b, cb) in zip(sorted(plain, key=key), sorted(got, key=key), strict=True):
            assert ca == cb and len(a.interiors) == len(b.interiors) and b.is_valid
            assert shapely.hausdorff_distance(a, b) < 2 * PINCH * 4
    assert early_seen


def test_only_tall_open_regions_have_early_holes():
    """Holes come early only for regions still open that already span two chunks' rows (a region open over
    fewer is likely to close soon); not for a region closing in its chunk; and a region merging two open
    ones takes the early holes of both."""
    raster = np.zeros((120, 60), np.uint8)
    raster[2:18, 5:25] = 1
    raster[6:10, 10:14] = 0  # a hole of a region closing in its first chunk
    raster[30:120, 5:15] = 1
    raster[30:120, 40:50] = 1  # two arms, open over many chunks...
    raster[110:120, 5:50] = 1  # ...joined at the bottom
    raster[32:35, 8:12] = 0  # a hole while its arm is short (the chunk from row 30)
    raster[62:66, 8:12] = 0
    raster[72:76, 43:47] = 0  # one hole in each arm once they are tall
    raster[79:82, 8:12] = 0  # a hole across two chunks
    items: list = []
    tracer = RegionTracer(60, [1], lambda g, c: items.append((g, c)), early_holes=True, chunk_rows=10)
    feed_strips(tracer, raster, 1, 5)
    early = [g for g, _ in items if isinstance(g, EarlyHoles)]
    holed = [g for g, _ in items if isinstance(g, HoledRegion)]
    assert sorted(h.bounds for g in early for h in g.holes) == [(8, 62, 12, 66), (43, 72, 47, 76)]
    assert len(holed) == 1 and len(holed[0].owners) == 2 and len(holed[0].polygon.interiors) == 2
    got, unclaimed = whole_regions(items)
    assert unclaimed == 0 and sorted(len(p.interiors) for p, _ in got) == [1, 4]
    assert sorted(round(p.area) for p, _ in got) == components(raster, 1)


@pytest.mark.parametrize("mode", ["clearly apart", "geos", "careful"])
def test_features_from_early_holes_are_those_of_the_whole_regions(mode, monkeypatch):
    """A region built from its early holes (built before it, as a run builds them) gives the feature built from
    the whole polygon: by the ring-by-ring checks, by GEOS's check (few holes), and by the careful path
    (the region crosses the clip)."""
    from qpbridge.engine.features import FeatureBuilder

    if mode == "geos":
        monkeypatch.setattr("qpbridge.geometry.MANY_HOLES", 10 ** 9)
    raster = np.ones((400, 190), np.uint8)
    rng = np.random.default_rng(7)
    for y, x in itertools.product(range(6, 394, 11), range(6, 184, 11)):  # 612 holes of class 2...
        cv2.circle(raster, (x + int(rng.integers(-2, 3)), y + int(rng.integers(-2, 3))), int(rng.integers(2, 5)), 2, -1)
    blobs = blob_raster(400, 190, 3, 6, seed=7)
    raster[:, 120:][blobs[:, 120:] == 0] = 0  # ...and a ragged outline
    items: list = []
    tracer = RegionTracer(190, [1, 2], lambda g, c: items.append((g, c)), early_holes=True, scale=4.0,
                          min_area=18.0 * 16, max_hole=5.0 * 16, chunk_rows=32)
    feed_strips(tracer, raster, 3, 30)
    whole, _ = whole_regions(items)
    card = ModelCard.from_dict({**DARK_CARD, "classes": [*DARK_CARD["classes"], {"name": "Other", "color": [1, 2, 3]}],
                                "postprocess": {"simplify_um": 2.0, "min_area_um2": 18.0 * 16,
                                                "max_hole_area_um2": 5.0 * 16}})
    size = (300 * 4 * 2 - 200, 190 * 4 * 2) if mode == "careful" else None

    def features(builder: FeatureBuilder, todo: list) -> list:
        out = []
        for k in range(0, len(todo), 50):  # in chunks and in order, as a run hands them over
            part = todo[k:k + 50]
            out += [f for f in builder.build_many([g for g, _ in part], [c for _, c in part], 3, 5, 2, 2) if f]
        return out

    early = features(FeatureBuilder(card, 0.5, None, size), items)
    plain = features(FeatureBuilder(card, 0.5, None, size), whole)
    assert len(early) == len(plain) > 10
    holed = max(early, key=lambda f: len(f["geometry"]["coordinates"]))
    # the spanning region, with its holes (fewer where clipped)
    assert len(holed["geometry"]["coordinates"]) > (100 if mode == "careful" else 300)
    key = lambda f: (f["properties"]["classification"]["name"], shape(f["geometry"]).bounds)  # noqa: E731
    for a, b in zip(sorted(plain, key=key), sorted(early, key=key), strict=True):
        ga, gb = shape(a["geometry"]), shape(b["geometry"])
        assert ga.equals(gb) and gb.is_valid and len(ga.interiors) == len(gb.interiors)
        assert a["properties"] == b["properties"]  # the same numbers: rings summed in the same order
