"""The installed QuPath scripts, RUN on QuPath's real core classes (0.5.1 on Java 17, 0.6.0 on Java 21).

`qpbridge install-qupath` writes the scripts; tests/qupath/run_scripts.groovy runs them the way QuPath runs a
script (QuPath's default imports prepended, the per-thread batch image set, batch attributes bound) on a real
`ImageData` of a real H&E image (MoNuSeg, 0.25 µm/px) with a real hierarchy, selection and, for "Run for
project", a real `DefaultProject`; the scripts talk to a running qpbridge server. The only stand-ins are the
static helpers of QuPath's QP/QPEx (not in qupath-core; tests/qupath/standins, QuPath's own signatures) and,
for the GUI-error test alone, QuPathGUI.getInstance() and Dialogs (tests/qupath/gui_standins).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import shapely.geometry
from PIL import Image

from conftest import MONUSEG, RunningServer, need_data, start_server, write_pyramid
from qpbridge.cli import main
from qpbridge.install_qupath import install_qupath
from qpbridge.sidecars import sidecar_path
from qupath_tools import HERE, QUPATH, VERSIONS, compile_groovy, run_groovy, set_parameters

pytestmark = [pytest.mark.groovy, pytest.mark.slow]

IMAGE = "TCGA-21-5784-01Z-00-DX1.tif"  # 1000 x 1000 px H&E
IMAGE2 = "TCGA-21-5786-01Z-00-DX1.tif"
HARNESS = HERE / "qupath" / "run_scripts.groovy"
ROI1 = (100, 100, 400, 300)  # the pathologist's "roi1" (Tumor), x, y, w, h
MINE = (600, 600, 200, 200)  # another of the pathologist's annotations, never selected


@dataclass
class Tools:
    version: str
    standins: Path
    gui_standins: Path
    scripts: Path  # the installed scripts (QuPath user dir / scripts / qpbridge)


@pytest.fixture(scope="module", params=VERSIONS)
def qupath(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tools:
    version = str(request.param)
    root = tmp_path_factory.mktemp(f"qupath-{version}")
    standins = compile_groovy(version, sorted((HERE / "qupath" / "standins").rglob("*.groovy")), root / "standins")
    gui = compile_groovy(version, sorted((HERE / "qupath" / "gui_standins").rglob("*.groovy")), root / "gui")
    user = root / "QuPath"
    assert install_qupath(user, QUPATH / "common" / "jeromq-0.3.6.jar", out=lambda s: None) == 0
    return Tools(version, standins, gui, user / "scripts" / "qpbridge")


def script(tools: Tools, name: str, folder: Path, **params: str) -> Path:
    """The installed script with its parameters edited (Groovy literals), saved as a new file."""
    text = (tools.scripts / f"{name}.groovy").read_text(encoding="utf-8")
    out = folder / f"{name.replace(' ', '_')}_{len(list(folder.glob('*.groovy')))}.groovy"
    out.write_text(set_parameters(text, params), encoding="utf-8")
    return out


def q(s: str | Path) -> str:
    """A Groovy string literal."""
    return "'" + str(s).replace("\\", "\\\\").replace("'", "\\'") + "'"


def run(tools: Tools, scenario: dict[str, Any], folder: Path, gui: bool = False) -> tuple[list[dict[str, Any]],
                                                                                            list[str], str]:
    """Runs a scenario; returns the step results, each step's log, and stdout."""
    path = folder / f"scenario_{len(list(folder.glob('scenario_*.json')))}.json"
    path.write_text(json.dumps(scenario), encoding="utf-8")
    extra = [tools.standins, *([tools.gui_standins] if gui else [])]
    results, proc = run_groovy(tools.version, HARNESS, [str(path)], extra_cp=extra)
    logs = re.split(r"^QPB-STEP \d+$", proc.stderr, flags=re.MULTILINE)[1:]
    assert len(results) == len(scenario["steps"]) == len(logs), proc.stderr[-3000:]
    return results, logs, proc.stdout


