"""Whole slides: reading, tile plans, seam-free stitching, instances across borders, slide jobs."""

from __future__ import annotations

import json
import os
import time
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from conftest import CMU_SVS, DARK_CARD, need_data, start_server, write_pyramid
from qpbridge.annotate import annotate_slide
from qpbridge.cards import ModelCard
from qpbridge.cli import main
from qpbridge.client import Client
from qpbridge.engine import Engine
from qpbridge.engine.plan import make_plan
from qpbridge.engine.reading import BLOCK_PX, BLOCK_ROWS, band_of, blocks_of
from qpbridge.engine.session import RunOptions
from qpbridge.engine.stitching import InstanceCollector, SemanticStitcher
from qpbridge.errors import BadRequestError, MissingPixelSizeError, RemoteError
from qpbridge.families import SemanticResult
from qpbridge.protocol import ImageInfo, TileSpec, planned_tile_spec
from qpbridge.slides import Slide, resolve_slide_path


def shapes_image() -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A 0.5 µm/px image with dark shapes that cross many tile borders, and each shape's mask."""
    h, w = 1200, 1600
    img = np.full((h, w, 3), 235, np.uint8)
    masks = {}
    m = np.zeros((h, w), np.uint8)
    cv2.ellipse(m, (500, 400), (380, 250), 20, 0, 360, 1, -1)
    masks["ellipse"] = m.astype(bool)
    m = np.zeros((h, w), np.uint8)
    cv2.circle(m, (1250, 850), 260, 1, -1)
    cv2.circle(m, (1250, 850), 120, 0, -1)  # a ring: one polygon with one hole
    masks["ring"] = m.astype(bool)
    m = np.zeros((h, w), np.uint8)
    cv2.line(m, (100, 1150), (900, 700), 1, 40)
    masks["band"] = m.astype(bool)
    for mask in masks.values():
        img[mask] = 25
    return img, masks


@pytest.fixture(scope="module")
def shapes_slide(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    img, masks = shapes_image()
    path = write_pyramid(tmp_path_factory.mktemp("slides") / "shapes.tif", img, mpp=0.5)
    return path, masks


def test_slide_reading_picks_the_pyramid_level(shapes_slide):
    path, _ = shapes_slide
    s = Slide(path)
    assert (s.width, s.height, s.mpp) == (1600, 1200, 0.5)
    assert s.level_downsamples == [1.0, 2.0, 4.0]
    assert s.level_for(2.0) == 1 and s.level_for(3.0) == 1 and s.level_for(1.5) == 0 and s.level_for(9) == 2
    # a level up to 1% coarser than asked for is used (as QuPath does), not one 2x finer
    assert s.level_for(1.985) == 1 and s.level_for(3.97) == 2 and s.level_for(1.97) == 0
    full = s.read(100, 100, 300, 200, 200, 100)
    half = s.read(100, 100, 300, 200, 100, 50)
    assert full.shape == (100, 200, 3) and half.shape == (50, 100, 3)
    edge = s.read(1500, 1100, 1700, 1300, 200, 200)  # past the corner: white padding
    assert (edge[150:, 150:] == 255).all()


def _zarr_level(s: Slide, level: int) -> np.ndarray:
    """A whole pyramid level as tiffslide's zarr store decodes it."""
    grp = s._handle().ts_zarr_grp
    arr = grp[str(level)] if hasattr(grp, "keys") and str(level) in grp else grp
    return np.asarray(arr[:])


@pytest.mark.parametrize("compression", ["jpeg", "zlib", None])
def test_direct_tile_reads_equal_tiffslide(tmp_path, compression):
    """Tiled levels are read by pread + tifffile's decoder; their pixels must be those of tiffslide's zarr
    store, at every level, across tile borders and in the partial tiles at the image's edges."""
    rng = np.random.default_rng(5)
    img = cv2.resize(rng.integers(0, 255, (37, 51, 3), dtype=np.uint8), (1310, 950), interpolation=cv2.INTER_CUBIC)
    s = Slide(write_pyramid(tmp_path / f"p-{compression}.tif", img, mpp=0.5, compression=compression))
    assert s._direct is not None and all(s._direct.can_read(i) for i in range(3))
    for level, (w, h) in enumerate(s.level_dimensions):
        ref = _zarr_level(s, level)
        assert ref.shape == (h, w, 3)
        boxes = ((0, 0, w, h), (w // 5, h // 3, w - 7, h - 1), (w - 60, h - 50, w, h), (3, 250, 300, 260))
        for x0, y0, x1, y1 in boxes:
            x1, y1 = min(x1, w), min(y1, h)
            if x1 <= x0 or y1 <= y0:
                continue
            np.testing.assert_array_equal(s._direct.read(level, x0, y0, x1, y1), ref[y0:y1, x0:x1],
                                          err_msg=f"level {level} box {(x0, y0, x1, y1)}")
    full = s.read(-40, -30, 1400, 1000, 1440, 1030)  # whole image at level 0, with white past the edges
    np.testing.assert_array_equal(full[30:980, 40:1350], _zarr_level(s, 0))
    assert (full[:30] == 255).all() and (full[:, 1350:] == 255).all()
    s.close()
    assert s._direct is None


def test_block_reads_decode_each_stored_tile_once_and_equal_single_reads(tmp_path):
    """A plan read in overlapping blocks, on several threads, decodes each stored tile it needs about once
    (the tiles a block uses in part are kept for the next), returns the pixels of tiffslide's own reads,
    and keeps at most two rows of stored tiles, none after close."""
    from concurrent.futures import ThreadPoolExecutor

    from qpbridge import slides
    from qpbridge.engine.reading import read_block

    rng = np.random.default_rng(11)
    img = cv2.resize(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8), (3000, 2100), interpolation=cv2.INTER_CUBIC)
    path = write_pyramid(tmp_path / "p.tif", img, mpp=0.5, compression="jpeg")
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 256, "overlap": 64}})
    s = Slide(path)
    plan = make_plan(card, (0, 0, s.width, s.height), s.mpp)  # 1 µm/px: level 1, 1500 x 1050 in 256 px tiles
    blocks = blocks_of(plan, block_px=700, rows=2)  # blocks and bands end inside stored tiles
    s.read_overlap = plan.overlap * plan.ds  # as a run sets it
    bands = len({band_of(b[0], 2) for b in blocks})
    assert bands > 2 and len(blocks) > 2 * bands
    decoded: list[int] = []
    real_decode = slides._TiledLevels._decode

    def counted(self, page, level, index, *rest):  # type: ignore[no-untyped-def]
        decoded.append(index)
        return real_decode(self, page, level, index, *rest)

    # stored tiles (256 px, at level 1 = canvas pixels) that each block's box touches: decoded without keeping
    boxes = [(min(t.x for t in b), min(t.y for t in b), max(t.x + t.w for t in b), max(t.y + t.h for t in b))
             for b in blocks]
    touched = sum(((min(x1, 1500) - 1) // 256 - x0 // 256 + 1) * ((min(y1, 1050) - 1) // 256 - y0 // 256 + 1)
                  for x0, y0, x1, y1 in boxes)
    across, down = -(-1500 // 256), -(-1050 // 256)
    assert touched > 1.4 * across * down
    slides._TiledLevels._decode = counted  # type: ignore[method-assign]
    try:
        seq = [read_block(plan, b, s.read) for b in blocks]
        assert sorted(decoded) == list(range(across * down))  # in order, on one thread: each once
        direct = s._direct
        assert direct is not None and 0 < len(direct._kept) <= 2 * across + 16
        s.close()
        assert not direct._kept
        s = Slide(path)
        s.read_overlap = plan.overlap * plan.ds
        decoded.clear()
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda b: read_block(plan, b, s.read), blocks))
    finally:
        slides._TiledLevels._decode = real_decode  # type: ignore[method-assign]
    # on four threads a tile that two need at the same moment may be decoded twice, still far fewer
    assert sorted(set(decoded)) == list(range(across * down)) and len(decoded) < 0.85 * touched
    s.close()
    ref = Slide(path)
    assert ref._direct is not None
    ref._direct.close()
    ref._direct = None  # tiffslide's read_region only
    for tiles, seq_tiles in zip(got, seq, strict=True):
        for (t, px), (_, seq_px) in zip(tiles, seq_tiles, strict=True):
            want = ref.read(*plan.fullres_box(t), t.w, t.h)
            np.testing.assert_array_equal(px, want, err_msg=f"tile {t.index}")
            np.testing.assert_array_equal(seq_px, want, err_msg=f"tile {t.index}")
    ref.close()


