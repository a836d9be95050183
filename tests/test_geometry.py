"""Masks to polygons: pixel-exact areas, holes, validity, QuPath-safe features."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import shapely
from shapely.geometry import Polygon, shape

from qpbridge import geometry
from qpbridge.cards import ClassInfo


def disc(size: int, cx: float, cy: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r


def test_rectangle_is_exact():
    m = np.zeros((50, 60), bool)
    m[10:20, 5:45] = True
    (p,) = geometry.mask_to_polygons(m)
    assert p.bounds == (5, 10, 45, 20)
    assert p.area == 400


def test_single_pixel_and_one_pixel_line():
    m = np.zeros((10, 10), bool)
    m[2, 3] = True
    m[6, 1:8] = True
    polys = sorted(geometry.mask_to_polygons(m), key=lambda g: g.area)
    assert [p.area for p in polys] == [1.0, 7.0]
    assert polys[0].bounds == (3, 2, 4, 3)


@pytest.mark.parametrize("r", [3.0, 6.0, 15.0])
def test_disc_area_matches_pixel_count(r):
    m = disc(64, 32, 32, r)
    (p,) = geometry.mask_to_polygons(m)
    # Pixel-edge tracing keeps the area the pixels cover (tracing pixel centres would lose ~r*π px).
    assert p.area == pytest.approx(m.sum(), rel=0.04)
    assert p.is_valid


def test_hole_is_kept_and_small_holes_filled():
    m = np.zeros((40, 40), bool)
    m[5:35, 5:35] = True
    m[15:25, 15:25] = False
    (p,) = geometry.mask_to_polygons(m)
    # Hole corners come back chamfered by a quarter pixel each (8-connected tracing): 1 px² in all.
    assert len(p.interiors) == 1 and p.area == pytest.approx(900 - 100, abs=1.0)
    assert len(geometry.fill_small_holes(p, 101).interiors) == 0
    assert len(geometry.fill_small_holes(p, 99).interiors) == 1


def test_diagonal_touching_pixels_give_valid_geometry():
    m = np.zeros((10, 10), bool)
    m[2:5, 2:5] = True
    m[5:8, 5:8] = True  # touches the first square at one corner
    for p in geometry.mask_to_polygons(m):
        assert p.is_valid
    total = sum(p.area for p in geometry.mask_to_polygons(m))
    assert total == pytest.approx(18, abs=0.5)


def test_labels_to_polygons_one_per_label():
    labels = np.zeros((64, 64), np.int32)
    labels[disc(64, 20, 20, 8)] = 1
    labels[disc(64, 40, 40, 6)] = 2
    labels[50:54, 2:6] = 5
    polys = geometry.labels_to_polygons(labels)
    assert sorted(polys) == [1, 2, 5]
    assert polys[5].bounds == (2, 50, 6, 54)
    for label, p in polys.items():
        assert p.area == pytest.approx((labels == label).sum(), rel=0.05)


def test_to_fullres_scales_and_offsets():
    p = Polygon([(0, 0), (10, 0), (10, 5), (0, 5)])
    q = geometry.to_fullres(p, 100, 200, 2.0, 4.0)
    assert q.bounds == (100, 200, 120, 220)


def test_clean_snaps_to_grid_and_drops_small():
    p = Polygon([(0, 0), (10.123456, 0), (10, 10), (0, 10)])
    c = geometry.clean(p)
    xs = np.asarray(c.exterior.coords)[:, 0]
    assert np.allclose(xs * 100, np.round(xs * 100))
    assert geometry.clean(p, min_area=1000).is_empty
    bowtie = Polygon([(0, 0), (10, 10), (10, 0), (0, 10)])  # self-intersecting
    fixed = geometry.clean(bowtie)
    assert fixed.is_valid and fixed.area == pytest.approx(50)


def test_measurements_are_finite_and_in_microns():
    p = shapely.Point(0, 0).buffer(10, quad_segs=64)
    m = geometry.shape_measurements(p, 0.5, "Nucleus: ")
    assert m["Nucleus: Area µm^2"] == pytest.approx(math.pi * 25, rel=0.01)
    assert m["Nucleus: Perimeter µm"] == pytest.approx(2 * math.pi * 5, rel=0.01)
    assert m["Nucleus: Circularity"] == pytest.approx(1.0, abs=0.01)
    assert geometry.finite_measurements({"a": float("nan"), "b": float("inf"), "c": 2, "d": "x"}) == {"c": 2.0}


def test_feature_layout_matches_qupath():
    p = Polygon([(0, 0), (4, 0), (4, 4), (0, 4)])
    f = geometry.make_feature(p, "detection", ClassInfo("Tumor", (200, 0, 0)), {"x": float("nan"), "y": 1}, "m")
    json.dumps(f, allow_nan=False)
    assert f["type"] == "Feature" and len(f["id"]) == 36
    assert f["properties"]["classification"] == {"name": "Tumor", "color": [200, 0, 0]}
    assert f["properties"]["measurements"] == {"y": 1.0}
    assert shape(f["geometry"]).equals(p)
    ring = f["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and isinstance(ring[0], tuple)  # written as JSON arrays
    assert json.loads(json.dumps(f))["geometry"]["coordinates"][0][0] == [0.0, 0.0]


def test_simplify_polygons_is_geos_douglas_peucker_in_one_call(monkeypatch):
    """All rings of traced, jagged regions (with holes) are simplified in one GEOS call, as linear rings
    (below ``RING_SLICE`` rings: see the next test).
    Wherever the result is valid it is exactly GEOS's own simplification of the polygon (which differs only
    in repairing invalid results); a collapsed hole is dropped, a collapsed shell empties its polygon, and
    other geometry types come back unchanged."""
    import cv2

    rng = np.random.default_rng(3)
    noise = cv2.GaussianBlur(rng.standard_normal((300, 300)).astype(np.float32), (0, 0), 3)
    polys = list(geometry.trace_regions((noise > 0.05).astype(np.uint8), 10_000.5, 20_000.25, 4.0))
    polys += [shapely.box(0, 0, 1, 1), shapely.Polygon([(0, 0), (40, 0), (40, 40), (0, 40)],
                                                      [[(10, 10), (10.5, 10), (10.5, 10.5)]])]
    arr = np.empty(len(polys) + 2, dtype=object)
    arr[:len(polys)] = polys
    arr[-2:] = [shapely.MultiPolygon([shapely.box(0, 0, 1, 1), shapely.box(3, 3, 4, 4)]), shapely.Polygon()]
    tol = 2.0
    calls = []
    simplify = shapely.simplify

    def counted(geoms, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(np.atleast_1d(geoms)))
        return simplify(geoms, *args, **kwargs)

    monkeypatch.setattr(shapely, "simplify", counted)
    ours = geometry.simplify_polygons(arr, tol)
    monkeypatch.undo()
    assert calls == [shapely.get_num_interior_rings(arr[:len(polys)]).sum() + len(polys)]  # every ring, at once
    geos = shapely.simplify(arr, tol, preserve_topology=False)
    assert ours[-2] is arr[-2] and ours[-1].is_empty  # other types unchanged
    assert ours[-3].area == pytest.approx(1600.0) and len(ours[-3].interiors) == 0  # the tiny hole collapsed
    assert ours[-4].is_empty and geos[-4].is_empty  # the 1 px box collapsed
    valid = 0
    for i in range(len(polys) - 2):
        o, g = ours[i], geos[i]
        assert not o.is_empty and not g.is_empty
        if o.is_valid:
            valid += 1
            assert shapely.equals_exact(o, g, 0), i
        assert abs(o.area - polys[i].area) <= max(0.05 * polys[i].area, 2 * tol * tol)
        assert shapely.hausdorff_distance(o, polys[i]) <= tol + 1e-9
        assert shapely.get_num_coordinates(o) <= shapely.get_num_coordinates(polys[i])
        assert len(o.interiors) <= len(polys[i].interiors)
    assert valid >= 0.9 * (len(polys) - 2)
    kept = shapely.get_num_coordinates(ours[:len(polys) - 2]).sum()
    assert kept < 0.9 * shapely.get_num_coordinates(arr[:len(polys) - 2]).sum()


def test_rings_of_a_huge_region_are_shared_out_with_the_same_result(monkeypatch):
    """Past ``RING_SLICE`` rings, simplification, hole areas and the ring-by-ring validity check run in
    slices on the post-processing threads: the results equal those of one call, exactly."""
    from qpbridge import pools

    holes = [_square(10 + 20 * i + (j % 3), 10 + 20 * j, 8 + (i * j) % 5) for i in range(30) for j in range(30)]
    jagged = [[(x + 0.3 * (k % 2), y) for k, (x, y) in enumerate(h)] for h in holes]
    arr = np.empty(2, dtype=object)
    arr[:] = [Polygon(_square(0, 0, 620), jagged), Polygon(_square(0, 0, 620), [*jagged, _square(14, 14, 8)])]
    whole = (geometry.simplify_polygons(arr, 0.5), geometry.fill_small_holes_many(arr, 60.0),
             geometry.valid_many(arr).tolist())
    sizes: list[tuple[int, int]] = []
    split_map = pools.split_map

    def spy(func, items, min_chunk):  # type: ignore[no-untyped-def]
        out = split_map(func, items, min_chunk)
        sizes.append((len(items), len(out)))
        return out

    monkeypatch.setattr(geometry, "split_map", spy)
    monkeypatch.setattr(geometry, "RING_SLICE", 100)
    monkeypatch.setattr(geometry, "MANY_HOLES", 8)
    sliced = (geometry.simplify_polygons(arr, 0.5), geometry.fill_small_holes_many(arr, 60.0),
              geometry.valid_many(arr).tolist())
    assert whole[2] == sliced[2] == [True, False]
    for a, b in zip(whole[:2], sliced[:2], strict=True):
        assert all(shapely.equals_exact(x, y, 0) for x, y in zip(a, b, strict=True))
    assert len(sizes) >= 4 and all(n >= 900 for n, _ in sizes)
    assert all(parts == min(pools.pool_size(), n // 100) for n, parts in sizes)  # every call went in slices


def test_split_map_keeps_order_and_never_deadlocks_inside_the_pool():
    """Slices come back in order, and tasks of the pool itself can split their work while every thread of
    the pool is busy doing the same (the caller runs the slices no thread took)."""
    import threading
    import time

    from qpbridge import pools

    items = np.arange(1000)
    assert np.concatenate(pools.split_map(lambda a: a * 2, items, 10)).tolist() == (items * 2).tolist()
    assert len(pools.split_map(lambda a: a, items, 10)) == min(pools.pool_size(), 100)
    assert pools.split_map(len, items[:15], 10) == [15]
    threads: set[str] = set()

    def slow(part: np.ndarray) -> int:
        threads.add(threading.current_thread().name)
        time.sleep(0.01)
        return int(part.sum())

    pool = pools.postprocess_pool()
    tasks = [pool.submit(lambda: sum(pools.split_map(slow, items, 10))) for _ in range(3 * pools.pool_size())]
    assert [t.result(timeout=60) for t in tasks] == [int(items.sum())] * len(tasks)
    assert len(threads) == pools.pool_size()


def test_fill_small_holes_many_matches_one_by_one():
    """Vectorised hole filling equals the per-polygon one: small holes filled, large kept, untouched
    polygons returned as they were."""
    shell = [(0, 0), (100, 0), (100, 100), (0, 100)]
    small, large = [(10, 10), (12, 10), (12, 12), (10, 12)], [(40, 40), (70, 40), (70, 70), (40, 70)]
    polys = [Polygon(shell, [small, large]), Polygon(shell, [large]), Polygon(shell, [small]),
             Polygon(shell), Polygon(shell, [small, [(80, 80), (81, 80), (81, 81)]])]
    arr = np.empty(len(polys), dtype=object)
    arr[:] = polys
    out = geometry.fill_small_holes_many(arr, 10.0)
    for got, p in zip(out, polys, strict=True):
        want = geometry.fill_small_holes(p, 10.0)
        assert got.equals(want) and len(got.interiors) == len(want.interiors)
    assert out[1] is arr[1] and out[3] is arr[3]
    assert [len(g.interiors) for g in out] == [1, 1, 0, 0, 0]


def test_new_ids_are_distinct_version_4_uuids():
    import uuid

    ids = geometry.new_ids(5000)
    assert len(set(ids)) == 5000 and geometry.new_ids(0) == []
    for s in ids[:200]:
        u = uuid.UUID(s)
        assert str(u) == s and u.version == 4 and u.variant == uuid.RFC_4122


def _square(x: float, y: float, s: float) -> list[tuple[float, float]]:
    return [(x, y), (x + s, y), (x + s, y + s), (x, y + s)]


def test_valid_many_agrees_with_geos_on_polygons_with_many_holes(monkeypatch):
    """The ring-by-ring check of polygons with many holes answers as GEOS does: it proves the clear cases valid
    and leaves every other case (touching, crossing, nested or escaping holes, bad rings) to GEOS."""
    grid = [_square(10 + 20 * i, 10 + 20 * j, 8) for i in range(10) for j in range(10)]  # 100 holes, well apart
    shell = _square(0, 0, 210)
    cases = {
        "apart": (shell, grid, True),
        "touching at a corner": (shell, [*grid, _square(18, 18, 2)], True),
        "overlapping": (shell, [*grid, _square(14, 14, 8)], False),
        "nested": (shell, [*grid, _square(12, 12, 3)], False),
        "crossing the shell": (shell, [*grid, _square(205, 100, 10)], False),
        "outside": (shell, [*grid, _square(300, 300, 5)], False),
        "touching the shell at a point": (shell, [*grid, [(0, 100), (5, 95), (9, 100), (5, 105)]], True),
        "along the shell": (shell, [*grid, _square(0, 100, 5)], False),
        "a bow-tie hole": (shell, [*grid, [(2, 2), (6, 6), (6, 2), (2, 6)]], False),
        "a bow-tie shell": ([(0, 0), (210, 210), (210, 0), (0, 210)], grid, False),
        # holes touching corner to corner in a ring cut the interior in two
        "cutting the interior": (shell, [_square(20, 20, 10), _square(30, 30, 10), _square(40, 20, 10),
                                        _square(30, 10, 10), *[_square(100 + 10 * i, 100, 4) for i in range(8)]],
                                 False),
    }
    monkeypatch.setattr(geometry, "MANY_HOLES", 8)
    polys = np.empty(len(cases), dtype=object)
    polys[:] = [Polygon(s, holes) for s, holes, _ in cases.values()]
    got = geometry.valid_many(polys)
    geos = shapely.is_valid(polys)
    for (name, (_, _, expect)), g, v in zip(cases.items(), got, geos, strict=True):
        assert bool(v) == expect, name  # the cases are what they say
        assert bool(g) == bool(v), name
    assert geometry.holes_clearly_apart(polys[0])  # proven without GEOS's whole-polygon check
    assert not any(geometry.holes_clearly_apart(p) for p in polys[1:])  # every other case went to GEOS
    few = np.empty(2, dtype=object)
    few[:] = [Polygon(shell, grid[:3]), shapely.Point(1, 1)]
    assert geometry.valid_many(few).tolist() == [True, True] and len(geometry.valid_many(few[:0])) == 0


@pytest.mark.parametrize("seed", range(4))
def test_traced_outlines_are_exactly_the_pixel_edges(seed):
    """Each region's polygon covers exactly its pixels (up to the PINCH cuts at corners where pixels only touch),
    is valid, keeps its holes, and has only corners for vertices, at pixel corners or PINCH off them."""
    import cv2

    rng = np.random.default_rng(seed)
    for trial in range(40):
        h, w = (int(v) for v in rng.integers(1, 36, 2))
        if trial % 2:
            mask = (rng.random((h, w)) < rng.uniform(0.2, 0.8)).astype(np.uint8)
        else:
            small = rng.random((h // 5 + 2, w // 5 + 2)).astype(np.float32)
            mask = (cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC) > 0.5).astype(np.uint8)
        n, labels = cv2.connectedComponents(mask, connectivity=8)
        polys = geometry.trace_regions(mask, 3.0, -2.0, 2.0)
        assert len(polys) == n - 1
        for p in polys:
            assert p.is_valid and p.geom_type == "Polygon"
            pt = p.representative_point()
            lab = labels[int(pt.y / 2.0 + 2.0), int(pt.x / 2.0 - 3.0)]
            assert lab > 0
            ys, xs = np.nonzero(labels == lab)
            pixels = shapely.union_all(shapely.box((xs + 3) * 2.0, (ys - 2) * 2.0, (xs + 4) * 2.0, (ys - 1) * 2.0))
            pinch_area = 4 * geometry.PINCH ** 2 / 2  # one cut, in px² scaled by 2²
            assert p.symmetric_difference(pixels).area <= pinch_area * 4 * len(xs) + 1e-9
            assert p.area == pytest.approx(4.0 * len(xs), abs=pinch_area * 4 * len(xs) + 1e-9)
            # its holes: the 4-connected components of everything else, but for the one around the mask
            outside = np.pad((labels != lab).astype(np.uint8), 1, constant_values=1)
            assert len(p.interiors) == cv2.connectedComponents(outside, connectivity=4)[0] - 2
            for ring in (p.exterior, *p.interiors):
                xy = np.asarray(ring.coords)[:-1] / 2.0
                off = np.abs(xy - np.round(xy))
                assert ((off < 1e-9) | (np.abs(off - geometry.PINCH) < 1e-9)).all()
                d = np.diff(np.vstack([xy, xy[:1]]), axis=0)
                turn = d[:, 0] * np.roll(d[:, 1], 1) - d[:, 1] * np.roll(d[:, 0], 1)
                assert (np.abs(turn) > 1e-12).all()  # no vertex on a straight edge


def one_pixel_holes(mask: np.ndarray) -> np.ndarray:
    """Background pixels whose four neighbours are foreground."""
    m = np.pad(mask != 0, 1)
    return m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:] & ~m[1:-1, 1:-1]


def test_small_holes_filled_and_small_regions_dropped_exactly():
    """trace_regions's max_hole and min_area give exactly what filling and dropping the full result gives, one-pixel
    holes being filled in the mask (so that no pinch cut is left where one was); and the same regions, up to those
    cuts, as filling every small hole of the traced polygons."""
    rng = np.random.default_rng(5)
    for _ in range(150):
        h, w = (int(v) for v in rng.integers(1, 50, 2))
        mask = (rng.random((h, w)) < rng.uniform(0.3, 0.8)).astype(np.uint8)
        min_area, max_hole, scale = float(rng.uniform(0, 30)), float(rng.uniform(0, 8)), float(rng.choice([1, 4]))
        got = geometry.trace_regions(mask, 0, 0, scale, min_area=min_area, max_hole=max_hole)
        key = lambda p: (p.bounds, round(p.area, 1))  # noqa: E731  (pinch cuts move areas, not bounds)
        filled = mask | one_pixel_holes(mask) if max_hole > 1 else mask
        for source, exact in ((filled, True), (mask, False)):
            full = [geometry.fill_small_holes(p, max_hole * scale ** 2)
                    for p in geometry.trace_regions(source, 0, 0, scale)]
            want = [p for p in full if p.area >= min_area * scale ** 2]
            assert len(got) == len(want)
            for a, b in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
                assert len(a.interiors) == len(b.interiors)
                if exact:
                    assert a.equals(b)
                else:  # a pinch cut is PINCH² / 2 px², a wrong fill 2 px² at least
                    cuts = 8 * int(one_pixel_holes(mask).sum())
                    assert a.symmetric_difference(b).area <= cuts * geometry.PINCH ** 2 * scale ** 2 + 1e-9


def test_one_pixel_holes_are_filled_in_a_copy_unless_the_mask_is_scratch():
    """Filling one-pixel holes before tracing leaves the caller's mask as it was, unless the caller gives it up."""
    mask = np.ones((5, 6), np.uint8)
    mask[2, 2] = 0  # a one-pixel hole
    mask[0, 5] = 0  # background on the edge: not a hole
    for given in (mask.copy(), mask.astype(bool)):
        (poly,) = geometry.trace_regions(given, max_hole=2)
        assert np.array_equal(given != 0, mask != 0) and len(poly.interiors) == 0 and poly.area == 29
    scratch = mask.copy()
    (poly,) = geometry.trace_regions(scratch, max_hole=2, scratch=True)
    assert poly.area == 29 and scratch[2, 2] == 1 and scratch[0, 5] == 0
    (holed,) = geometry.trace_regions(mask, max_hole=1)  # not smaller than max_hole: kept
    assert len(holed.interiors) == 1 and holed.area == 28


