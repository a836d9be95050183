"""The Groovy client (groovy/) with Groovy 4 on QuPath 0.6.0's core jars, against a real qpbridge server.

Drivers in tests/groovy/ are inlined exactly as `qpbridge install-qupath` inlines the QuPath scripts, compiled
once with Groovy 4's groovyc against the real classes of ../shared/qupath, and print one ``QPB <json>`` line
per check. The installed scripts themselves run on real QuPath objects in tests/test_qupath_scripts.py.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qpbridge.client import Client
from qpbridge.install_qupath import inline_script
from qpbridge.protocol import ImageInfo, TileSpec
from qupath_tools import QUPATH, VERSIONS, compile_groovy, run_groovy

pytestmark = pytest.mark.groovy

HERE = Path(__file__).resolve().parent
DRIVERS = HERE / "groovy"
MONUSEG = HERE.parent.parent / "shared" / "data" / "monuseg-train"
MONUSEG_IMAGE = "TCGA-21-5784-01Z-00-DX1.tif"
VERSION = "0.6.0"  # the client library is QuPath-free: one QuPath version is enough for it


def need_data(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real test data {path} is absent (expected ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="module")
def checks_classes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The client test driver with the library inlined, as the installer does it, compiled once."""
    root = tmp_path_factory.mktemp("groovy")
    src = root / "client_checks.groovy"
    src.write_text(inline_script((DRIVERS / "client_checks.groovy").read_text(encoding="utf-8")), encoding="utf-8")
    return compile_groovy(VERSION, [src], root / "classes")


def run_checks(classes: Path, args: Sequence[str], without_jeromq: bool = False) -> tuple[list[dict[str, Any]], str]:
    """Runs the compiled driver; without_jeromq leaves the JeroMQ jar off the classpath."""
    extra: list[Path | str] = [classes]
    if without_jeromq:
        # Only what the library needs besides JeroMQ: Groovy and Gson.
        results, proc = run_groovy(VERSION, "", args, main_class="client_checks", timeout=300,
                                   classpath_override=[classes, *sorted((QUPATH / "common").glob("groovy-*.jar")),
                                                       *sorted((QUPATH / VERSION).glob("gson-*.jar"))])
    else:
        results, proc = run_groovy(VERSION, "", args, main_class="client_checks", extra_cp=extra, timeout=300)
    return results, proc.stderr