def test_a_level_within_one_percent_is_read_and_scaled_up(tmp_path, monkeypatch):
    """A slide 0.5% off its pyramid's 2x level (1.99x asked for) is read from that level, scaled up by 0.5%,
    not from level 0 averaged down: a quarter of the pixels decoded, and nearly the same picture."""
    from qpbridge import slides

    rng = np.random.default_rng(2)
    img = cv2.resize(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8), (1600, 1200), interpolation=cv2.INTER_CUBIC)
    s = Slide(write_pyramid(tmp_path / "p.tif", img, mpp=0.5, compression="jpeg"))
    levels: list[int] = []
    real_read = slides._TiledLevels.read

    def read(self, level, *rest):  # type: ignore[no-untyped-def]
        levels.append(level)
        return real_read(self, level, *rest)

    monkeypatch.setattr(slides._TiledLevels, "read", read)
    box = (101.5, 203.0, 101.5 + 1.99 * 500, 203.0 + 1.99 * 300, 500, 300)
    near = s.read(*box)
    monkeypatch.setattr(slides, "LEVEL_TOLERANCE", 0.0)
    fine = s.read(*box)
    assert levels == [1, 0]
    assert near.shape == fine.shape == (300, 500, 3)
    assert np.abs(near.astype(int) - fine).mean() < 2.5  # (the test pyramid subsamples its levels)
    s.close()