def dump(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def named(objects: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["feature"]["properties"].get("name") == name]


def of_model(objects: list[dict[str, Any]], cls: str, parent: str | None) -> list[dict[str, Any]]:
    """The objects of one class below one parent (None: the root), drawn by no one."""
    return [o for o in objects if (o["feature"]["properties"].get("classification") or {}).get("name") == cls
            and o.get("parent") == parent and "name" not in o["feature"]["properties"]]


def error_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if " ERROR " in line]


def assert_one_clear_error(log: str, *needles: str) -> str:
    """ONE error line, no stack trace, no Groovy exception text."""
    (line,) = error_lines(log)
    assert "qpbridge" in line
    for n in needles:
        assert n in line, line
    assert not re.search(r"^\s+at ", log, re.MULTILINE), log
    assert "SCRIPT FAILED" not in log and "Exception" not in line
    return line


@pytest.fixture
def slide_server(models_dir: Path) -> Iterator[RunningServer]:
    """A server that may read the MoNuSeg images itself (--slide-root)."""
    running = start_server(models_dir, slide_roots=[MONUSEG])
    yield running
    running.server.stop()
    running.thread.join(10)


def test_run_model_replace_tissue_status_and_errors(qupath: Tools, server: RunningServer,
                                                    slide_server: RunningServer, tmp_path: Path) -> None:
    """The pathologist's path on one image: nuclei in a selected annotation, a re-run, tissue, status, errors."""
    image = need_data(MONUSEG / IMAGE)
    addr = q(server.address)
    steps = [
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER=addr), "select": ["roi1"], "dump": "d0"},
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER=addr), "select": ["roi1"], "dump": "d1"},
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER=addr, MODEL="'tissue'"), "dump": "d2"},
        {"script": script(qupath, "qpbridge server status", tmp_path, SERVER=addr)},
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER="'tcp://127.0.0.1:9'")},
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER=addr, MODEL="'nope'")},
        # A server that reads the file itself; the TIFF has no pixel size, QuPath's calibration is sent.
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER=q(slide_server.address)), "select": ["mine"],
         "dump": "d6"},
        # ... and the same with the tiles read in QuPath.
        {"script": script(qupath, "Run qpbridge model", tmp_path, SERVER=q(slide_server.address),
                          USE_SERVER_SIDE_READING="false"), "select": ["mine"], "dump": "d7"},
    ]
    for s in steps:
        s["image"] = "a"
        s["script"] = str(s["script"])
        if "dump" in s:
            s["dump"] = str(tmp_path / f"{s['dump']}.json")
    scenario = {"images": [{
        "key": "a", "file": str(image), "mpp": 0.25,
        "annotations": [{"name": "roi1", "class": "Tumor", "x": ROI1[0], "y": ROI1[1], "w": ROI1[2], "h": ROI1[3]},
                        {"name": "mine", "class": "Stroma", "x": MINE[0], "y": MINE[1], "w": MINE[2], "h": MINE[3]}],
        # Hand-drawn detections: an untagged "Nucleus" inside roi1 and a "Lymphocyte" inside "mine".
        "detections": [{"name": "hand", "class": "Nucleus", "x": 150, "y": 150, "w": 20, "h": 20},
                       {"name": "lymph", "class": "Lymphocyte", "x": 700, "y": 700, "w": 15, "h": 15}]}],
        "steps": steps}
    results, logs, _ = run(qupath, scenario, tmp_path)
    assert all(r["ok"] for r in results), results  # no exception ever escapes a script
    full_log = "\n".join(logs)
    assert "Exception setting metadata" not in full_log and "UnsupportedOperationException" not in full_log
    tags = qupath.version != "0.5.1"  # QuPath 0.5 cannot keep metadata on detections

    # 1. Nuclei land as detections below the selected annotation, classified, coloured, measured, clipped to it.
    d0 = dump(tmp_path / "d0.json")
    nuclei = of_model(d0, "Nucleus", "roi1")
    assert len(nuclei) > 20
    box = shapely.geometry.box(ROI1[0], ROI1[1], ROI1[0] + ROI1[2], ROI1[1] + ROI1[3])
    for o in nuclei:
        props = o["feature"]["properties"]
        assert props["objectType"] == "detection"
        assert props["classification"]["color"] and len(props["classification"]["color"]) == 3
        assert props["measurements"] and all(isinstance(v, (int, float)) for v in props["measurements"].values())
        assert shapely.geometry.shape(o["feature"]["geometry"]).difference(box).area < 1.0
        assert (o.get("metadata_api") or {}).get("qpbridge.model") == ("nuclei" if tags else None)
    assert "roi1 (Tumor)" in logs[0] and "added" in logs[0]
    n0 = len(nuclei)

    # 2. Re-run with replace: the same nuclei, no duplicates; the pathologist's objects kept.
    d1 = dump(tmp_path / "d1.json")
    assert len(of_model(d1, "Nucleus", "roi1")) == n0
    assert f"replaced {n0}" in logs[1]
    for name in ("roi1", "mine", "lymph"):
        assert len(named(d1, name)) == 1, name
    assert named(d1, "lymph")[0].get("parent") == "mine"
    # The untagged hand-drawn "Nucleus" detection: kept where QuPath keeps tags (0.6); on 0.5 a detection of the
    # model's class and type without a tag counts as an earlier result (docs/qupath.md says so).
    assert len(named(d1, "hand")) == (1 if tags else 0)

    # 3. Tissue on the whole image: annotations below the root, tagged; the nuclei below roi1 untouched.
    d2 = dump(tmp_path / "d2.json")
    tissue = [o for o in d2 if o.get("parent") is None and o["feature"]["properties"].get("objectType") == "annotation"
              and (o.get("metadata_api") or {}).get("qpbridge.model") == "tissue"]
    assert tissue and all(o["feature"]["properties"]["classification"]["name"] for o in tissue)
    assert sum(shapely.geometry.shape(o["feature"]["geometry"]).area for o in tissue) > 0.5 * 1000 * 1000
    assert len(of_model(d2, "Nucleus", "roi1")) == n0

    # 4. Status: server version, protocol, models.
    assert f"at {server.address}: protocol 1" in logs[3] and "nuclei" in logs[3] and "tissue" in logs[3]
    # 5. No server: one clear line saying how to start it. 6. Unknown model: one line naming the served ones.
    assert_one_clear_error(logs[4], "No qpbridge server answered", "qpbridge serve")
    assert_one_clear_error(logs[5], "no model 'nope'", "nuclei")
    # 7. Server-side reading of the image file, with QuPath's pixel size.
    assert "the server reads the slide itself" in logs[6]
    assert "sending QuPath's calibration (0.25 µm/px)" in logs[6]
    assert "server-side reading is switched off" in logs[7]
    # Same region, pixels resampled by the server (tiffslide + OpenCV) or by QuPath: nearly the same nuclei.
    on_server = len(of_model(dump(tmp_path / "d6.json"), "Nucleus", "mine"))
    in_qupath = len(of_model(dump(tmp_path / "d7.json"), "Nucleus", "mine"))
    assert on_server >= 3 and abs(on_server - in_qupath) <= max(2, 0.2 * in_qupath)


