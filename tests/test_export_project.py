"""`qpbridge export-tiles PROJECT`: a QuPath project's annotations read through paquo (QuPath's real classes,
../shared/paquo-qupath), or from sidecar GeoJSON files without Java; the same dataset layout either way."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import test_projects
from qpbridge.dataset import load_dataset
from qpbridge.sidecars import sidecar_path
from test_projects import PATHOLOGIST, make_project, qpbridge

paquo_env = test_projects.paquo_env  # the session fixture: QuPath's classes laid out for paquo

pytestmark = pytest.mark.slow


def _masks(root: Path) -> dict[str, np.ndarray]:
    ds = load_dataset(root)
    return {t.image.name: np.asarray(Image.open(t.mask)) for t in ds.tiles}


def test_project_through_paquo_and_through_sidecars(paquo_env: dict[str, str], tmp_path: Path) -> None:
    project = make_project(paquo_env, tmp_path, n_tif=2, png=True)
    out = tmp_path / "tiles"
    r = qpbridge(paquo_env, "export-tiles", str(project), "-o", str(out), "--paquo", "--mpp", "0.25",
                 "--tile-mpp", "1", "--size", "128", "--val-fraction", "0.34")
    assert r.returncode == 0, r.stderr
    ds = load_dataset(out)
    info = ds.info
    # Three entries (two MoNuSeg TIFFs, a PNG crop), named as QuPath names their tiles: without extension.
    names = {s["name"] for s in info["sources"]}
    assert len(names) == 3 and "crop" in names and all(not n.endswith((".tif", ".png")) for n in names)
    assert all("#" in s["annotations"] and s["annotations"].startswith(str(project)) for s in info["sources"])
    assert [c["name"] for c in ds.classes] == ["Nucleus", "Tumor"]
    assert len(info["split"]["val"]) == 1 and len(info["split"]["train"]) == 2
    assert {t.split for t in ds.tiles if t.source in info["split"]["val"]} == {"val"}
    # The pathologist's tumour box, 500 x 500 px at 0.25 µm/px: 125 x 125 px at 1 µm/px in every image; the
    # hand-drawn nucleus box (60 x 60 px) 15 x 15 in the two TIFFs (the crop holds only the tumour).
    per_source: dict[str, np.ndarray] = {}
    for t in ds.tiles:
        mask = np.asarray(Image.open(t.mask))
        counts = per_source.setdefault(t.source, np.zeros(3, np.int64))
        counts += np.bincount(mask.ravel(), minlength=3)[:3]
    for name, counts in per_source.items():
        assert counts[2] == 125 * 125, name
        assert counts[1] == (0 if name == "crop" else 15 * 15), name

    # Without Java: the same objects as sidecar GeoJSON files beside the images give the same dataset.
    for item in json.loads((tmp_path / "spec.json").read_text())["images"]:
        boxes = PATHOLOGIST if not item["path"].endswith(".png") else PATHOLOGIST[:1]
        feats = [{"type": "Feature", "properties": {"objectType": "annotation",
                                                    "classification": {"name": b["class"]}},
                  "geometry": {"type": "Polygon", "coordinates": [[
                      [b["box"][0], b["box"][1]], [b["box"][2], b["box"][1]], [b["box"][2], b["box"][3]],
                      [b["box"][0], b["box"][3]], [b["box"][0], b["box"][1]]]]}} for b in boxes]
        sidecar_path(item["path"]).write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out2 = tmp_path / "tiles_sidecars"
    r = qpbridge(paquo_env, "export-tiles", str(project / "project.qpproj"), "-o", str(out2), "--sidecars",
                 "--mpp", "0.25", "--tile-mpp", "1", "--size", "128", "--val-fraction", "0.34")
    assert r.returncode == 0, r.stderr
    a, b = _masks(out), _masks(out2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert load_dataset(out2).info["split"] == info["split"]