@pytest.mark.parametrize("step", [1.005, 1.06, 1.979, 2.004, 2.2, 3.957])
def test_near_whole_downsamples_match_exact_area_averaging(monkeypatch, step):
    """A downsample near a whole number is done as a linear scale by the fraction, then whole-block averaging
    (no fractional area resize, OpenCV's slow path), and gives the exact area average within 2 grey levels."""
    from qpbridge import images

    rng = np.random.default_rng(4)
    src = cv2.resize(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8), (1400, 1000), interpolation=cv2.INTER_CUBIC)
    cv2.line(src, (0, 500), (1399, 620), (20, 20, 20), 3)  # sharp edges too
    cv2.circle(src, (700, 300), 150, (250, 240, 250), 5)
    size = (int(1000 / step) - 2, int(1400 / step) - 2, 3)
    calls: list[tuple[int, float]] = []
    real_resize = cv2.resize

    def resize(img, dsize, interpolation):  # type: ignore[no-untyped-def]
        calls.append((interpolation, img.shape[1] / dsize[0]))
        return real_resize(img, dsize, interpolation=interpolation)

    monkeypatch.setattr(cv2, "resize", resize)
    fast = np.full(size, 255, np.uint8)
    images.paste_scaled(fast, src, 10.0, 20.0, 13.7, 22.1, step)
    assert not [f for i, f in calls if i == cv2.INTER_AREA and abs(f - round(f)) > 1e-9], calls
    monkeypatch.setattr(images, "NEAR_INTEGER", 0.0)
    exact = np.full(size, 255, np.uint8)
    images.paste_scaled(exact, src, 10.0, 20.0, 13.7, 22.1, step)
    assert calls[-1][0] == cv2.INTER_AREA and abs(calls[-1][1] - step) < 0.01
    diff = np.abs(fast.astype(int) - exact)
    assert np.percentile(diff, 99) <= 2 and diff.mean() < 0.3, (np.percentile(diff, 99), diff.mean())


def test_direct_reads_of_the_cmu_svs_equal_tiffslide():
    s = Slide(need_data(CMU_SVS))
    assert s._direct is not None
    box = (333.3, 101.9, 2100.0, 1900.0, 900, 917)
    got = s.read(*box)
    s.close()  # the same read through tiffslide's read_region (level 0: exact coordinates)
    np.testing.assert_array_equal(got, s.read(*box))


def test_shapes_crossing_tiles_come_back_as_one_polygon_each(shapes_slide, models_dir):
    path, masks = shapes_slide
    engine = Engine(models_dir)
    result = annotate_slide(engine, path, "seams")
    plan = result.plan
    assert plan.rows * plan.cols > 100  # 64 px tiles at 1 µm/px over 800x600 model px
    geoms = [shape(f["geometry"]) for f in result.features]
    assert len(geoms) == 3, [g.area for g in geoms]
    for name, mask in masks.items():
        truth = mask.sum()
        ys, xs = np.nonzero(mask)
        centre = shapely.Point(xs.mean() + 0.5, ys.mean() + 0.5)
        match = [g for g in geoms if g.buffer(1).contains(centre) or g.distance(centre) < 1]
        if name == "ring":  # the centre is in the hole
            match = [g for g in geoms if len(getattr(g, "interiors", [])) == 1]
        assert len(match) == 1, name
        g = match[0]
        assert g.is_valid and g.geom_type == "Polygon"
        assert g.area == pytest.approx(truth, rel=0.02), name


def test_sixteen_fold_overlap_is_expressible(shapes_slide, tmp_path):
    """Histo_Unet's "16-fold overlap": overlap = 3/4 of the tile, every pixel blended from 16 tiles."""
    path, masks = shapes_slide
    card = {**DARK_CARD, "name": "sixteen", "tile": {"size": 64, "overlap": 48, "batch_size": 64}}
    (tmp_path / "sixteen").mkdir()
    (tmp_path / "sixteen" / "config.json").write_text(json.dumps(card))
    result = annotate_slide(Engine(tmp_path), path, "sixteen")
    cover = np.zeros((result.plan.height, result.plan.width), int)
    for t in result.plan.tiles:
        cover[t.y:t.y + t.h, t.x:t.x + t.w] += 1
    assert cover[64:-64, 64:-64].min() == 16
    areas = sorted(shape(f["geometry"]).area for f in result.features)
    assert areas == pytest.approx(sorted(float(m.sum()) for m in masks.values()), rel=0.02)


def test_no_tile_seams_compared_with_single_tiles(shapes_slide, models_dir):
    """Without stitching (one request per tile) the same slide breaks into many pieces."""
    path, _ = shapes_slide
    engine = Engine(models_dir)
    slide = Slide(path)
    plan = make_plan(engine.card("seams"), (0, 0, slide.width, slide.height), slide.mpp)
    pieces = 0
    for t in plan.tiles:
        x0, y0, x1, y1 = plan.fullres_box(t)
        spec = planned_tile_spec(plan, t)
        feats = engine.predict("seams", ImageInfo(mpp=0.5), [(spec, slide.read(x0, y0, x1, y1, t.w, t.h))])
        pieces += len(feats)
    assert pieces > 50


def test_nuclei_on_tile_borders_are_counted_once(tmp_path):
    """Purple discs laid on the 512 px tile borders of the nuclei plan (step 480): each found exactly once."""
    h, w = 1000, 1500
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (226, 170, 200)  # eosin-pink tissue
    centres = []
    for x in (240, 470, 480, 490, 500, 720, 950, 960, 975, 1200):
        for y in (200, 470, 482, 495, 700, 950):
            if y > h - 10:
                continue
            centres.append((x, y))
    centres = [c for i, c in enumerate(centres) if all(abs(c[0] - d[0]) + abs(c[1] - d[1]) >= 24
                                                     for d in centres[:i])]
    for x, y in centres:
        cv2.circle(img, (x, y), 7, (90, 40, 140), -1)
    path = write_pyramid(tmp_path / "nuclei.tif", img, mpp=0.5, levels=1)
    engine = Engine()
    result = annotate_slide(engine, path, "nuclei", tissue_filter=False)
    assert result.plan.cols * result.plan.rows > 6  # many discs sit in overlaps seen by 2 or 4 tiles
    found = [shape(f["geometry"]).centroid for f in result.features]
    assert len(found) == len(centres)
    for x, y in centres:
        near = [p for p in found if abs(p.x - x) < 3 and abs(p.y - y) < 3]
        assert len(near) == 1, (x, y)
    for f in result.features:
        area = f["properties"]["measurements"]["Nucleus: Area µm^2"]
        assert area == pytest.approx(np.pi * 7.0 ** 2 * 0.25, rel=0.12)