def test_error_shows_a_dialog_in_the_gui(qupath: Tools, tmp_path: Path) -> None:
    """With QuPath's GUI classes present: the same one line in the log, and a dialog (a notification in batch)."""
    image = need_data(MONUSEG / IMAGE)
    dead = script(qupath, "Run qpbridge model", tmp_path, SERVER="'tcp://127.0.0.1:9'")
    scenario = {"images": [{"key": "a", "file": str(image), "mpp": 0.25}],
                "steps": [{"image": "a", "script": str(dead)},
                          {"image": "a", "script": str(dead), "batch": {"index": 0, "size": 3}}]}
    results, logs, stdout = run(qupath, scenario, tmp_path, gui=True)
    assert all(r["ok"] for r in results)
    line = assert_one_clear_error(logs[0], "No qpbridge server answered")
    dialogs = [d for d in stdout.splitlines() if d.startswith("DIALOG ")]
    assert len(dialogs) == 2
    kind, title, message = dialogs[0][len("DIALOG "):].split("|", 2)
    assert kind == "message" and title == "qpbridge: Run qpbridge model failed"
    assert message in line  # the log line and the dialog say the same
    assert dialogs[1].startswith("DIALOG notification|")


def test_kill_running_script(qupath: Tools, server: RunningServer, tmp_path: Path) -> None:
    """QuPath's "Kill running script" (an interrupt of the script thread): one line, job cancelled, nothing added."""
    image = need_data(MONUSEG / IMAGE)
    # The test model 'slow' at 1 µm/px on 1000 px: 256 tiles of 64 px at 50 ms each, about 13 s of work.
    slow = script(qupath, "Run qpbridge model", tmp_path, SERVER=q(server.address), MODEL="'slow'",
                  PIXEL_SIZE_UM="1.0", BATCH_SIZE="8")
    scenario = {"images": [{"key": "a", "file": str(image), "mpp": 0.25}],
                "steps": [{"image": "a", "script": str(slow), "interrupt_after_s": 3.0,
                           "dump": str(tmp_path / "k.json")}]}
    (r,), (log,), _ = run(qupath, scenario, tmp_path)
    assert r["ok"] and not r["alive"] and r["returned_after_interrupt_s"] < 10  # about 1 s unloaded
    assert not r["interrupted"]  # QuPath's saving after the script is not cut short
    assert dump(tmp_path / "k.json") == []  # nothing added
    assert error_lines(log) == [] and not re.search(r"^\s+at ", log, re.MULTILINE)
    (line,) = [x for x in log.splitlines() if "stopped by the user" in x]
    assert " WARN " in line and "cancelled" in line
    assert re.search(r"cancelled server job \w+ \(state cancelled\)", log)