def by_check(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["check"]: r for r in results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_plan_reads_regions_and_slide_decisions(checks_classes: Path) -> None:
    (plan,), _ = run_checks(checks_classes, ["plan"])
    # A server plan's tiles become reads of width*downsample x height*downsample full-res pixels (rounded),
    # cut at the image's edges (2240 x 1000 here); the planned pixel size stays in the header.
    assert plan["reads"] == [[100, 50, 973, 950, 1.9, 512, 512], [1012, 50, 973, 950, 1.9, 512, 512],
                             [1924, 50, 316, 950, 1.9, 170, 512]]
    assert plan["regions"] == [{"x": 10, "y": 20, "width": 101, "height": 51},
                               {"x": 0, "y": 0, "width": 15, "height": 15},
                               {"x": 990, "y": 10, "width": 10, "height": 10}, None]
    assert plan["progress"].startswith("qpbridge nuclei: 25% (50/200 tiles), ")
    assert "tiles/s, ETA " in plan["progress"]
    assert plan["eta"] == "1:02:05"
    assert plan["server_line"] == "qpbridge x: 50% (5/10 tiles), 2.5 tiles/s, ETA 0:02"
    assert plan["mpp"]["required"]["code"] == "missing_mpp" and "PIXEL_SIZE_UM" in plan["mpp"]["required"]["message"]
    assert plan["mpp"].get("free") is None and plan["mpp"]["given"] == 0.25  # Gson leaves the null out

    d = plan["decisions"]
    root = plan["root"]
    assert d["inside"]["use"] and d["inside"]["path"] == f"{root}/a b.tif" and d["inside"]["root"] == root
    assert d["inside_str"]["use"] and d["inside_str"]["path"] == d["inside"]["path"]
    assert d["link_in"]["use"] and d["link_in"]["path"] == d["inside"]["path"]  # a link into the root
    for key in ("outside", "link_out"):  # a link out of the root does not count
        assert not d[key]["use"] and "not below the server's slide roots" in d[key]["reason"]
    assert not d["missing"]["use"] and "not a file" in d["missing"]["reason"]
    assert not d["not_file"]["use"] and "not a local file" in d["not_file"]["reason"]
    assert not d["two_files"]["use"] and "one file (2 URIs)" in d["two_files"]["reason"]
    assert not d["no_uris"]["use"]
    assert not d["no_cap"]["use"] and "--slide-root" in d["no_cap"]["reason"]
    assert not d["disabled"]["use"] and "USE_SERVER_SIDE_READING" in d["disabled"]["reason"]


def test_hello_models_and_errors(checks_classes: Path, server: Any) -> None:
    dead = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    results, _ = run_checks(checks_classes, ["hello,errors", f"address={server.address}", f"dead={dead}"])
    r = by_check(results)
    hello = r["hello"]
    assert hello["protocol"] == 1
    assert {"nuclei", "tissue"} <= set(hello["models"])
    assert "jobs" in hello["capabilities"]
    nuclei = r["models"]["nuclei"]
    assert nuclei["mpp"] == 0.5 and nuclei["object_type"] == "detection"

    down = r["server_down"]["error"]
    assert down["code"] == "server_unavailable"
    assert "qpbridge serve" in down["message"] and dead in down["message"]
    assert r["server_down"]["seconds"] < 5  # connect timeout 1.5 s, plus closing
    mismatch = r["mismatch"]["error"]
    assert mismatch["code"] == "protocol_mismatch"
    assert "speaks protocol 1" in mismatch["message"] and "speaks protocol 2" in mismatch["message"]
    assert r["unknown_model"]["error"]["code"] == "unknown_model"
    assert "nuclei" in r["unknown_model"]["error"]["message"]
    assert r["missing_mpp"]["error"]["code"] == "missing_mpp"
    assert "PIXEL_SIZE_UM" in r["missing_mpp"]["error"]["message"]
    assert r["server_missing_mpp"]["error"]["code"] == "missing_mpp"
    assert time.monotonic() - t0 < 60


def test_jeromq_missing_is_a_clear_error(checks_classes: Path) -> None:
    (r,), _ = run_checks(checks_classes, ["nojeromq"], without_jeromq=True)
    assert r["error"]["code"] == "jeromq_missing"
    assert "extensions" in r["error"]["message"] and "install-qupath" in r["error"]["message"]


def _canonical(features: list[dict[str, Any]]) -> list[str]:
    """Features without their random ids, in a stable order."""
    out = []
    for f in features:
        g = dict(f)
        g.pop("id", None)
        out.append(json.dumps(g, sort_keys=True))
    return sorted(out)


def _geometries(features: list[dict[str, Any]]) -> list[Any]:
    import shapely.geometry

    return [shapely.geometry.shape(f["geometry"]) for f in features]


def test_planned_job_matches_python_client(checks_classes: Path, server: Any, tmp_path: Path) -> None:
    image = need_data(MONUSEG / MONUSEG_IMAGE)
    out = tmp_path / "job"
    # mpp 0.5 = the model's resolution: the server plans a 3 x 3 grid of 512 px tiles over the 1000 px image.
    results, stderr = run_checks(checks_classes, ["job", f"address={server.address}", f"image={image}",
                                                         "mpp=0.5", f"out={out}"])
    job = by_check(results)["job"]
    assert job["kind"] == "tiles" and job["tiles"] == 9 and job["downsample"] == 1.0
    assert job["plan"]["rows"] == 3 and job["plan"]["cols"] == 3 and len(job["plan"]["tiles"]) == 9
    assert job["features"] > 100  # a real H&E tile set has hundreds of nuclei
    assert any("100% (9/9 tiles)" in line for line in job["progress_lines"])
    assert "ETA" in stderr
    assert "no 'slide-jobs' capability" in job["path_lines"][0]  # the shared test server reads no slides

    groovy_features = json.loads((out / "features.json").read_text(encoding="utf-8"))
    assert len(groovy_features) == job["features"]
    for f in groovy_features:
        props = f["properties"]
        assert props["classification"]["name"] == "Nucleus" and len(props["classification"]["color"]) == 3
        assert props["metadata"]["qpbridge.model"] == "nuclei"
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")

    # The same planned job through the Python client, fed the very pixels the Groovy client read, in
    # another order and other batches: identical features (ids aside).
    sent = json.loads((out / "tiles.json").read_text(encoding="utf-8"))
    tiles = []
    for t in sent:
        px = np.frombuffer((out / t["file"]).read_bytes(), dtype=np.uint8).reshape(t["height"], t["width"], 3)
        tiles.append((TileSpec(x=t["x"], y=t["y"], width=t["width"], height=t["height"],
                               downsample=float(t["downsample"])), px))
    with Client(server.address, timeout_s=120) as client:
        r = job["region"]
        opened = client.job_open_planned("nuclei", ImageInfo(name=image.name, mpp=0.5, width=1000, height=1000),
                                         (r["x"], r["y"], r["width"], r["height"]))
        assert opened["plan"] == job["plan"]
        planned = {(t["x"], t["y"]) for t in opened["plan"]["tiles"]}
        assert {(t["x"], t["y"]) for t in sent} == planned
        try:
            for i in range(0, len(tiles), 4):
                client.job_tiles(opened["job"], tiles[::-1][i:i + 4])
            client.job_finish(opened["job"])
            py_features = list(client.job_results(opened["job"]))
        finally:
            client.job_close(opened["job"])
    assert _canonical(groovy_features) == _canonical(py_features)


def _dark_image(w: int, h: int) -> np.ndarray:
    """White with one large dark ellipse (about 420 x 260 px) and a small dark square."""
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.full((h, w, 3), 235, np.uint8)
    img[((xx - 250) / 210.0) ** 2 + ((yy - 170) / 130.0) ** 2 <= 1] = (40, 30, 60)
    img[20:40, w - 60:w - 30] = 20
    return img


def _write_png(path: Path, img: np.ndarray) -> Path:
    import cv2

    assert cv2.imwrite(str(path), np.ascontiguousarray(img[:, :, ::-1]))
    return path


def test_seams_one_feature(checks_classes: Path, server: Any, tmp_path: Path) -> None:
    """A dark shape across many 64 px tiles (overlap 16) of the semantic test model comes back as one polygon."""
    import shapely.geometry

    img = _dark_image(520, 360)
    png = _write_png(tmp_path / "seams.png", img)
    roi = {"type": "Polygon", "coordinates": [[[150.5, 60], [420, 60], [420, 300.5], [150.5, 300.5], [150.5, 60]]]}
    (tmp_path / "roi.json").write_text(json.dumps(roi))
    out = tmp_path / "out"
    (r,), _ = run_checks(checks_classes, ["seams", f"address={server.address}", f"png={png}",
                                                 f"roi={tmp_path / 'roi.json'}", f"out={out}"])
    assert r["whole"]["tiles"] > 30
    whole = json.loads((out / "whole.json").read_text())
    dark = [f for f in whole if f["properties"]["classification"]["name"] == "Dark"]
    (ellipse,) = [g for g in _geometries(dark) if g.area > 10000]  # ONE polygon across the tile seams
    assert len(dark) == 2  # the ellipse and the small square
    assert ellipse.area == pytest.approx(np.pi * 210 * 130, rel=0.02)
    assert ellipse.bounds == pytest.approx((40, 40, 460, 300), abs=2)

    inside = json.loads((out / "roi.json").read_text())
    assert r["roi"]["features"] == len(inside) == 1  # clipped to the ROI, still one polygon
    (g,) = _geometries(inside)
    box = shapely.geometry.shape(roi)
    assert g.difference(box).area < 1  # the server clipped it to the ROI
    assert g.area == pytest.approx(ellipse.intersection(box).area, rel=0.01)


def test_slide_job_and_fallbacks(checks_classes: Path, models_dir: Path, tmp_path: Path) -> None:
    """job.slide through the Groovy client equals the Python client's; paths outside the roots fall back."""
    from conftest import start_server, write_pyramid

    img = _dark_image(520, 360)
    root = tmp_path / "slides"
    root.mkdir()
    slide = write_pyramid(root / "slide.tif", img, 1.0, levels=2)
    outside = write_pyramid(tmp_path / "outside.tif", img, 1.0, levels=2)
    png = _write_png(tmp_path / "slide.png", img)
    roi = {"type": "Polygon", "coordinates": [[[100, 30], [470, 90], [380, 330], [60, 280], [100, 30]]]}
    (tmp_path / "roi.json").write_text(json.dumps(roi))
    out = tmp_path / "out"
    running = start_server(models_dir, slide_roots=[root])
    try:
        (r,), _ = run_checks(checks_classes, [
            "slide", f"address={running.address}", f"png={png}", f"slide={slide}", f"outside={outside}",
            f"roi={tmp_path / 'roi.json'}", "rx=60", "ry=30", "rw=410", "rh=300", f"out={out}"])
        with Client(running.address, timeout_s=60) as client:
            job = client.request({"op": "job.slide", "model": "seams", "path": str(slide), "roi": roi})["job"]
            deadline = time.monotonic() + 60
            while client.job_status(job)["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.05)
            assert client.job_status(job)["state"] == "done"
            py_features = list(client.job_results(job))
            client.job_close(job)
    finally:
        running.server.stop()
        running.thread.join(10)

    assert "slide-jobs" in r["capabilities"] and r["slide_roots"] == [str(root)]
    assert r["inside"]["choice"]["use"] and r["inside"]["kind"] == "slide"
    groovy_slide = json.loads((out / "slide.json").read_text())
    assert r["inside"]["features"] == len(groovy_slide) == len(py_features) >= 1
    assert _canonical(groovy_slide) == _canonical(py_features)
    assert r["inside"]["tiles"] > 10

    # Outside the roots: tiles read on this side through the planned job over the same region and ROI. Same
    # pixels, same plan, same stitching: the very same objects.
    assert not r["outside"]["choice"]["use"] and r["outside"]["kind"] == "tiles"
    fallback = json.loads((out / "fallback.json").read_text())
    assert _canonical(fallback) == _canonical(groovy_slide)
    assert r["refused"]["error"]["cls"] == "QpbSlideUnusableException"
    assert r["refused"]["error"]["code"] == "bad_request"
    assert "outside the server's slide roots" in r["refused"]["error"]["message"]
    assert r["forced"] == {"kind": "tiles", "features": len(fallback)}
    assert not r["disabled"]["use"]
    log = "\n".join(r["log"])
    assert "the server reads the slide itself" in log and "reading tiles in QuPath instead" in log
    assert "reading tiles in QuPath: " in log and "(read on the server)" in log

    cancel = r["cancel"]
    assert cancel["state_before"] == "running" and cancel["expected"] > 3
    assert cancel["outcome"]["result"] == "threw"
    assert cancel["outcome"]["error"]["cls"] == "QpbCancelledException"
    assert not cancel["alive"] and cancel["return_seconds"] < 5
    assert cancel["after"] == {"error": "unknown_job"}  # cancelled, then closed on the server


def test_cancel_returns_promptly(checks_classes: Path, server: Any) -> None:
    (r,), _ = run_checks(checks_classes, ["cancel", f"address={server.address}"])
    assert r["tiles"] == 256  # 1024 px at 64 px tiles, no overlap
    assert r["state_before"] == "running"
    assert r["outcome"]["result"] == "threw"
    assert r["outcome"]["error"]["cls"] == "QpbCancelledException"
    assert not r["alive"]
    assert r["return_seconds"] < 5  # returns promptly
    assert r["after"] == {"error": "unknown_job"}  # cancelled, then closed on the server
    assert any("state cancelled" in line for line in r["cancel_lines"])


@pytest.mark.parametrize("version", VERSIONS)
def test_adapter_roi_geojson_and_uris(version: str, tmp_path: Path) -> None:
    """The adapter's helpers on QuPath's real classes: annotation ROI -> GeoJSON, image URIs (file, rotated)."""
    import shapely.geometry

    script = tmp_path / "adapter_checks.groovy"
    script.write_text(inline_script((DRIVERS / "adapter_checks.groovy").read_text(encoding="utf-8")), encoding="utf-8")
    (r,), _ = run_groovy(version, script, [])
    geo = r["geo"]
    hole = shapely.geometry.shape(geo["hole"])
    assert geo["hole"]["type"] == "Polygon" and len(geo["hole"]["coordinates"]) == 2 and hole.area == 8000 - 100
    assert geo["multi"]["type"] == "MultiPolygon" and len(geo["multi"]["coordinates"]) == 2
    assert geo["multi"]["coordinates"][1][0][1] == [30.12, 20.0]  # rounded to 0.01 px
    assert geo["mixed"] == {"type": "Polygon", "coordinates": [[[0.0, 0.0], [4.0, 0.0], [4.0, 4.0], [0.0, 4.0],
                                                                [0.0, 0.0]]]}
    assert "line" not in geo and "empty" not in geo  # no area: null, left out by Gson
    big = r["big"]
    assert big["json_chars"] <= 400000 and big["vertices"] < 60000
    assert len(big["log"]) == 1 and "has 60001 vertices; sent to the server simplified within 0.25 px" in big["log"][0]

    uris = r["uris"]
    assert len(uris["file"]) == 1 and uris["file"][0].startswith("file:")
    assert uris["choice_file"]["use"] and uris["choice_file"]["path"] == r["file"]
    assert uris["rotated"] == [] and not uris["choice_rotated"]["use"]


def test_busy_answer_stands_when_a_retry_cannot_be_answered_in_time(checks_classes: Path, models_dir: Path) -> None:
    """A full server answers `busy, retry after 1000 ms`; with a 1.4 s deadline the retry's answer would not
    fit, so the client reports the busy answer at once instead of retrying into a 'no reply'."""
    import json

    import zmq

    from conftest import start_server
    from qpbridge.protocol import Limits

    running = start_server(models_dir, Limits(max_queued_requests=1), workers=1)
    greedy = zmq.Context.instance().socket(zmq.DEALER)
    greedy.setsockopt(zmq.LINGER, 0)
    try:
        greedy.connect(running.address)
        tile = {"x": 0, "y": 0, "width": 64, "height": 64, "downsample": 1.0, "encoding": "raw"}
        greedy.send_multipart([b"", json.dumps({"op": "predict", "v": 1, "model": "slow",
                                                "tiles": [tile] * 200}).encode(), *([bytes(64 * 64 * 3)] * 200)])
        results, _ = run_checks(checks_classes, ["busy", f"address={running.address}"])
        busy = by_check(results)["busy"]
        assert busy["error"] is not None and busy["error"]["code"] == "busy", busy
        assert busy["seconds"] < 0.8  # no wait for a retry (1 s)
    finally:
        greedy.close()
        running.server.stop()
        running.thread.join(10)


def test_curve_server_groovy_client(checks_classes: Path, models_dir: Path, tmp_path: Path) -> None:
    """A CURVE server: the Groovy client without the key gets a clear error within its connect timeout; with the
    key, JeroMQ 0.3.6 (the jar here) says exactly which jars CURVE needs. With a CURVE-capable JeroMQ named in
    $QPBRIDGE_JEROMQ_CURVE_CP (jeromq >= 0.4 and jnacl jars), the keyed hello must succeed."""
    import os

    from conftest import start_server
    from qpbridge.keys import new_key_pair

    _, secret = new_key_pair(tmp_path / "server")
    public = tmp_path / "server" / "server.key"
    running = start_server(models_dir, curve_secret=secret)
    try:
        results, _ = run_checks(checks_classes, ["curve", f"address={running.address}", f"key={public}"])
        r = by_check(results)
        without = r["curve_without_key"]["error"]
        assert without["code"] == "server_unavailable" and "SERVER_KEY" in without["message"]
        assert r["curve_without_key"]["seconds"] < 10  # connect timeout 1.5 s, plus a close of at most 3 s
        keyed = r["curve_with_key"]
        if keyed["jeromq"].startswith("0.3"):
            assert keyed["error"]["code"] == "curve_unsupported"
            assert "jnacl" in keyed["error"]["message"] and "jeromq-0.6.0" in keyed["error"]["message"]
        extra = os.environ.get("QPBRIDGE_JEROMQ_CURVE_CP")
        if not extra:
            pytest.skip("no CURVE-capable JeroMQ here (set QPBRIDGE_JEROMQ_CURVE_CP to "
                        "jeromq-0.6.0.jar:jnacl-1.0.0.jar)")
        cp = [checks_classes, *extra.split(os.pathsep), *sorted((QUPATH / "common").glob("groovy-*.jar")),
              *sorted((QUPATH / VERSION).glob("gson-*.jar"))]
        results, _ = run_groovy(VERSION, "", ["curve", f"address={running.address}", f"key={public}"],
                                main_class="client_checks", timeout=300, classpath_override=cp)
        assert by_check(results)["curve_with_key"]["error"] is None
    finally:
        running.server.stop()
        running.thread.join(10)