def test_min_area_is_decided_on_the_region_not_its_simplified_outline():
    """A staircase region whose simplified outline is smaller than min_area is kept, and one whose simplified
    outline is larger is dropped: the region's own area decides, whatever the simplification tolerance."""
    from qpbridge.cards import ModelCard
    from qpbridge.engine.features import FeatureBuilder

    steps = np.tril(np.ones((12, 12), np.uint8))  # a staircase triangle of 78 px
    mask = np.pad(steps, 2)
    (region,) = geometry.trace_regions(mask)
    simplified = geometry.simplify_polygons(np.array([region], dtype=object), 1.5)[0]
    assert region.area == 78 and abs(simplified.area - region.area) > 2  # simplification moves the area
    card = {"schema_version": 1, "name": "m", "family": "bench-fixed", "task": "semantic-segmentation",
            "object_type": "annotation", "classes": [{"name": "Background", "color": [255, 255, 255]},
                                                        {"name": "Tissue", "color": [200, 0, 0]}],
            "tile": {"size": 64, "overlap": 0, "batch_size": 1}, "mpp": 1.0,
            "postprocess": {"simplify_um": 1.5}}
    for min_area, kept in ((77.5, True), (78.5, False), ((region.area + simplified.area) / 2, True)):
        builder = FeatureBuilder(ModelCard.from_dict({**card, "postprocess": {**card["postprocess"],
                                                                                "min_area_um2": min_area}}), 1.0)
        (feature,) = builder.build_many([region], [1], 0, 0, 1, 1)
        assert (feature is not None) == kept, min_area