def test_sidecar_round_trip(qupath: Tools, tmp_path: Path) -> None:
    """`qpbridge annotate --sidecar` writes the file the Import script finds beside the image, or in a folder."""
    rgb = cv2.imread(str(need_data(MONUSEG / IMAGE)), cv2.IMREAD_COLOR)[:600, :600, ::-1]
    tif = write_pyramid(tmp_path / "slide one.tif", np.ascontiguousarray(rgb), 0.25, levels=1, compression=None)
    assert main(["annotate", str(tif), "--model", "nuclei", "--sidecar", "--quiet", "--no-tissue-filter"]) == 0
    beside = sidecar_path(tif)
    assert beside.name == "slide one.tif.qpbridge.geojson" and beside.is_file()
    other = tmp_path / "elsewhere"
    assert main(["annotate", str(tif), "--model", "tissue", "--sidecar", str(other), "--quiet"]) == 0
    n_nuclei = len(json.loads(beside.read_text())["features"])
    n_tissue = len(json.loads(sidecar_path(tif, other).read_text())["features"])
    assert n_nuclei > 50 and n_tissue >= 1

    imp = "Import qpbridge GeoJSON"
    steps = [{"script": script(qupath, imp, tmp_path), "dump": "i0"},  # default: beside the image
             {"script": script(qupath, imp, tmp_path), "dump": "i1"},  # again: replaced, not doubled
             {"script": script(qupath, imp, tmp_path, SIDECAR=q(other)), "dump": "i2"},  # a folder
             {"script": script(qupath, imp, tmp_path, SIDECAR=q(beside)), "dump": "i3"},  # the file itself
             {"script": script(qupath, imp, tmp_path, SIDECAR=q(tmp_path / "missing"))}]
    for s in steps:
        s["image"] = "a"
        s["script"] = str(s["script"])
        if "dump" in s:
            s["dump"] = str(tmp_path / f"{s['dump']}.json")
    scenario = {"images": [{"key": "a", "file": str(tif), "mpp": 0.25}], "steps": steps}
    results, logs, _ = run(qupath, scenario, tmp_path)
    assert all(r["ok"] for r in results)

    def model_objects(d: list[dict[str, Any]], cls: str) -> list[dict[str, Any]]:
        return [o for o in d if (o["feature"]["properties"].get("classification") or {}).get("name") == cls]

    i0, i1 = dump(tmp_path / "i0.json"), dump(tmp_path / "i1.json")
    assert len(model_objects(i0, "Nucleus")) == n_nuclei
    assert f"imported {n_nuclei} objects from {beside}" in logs[0]
    assert len(model_objects(i1, "Nucleus")) == n_nuclei and f"replaced {n_nuclei}" in logs[1]
    i2 = dump(tmp_path / "i2.json")
    assert len(model_objects(i2, "Nucleus")) == n_nuclei and len(i2) == n_nuclei + n_tissue
    assert len(model_objects(dump(tmp_path / "i3.json"), "Nucleus")) == n_nuclei
    assert_one_clear_error(logs[4], "does not exist")
    assert "Exception setting metadata" not in "\n".join(logs)


