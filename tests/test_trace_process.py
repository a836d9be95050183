"""Tracing class strips in a child process: the same regions as in-process tracing, errors and crashes of the
child fail the run with its reason, and a finished run's process is reused."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from conftest import DARK_CARD, write_pyramid
from qpbridge.annotate import annotate_slide
from qpbridge.engine import Engine
from qpbridge.engine import trace_process as tp
from qpbridge.engine.morphology import Morphology
from qpbridge.engine.session import RunOptions
from qpbridge.engine.vectorise import NO_CLASS, EarlyHoles, HoledRegion, RegionTracer
from qpbridge.errors import InternalError


def _raster(h: int, w: int, seed: int) -> np.ndarray:
    """Blobs of three classes, some crossing many strips, with holes and uncovered pixels."""
    rng = np.random.default_rng(seed)
    noise = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 4)
    raster = ((noise - noise.min()) / np.ptp(noise) * 2.999).astype(np.uint8)
    raster[h - 20:, :25] = NO_CLASS
    return raster


def _trace(tracer: RegionTracer | tp.RemoteTracer, raster: np.ndarray, step: int) -> None:
    for y in range(0, raster.shape[0], step):
        tracer.add_strip(raster[y:y + step], last=y + step >= raster.shape[0])
    tracer.finish()


@pytest.mark.parametrize("morphology", [None, Morphology(opening_px=2, closing_px=1, classes=(1, 2), fill=0)])
def test_remote_tracer_emits_what_the_tracer_emits_in_order(morphology):
    raster = _raster(230, 170, seed=3)
    local: list[tuple[shapely.Geometry, int]] = []
    tracer = RegionTracer(170, [1, 2], lambda g, c: local.append((g, c)), scale=4, min_area=40, max_hole=30)
    if morphology is not None:
        from qpbridge.engine.morphology import StripMorphology

        filt = StripMorphology(morphology, tracer.add_strip)
        for y in range(0, 230, 16):
            filt.add_strip(raster[y:y + 16], last=y + 16 >= 230)
        tracer.finish()
    else:
        _trace(tracer, raster, 16)
    remote: list[tuple[shapely.Geometry, int]] = []
    rt = tp.RemoteTracer(lambda g, c: remote.append((g, c)))
    rt.open(170, [1, 2], scale=4, min_area=40, max_hole=30, morphology=morphology)
    _trace(rt, raster, 16)
    assert len(local) > 10 and any(len(g.interiors) for g, _ in local)
    assert [c for _, c in remote] == [c for _, c in local]
    assert all(a.equals_exact(b, 0) for (a, _), (b, _) in zip(remote, local, strict=True))
    assert rt.regions == tracer.regions and rt.peak_rows == tracer.peak_rows and rt.busy_s > 0


def test_polygons_cross_the_pipe_as_ragged_arrays_and_come_back_exactly():
    """Polygons (holes, empty ones) go as shapely's ragged arrays, which the stitching thread decodes faster
    than WKB; other geometries go as WKB. Both come back exactly, in order."""
    import pickle

    polys = np.array([shapely.Polygon([(0, 0), (4, 0), (4, 4), (0, 4)], [[(1, 1), (2, 1), (2, 2), (1, 2)]]),
                      shapely.Polygon(), shapely.box(5.25, 5.5, 6.125, 7.75, ccw=False)], dtype=object)
    mixed = np.array([shapely.box(0, 0, 1, 1), shapely.MultiPolygon([shapely.box(2, 2, 3, 3)])], dtype=object)
    for geoms, how in ((polys, "ragged"), (mixed, "wkb"), (np.array([], dtype=object), "wkb")):
        packed = tp.pack(geoms)
        assert packed[0] == how
        back = tp.unpack(pickle.loads(pickle.dumps(packed)))
        assert len(back) == len(geoms)
        assert all(a.equals_exact(b, 0) and a.geom_type == b.geom_type for a, b in zip(back, geoms, strict=True))
        assert [list(a.exterior.coords) for a in back if a.geom_type == "Polygon"] == \
            [list(b.exterior.coords) for b in geoms if b.geom_type == "Polygon"]  # ring order and start kept


def test_sync_traces_the_strips_the_child_holds_for_a_chunk():
    raster = _raster(230, 170, seed=5)
    local: list[tuple[shapely.Geometry, int]] = []
    tracer = RegionTracer(170, [1, 2], lambda g, c: local.append((g, c)))
    tracer.add_strip(raster[:100])
    tracer.flush()
    remote: list[tuple[shapely.Geometry, int]] = []
    rt = tp.RemoteTracer(lambda g, c: remote.append((g, c)))
    rt.open(170, [1, 2])
    rt.add_strip(raster[:50])
    rt.add_strip(raster[50:100])
    rt.sync()
    assert len(remote) == len(local) > 3  # emitted, though 100 rows are less than a chunk
    assert all(a.equals_exact(b, 0) for (a, _), (b, _) in zip(remote, local, strict=True))
    rt.close()


def test_finished_process_is_reused_and_a_closed_one_is_not():
    rt = tp.RemoteTracer(lambda g, c: None)
    assert rt.child is not None
    pid = rt.child.proc.pid
    rt.sync()  # before the run opens: nothing to wait for
    rt.open(50, [1])
    _trace(rt, _raster(60, 50, seed=1), 20)
    again = tp.RemoteTracer(lambda g, c: None)
    assert again.child is not None and again.child.proc.pid == pid  # back in the idle set, taken again
    proc = again.child.proc
    again.close()
    assert proc.poll() is not None
    fresh = tp.RemoteTracer(lambda g, c: None)
    assert fresh.child is not None and fresh.child.proc.pid != pid
    fresh.close()


def test_an_error_in_the_child_fails_with_its_traceback():
    rt = tp.RemoteTracer(lambda g, c: None)
    rt.open(40, [1])
    assert rt.child is not None
    rt.child.send(("strip", 0, (2, 41), bytes(80), False))  # bytes that do not make the shape it names
    rt.sent = 1
    with pytest.raises(InternalError, match=r"(?s)tracing failed in its process.*cannot reshape"):
        rt.sync()
    assert rt.child is None  # the process was ended, not given back


@pytest.mark.parametrize("processes", [1, 2])
def test_a_child_that_dies_fails_the_run_with_its_exit_code(processes):
    """Any of the run's tracing processes: the run fails with its exit code, and the others are ended too."""
    rt = tp.RemoteTracer(lambda g, c: None, processes=processes)
    rt.open(40, [1, 2])
    procs = [c.proc for c in rt.children]
    assert len(procs) == processes
    rt.add_strip(np.zeros((4, 40), np.uint8))
    rt.sync()
    os.kill(procs[-1].pid, signal.SIGKILL)
    with pytest.raises(InternalError, match="ended unexpectedly"):
        for _ in range(100):  # the pipe takes a strip or two before the death shows
            rt.add_strip(np.zeros((4, 40), np.uint8))
        rt.finish()
    assert not rt.children and all(p.poll() is not None for p in procs)


