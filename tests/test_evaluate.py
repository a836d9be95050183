"""`qpbridge evaluate`: the built-in nuclei model on a generated image (GeoJSON and mask truth, a dataset folder)
and on MoNuSeg with its ImageScope XML."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from shapely.geometry import Point, mapping

from conftest import MONUSEG, need_data
from qpbridge.cli import main
from test_builtin_models import _disc_image

DISCS = [(30, 30), (30, 90), (90, 40), (150, 30), (200, 100), (40, 170), (110, 200), (220, 220), (160, 160),
         (90, 130)]
RADIUS = 8.0


def _generated(folder: Path, name: str = "gen", seed: int = 0) -> tuple[Path, np.ndarray]:
    """A 256 px H&E-like image at 0.5 µm/px with ten nuclei, and their outlines as QuPath GeoJSON beside it."""
    rgb, truth = _disc_image(256, DISCS, RADIUS, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    img = folder / f"{name}.png"
    cv2.imwrite(str(img), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    feats = [{"type": "Feature", "geometry": mapping(Point(cx, cy).buffer(RADIUS, 32)),
              "properties": {"objectType": "annotation", "classification": {"name": "Nucleus", "color": [0, 0, 255]}}}
             for cy, cx in DISCS]
    (folder / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    return img, truth


def _evaluate(data: Path, out: Path, *extra: str) -> dict:
    assert main(["--log-level", "warning", "evaluate", "--model", "nuclei", "--data", str(data), "--device", "cpu",
                 "-o", str(out), *extra]) == 0
    return json.loads(out.read_text())


def test_generated_image_geojson_and_mask_truth(tmp_path: Path, capsys) -> None:
    _generated(tmp_path / "a")
    rep = _evaluate(tmp_path / "a", tmp_path / "a.json", "--mpp", "0.5")
    (row,) = rep["images"]
    assert row["image"] == "gen.png" and row["n_true"] == 10
    # Ten well separated nuclei: all found, centroids within 3 µm, outlines close.
    assert row["n_pred"] == 10 and row["tp"] == 10 and row["f1"] == 1.0
    assert row["pq"] > 0.75 and row["aji"] > 0.75 and row["dice"] > 0.85 and row["ap50"] > 0.9
    for key in ("dice", "aji", "aji_plus", "dq", "sq", "pq", "ap", "ap50", "ap75", "bbox_ap50", "precision",
                "recall", "f1", "pixel_accuracy", "miou", "iou_nucleus"):
        assert key in rep and rep[key] == pytest.approx(row[key]), key
    table = capsys.readouterr().out
    assert "gen.png" in table and "mean" in table and "pq" in table
    # The same truth as a 16-bit label mask: the same numbers.
    b = tmp_path / "b"
    (b / "masks").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "gen.png", b / "gen.png")
    from qpbridge.tile_export import paint_geometry

    labels = np.zeros((256, 256), np.uint16)
    for i, (cy, cx) in enumerate(DISCS, 1):
        paint_geometry(labels, Point(cx, cy).buffer(RADIUS, 32), 0, 0, 1.0, i)
    cv2.imwrite(str(b / "masks" / "gen.png"), labels)
    rep_b = _evaluate(b, tmp_path / "b.json", "--mpp", "0.5")
    for key in ("pq", "aji", "aji_plus", "dice", "f1", "ap"):
        assert rep_b[key] == pytest.approx(rep[key]), key


def test_missing_pixel_size_and_empty_folder(tmp_path: Path, capsys) -> None:
    _generated(tmp_path / "a")
    assert main(["evaluate", "--model", "nuclei", "--data", str(tmp_path / "a"), "--device", "cpu"]) == 1
    assert "--mpp" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", "--model", "nuclei", "--data", str(tmp_path / "empty"), "--device", "cpu"]) == 1
    assert "holds no image" in capsys.readouterr().err


def test_dataset_folder_is_evaluated_on_its_val_tiles(tmp_path: Path) -> None:
    for i in range(3):
        _generated(tmp_path / "src", f"gen{i}", seed=i)
    ds = tmp_path / "ds"
    assert main(["--log-level", "warning", "export-tiles", str(tmp_path / "src"), "-o", str(ds), "--format",
                 "instance", "--mpp", "0.5", "--size", "256", "--val-fraction", "0.34"]) == 0
    info = json.loads((ds / "dataset.json").read_text())
    (val,) = info["split"]["val"]
    rep = _evaluate(ds, tmp_path / "m.json")  # the tiles' µm/px comes from dataset.json
    assert [r["image"] for r in rep["images"]] == [f"{val} [x=0,y=0,w=256,h=256].png"]
    assert rep["n_true"] == 10 and rep["f1"] == 1.0 and rep["pq"] > 0.75


@pytest.mark.slow
def test_monuseg_images_with_imagescope_xml(tmp_path: Path) -> None:
    need_data(MONUSEG)
    from qpbridge.annotation_files import read_imagescope_xml

    src = sorted(MONUSEG.glob("*.tif"))[0]
    for f in (src, src.with_suffix(".xml")):
        shutil.copy(f, tmp_path / f.name)
    rep = _evaluate(tmp_path, tmp_path / "m.json", "--mpp", "0.25")
    (row,) = rep["images"]
    n_xml = len(read_imagescope_xml(src.with_suffix(".xml")))
    assert n_xml * 0.97 <= row["n_true"] <= n_xml  # a few nuclei drawn over others may vanish
    # The weightless model finds most nuclei; its outlines are coarser than the hand-drawn ones.
    assert 0.2 < row["pq"] < 0.9 and 0.2 < row["aji"] < 0.9 and row["f1"] > 0.5
    assert 0 <= row["ap"] <= row["ap50"] <= 1


def test_semantic_model_pixel_accuracy_and_iou(tmp_path: Path, models_dir: Path) -> None:
    """A semantic model (the test model `dark`) against region annotations: one square right, one half drawn."""
    from test_cli import synthetic_png

    synthetic_png(tmp_path / "s.png")  # dark squares: x 50..150, y 40..80 and x 200..260, y 120..180
    feats = [{"type": "Feature", "properties": {"classification": {"name": "Dark"}}, "geometry": {
        "type": "Polygon", "coordinates": [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]}}
        for x0, y0, x1, y1 in ((50, 40, 150, 80), (200, 120, 230, 180))]  # the second: its left half only
    (tmp_path / "s.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "m.json"
    assert main(["--log-level", "warning", "evaluate", "--model", "dark", "--models-dir", str(models_dir), "--data",
                 str(tmp_path), "--device", "cpu", "-o", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["classes"] == ["Background", "Dark"]
    dark_true, dark_pred, wrong = 100 * 40 + 30 * 60, 100 * 40 + 60 * 60, 30 * 60
    assert rep["pixel_accuracy"] == pytest.approx(1 - wrong / (200 * 300))
    assert rep["iou_dark"] == pytest.approx(dark_true / dark_pred)
    bg = 200 * 300 - dark_pred
    assert rep["iou_background"] == pytest.approx(bg / (bg + wrong))
    assert rep["miou"] == pytest.approx((rep["iou_dark"] + rep["iou_background"]) / 2)
    assert "pq" not in rep  # no instance metrics for a semantic model