def test_rings_listed_in_any_order_give_the_same_polygons(monkeypatch):
    """OpenCV lists each shell's holes right after it; rings listed in another order (shuffled here, the
    hierarchy renumbered to match) are put back in that order, and the polygons are the same."""
    import cv2

    rng = np.random.default_rng(8)
    mask = (rng.random((40, 50)) < 0.6).astype(np.uint8)
    want = geometry.trace_regions(mask, min_area=3, max_hole=2)
    assert sum(len(p.interiors) for p in want) >= 5
    real = cv2.findContours

    def shuffled(*args):  # type: ignore[no-untyped-def]
        contours, hierarchy = real(*args)
        perm = rng.permutation(len(contours))
        new_pos = np.argsort(perm)
        h = hierarchy[0][perm].copy()
        h[:, 3] = np.where(h[:, 3] >= 0, new_pos[np.maximum(h[:, 3], 0)], -1)
        h[:, :3] = -1  # siblings and children are not read
        return tuple(contours[i] for i in perm), h[None]

    monkeypatch.setattr(cv2, "findContours", shuffled)
    got = geometry.trace_regions(mask, min_area=3, max_hole=2)
    key = lambda p: (round(p.area, 6), p.bounds)  # noqa: E731
    assert len(got) == len(want)
    for a, b in zip(sorted(got, key=key), sorted(want, key=key), strict=True):
        assert a.is_valid and a.equals(b) and len(a.interiors) == len(b.interiors)