def test_an_error_in_one_of_two_children_fails_with_its_traceback_and_ends_both():
    rt = tp.RemoteTracer(lambda g, c: None, processes=2)
    rt.open(40, [1, 2])
    procs = [c.proc for c in rt.children]
    rt.children[1].send(("strip", 0, (2, 41), bytes(80), False))  # bytes that do not make the shape it names
    rt.children[0].send(("strip", 0, (2, 40), bytes(80), False))
    rt.sent = 1
    with pytest.raises(InternalError, match=r"(?s)tracing failed in its process.*cannot reshape"):
        rt.sync()
    assert not rt.children and all(p.wait(timeout=5) is not None for p in procs)  # ended, not given back


def test_a_slide_traced_in_a_process_gives_the_same_features(tmp_path: Path):
    """The whole run: same polygons, in the same order, as tracing on the stitching thread; a cancelled run
    keeps what the process traced."""
    img = np.full((900, 1100, 3), 235, np.uint8)
    cv2.ellipse(img, (450, 380), (330, 200), 25, 0, 360, (30, 30, 30), -1)
    cv2.circle(img, (850, 650), 180, (30, 30, 30), -1)
    cv2.circle(img, (850, 650), 70, (235, 235, 235), -1)  # a hole
    for k in range(12):  # specks in many strips
        cv2.circle(img, (80 + 80 * k, 820 - 50 * (k % 3)), 9, (30, 30, 30), -1)
        cv2.circle(img, (60 + 80 * k, 40), 12, (30, 30, 30), -1)  # closed in the first strips
    slide = write_pyramid(tmp_path / "shapes.tif", img, mpp=0.5)
    card = {**DARK_CARD, "name": "seams", "tile": {"size": 64, "overlap": 16, "batch_size": 16}}
    (tmp_path / "models" / "seams").mkdir(parents=True)
    (tmp_path / "models" / "seams" / "config.json").write_text(json.dumps(card))
    engine = Engine(tmp_path / "models")
    here = annotate_slide(engine, slide, "seams", tissue_filter=False,
                          options=RunOptions(readers=2, trace_process=False))
    there = annotate_slide(engine, slide, "seams", tissue_filter=False,
                           options=RunOptions(readers=2, trace_process=True))
    assert "trace_process_cpu_s" not in here.stats.extra and there.stats.extra["trace_process_cpu_s"] > 0
    assert there.stats.features == len(there.features)
    assert len(here.features) == len(there.features) >= 20
    for a, b in zip(here.features, there.features, strict=True):
        assert shape(a["geometry"]).equals(shape(b["geometry"]))
        assert a["properties"] == b["properties"]  # measurements and classes too
    done = {"tiles": 0}

    def progress(p) -> None:  # type: ignore[no-untyped-def]
        done["tiles"] = p.tiles_done

    cut = annotate_slide(engine, slide, "seams", tissue_filter=False, on_progress=progress,
                         should_stop=lambda: done["tiles"] >= 16,
                         options=RunOptions(readers=2, trace_process=True))
    assert cut.stats.cancelled and 0 < len(cut.features) < len(there.features)
    top = {shape(f["geometry"]).wkb for f in there.features}
    assert any(shape(f["geometry"]).wkb in top for f in cut.features)  # regions closed before the cut