def test_a_cancelled_run_keeps_the_nuclei_it_found_on_seams(tmp_path):
    """Instances near a core border wait for the neighbour tile; when the run stops before that tile, they
    are emitted anyway (nothing already found is lost), each once, and equal to the full run's."""
    h, w = 1000, 1500
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (226, 170, 200)
    centres = [(x, y) for x in (150, 470, 490, 800, 950, 975, 1300) for y in (150, 482, 880)]
    for x, y in centres:
        cv2.circle(img, (x, y), 7, (90, 40, 140), -1)
    path = write_pyramid(tmp_path / "nuclei.tif", img, mpp=0.5, levels=1)
    engine = Engine()
    full = annotate_slide(engine, path, "nuclei", tissue_filter=False)
    calls = []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 2  # polled once per row block: the first two rows (one batch) run, the third not

    cut = annotate_slide(engine, path, "nuclei", tissue_filter=False, should_stop=stop,
                         options=RunOptions(readers=1, prefetch_blocks=1, feeders=1))
    assert cut.stats.cancelled and 0 < cut.stats.tiles < len(cut.plan.tiles)
    done = cut.plan.tiles[:cut.stats.tiles]
    full_c = [shape(f["geometry"]).centroid for f in full.features]
    got = [shape(f["geometry"]).centroid for f in cut.features]
    assert len(got) == len({(round(p.x), round(p.y)) for p in got})  # none twice
    for p in got:  # each is one of the full run's nuclei
        assert min(abs(p.x - q.x) + abs(p.y - q.y) for q in full_c) < 1.0
    # nuclei just above the border of the row that never ran waited for it; they are kept all the same
    border = max(t.row for t in done) * cut.plan.step + cut.plan.step + cut.plan.overlap / 2
    waiting = [(x, y) for x, y in centres if border - 12 < y < border]
    assert waiting
    for x, y in waiting:
        assert sum(abs(p.x - x) < 3 and abs(p.y - y) < 3 for p in got) == 1, (x, y)


def test_instance_cores_partition_the_canvas(models_dir):
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 64, "overlap": 16}})
    plan = make_plan(card, (0, 0, 300, 200), None)
    collector = InstanceCollector(plan, lambda *a: None)
    rng = np.random.default_rng(0)
    for px, py in rng.uniform(0, 200, size=(500, 2)):
        owners = [t for t in plan.tiles if (c := collector.core(t))[0] <= px < c[2] and c[1] <= py < c[3]]
        assert len(owners) == 1


def test_stitching_memory_does_not_grow_with_slide_height():
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 256, "overlap": 64}})
    peaks = []
    for height in (2048, 8192):
        plan = make_plan(card, (0, 0, 4096, height), None)
        stitcher = SemanticStitcher(plan, 2, [1], lambda *a: None)
        probs = np.zeros((2, 256, 256), np.float32)
        probs[0] = 1.0
        tracemalloc.start()
        for t in plan.tiles:
            stitcher.add(t, SemanticResult(probs=probs[:, :t.h, :t.w]))
        stitcher.finish()
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    # Four times the area, same width: the same working memory (a few MB of accumulator).
    assert peaks[1] < peaks[0] * 1.25 + (1 << 20), peaks


def test_out_of_order_tiles_stitch_the_same(shapes_slide, models_dir):
    path, _ = shapes_slide
    engine = Engine(models_dir)
    card = engine.card("seams")
    slide = Slide(path)
    plan = make_plan(card, (0, 0, slide.width, slide.height), slide.mpp)
    model = engine.model("seams")

    def stitch(order):
        out = []
        st = SemanticStitcher(plan, 2, [1], lambda g, c, e: out.append(g))
        for i in order:
            t = plan.tiles[i]
            x0, y0, x1, y1 = plan.fullres_box(t)
            st.add(t, model.predict([slide.read(x0, y0, x1, y1, t.w, t.h)])[0])
        st.finish()
        return sorted(round(g.area) for g in out)

    n = len(plan.tiles)
    shuffled = list(np.random.default_rng(1).permutation(n))
    assert stitch(range(n)) == stitch(shuffled)


def test_roi_restricts_tiles_and_clips_results(shapes_slide, models_dir):
    path, _ = shapes_slide
    roi = shapely.box(200, 200, 700, 600)
    engine = Engine(models_dir)
    full = annotate_slide(engine, path, "seams")
    part = annotate_slide(engine, path, "seams", roi=roi)
    assert len(part.plan.tiles) < len(full.plan.tiles) / 3
    for f in part.features:
        g = shape(f["geometry"])
        assert roi.buffer(0.01).contains(g)
    assert sum(shape(f["geometry"]).area for f in part.features) < 500 * 400