def test_run_for_project_and_export_tiles(qupath: Tools, server: RunningServer, tmp_path: Path) -> None:
    """'Run for project' on a DefaultProject: each entry read, annotated, saved; tiles and masks exported."""
    images = [need_data(MONUSEG / IMAGE), need_data(MONUSEG / IMAGE2)]
    addr = q(server.address)
    project = tmp_path / "project"
    run_model = str(script(qupath, "Run qpbridge model", tmp_path, SERVER=addr))
    sem = tmp_path / "semantic"
    inst = tmp_path / "instances"
    export_sem = str(script(qupath, "Export training tiles", tmp_path, OUTPUT_DIR=q(sem)))
    export_inst = str(script(qupath, "Export training tiles", tmp_path, OUTPUT_DIR=q(inst), MODE="'instances'",
                             PIXEL_SIZE_UM="0.5", TILE_SIZE="256", ANNOTATED_TILES_ONLY="false"))
    export_default = str(script(qupath, "Export training tiles", tmp_path))
    steps: list[dict[str, Any]] = []
    for i, key in enumerate(("a", "b")):
        steps.append({"image": key, "script": run_model, "batch": {"index": i, "size": 2}})
    for key in ("a", "b"):
        steps.append({"image": key, "dump": str(tmp_path / f"saved_{key}.json")})  # as saved in the project
    for exp in (export_sem, export_inst, export_default):
        for i, key in enumerate(("a", "b")):
            steps.append({"image": key, "script": exp, "batch": {"index": i, "size": 2}})
    annotations = [{"name": "roi1", "class": "Tumor", "x": ROI1[0], "y": ROI1[1], "w": ROI1[2], "h": ROI1[3]},
                   {"name": "mine", "class": "Stroma", "x": MINE[0], "y": MINE[1], "w": MINE[2], "h": MINE[3]}]
    scenario = {"project": str(project),
                "images": [{"key": k, "file": str(p), "mpp": 0.25, "name": f"entry {k}", "annotations": annotations}
                           for k, p in zip(("a", "b"), images, strict=True)],
                "steps": steps}
    results, logs, _ = run(qupath, scenario, tmp_path)
    assert all(r.get("ok", True) for r in results), results
    assert "image 1 of 2: entry a" in logs[0] and "image 2 of 2: entry b" in logs[1]
    for key in ("a", "b"):
        saved = dump(tmp_path / f"saved_{key}.json")
        assert len(of_model(saved, "Nucleus", None)) > 100  # whole image: below the root, read back from disk
        assert len(named(saved, "roi1")) == 1 and len(named(saved, "mine")) == 1

    # Semantic: one 250 x 250 px tile per image at 1 µm/px (a partial tile, kept), 8-bit masks of 2 classes.
    tiles = sorted((sem / "images").glob("*.png"))
    masks = sorted((sem / "masks").glob("*.png"))
    assert len(tiles) == 2 and [m.name for m in masks] == [t.name for t in tiles]
    labels = json.loads((sem / "labels.json").read_text())
    assert labels["mode"] == "semantic" and labels["labels"] == {"Stroma": 1, "Tumor": 2} and labels["mask_bits"] == 8
    for t, m in zip(tiles, masks, strict=True):
        img, png = cv2.imread(str(t)), Image.open(m)
        assert png.mode == "P"  # QuPath writes 8-bit palette PNGs: the pixel values are the labels
        mask = np.asarray(png)
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2] == (250, 250)
        assert set(np.unique(mask)) == {0, 1, 2}
        assert (mask == 2).sum() == pytest.approx(100 * 75, rel=0.05)  # roi1: 400 x 300 px at 0.25 -> 100 x 75
    # Instances from the nuclei: 16-bit labels, one per nucleus, 2 x 2 tiles of 256 px per image at 0.5 µm/px.
    inst_masks = sorted((inst / "masks").glob("*.png"))
    assert len(inst_masks) == 8
    m = np.asarray(Image.open(inst_masks[0]))
    assert m.dtype == np.uint16 and len(np.unique(m)) > 20
    assert json.loads((inst / "labels.json").read_text())["mask_bits"] == 16
    # Defaults in a project: <project>/training_tiles.
    assert len(list((project / "training_tiles" / "masks").glob("*.png"))) == 2