def test_large_plans_on_many_cores_trace_in_a_process(monkeypatch):
    from qpbridge.cards import ModelCard
    from qpbridge.engine.plan import make_plan
    from qpbridge.engine.session import TRACE_PROCESS_TILES

    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 16}})
    big = make_plan(card, (0, 0, 48 * 50, 48 * 50), None)
    small = make_plan(card, (0, 0, 480, 480), None)
    assert len(big.tiles) >= TRACE_PROCESS_TILES > len(small.tiles)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert RunOptions().traces_in_process(big) and not RunOptions().traces_in_process(small)
    assert not RunOptions(trace_process=False).traces_in_process(big)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert not RunOptions().traces_in_process(big) and RunOptions(trace_process=True).traces_in_process(small)



def test_an_unguarded_user_script_runs_once(tmp_path: Path):
    """A library user's script without ``if __name__ == "__main__"``: the tracing process must not run it again
    (multiprocessing's spawn would import it in the child and start the run there too)."""
    import subprocess
    import sys

    img = np.full((700, 900, 3), 235, np.uint8)
    cv2.circle(img, (450, 350), 200, (150, 60, 160), -1)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.5)
    marks = tmp_path / "marks.txt"
    script = tmp_path / "user_script.py"
    script.write_text(
        "from pathlib import Path\n"
        "from qpbridge.annotate import annotate_slide\n"
        "from qpbridge.engine import Engine\n"
        "from qpbridge.engine.session import RunOptions\n"
        f"with open({str(marks)!r}, 'a') as f:\n"
        "    f.write('ran\\n')\n"
        f"r = annotate_slide(Engine(), Path({str(slide)!r}), 'tissue', tissue_filter=False,\n"
        "                   options=RunOptions(readers=1, trace_process=True))\n"
        "print('features', len(r.features), r.stats.extra['trace_process_cpu_s'] > 0)\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "True" in out.stdout and "features 1 " in out.stdout + " "
    assert marks.read_text() == "ran\n"


def test_early_holes_cross_the_pipe_in_order():
    """Early holes and the regions they belong to come out of the child as the tracer emits them."""
    raster = _raster(700, 170, seed=9)
    raster[:, :2] = 1  # class 1 spans the chunks
    local: list = []
    tracer = RegionTracer(170, [1, 2], lambda g, c: local.append((g, c)), scale=4, min_area=40, max_hole=30,
                          early_holes=True)
    _trace(tracer, raster, 16)
    remote: list = []
    rt = tp.RemoteTracer(lambda g, c: remote.append((g, c)))
    rt.open(170, [1, 2], scale=4, min_area=40, max_hole=30, early_holes=True)
    _trace(rt, raster, 16)
    assert any(isinstance(g, EarlyHoles) for g, _ in local) and any(isinstance(g, HoledRegion) for g, _ in local)
    assert [(type(g), c) for g, c in remote] == [(type(g), c) for g, c in local]
    for (a, _), (b, _) in zip(remote, local, strict=True):
        if isinstance(a, EarlyHoles):
            assert a.owners.tolist() == b.owners.tolist() and a.row == b.row
            assert all(x.equals_exact(y, 0) for x, y in zip(a.holes, b.holes, strict=True))
        elif isinstance(a, HoledRegion):
            assert a.owners == b.owners and a.polygon.equals_exact(b.polygon, 0)
        else:
            assert a.equals_exact(b, 0)


def test_early_holes_leave_a_runs_features_as_they_were(tmp_path: Path, monkeypatch):
    """A region spanning the slide with a hundred holes: the run traces most of them before the region closes,
    and its features are those of a run that traces them with the region."""
    from qpbridge.engine import session
    from qpbridge.engine.stitching import SemanticStitcher

    img = np.full((3000, 600, 3), 235, np.uint8)
    img[40:2960, 30:570] = 30
    rng = np.random.default_rng(2)
    for _ in range(180):  # light holes in the dark region
        cv2.circle(img, (int(rng.integers(60, 540)), int(rng.integers(70, 2930))), int(rng.integers(4, 14)),
                   (235, 235, 235), -1)
    slide = write_pyramid(tmp_path / "holes.tif", img, mpp=0.5)
    card = {**DARK_CARD, "name": "holes", "tile": {"size": 64, "overlap": 16, "batch_size": 16}}
    (tmp_path / "models" / "holes").mkdir(parents=True)
    (tmp_path / "models" / "holes" / "config.json").write_text(json.dumps(card))
    engine = Engine(tmp_path / "models")
    runs = {}
    for where in (False, True):
        runs[where] = annotate_slide(engine, slide, "holes", tissue_filter=False,
                                     options=RunOptions(readers=2, trace_process=where))

    class Late(SemanticStitcher):
        def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
            super().__init__(*args, **{**kwargs, "early_holes": False})

    monkeypatch.setattr(session, "SemanticStitcher", Late)
    late = annotate_slide(engine, slide, "holes", tissue_filter=False, options=RunOptions(readers=2))
    assert late.stats.extra["early_holes"] == 0
    (region,) = [f for f in late.features if len(f["geometry"]["coordinates"]) > 1]
    holes = len(region["geometry"]["coordinates"]) - 1
    assert holes > 150
    for run in runs.values():  # (holes in the region's first two chunks, and across chunks, come at its close)
        assert holes / 3 < run.stats.extra["early_holes"] < holes
        assert len(run.features) == len(late.features)
        for a, b in zip(late.features, run.features, strict=True):
            assert shape(a["geometry"]).equals(shape(b["geometry"]))
            # holes listed (and their areas summed) in another order: the same up to rounding
            pa, pb = dict(a["properties"]), dict(b["properties"])
            assert pb.pop("measurements") == pytest.approx(pa.pop("measurements"), rel=1e-12)
            assert pa == pb
    # and the same numbers, holes in the same order, in a thread and in a process
    assert [f["geometry"] for f in runs[False].features] == [f["geometry"] for f in runs[True].features]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the child's environment from /proc")
def test_the_tracing_process_keeps_to_one_thread_of_work():
    """No BLAS or OpenMP pool of a thread per core in the child, to take cores from the parent's threads: after
    a run (labelling, tracing, early holes), its tracing thread and the one taking strips off the socket."""
    rt = tp.RemoteTracer(lambda g, c: None)
    try:
        assert rt.child is not None
        env = Path(f"/proc/{rt.child.proc.pid}/environ").read_bytes().split(b"\0")
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            assert f"{name}=1".encode() in env
        raster = _raster(700, 170, seed=4)
        raster[:, :2] = 1
        rt.open(170, [1, 2], scale=4, min_area=40, max_hole=30, early_holes=True)
        _trace(rt, raster, 16)
        assert rt.threads == 2
        assert 0 < rt.thread_s <= rt.busy_s + 0.02  # (clock ticks: the two are read a moment apart)
    finally:
        rt.close()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the child's page faults from /proc")
def test_the_children_report_the_kernels_cpu_and_page_faults_of_the_run_alone():
    """What first touches of memory cost a run's tracing processes: the kernel's CPU and the page faults since
    the run opened (not those of the process's start-up imports), summed over the children."""
    rt = tp.RemoteTracer(lambda g, c: None, processes=2)
    try:
        pids = [child.proc.pid for child in rt.children]  # (given back to the idle ones when the run finishes)
        raster = _raster(700, 170, seed=4)
        rt.open(170, [1, 2], scale=4, min_area=40, max_hole=30, early_holes=True)
        _trace(rt, raster, 16)
        assert rt.faults > 0 and 0 <= rt.system_s <= rt.busy_s + 0.02
        since_start = 0
        for pid in pids:  # minflt + majflt of the whole process (fields 10 and 12 of /proc/PID/stat)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            since_start += int(fields[7]) + int(fields[9])
        assert rt.faults < since_start / 2  # the imports took most of them, before the run
    finally:
        rt.close()


def test_time_waiting_for_the_child_is_counted_apart_from_finishing(monkeypatch):
    """``wait_s``: what add_strip waited for the child, strips too far ahead; never the wait for the finish."""
    raster = _raster(700, 170, seed=4)
    waits = {}
    for ahead in (0, 10 ** 6):
        monkeypatch.setattr(tp, "STRIPS_AHEAD", ahead)
        rt = tp.RemoteTracer(lambda g, c: None)
        rt.open(170, [1, 2], scale=4, min_area=40, max_hole=30)
        _trace(rt, raster, 16)
        waits[ahead] = rt.wait_s
    assert waits[10 ** 6] == 0.0 and waits[0] > 0.0


def _same_up_to_keys(got: list, want: list) -> None:
    """The same emissions in the same order; region keys (early holes' owners) may differ, one for one."""
    assert [(type(g), c) for g, c in got] == [(type(g), c) for g, c in want]
    keys: dict[int, int] = {}
    for (a, _), (b, _) in zip(got, want, strict=True):
        if isinstance(a, EarlyHoles):
            assert a.row == b.row and all(x.equals_exact(y, 0) for x, y in zip(a.holes, b.holes, strict=True))
            for ka, kb in zip(a.owners.tolist(), b.owners.tolist(), strict=True):
                assert keys.setdefault(ka, kb) == kb
        elif isinstance(a, HoledRegion):
            assert a.polygon.equals_exact(b.polygon, 0) and [keys[k] for k in a.owners] == list(b.owners)
        else:
            assert a.equals_exact(b, 0)
    assert len(set(keys.values())) == len(keys)  # one for one


@pytest.mark.parametrize(("classes", "processes", "used"), [([1, 2], 2, 2), ([0, 1, 2], 2, 2), ([1, 2], 3, 2)])
def test_classes_shared_out_over_processes_emit_what_one_tracer_emits(classes, processes, used):
    """Several processes, each tracing its own classes of every strip: the regions, early holes and holed regions
    one tracer of all the classes emits, in its order; keys of one process never meet another's (the early holes
    of two regions would be joined to the wrong one)."""
    # Class 1 on the left, and the same shapes in class 2 on the right: a band spanning the chunks with holes
    # (early holes), and blobs. Traced apart, each class would number its regions alike.
    half = np.zeros((700, 85), np.uint8)
    half[:, :12] = 1
    for y in range(10, 690, 20):
        half[y:y + 2, 4:6] = 0
        half[y + 3:y + 9, 30 + y % 40:36 + y % 40] = 1
    raster = np.concatenate([half, half * 2], axis=1)
    local: list = []
    kw = {"scale": 4, "min_area": 40, "max_hole": 30, "early_holes": True}
    tracer = RegionTracer(170, classes, lambda g, c: local.append((g, c)), **kw)  # type: ignore[arg-type]
    _trace(tracer, raster, 16)
    remote: list = []
    rt = tp.RemoteTracer(lambda g, c: remote.append((g, c)), processes=processes)
    pids = {c.proc.pid for c in rt.children}
    rt.open(170, classes, **kw)  # type: ignore[arg-type]
    assert rt.processes == len(rt.children) == used
    _trace(rt, raster, 16)
    owners = [k for g, c in local if isinstance(g, EarlyHoles) for k in g.owners.tolist()]
    assert {c for g, c in local if isinstance(g, HoledRegion)} >= {1, 2} and len(owners) > 20
    _same_up_to_keys(remote, local)
    keys = [{k for g, c in remote if isinstance(g, EarlyHoles) and c == cls for k in g.owners.tolist()}
            for cls in (1, 2)]
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert rt.regions == tracer.regions and rt.busy_s > 0
    assert tracer.peak_rows < rt.peak_rows <= used * tracer.peak_rows  # each keeps the rows its classes need
    assert not rt.children  # given back for the next run
    again = tp.RemoteTracer(lambda g, c: None, processes=processes)
    assert {c.proc.pid for c in again.children} & pids  # reused
    again.close()


def test_tracing_processes_start_before_the_model_loads_and_end_if_it_fails(tmp_path: Path, monkeypatch):
    """A run starts its tracing processes before it loads the model (their imports, most of a second, overlap
    the load); a model that fails to load fails the run and ends them."""
    from qpbridge.errors import ModelLoadError
    from qpbridge.families import ModelFamily, register_family

    started: list = []
    acquire = tp._acquire

    def watched() -> tp._Child:
        child = acquire()
        started.append(child)
        return child

    monkeypatch.setattr(tp, "_acquire", watched)

    @register_family("test-slow-to-load")
    class SlowToLoad(ModelFamily):
        def __init__(self, card, device="cpu"):  # type: ignore[no-untyped-def]
            super().__init__(card, device)
            assert started and all(c.alive for c in started), "the tracing processes start first"
            raise ModelLoadError("these weights are broken")

        def predict(self, tiles):  # type: ignore[no-untyped-def]
            raise AssertionError("never loaded")

    img = np.full((300, 300, 3), 235, np.uint8)
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.5)
    card = {**DARK_CARD, "name": "broken", "family": "test-slow-to-load"}
    (tmp_path / "models" / "broken").mkdir(parents=True)
    (tmp_path / "models" / "broken" / "config.json").write_text(json.dumps(card))
    engine = Engine(tmp_path / "models")
    with pytest.raises(ModelLoadError, match="broken"):
        annotate_slide(engine, slide, "broken", tissue_filter=False,
                       options=RunOptions(readers=2, trace_process=True))
    assert len(started) == 1
    assert all(c.proc.wait(timeout=10) is not None for c in started)  # ended, not left running