def test_missing_mpp_is_an_error_unless_overridden(tmp_path, capsys):
    img, _ = shapes_image()
    path = write_pyramid(tmp_path / "nompp.tif", img[:400, :400], mpp=None, levels=1)
    with pytest.raises(MissingPixelSizeError, match="--mpp"):
        annotate_slide(Engine(), path, "tissue")
    assert main(["annotate", str(path), "--model", "tissue", "-o", str(tmp_path / "a.geojson"), "--quiet"]) == 1
    assert "--mpp" in capsys.readouterr().err
    assert main(["annotate", str(path), "--model", "tissue", "-o", str(tmp_path / "a.geojson"), "--mpp", "0.5",
                 "--quiet"]) == 0


def test_annotate_sidecar_names_and_output_required(tmp_path, capsys, models_dir):
    img, _ = shapes_image()
    dark = ["--model", "dark", "--models-dir", str(models_dir), "--quiet"]
    path = write_pyramid(tmp_path / "case 1.tif", img[:400, :400], mpp=1.0, levels=1)
    assert main(["annotate", str(path), *dark]) == 1
    assert "--sidecar" in capsys.readouterr().err and not list(tmp_path.glob("*.geojson"))
    out = tmp_path / "copy.geojson"
    assert main(["annotate", str(path), *dark, "--sidecar", "-o", str(out)]) == 0
    beside = tmp_path / "case 1.tif.qpbridge.geojson"  # the name QuPath's Import script looks for first
    assert json.loads(beside.read_text()) == json.loads(out.read_text())
    assert json.loads(beside.read_text())["features"]
    folder = tmp_path / "sidecars"
    assert main(["annotate", str(path), *dark, "--sidecar", str(folder)]) == 0
    assert [p.name for p in folder.iterdir()] == ["case 1.tif.qpbridge.geojson"]
    assert str(folder / "case 1.tif.qpbridge.geojson") in capsys.readouterr().out


def test_cmu_svs_end_to_end_cli(tmp_path, capsys):
    svs = need_data(CMU_SVS)
    out, overlay = tmp_path / "tissue.geojson", tmp_path / "tissue.png"
    assert main(["annotate", str(svs), "--model", "tissue", "-o", str(out), "--overlay", str(overlay)]) == 0
    feats = json.loads(out.read_text())["features"]
    tissue = shapely.union_all([shape(f["geometry"]) for f in feats])
    assert 0.30 < tissue.area / (2220 * 2967) < 0.50  # the strip of skin, not the glass around it
    assert cv2.imread(str(overlay)) is not None
    roi = tmp_path / "roi.geojson"
    roi.write_text(json.dumps({"type": "Feature", "properties": {},
                               "geometry": shapely.geometry.mapping(shapely.box(700, 1200, 1300, 1800))}))
    nout = tmp_path / "nuclei.geojson"
    assert main(["annotate", str(svs), "--model", "nuclei", "-o", str(nout), "--roi", str(roi), "--quiet"]) == 0
    nuclei = json.loads(nout.read_text())["features"]
    assert 50 < len(nuclei) < 2000
    assert all(shape(f["geometry"]).within(shapely.box(700, 1200, 1300, 1800).buffer(0.01)) for f in nuclei)
    assert "tiles/s" in capsys.readouterr().out


def test_slide_paths_outside_roots_are_rejected(tmp_path):
    root = tmp_path / "slides"
    root.mkdir()
    inside = root / "a.tif"
    inside.write_bytes(b"x")
    outside = tmp_path / "secret.tif"
    outside.write_bytes(b"x")
    (root / "link.tif").symlink_to(outside)
    assert resolve_slide_path(str(inside), [root]) == inside.resolve()
    for bad in (str(outside), str(root / ".." / "secret.tif"), str(root / "link.tif"), "a.tif", "/etc/passwd"):
        with pytest.raises(BadRequestError):
            resolve_slide_path(bad, [root])
    with pytest.raises(BadRequestError, match="--slide-root"):
        resolve_slide_path(str(inside), [])


