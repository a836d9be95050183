"""`qpbridge export-tiles`: QuPath GeoJSON and ImageScope XML in, the dataset layout of docs/training.md out."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from conftest import MONUSEG, need_data
from qpbridge.cli import main
from qpbridge.dataset import load_dataset, parse_tile_name, split_sources, tile_name

TUMOR = (200, 0, 0)
STROMA = (0, 150, 0)


def _image(path: Path, w: int = 200, h: int = 150) -> np.ndarray:
    """A gradient image, so that every tile's pixels tell where they came from."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=2).astype(np.uint8)
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    return rgb


def _feature(geometry: dict, cls: str | None, color: tuple[int, int, int] | None,
             object_type: str = "annotation") -> dict:
    props: dict = {"objectType": object_type}
    if cls:
        props["classification"] = {"name": cls, "color": list(color or (0, 0, 0))}
    return {"type": "Feature", "id": "0b0e8d0c-6d1f-4a77-9d0a-3e9f3a1c2b11", "geometry": geometry,
            "properties": props}


def _qupath_geojson() -> dict:
    """As QuPath exports it: a tumour square with a square hole, a stroma MultiPolygon, a point (skipped)."""
    tumour = {"type": "Polygon", "coordinates": [[[10, 10], [90, 10], [90, 90], [10, 90], [10, 10]],
                                                 [[40, 40], [60, 40], [60, 60], [40, 60], [40, 40]]]}
    stroma = {"type": "MultiPolygon", "coordinates": [[[[120, 20], [180, 20], [180, 60], [120, 60], [120, 20]]],
                                                      [[[120, 100], [150, 100], [150, 130], [120, 130],
                                                        [120, 100]]]]}
    point = {"type": "Point", "coordinates": [5, 5]}
    return {"type": "FeatureCollection", "features": [
        _feature(tumour, "Tumor", TUMOR), _feature(stroma, "Stroma", STROMA), _feature(point, "Tumor", TUMOR)]}


def _export(*args: str) -> int:
    return main(["--log-level", "warning", "export-tiles", *args])


def test_semantic_tiles_masks_palette_and_dataset_json(tmp_path: Path, capsys) -> None:
    rgb = _image(tmp_path / "slide a.png")
    (tmp_path / "slide a.geojson").write_text(json.dumps(_qupath_geojson()))
    out = tmp_path / "ds"
    assert _export(str(tmp_path / "slide a.png"), "--annotations", str(tmp_path / "slide a.geojson"), "-o",
                   str(out), "--size", "64", "--licence", "CC0") == 0
    ds = json.loads((out / "dataset.json").read_text())
    assert ds["mode"] == "semantic" and ds["format"] == "semantic" and ds["licence"] == "CC0"
    assert [(c["name"], c["label"], c["color"]) for c in ds["classes"]] == [("Stroma", 1, list(STROMA)),
                                                                           ("Tumor", 2, list(TUMOR))]
    # 200 x 150 in 64 px tiles: x 0, 64, 128, 192 (8 px wide); y 0, 64, 128 (22 px high). Tiles without any
    # annotation are left out: x=192 (annotations end at 180) and (0, 128) (the tumour ends at y 90).
    regions = sorted((t["x"], t["y"], t["w"], t["h"]) for t in ds["tiles"])
    assert regions == sorted([(0, 0, 64, 64), (64, 0, 64, 64), (128, 0, 64, 64), (0, 64, 64, 64),
                              (64, 64, 64, 64), (128, 64, 64, 64), (64, 128, 64, 22), (128, 128, 64, 22)])
    labels = json.loads((out / "labels.json").read_text())
    assert labels["mode"] == "semantic" and labels["labels"] == {"Stroma": 1, "Tumor": 2}
    full = np.zeros((150, 200), np.uint8)
    for t in ds["tiles"]:
        assert t["source"] == "slide a" and t["split"] == "train" and t["downsample"] == 1
        name = Path(t["image"]).stem
        assert name == tile_name("slide a", t["x"], t["y"], t["w"], t["h"], 1.0)
        assert parse_tile_name(name) == {"source": "slide a", "x": t["x"], "y": t["y"], "w": t["w"],
                                         "h": t["h"], "downsample": 1.0}
        tile = cv2.cvtColor(cv2.imread(str(out / t["image"])), cv2.COLOR_BGR2RGB)
        assert np.array_equal(tile, rgb[t["y"]:t["y"] + t["h"], t["x"]:t["x"] + t["w"]])
        mask = Image.open(out / t["mask"])
        assert mask.mode == "P" and mask.size == (t["w"], t["h"])
        assert mask.getpalette()[:9] == [0, 0, 0, *STROMA, *TUMOR]
        full[t["y"]:t["y"] + t["h"], t["x"]:t["x"] + t["w"]] = np.asarray(mask)
    # Pixel centres inside a polygon take its label: the tumour's ring, not its hole; the stroma's two parts.
    assert full[10, 10] == 2 and full[89, 89] == 2 and full[9, 10] == 0 and full[90, 50] == 0
    assert full[50, 50] == 0 and full[39, 50] == 2 and full[40, 50] == 0
    assert full[20, 120] == 1 and full[129, 149] == 1 and full[80, 130] == 0
    assert (full == 2).sum() == 80 * 80 - 20 * 20 and (full == 1).sum() == 60 * 40 + 30 * 30
    assert "8 tiles from 1 image" in capsys.readouterr().out