def test_geojson_positions_are_left_alone_by_the_garbage_collector():
    """Positions are (x, y) tuples of floats, written as JSON arrays, which the collector stops tracking once
    it has seen them: a run keeps millions of them alive until it ends."""
    import gc

    poly = Polygon([(0, 0), (4, 0), (4, 3), (0, 3)], [[(1, 1), (2, 1), (2, 2), (1, 2)]])
    shapes = [geometry.geojson_geometries(np.array([poly], dtype=object))[0], geometry.geojson_geometry(poly)]
    gc.collect()
    for g in shapes:
        assert json.loads(json.dumps(g)) == json.loads(json.dumps(shapely.geometry.mapping(poly)))
        assert all(type(p) is tuple and not gc.is_tracked(p) for ring in g["coordinates"] for p in ring)
        assert shape(g).equals(poly)


def test_coordinates_land_on_the_grid_as_short_decimals():
    """Full-resolution coordinates are the doubles nearest to k / 100 (as GEOS rounds), which JSON writes as
    short as they are ("0.03", where 3 * 0.01 writes "0.030000000000000002") and reads back exactly."""
    from qpbridge.cards import ModelCard
    from qpbridge.engine.features import FeatureBuilder

    k = np.arange(-5000, 5000)
    assert any(len(repr(float(v))) > 10 for v in k * geometry.GRID)  # what the old rounding wrote
    assert (geometry.on_grid(k * geometry.GRID) == k / 100).all()
    card = {"schema_version": 1, "name": "m", "family": "bench-fixed", "task": "semantic-segmentation",
            "object_type": "annotation", "classes": [{"name": "Background", "color": [255, 255, 255]},
                                                        {"name": "Tissue", "color": [200, 0, 0]}],
            "tile": {"size": 64, "overlap": 0, "batch_size": 1}, "mpp": 1.0}
    builder = FeatureBuilder(ModelCard.from_dict(card), 0.5)
    rng = np.random.default_rng(3)
    # a star of 400 vertices at off-grid positions, mapped with an offset and a scale that are off-grid too
    angles = np.sort(rng.uniform(0, 2 * np.pi, 400))
    radius = rng.uniform(20, 30, 400)
    star = Polygon(np.c_[radius * np.cos(angles) + 40.003, radius * np.sin(angles) + 40.007])
    (feature,) = builder.build_many([star], [1], 1000.017, 2000.031, 1.37, 1.37)
    assert feature is not None
    text = json.dumps(feature)
    ring = np.asarray(json.loads(text)["geometry"]["coordinates"][0])
    assert len(ring) > 100
    assert (ring == np.round(ring * 100) / 100).all()
    for v in ring.ravel().tolist():
        assert len(repr(v).split(".")[1]) <= 2, v