def test_server_slide_job_progress_results_and_cancel(shapes_slide, models_dir):
    path, _ = shapes_slide
    root = path.parent
    running = start_server(models_dir, slide_roots=[root])
    try:
        with Client(running.address) as c:
            assert "slide-jobs" in c.hello()["capabilities"]
            job = c.request({"op": "job.slide", "model": "seams", "path": str(path)})["job"]
            deadline = time.monotonic() + 60
            while (st := c.job_status(job))["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert st["state"] == "done" and st["tiles_done"] == st["tiles_expected"] > 100
            feats = list(c.job_results(job, page_size=2))
            assert len(feats) == 3
            with pytest.raises(RemoteError) as info:
                c.job_tiles(job, [])
            assert info.value.code == "job_state"
            # Escapes are refused before anything is read.
            for bad in (str(root / ".." / "x.tif"), "/etc/passwd", "relative.tif"):
                with pytest.raises(RemoteError) as info:
                    c.request({"op": "job.slide", "model": "seams", "path": bad})
                assert info.value.code == "bad_request"
            # Cancel: the slow model takes 50 ms a tile, so the job is cancelled part-way.
            job = c.request({"op": "job.slide", "model": "slow", "path": str(path)})["job"]
            time.sleep(0.5)
            c.job_cancel(job)
            time.sleep(0.3)
            st = c.job_status(job)
            assert st["state"] == "cancelled" and 0 < st["tiles_done"] < st["tiles_expected"]
    finally:
        running.server.stop()
        running.thread.join(10)


def test_default_server_refuses_slide_jobs(server):
    with Client(server.address) as c, pytest.raises(RemoteError) as info:
        c.request({"op": "job.slide", "model": "tissue", "path": os.path.abspath("x.svs")})
    assert "--slide-root" in info.value.message


def test_slide_without_tissue_gives_no_features(tmp_path):
    blank = np.full((600, 800, 3), 245, np.uint8)
    path = write_pyramid(tmp_path / "blank.tif", blank, mpp=0.5, levels=1)
    result = annotate_slide(Engine(), path, "nuclei")
    assert result.plan.tiles == [] and result.features == []


def test_planned_tile_job_is_seam_free_in_any_order(shapes_slide, server):
    """A client reads the tiles the server planned and sends them shuffled; results equal annotate's."""
    path, masks = shapes_slide
    slide = Slide(path)
    image = ImageInfo(name="shapes", mpp=0.5, width=slide.width, height=slide.height)
    with Client(server.address) as c:
        opened = c.job_open_planned("seams", image, (0, 0, slide.width, slide.height))
        job, plan = opened["job"], opened["plan"]
        specs = [TileSpec(**{k: t[k] for k in ("x", "y", "width", "height", "downsample")}) for t in plan["tiles"]]
        assert len(specs) == plan["rows"] * plan["cols"] > 100
        order = np.random.default_rng(2).permutation(len(specs))
        tiles = []
        for i in order:
            s = specs[i]
            x1, y1 = s.x + s.width * s.downsample, s.y + s.height * s.downsample
            tiles.append((s, slide.read(s.x, s.y, x1, y1, s.width, s.height)))
        with pytest.raises(RemoteError) as info:
            c.job_finish(job)  # nothing sent yet
        assert info.value.code == "job_state"
        for k in range(0, len(tiles), 32):
            c.job_tiles(job, tiles[k:k + 32])
        with pytest.raises(RemoteError) as info:
            c.job_tiles(job, [(TileSpec(3, 5, 64, 64, 2.0), np.zeros((64, 64, 3), np.uint8))])
        assert info.value.code == "bad_request" and "plan" in info.value.message
        assert c.job_finish(job)["state"] == "done"
        feats = list(c.job_results(job))
    areas = sorted(shape(f["geometry"]).area for f in feats)
    truth = sorted(float(m.sum()) for m in masks.values())
    assert areas == pytest.approx(truth, rel=0.02)


def test_planned_nuclei_job_counts_border_nuclei_once(server):
    h, w = 700, 1100
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (226, 170, 200)
    centres = [(x, y) for x in (200, 470, 496, 520, 800) for y in (150, 470, 500, 600)]
    for x, y in centres:
        cv2.circle(img, (x, y), 7, (90, 40, 140), -1)
    image = ImageInfo(name="discs", mpp=0.5, width=w, height=h)
    with Client(server.address) as c:
        opened = c.job_open_planned("nuclei", image, (0, 0, w, h))
        tiles = []
        for t in opened["plan"]["tiles"]:
            s = TileSpec(t["x"], t["y"], t["width"], t["height"], t["downsample"])
            tiles.append((s, np.ascontiguousarray(img[s.y:s.y + s.height, s.x:s.x + s.width])))
        c.job_tiles(opened["job"], tiles)
        c.job_finish(opened["job"])
        feats = list(c.job_results(opened["job"]))
    assert len(feats) == len(centres)


def test_running_slide_job_outlives_the_job_ttl(shapes_slide, models_dir):
    from qpbridge.protocol import Limits

    path, _ = shapes_slide
    running = start_server(models_dir, Limits(job_ttl_s=1.0), slide_roots=[path.parent])
    try:
        with Client(running.address) as c:
            job = c.request({"op": "job.slide", "model": "slow", "path": str(path)})["job"]
            time.sleep(2.5)  # no request for longer than the TTL
            assert c.job_status(job)["state"] == "running"
            c.job_cancel(job)
    finally:
        running.server.stop()
        running.thread.join(10)


def test_planned_tiles_are_found_by_their_plan_index(server):
    """Plans carry each tile's index; a tile sent with its index is taken even when its rounded origin is a
    pixel off, and an index that does not match the plan is refused."""
    image = ImageInfo(name="blank", mpp=0.5, width=500, height=400)
    with Client(server.address) as c:
        opened = c.job_open_planned("seams", image, (0, 0, 500, 400))
        tiles = opened["plan"]["tiles"]
        assert [t["index"] for t in tiles] == list(range(len(tiles)))
        batch = []
        for t in tiles:
            s = TileSpec(t["x"] + (1 if t["index"] == 1 else 0), t["y"], t["width"], t["height"], t["downsample"],
                         index=t["index"])
            batch.append((s, np.full((s.height, s.width, 3), 240, np.uint8)))
        for bad in (len(tiles), 0):
            s = batch[2][0]
            wrong = TileSpec(s.x + (0 if bad else 400), s.y, s.width, s.height, s.downsample, index=bad)
            with pytest.raises(RemoteError) as info:
                c.job_tiles(opened["job"], [(wrong, batch[2][1])])
            assert info.value.code == "bad_request"
        assert c.job_tiles(opened["job"], batch)["accepted"] == len(tiles)
        assert c.job_finish(opened["job"])["state"] == "done"


def test_instance_overlap_covers_the_largest_object():
    card = Engine().card("nuclei")
    largest_px = card.max_object_um / card.mpp  # a disc of params.max_area_um2
    assert card.plan_overlap >= 2 * largest_px > card.overlap
    assert make_plan(card, (0, 0, 3000, 3000), 0.5).overlap == card.plan_overlap


def test_a_nucleus_segmented_differently_by_two_tiles_is_kept_once():
    card = ModelCard.from_dict({**DARK_CARD, "task": "instance-segmentation", "tile": {"size": 64, "overlap": 16}})
    plan = make_plan(card, (0, 0, 112, 64), None)  # two tiles side by side, core border at x = 56
    left, right = plan.tiles
    out = []
    collector = InstanceCollector(plan, lambda g, c, e: out.append(g), max_object=12)
    a = np.zeros((64, 64), np.int32)
    cv2.circle(a, (54, 30), 7, 1, -1)  # centroid x = 54.5: the left tile's core
    b = np.zeros((64, 64), np.int32)
    cv2.circle(b, (58 - right.x, 30), 7, 1, -1)  # the same nucleus, 4 px off: centroid in the right core
    cv2.circle(b, (40, 40), 6, 2, -1)  # another nucleus, only in the right tile
    from qpbridge.families import InstanceResult

    collector.add_batch([(left, InstanceResult(a)), (right, InstanceResult(b))])
    assert len(out) == 2 and collector.duplicates == 1


def test_monuseg_predict_returns_no_nucleus_twice(tmp_path):
    """Real H&E at 0.5 µm/px (9 tiles of 512 px per 1000 px image): no two nuclei overlap by more than half."""
    from shapely import STRtree

    from conftest import MONUSEG

    images = sorted(need_data(MONUSEG).glob("*.tif"))[:2]
    for image in images:
        out = tmp_path / f"{image.stem}.geojson"
        assert main(["predict", str(image), "--model", "nuclei", "--mpp", "0.5", "-o", str(out)]) == 0
        nuclei = [shape(f["geometry"]) for f in json.loads(out.read_text())["features"]]
        assert len(nuclei) > 300
        tree = STRtree(nuclei)
        for i, a in enumerate(nuclei):
            for j in tree.query(a, predicate="intersects"):
                if j > i:
                    b = nuclei[j]
                    assert a.intersection(b).area <= 0.5 * min(a.area, b.area), (image.name, a.centroid, b.centroid)


def test_kept_instances_do_not_depend_on_the_order_tiles_arrive_in():
    """A planned job's clients send tiles in any order and batches: the nuclei kept must be the same."""
    import tifffile

    from conftest import MONUSEG
    from qpbridge.families import InstanceResult

    img = tifffile.imread(sorted(need_data(MONUSEG).glob("*.tif"))[0])[:, :, :3]
    engine = Engine()
    card = engine.card("nuclei")
    plan = make_plan(card, (0, 0, img.shape[1], img.shape[0]), 0.5)
    results = engine.model("nuclei").predict([np.ascontiguousarray(img[t.y:t.y + t.h, t.x:t.x + t.w])
                                              for t in plan.tiles])

    def kept(order, batch):
        out = []
        collector = InstanceCollector(plan, lambda g, c, e: out.append(g.wkt), max_object=card.max_object_um / 0.5)
        items = [(plan.tiles[i], results[i]) for i in order]
        for k in range(0, len(items), batch):
            collector.add_batch([(t, r) for t, r in items[k:k + batch] if isinstance(r, InstanceResult)])
        collector.finish()
        return sorted(out), collector.duplicates

    reference, _ = kept(range(len(plan.tiles)), 1)
    for seed, batch in ((1, 1), (2, 4), (3, 3)):
        order = np.random.default_rng(seed).permutation(len(plan.tiles))
        assert kept(order, batch)[0] == reference


# ---- block reads ----------------------------------------------------------------------------------------


def _box_area(blocks) -> int:
    return sum((max(t.x + t.w for t in b) - min(t.x for t in b)) * (max(t.y + t.h for t in b) - min(t.y for t in b))
               for b in blocks)


def test_blocks_read_each_canvas_pixel_about_once_band_by_band_in_plan_order():
    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 256, "overlap": 64}})
    plan = make_plan(card, (0, 0, 9000, 7000), None)
    blocks = blocks_of(plan)
    assert sorted(t.index for b in blocks for t in b) == list(range(len(plan.tiles)))  # every tile once
    for b in blocks:
        assert [t.index for t in b] == sorted(t.index for t in b)
        assert len({band_of(t) for t in b}) == 1 and len({t.row for t in b}) <= BLOCK_ROWS
        assert max(t.x + t.w for t in b) - min(t.x for t in b) <= BLOCK_PX
    bands = [band_of(b[0]) for b in blocks]
    assert bands == sorted(bands)
    canvas = plan.width * plan.height
    rows_only = blocks_of(plan, rows=1)  # one plan row per block: rows overlap, their pixels are read twice
    assert _box_area(blocks) / canvas < 1.15  # the rows of a band share their overlaps
    assert _box_area(rows_only) / canvas > 1.3