def test_a_run_shares_its_classes_out_over_processes_with_the_same_features(tmp_path: Path):
    """Two emitted classes traced in two processes: the features (and their order) of tracing on the stitching
    thread."""
    from collections.abc import Sequence

    from qpbridge.families import ModelFamily, SemanticResult, register_family

    @register_family("test-grey-levels")
    class GreyLevels(ModelFamily):
        """Class 1 where dark, 2 where mid-grey, else background."""

        def predict(self, tiles: Sequence[np.ndarray]) -> list[SemanticResult]:
            out = []
            for t in tiles:
                m = t.mean(axis=2)
                out.append(SemanticResult(classes=np.where(m < 80, 1, np.where(m < 180, 2, 0)).astype(np.uint8)))
            return out

    img = np.full((2400, 500, 3), 235, np.uint8)
    img[40:2360, 30:470] = 30  # class 1 spanning the slide
    rng = np.random.default_rng(5)
    for _ in range(120):  # holes in it, some holding class 2
        x, y, r = int(rng.integers(60, 440)), int(rng.integers(70, 2330)), int(rng.integers(5, 14))
        cv2.circle(img, (x, y), r, (235, 235, 235), -1)
        if r > 9:
            cv2.circle(img, (x, y), r // 2, (140, 140, 140), -1)
    img[:, 480:] = 140  # class 2 spanning the slide too
    slide = write_pyramid(tmp_path / "two.tif", img, mpp=0.5)
    card = {**DARK_CARD, "name": "two", "family": "test-grey-levels",
            "classes": [*DARK_CARD["classes"], {"name": "Grey", "color": [140, 140, 140]}],
            "tile": {"size": 64, "overlap": 16, "batch_size": 16}}
    (tmp_path / "models" / "two").mkdir(parents=True)
    (tmp_path / "models" / "two" / "config.json").write_text(json.dumps(card))
    engine = Engine(tmp_path / "models")
    here = annotate_slide(engine, slide, "two", tissue_filter=False, options=RunOptions(readers=2, trace_process=False))
    there = annotate_slide(engine, slide, "two", tissue_filter=False,
                           options=RunOptions(readers=2, trace_process=True, trace_processes=2))
    assert there.stats.extra["trace_processes"] == 2 and "2 processes" in there.stats.table()
    assert there.stats.extra["early_holes"] > 20
    assert {f["properties"]["classification"]["name"] for f in here.features} == {"Dark", "Grey"}
    assert len(here.features) == len(there.features) >= 40
    for a, b in zip(here.features, there.features, strict=True):
        assert a["geometry"] == b["geometry"] and a["properties"] == b["properties"]
    done = {"tiles": 0}

    def progress(p) -> None:  # type: ignore[no-untyped-def]
        done["tiles"] = p.tiles_done

    cut = annotate_slide(engine, slide, "two", tissue_filter=False, on_progress=progress,
                         should_stop=lambda: done["tiles"] >= 48,
                         options=RunOptions(readers=2, trace_process=True, trace_processes=2))
    assert cut.stats.cancelled and 0 < len(cut.features) < len(there.features)  # what both processes closed


def test_prestarted_processes_wait_idle_for_the_next_run(tmp_path: Path, monkeypatch):
    """``prestart`` starts tracing processes at once, idle (never more than asked in all, nor than the idle ones
    kept), and the next run takes them; ``annotate_slide`` prestarts them when its run will trace in processes,
    before anything else (here the tissue run)."""
    tp._end_idle()
    t = time.perf_counter()
    tp.prestart(2)
    assert time.perf_counter() - t < 0.5  # (a process's start-up takes most of a second: not waited for)
    tp.prestart(2)
    idle = {c.proc.pid for c in tp._IDLE}
    assert len(idle) == 2
    rt = tp.RemoteTracer(lambda g, c: None, processes=2)
    assert {c.proc.pid for c in rt.children} == idle and not tp._IDLE
    rt.close()

    started: list[int] = []
    prestart = tp.prestart
    monkeypatch.setattr(tp, "prestart", lambda n: (started.append(n), prestart(n)))
    img = np.full((600, 600, 3), 235, np.uint8)
    cv2.circle(img, (300, 300), 200, (150, 60, 140), -1)  # stained tissue (what the tissue run keeps)...
    cv2.circle(img, (300, 300), 120, (30, 30, 30), -1)  # ...with a dark region in it
    slide = write_pyramid(tmp_path / "disc.tif", img, mpp=0.5)
    card = {**DARK_CARD, "name": "seams", "tile": {"size": 64, "overlap": 16, "batch_size": 16},
            "params": {"tissue_filter": True}}
    (tmp_path / "models" / "seams").mkdir(parents=True)
    (tmp_path / "models" / "seams" / "config.json").write_text(json.dumps(card))
    engine = Engine(tmp_path / "models")
    import qpbridge.annotate as annotate

    tissue = annotate.tissue_geometry
    monkeypatch.setattr(annotate, "tissue_geometry",
                        lambda *a, **k: (started.append(-1), tissue(*a, **k))[1])  # type: ignore[func-returns-value]
    out = annotate_slide(engine, slide, "seams", options=RunOptions(readers=2, trace_process=True))
    assert started[:2] == [1, -1]  # one process (one emitted class), started before the tissue run
    assert out.features and out.stats.extra["trace_processes"] == 1
    started.clear()
    annotate_slide(engine, slide, "seams", options=RunOptions(readers=2, trace_process=False))
    assert started == [-1]  # traced on the stitching thread: nothing started


def test_tracing_processes_follow_the_cores(monkeypatch):
    from qpbridge.engine.session import TRACE_PROCESSES_MAX

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert RunOptions().tracing_processes() == 2 and RunOptions(trace_processes=1).tracing_processes() == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert RunOptions().tracing_processes() == 1 and RunOptions(trace_processes=3).tracing_processes() == 3
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    assert RunOptions().tracing_processes() == TRACE_PROCESSES_MAX