NUCLEI = [(150, 160, 40, 30), (300, 420, 36, 36), (700, 200, 50, 34), (520, 530, 30, 44), (880, 860, 40, 40)]


def test_export_tiles_script_and_cli_write_the_same_dataset(qupath: Tools, tmp_path: Path) -> None:
    """The QuPath script and `qpbridge export-tiles`, from the same image and objects: the same tiles (names,
    regions), masks that agree, the same classes and the same split by image in dataset.json."""
    from shapely import affinity
    from shapely.geometry import Point, box, mapping

    from qpbridge.dataset import load_dataset, split_sources

    images = [need_data(MONUSEG / IMAGE), need_data(MONUSEG / IMAGE2)]
    annotations = [{"name": "roi1", "class": "Tumor", "x": ROI1[0], "y": ROI1[1], "w": ROI1[2], "h": ROI1[3]},
                   {"name": "mine", "class": "Stroma", "x": MINE[0], "y": MINE[1], "w": MINE[2], "h": MINE[3]}]
    detections = [{"name": f"n{i}", "class": "Nucleus", "x": x, "y": y, "w": w, "h": h}
                  for i, (x, y, w, h) in enumerate(NUCLEI)]
    sem, inst = tmp_path / "qp_semantic", tmp_path / "qp_instances"
    export_sem = str(script(qupath, "Export training tiles", tmp_path, OUTPUT_DIR=q(sem), PIXEL_SIZE_UM="1.0",
                            TILE_SIZE="128", VAL_FRACTION="0.5", CLASSES="['Stroma', 'Tumor']"))
    export_inst = str(script(qupath, "Export training tiles", tmp_path, OUTPUT_DIR=q(inst), MODE="'instances'",
                             PIXEL_SIZE_UM="0.5", TILE_SIZE="256", VAL_FRACTION="0.5"))
    steps = [{"image": k, "script": s, "batch": {"index": i, "size": 2}}
             for s in (export_sem, export_inst) for i, k in enumerate(("a", "b"))]
    scenario = {"project": str(tmp_path / "project"),
                "images": [{"key": k, "file": str(p), "mpp": 0.25, "annotations": annotations,
                            "detections": detections} for k, p in zip(("a", "b"), images, strict=True)],
                "steps": steps}
    results, _, _ = run(qupath, scenario, tmp_path)
    assert all(r.get("ok", True) for r in results), results

    # The same objects as QuPath GeoJSON beside copies of the images, exported by the CLI.
    src = tmp_path / "src"
    src.mkdir()
    feats = [{"type": "Feature", "geometry": mapping(box(a["x"], a["y"], a["x"] + a["w"], a["y"] + a["h"])),
              "properties": {"objectType": "annotation", "classification": {"name": a["class"]}}}
             for a in annotations]
    nuclei = [{"type": "Feature", "geometry": mapping(affinity.scale(Point(x + w / 2, y + h / 2).buffer(1, 64),
                                                                     w / 2, h / 2)),
               "properties": {"objectType": "detection", "classification": {"name": "Nucleus"}}}
              for x, y, w, h in NUCLEI]
    for p in images:
        (src / p.name).write_bytes(p.read_bytes())
        (src / f"{p.stem}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats + nuclei}))
    cli_sem, cli_inst = tmp_path / "cli_semantic", tmp_path / "cli_instances"
    common = ["--log-level", "warning", "export-tiles", str(src), "--mpp", "0.25", "--val-fraction", "0.5"]
    assert main([*common, "-o", str(cli_sem), "--tile-mpp", "1", "--size", "128", "--objects", "annotations"]) == 0
    assert main([*common, "-o", str(cli_inst), "--tile-mpp", "0.5", "--size", "256", "--objects", "detections",
                 "--format", "instance"]) == 0

    names = [p.stem for p in images]  # QuPath names tiles after the image without its extension
    for qp_dir, cli_dir in ((sem, cli_sem), (inst, cli_inst)):
        qp_ds, cli_ds = load_dataset(qp_dir), load_dataset(cli_dir)
        info = qp_ds.info
        assert info["created_by"].startswith("QuPath Export training tiles (QuPath ") and info["version"] == 1
        assert (qp_ds.mode, qp_ds.format, qp_ds.mpp) == (cli_ds.mode, cli_ds.format, cli_ds.mpp)
        assert [(c["name"], c["label"]) for c in qp_ds.classes] == [(c["name"], c["label"]) for c in cli_ds.classes]
        assert info["split"]["val"] == cli_ds.info["split"]["val"] and len(info["split"]["val"]) == 1
        expected = split_sources(names, 0.5, 0)
        assert {s["name"]: s["split"] for s in info["sources"]} == expected
        assert {t.source for t in qp_ds.tiles} == set(names)
        qp_tiles = {t.image.name: t for t in qp_ds.tiles}
        cli_tiles = {t.image.name: t for t in cli_ds.tiles}
        assert set(qp_tiles) == set(cli_tiles), (sorted(qp_tiles), sorted(cli_tiles))
        for name, t in qp_tiles.items():
            c = cli_tiles[name]
            assert (t.x, t.y, t.w, t.h, t.split) == (c.x, c.y, c.w, c.h, c.split)
            assert t.downsample == pytest.approx(c.downsample)
            a, b = np.asarray(Image.open(t.mask)), np.asarray(Image.open(c.mask))
            assert a.shape == b.shape
            if qp_ds.mode == "semantic":
                assert a.dtype == b.dtype == np.uint8 and (a == b).mean() > 0.99, name
            else:  # each nucleus its own label in both (QuPath: 8-bit below 256 objects); outlines agree closely
                assert len(np.unique(a)) == len(np.unique(b))
                inter, union = ((a > 0) & (b > 0)).sum(), ((a > 0) | (b > 0)).sum()
                assert union == 0 or inter / union > 0.85, name
            ia = cv2.imread(str(t.image)).astype(np.int16)
            ib = cv2.imread(str(c.image)).astype(np.int16)
            # QuPath and the CLI resample differently (a few grey levels), but the same pixels, aligned.
            assert ia.shape == ib.shape and np.abs(ia - ib).mean() < 8, name
            assert np.corrcoef(ia.mean(axis=2).ravel(), ib.mean(axis=2).ravel())[0, 1] > 0.95, name