def test_block_tiles_are_rows_of_one_stack_per_size_and_fill_a_batch_in_few_copies():
    """Each block's tiles are cut out of its box in one copy per tile size: every tile equals its crop of
    the box, is contiguous and read-only, and the tiles of a batch come as one run per block and size (the
    batch is filled with one copy per run, not per tile); tiles off the grid are cut one by one."""
    import dataclasses

    from qpbridge.engine.reading import read_block
    from qpbridge.families.torch_runtime import contiguous_runs

    rng = np.random.default_rng(5)
    canvas = rng.integers(0, 255, (1000, 1400, 3), dtype=np.uint8)
    calls = []

    def read_box(x0, y0, x1, y1, w, h):  # type: ignore[no-untyped-def]
        calls.append((w, h))
        return canvas[int(y0):int(y0) + h, int(x0):int(x0) + w].copy()

    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 256, "overlap": 64}})
    plan = make_plan(card, (0, 0, 1400, 1000), None)  # 7 x 5 tiles, the last column and row cut short
    assert len({(t.w, t.h) for t in plan.tiles}) == 4
    blocks = blocks_of(plan, block_px=900, rows=2)
    batch = []
    for block in blocks:
        got = read_block(plan, block, read_box)
        assert [t for t, _ in got] == block
        for t, px in got:
            np.testing.assert_array_equal(px, canvas[t.y:t.y + t.h, t.x:t.x + t.w], err_msg=f"tile {t.index}")
            assert px.flags.c_contiguous and not px.flags.writeable
        full = [px for t, px in got if (t.w, t.h) == (256, 256)]
        if len(full) == len(got):
            assert len(contiguous_runs(full)) == 1  # the whole block: one copy into the batch
        batch.extend(full)
    assert len(calls) == len(blocks)
    runs = contiguous_runs(batch)
    assert len(runs) < len(batch) / 2 and sum(len(r) for r in runs) == len(batch)
    np.testing.assert_array_equal(np.concatenate(runs), np.stack(batch))
    # the same tiles in reverse order, or cut from other arrays, are not joined
    assert len(contiguous_runs(batch[::-1])) == len(batch)
    assert len(contiguous_runs([px.copy() for px in batch[:5]])) == 5
    assert len(contiguous_runs([px[:, :128] for px in batch[:5]])) == 5
    # a tile off the plan's grid is cut on its own, still exact
    odd = dataclasses.replace(plan.tiles[0], x=10, y=6)
    got = read_block(plan, [odd, plan.tiles[1]], read_box)
    np.testing.assert_array_equal(got[0][1], canvas[6:262, 10:266])
    np.testing.assert_array_equal(got[1][1], canvas[0:256, 192:448])