def test_instance_coco_points_at_half_resolution(tmp_path: Path) -> None:
    """QuPath's own Feature list (no FeatureCollection), detections, tiles at 2x the pixel size."""
    _image(tmp_path / "img.png", 240, 240)
    squares = [(10, 10, 30, 30), (26, 14, 50, 40), (120, 120, 160, 150)]  # the first two overlap
    feats = [_feature({"type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
                      None, None, "detection") for x0, y0, x1, y1 in squares]
    (tmp_path / "img.geojson").write_text(json.dumps(feats))
    for fmt in ("instance", "coco", "points"):
        out = tmp_path / fmt
        assert _export(str(tmp_path / "img.png"), "-o", str(out), "--format", fmt, "--mpp", "0.25",
                       "--tile-mpp", "0.5", "--size", "100") == 0
        ds = load_dataset(out)
        assert ds.mode == "instances" and ds.format == fmt and ds.mpp == 0.5
        assert [c["name"] for c in ds.classes] == ["Nucleus"]
        # 240 px at downsample 2 = 120 tile px: tiles of 200 full-res px at x, y in {0, 200}; only (0, 0) holds
        # objects.
        assert [(t.x, t.y, t.w, t.h, t.downsample) for t in ds.tiles] == [(0, 0, 200, 200, 2.0)]
        t = ds.tiles[0]
        assert t.image.name == "img [d=2,x=0,y=0,w=200,h=200].png"
        inst = cv2.imread(str(t.mask), cv2.IMREAD_UNCHANGED)
        assert inst.dtype == np.uint16 and inst.shape == (100, 100)
        ids = [int(i) for i in np.unique(inst) if i]
        assert len(ids) == 3
        # The smaller square is drawn over the larger one where they overlap; each keeps its own label.
        assert inst[7, 7] != inst[10, 20] and inst[10, 20] > 0 and inst[65, 65] > 0
        assert inst[8, 14] == inst[7, 7]
        assert (inst == inst[65, 65]).sum() == 20 * 15
        types = np.asarray(Image.open(t.types))
        assert set(np.unique(types)) == {0, 1} and np.array_equal(types > 0, inst > 0)
    coco = json.loads((tmp_path / "coco" / "coco" / "train.json").read_text())
    assert [c["name"] for c in coco["categories"]] == ["Nucleus"]
    anns = sorted(coco["annotations"], key=lambda a: a["bbox"])
    assert [a["bbox"] for a in anns] == [[5, 5, 10, 10], [13, 7, 12, 13], [60, 60, 20, 15]]
    assert [a["area"] for a in anns] == [100, 156, 300] and all(a["iscrowd"] == 0 for a in anns)
    assert coco["images"][0]["file_name"] == "img [d=2,x=0,y=0,w=200,h=200].png"
    from pycocotools.coco import COCO

    api = COCO(str(tmp_path / "coco" / "coco" / "train.json"))
    (big,) = [a for a in api.loadAnns(api.getAnnIds()) if a["area"] == 300]
    mask = api.annToMask(big)
    assert mask.sum() == pytest.approx(300, rel=0.1)
    pts = json.loads((tmp_path / "points" / "points" / f"{t.image.stem}.json").read_text())
    assert sorted((p["x"], p["y"]) for p in pts) == [(10, 10), (19, 13.5), (70, 67.5)]
    assert {(p["class"], p["label"]) for p in pts} == {("Nucleus", 1)}  # unclassified: --default-class


def test_split_by_image_deterministic_and_order_free(tmp_path: Path) -> None:
    names = [f"img{i}.png" for i in range(5)]
    stems = [Path(n).stem for n in names]
    for n in names:
        _image(tmp_path / n, 64, 64)
        (tmp_path / (Path(n).stem + ".geojson")).write_text(json.dumps(_qupath_geojson()["features"][:1]))
    a, b = tmp_path / "a", tmp_path / "b"
    assert _export(str(tmp_path), "-o", str(a), "--val-fraction", "0.4", "--size", "32", "--seed", "3") == 0
    # The same images in another order, two exports into one folder: the same split.
    assert _export(*[str(tmp_path / n) for n in names[3:]], "-o", str(b), "--val-fraction", "0.4", "--size", "32",
                   "--seed", "3") == 0
    assert _export(*[str(tmp_path / n) for n in reversed(names[:3])], "-o", str(b), "--val-fraction", "0.4",
                   "--size", "32", "--seed", "3") == 0
    da, db = json.loads((a / "dataset.json").read_text()), json.loads((b / "dataset.json").read_text())
    assert da["split"] == db["split"] and len(da["split"]["val"]) == 2 and len(da["split"]["train"]) == 3
    assert da["split"]["val"] == sorted(n for n, s in split_sources(stems, 0.4, 3).items() if s == "val")
    by_tile = {t["image"]: t["split"] for t in da["tiles"]}
    assert by_tile == {t["image"]: t["split"] for t in db["tiles"]} and len(by_tile) == 5 * 4
    for t in da["tiles"]:
        assert t["split"] == ("val" if t["source"] in da["split"]["val"] else "train")
    # A folder with only labels.json (an older QuPath script): the same tiles and split, rebuilt from names.
    (a / "dataset.json").unlink()
    old = load_dataset(a)
    default = split_sources(stems)  # labels.json records no split: the default fraction and seed
    assert {t.image.name: t.split for t in old.tiles} == {Path(k).name: default[v["source"]]
                                                          for k, v in ((t["image"], t) for t in da["tiles"])}
    assert len(old.tiles) == 20 and old.mode == "semantic" and {t.source for t in old.tiles} == set(stems)


def test_clear_errors(tmp_path: Path, capsys) -> None:
    _image(tmp_path / "a.png", 100, 100)
    (tmp_path / "a.geojson").write_text(json.dumps(_qupath_geojson()))
    assert _export(str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--classes", "Tumor") == 1
    err = capsys.readouterr().err
    assert "unknown class 'Stroma'" in err and "a.geojson" in err and "--classes" in err
    far = [_feature({"type": "Polygon", "coordinates": [[[500, 500], [600, 500], [600, 600], [500, 500]]]},
                    "Tumor", TUMOR)]
    (tmp_path / "far.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": far}))
    assert _export(str(tmp_path / "a.png"), "--annotations", str(tmp_path / "far.geojson"), "-o",
                   str(tmp_path / "o")) == 1
    assert "lie outside the image (100 x 100 px)" in capsys.readouterr().err
    assert _export(str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--tile-mpp", "0.5") == 1
    err = capsys.readouterr().err
    assert "no pixel size" in err and "--mpp" in err
    (tmp_path / "b.png").write_bytes((tmp_path / "a.png").read_bytes())
    assert _export(str(tmp_path / "b.png"), "-o", str(tmp_path / "o")) == 1
    assert "no annotation file" in capsys.readouterr().err
    (tmp_path / "bad.xml").write_text("<Other/>")
    assert _export(str(tmp_path / "a.png"), "--annotations", str(tmp_path / "bad.xml"), "-o", str(tmp_path / "o")) == 1
    assert "not an ImageScope annotation file" in capsys.readouterr().err
    assert not (tmp_path / "o" / "dataset.json").exists()


def test_annotate_output_round_trip(tmp_path: Path, models_dir: Path) -> None:
    """GeoJSON as `qpbridge predict`/`annotate` write it (detections with classification name and colour)."""
    from test_cli import synthetic_png

    img = synthetic_png(tmp_path / "a.png")
    out = tmp_path / "a.geojson"
    assert main(["predict", str(img), "--model", "dark", "-o", str(out), "--models-dir", str(models_dir),
                 "--device", "cpu"]) == 0
    feats = json.loads(out.read_text())["features"]
    assert _export(str(img), "-o", str(tmp_path / "ds"), "--format", "instance", "--size", "512") == 0
    ds = load_dataset(tmp_path / "ds")
    assert [c["name"] for c in ds.classes] == ["Dark"] and ds.classes[0]["color"] == [10, 20, 30]
    inst = cv2.imread(str(ds.tiles[0].mask), cv2.IMREAD_UNCHANGED)
    areas = sorted(int((inst == i).sum()) for i in np.unique(inst) if i)
    assert areas == pytest.approx(sorted(shape(f["geometry"]).area for f in feats), rel=0.02)


def test_monuseg_xml_instances(tmp_path: Path) -> None:
    need_data(MONUSEG)
    src = sorted(MONUSEG.glob("*.tif"))[0]
    for f in (src, src.with_suffix(".xml")):
        shutil.copy(f, tmp_path / f.name)
    out = tmp_path / "ds"
    assert _export(str(tmp_path / src.name), "-o", str(out), "--format", "instance", "--mpp", "0.25",
                   "--tile-mpp", "0.5", "--size", "256", "--licence", "CC BY-NC-SA 4.0") == 0
    ds = load_dataset(out)
    from qpbridge.annotation_files import read_imagescope_xml

    objs = read_imagescope_xml(src.with_suffix(".xml"))
    assert len(objs) > 300
    assert len(ds.tiles) == 4 and ds.licence == "CC BY-NC-SA 4.0"
    fg = sum(int((cv2.imread(str(t.mask), cv2.IMREAD_UNCHANGED) > 0).sum()) for t in ds.tiles)
    from shapely import union_all

    true_fg = union_all([o.geometry for o in objs]).area / 4  # full-res px -> tile px at downsample 2
    assert fg == pytest.approx(true_fg, rel=0.03)


def test_large_outline_cut_per_tile(tmp_path: Path) -> None:
    """A tissue outline of 20,000 vertices over many tiles: each tile paints its part, the parts add up."""
    from shapely.geometry import Point, mapping

    _image(tmp_path / "big.png", 1500, 1500)
    disc = Point(750, 750).buffer(600, 5000)
    disc = disc.difference(Point(750, 750).buffer(100, 64))  # with a hole crossing tile borders
    feats = [{"type": "Feature", "geometry": mapping(disc),
              "properties": {"objectType": "annotation", "classification": {"name": "Tissue", "color": [1, 2, 3]}}}]
    (tmp_path / "big.geojson").write_text(json.dumps(feats))
    assert _export(str(tmp_path / "big.png"), "-o", str(tmp_path / "ds"), "--size", "256") == 0
    ds = load_dataset(tmp_path / "ds")
    assert len(ds.tiles) == 32  # 6 x 6 tiles of 256 px (the last ones 220 px) less the 4 corners, off the disc
    total = sum(int((np.asarray(Image.open(t.mask)) == 1).sum()) for t in ds.tiles)
    assert total == pytest.approx(disc.area, rel=0.002)


def test_adding_to_a_folder_coco_ids_and_stale_tiles(tmp_path: Path, capsys) -> None:
    """Two exports into one COCO folder: both images in the split files with unique ids; a source exported again
    replaces its tiles (files of tiles it no longer has are removed); another tile size is refused."""
    sq = [_feature({"type": "Polygon", "coordinates": [[[20, 20], [40, 20], [40, 40], [20, 40], [20, 20]]]},
                   None, None, "detection")]  # across the corner of four 32 px tiles
    for n in ("a", "b", "c"):
        _image(tmp_path / f"{n}.png", 96, 96)
        (tmp_path / f"{n}.geojson").write_text(json.dumps(sq))
    out = tmp_path / "ds"
    opts = ["--format", "coco", "--size", "32", "--val-fraction", "0.34"]
    assert _export(str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(out), *opts, "--all-tiles") == 0
    assert len(list((out / "images").glob("a *.png"))) == 9
    assert _export(str(tmp_path / "c.png"), str(tmp_path / "a.png"), "-o", str(out), *opts) == 0
    ds = load_dataset(out)
    assert sorted({t.source for t in ds.tiles}) == ["a", "b", "c"]
    # a again, without --all-tiles: only the 4 tiles its square touches remain, on disk too.
    assert len([t for t in ds.tiles if t.source == "a"]) == 4 == len(list((out / "images").glob("a *.png")))
    assert len(list((out / "masks").glob("a *.png"))) == 4 and len(list((out / "types").glob("a *.png"))) == 4
    coco = {s: json.loads((out / "coco" / f"{s}.json").read_text()) for s in ("train", "val")}
    files = {s: sorted(im["file_name"] for im in c["images"]) for s, c in coco.items()}
    by_split = {s: sorted(t.image.name for t in ds.split(s)) for s in ("train", "val")}
    assert files == by_split and len(ds.split("val")) > 0
    for c in coco.values():
        assert [im["id"] for im in c["images"]] == list(range(1, len(c["images"]) + 1))
        assert len({a["id"] for a in c["annotations"]}) == len(c["annotations"])
        assert {a["image_id"] for a in c["annotations"]} <= {im["id"] for im in c["images"]}
    capsys.readouterr()
    assert _export(str(tmp_path / "c.png"), "-o", str(out), "--format", "coco", "--size", "64") == 1
    assert "tiles of 32 px" in capsys.readouterr().err


def test_slide_svs_with_a_region(tmp_path: Path) -> None:
    """An Aperio SVS read region by region (its own pixel size), tiles at 2 µm/px around a tumour outline."""
    from conftest import CMU_SVS
    from qpbridge.slides import Slide

    svs = need_data(CMU_SVS)
    region = {"type": "Polygon", "coordinates": [[[400, 600], [1400, 600], [1400, 1600], [400, 1600], [400, 600]]]}
    (tmp_path / "cmu.geojson").write_text(json.dumps([_feature(region, "Tumor", TUMOR)]))
    out = tmp_path / "ds"
    assert _export(str(svs), "--annotations", str(tmp_path / "cmu.geojson"), "-o", str(out), "--tile-mpp", "2",
                   "--size", "128") == 0
    ds = load_dataset(out)
    slide = Slide(svs)
    d = 2.0 / slide.require_mpp()
    assert ds.mpp == 2.0 and all(t.downsample == pytest.approx(d, rel=1e-5) for t in ds.tiles)
    assert ds.info["sources"][0]["path"] == str(svs.resolve()) and ds.tiles[0].source == "CMU-1-Small-Region"
    tumour = sum(int((np.asarray(Image.open(t.mask)) == 1).sum()) for t in ds.tiles)
    assert tumour == pytest.approx(1000 * 1000 / d**2, rel=0.01)
    t = ds.tiles[0]
    ow, oh = Image.open(t.image).size
    expected = slide.read(t.x, t.y, t.x + t.w, t.y + t.h, ow, oh)
    assert np.array_equal(np.asarray(Image.open(t.image)), expected)
    slide.close()