def test_sparse_plans_are_read_in_row_runs_not_empty_boxes():
    """Kept tiles far apart inside one band (tissue islands): each run of a row is read on its own."""
    import dataclasses

    card = ModelCard.from_dict({**DARK_CARD, "tile": {"size": 256, "overlap": 64}})
    full = make_plan(card, (0, 0, 6000, 6000), None)
    corners = [t for t in full.tiles if (t.row % 4, t.col % 10) in ((0, 0), (0, 1), (3, 8), (3, 9))]
    plan = dataclasses.replace(full, tiles=corners)
    blocks = blocks_of(plan)
    assert sorted(t.index for b in blocks for t in b) == sorted(t.index for t in plan.tiles)
    assert all(len({t.row for t in b}) == 1 for b in blocks)
    assert _box_area(blocks) == sum((max(t.x + t.w for t in b) - min(t.x for t in b)) * 256 for b in blocks)
    assert _box_area(blocks) < 0.9 * sum(t.w * t.h for t in plan.tiles)  # pairs of overlapping tiles (a box: 6x)
    diagonal = make_plan(card, (0, 0, 6000, 6000), None,
                         shapely.buffer(shapely.LineString([(0, 0), (6000, 6000)]), 40))
    assert any(len({t.row for t in b}) > 1 for b in blocks_of(diagonal))  # dense enough to read in boxes


def test_band_reads_reach_the_model_in_plan_order_with_the_same_regions(shapes_slide, models_dir, monkeypatch):
    """Blocks several rows tall and cut across (here 4 rows x 4 tiles) are fed to the model in plan order,
    and the regions equal those of row-by-row reads."""
    from qpbridge.engine import reading
    from qpbridge.engine.session import PlanRun

    path, _ = shapes_slide
    seen: list[int] = []
    infer = PlanRun.infer

    def spy(self, tiles, pixels):
        seen.extend(t.index for t in tiles)
        return infer(self, tiles, pixels)

    monkeypatch.setattr(PlanRun, "infer", spy)
    monkeypatch.setattr(reading, "BLOCK_PX", 208)  # 64 px tiles at a step of 48: 4 tiles across
    engine = Engine(models_dir)
    opts = RunOptions(readers=3, feeders=1, prefetch_blocks=2)
    banded = annotate_slide(engine, path, "seams", tissue_filter=False, options=opts)
    assert seen == list(range(len(banded.plan.tiles))) and banded.plan.rows > 2 * reading.BLOCK_ROWS
    assert banded.plan.cols > 3 * 4
    monkeypatch.setattr(reading, "BLOCK_ROWS", 1)
    rows = annotate_slide(engine, path, "seams", tissue_filter=False, options=opts)
    assert len(banded.features) == len(rows.features) > 0
    for a, b in zip(banded.features, rows.features, strict=True):
        assert shape(a["geometry"]).equals(shape(b["geometry"]))
