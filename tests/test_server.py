"""The server over real sockets: every op, bad input of every kind, concurrency."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
import shapely
import zmq
from shapely.geometry import shape

from qpbridge.client import Client
from qpbridge.errors import RemoteError, ServerUnavailableError
from qpbridge.protocol import ImageInfo, TileSpec


def raw_request(address: str, frames: list[bytes], timeout_ms: int = 5000) -> dict:
    """One request over a plain REQ socket, as an independent client would send it."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send_multipart(frames)
        assert sock.poll(timeout_ms), "server did not answer"
        return json.loads(sock.recv_multipart()[0])
    finally:
        sock.close()


def hdr(**fields) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


def dark_square_image(size: int = 128, box: tuple[int, int, int, int] = (20, 30, 60, 90)) -> np.ndarray:
    img = np.full((size, size, 3), 240, np.uint8)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 20
    return img


def test_hello_over_req_socket(server):
    reply = raw_request(server.address, [hdr(op="hello", id="a1")])
    assert reply["ok"] is True and reply["protocol"] == 1 and reply["id"] == "a1"
    assert reply["device"] == "cpu"
    assert {"predict", "jobs", "encoding:raw"} <= set(reply["capabilities"])
    assert {"tissue", "nuclei", "dark"} <= set(reply["models"])
    assert reply["limits"]["max_tiles_per_request"] == 256


def test_bare_dealer_without_delimiter_is_answered(server):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        sock.send_multipart([hdr(op="hello")])
        assert sock.poll(5000)
        assert json.loads(sock.recv_multipart()[-1])["ok"] is True
    finally:
        sock.close()


def test_models_lists_cards_with_colours(server):
    with Client(server.address) as c:
        cards = {m["name"]: m for m in c.models()}
    assert cards["nuclei"]["object_type"] == "detection" and cards["nuclei"]["mpp"] == 0.5
    assert cards["tissue"]["object_type"] == "annotation"
    for card in cards.values():
        # image translators (ihc2he) make pixels, not objects: they alone have no classes
        assert card["tile_size"] > 0 and (card["classes"] or card["task"] == "image-translation")
        for cls in card["classes"]:
            assert len(cls["color"]) == 3 and all(0 <= v <= 255 for v in cls["color"])


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
def test_predict_returns_fullres_geometry(server, encoding):
    img = dark_square_image()
    # The tile stands for a 256 px full-resolution region at downsample 2, origin (1000, 500).
    spec = TileSpec(x=1000, y=500, width=128, height=128, downsample=2.0)
    with Client(server.address) as c:
        feats = c.predict("dark", [(spec, img)], ImageInfo(name="synthetic"), encoding=encoding)
    assert len(feats) == 1
    f = feats[0]
    geom = shape(f["geometry"])
    assert geom.is_valid
    minx, miny, maxx, maxy = geom.bounds
    tol = 0.01 if encoding != "jpeg" else 2.5
    assert minx == pytest.approx(1000 + 20 * 2, abs=tol) and maxx == pytest.approx(1000 + 60 * 2, abs=tol)
    assert miny == pytest.approx(500 + 30 * 2, abs=tol) and maxy == pytest.approx(500 + 90 * 2, abs=tol)
    assert geom.area == pytest.approx(80 * 120, rel=0.02 if encoding != "jpeg" else 0.1)
    props = f["properties"]
    assert props["objectType"] == "annotation"
    assert props["classification"] == {"name": "Dark", "color": [10, 20, 30]}
    assert props["metadata"]["qpbridge.model"] == "dark"
    assert "Area px^2" in props["measurements"]


def test_holes_survive(server):
    img = dark_square_image(box=(10, 10, 100, 100))
    img[40:70, 40:70] = 250  # a 30x30 hole
    with Client(server.address) as c:
        feats = c.predict("dark", [(TileSpec(0, 0, 128, 128), img)])
    geom = shape(feats[0]["geometry"])
    assert len(geom.interiors) == 1
    assert geom.area == pytest.approx(90 * 90 - 30 * 30, rel=0.01)


def test_resampling_to_model_pixel_size(server):
    # 0.5 µm/px image into a 1 µm/px model: the server halves the tile and maps back to full resolution.
    img = dark_square_image(256, box=(40, 60, 200, 180))
    with Client(server.address) as c:
        feats = c.predict("dark", [(TileSpec(0, 0, 256, 256), img)], ImageInfo(mpp=0.5))
    geom = shape(feats[0]["geometry"])
    assert geom.bounds == pytest.approx((40, 60, 200, 180), abs=1.0)
    assert feats[0]["properties"]["measurements"]["Area µm^2"] == pytest.approx(160 * 120 * 0.25, rel=0.03)


# ---- bad input: every case gets a structured error and the server keeps serving ---------------------
BAD = {
    "not json": ([b"{nope"], "bad_request"),
    "json array": ([b"[1,2]"], "bad_request"),
    "missing op": ([json.dumps({"v": 1}).encode()], "bad_request"),
    "missing v": ([json.dumps({"op": "hello"}).encode()], "bad_request"),
    "v as string": ([json.dumps({"op": "hello", "v": "1"}).encode()], "bad_request"),
    "unknown op": ([hdr(op="explode")], "unknown_op"),
    "unknown model": ([hdr(op="predict", model="nope", tiles=[])], "unknown_model"),
    "model missing": ([hdr(op="predict", tiles=[])], "bad_request"),
    "tiles missing": ([hdr(op="predict", model="dark")], "bad_request"),
    "too few frames": ([hdr(op="predict", model="dark", tiles=[{"x": 0, "y": 0, "width": 2, "height": 2}])],
                       "frame_count"),
    "too many frames": ([hdr(op="predict", model="dark", tiles=[]), b"\0" * 12], "frame_count"),
    "byte count": ([hdr(op="predict", model="dark", tiles=[{"x": 0, "y": 0, "width": 2, "height": 2}]),
                    b"\0" * 11], "bad_tile"),
    "negative size": ([hdr(op="predict", model="dark", tiles=[{"x": 0, "y": 0, "width": -2, "height": 2}]),
                       b""], "bad_request"),
    "float x": ([hdr(op="predict", model="dark", tiles=[{"x": 0.5, "y": 0, "width": 2, "height": 2}]),
                 b"\0" * 12], "bad_request"),
    "bad encoding": ([hdr(op="predict", model="dark",
                          tiles=[{"x": 0, "y": 0, "width": 2, "height": 2, "encoding": "webp"}]), b"x"],
                     "bad_request"),
    "not a png": ([hdr(op="predict", model="dark",
                       tiles=[{"x": 0, "y": 0, "width": 2, "height": 2, "encoding": "png"}]), b"GIF89a"],
                  "bad_tile"),
    "zero downsample": ([hdr(op="predict", model="dark",
                             tiles=[{"x": 0, "y": 0, "width": 2, "height": 2, "downsample": 0}]), b"\0" * 12],
                        "bad_request"),
    "missing mpp": ([hdr(op="predict", model="nuclei", tiles=[])], "missing_mpp"),
    "bad mpp": ([hdr(op="predict", model="nuclei", image={"mpp": -1}, tiles=[])], "bad_request"),
    "unknown job": ([hdr(op="job.status", job="deadbeef")], "unknown_job"),
    "job id not string": ([hdr(op="job.status", job=5)], "unknown_job"),
    "bad id": ([hdr(op="hello", id={"x": 1})], "bad_request"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_gets_structured_error(server, case):
    frames, code = BAD[case]
    reply = raw_request(server.address, frames)
    assert reply["ok"] is False, reply
    assert reply["error"]["code"] == code, reply
    assert reply["error"]["message"]
    assert raw_request(server.address, [hdr(op="hello")])["ok"] is True


def test_protocol_mismatch_names_both_versions(server):
    reply = raw_request(server.address, [json.dumps({"op": "hello", "v": 7, "id": 42}).encode()])
    assert reply["id"] == 42 and reply["op"] == "hello"  # a DEALER client can match the error to its request
    assert reply["error"]["code"] == "unsupported_version"
    assert reply["error"]["details"] == {"server_protocol": 1, "client_protocol": 7, "op": "hello"}
    assert "7" in reply["error"]["message"] and "1" in reply["error"]["message"]


def test_unknown_model_lists_known(server):
    with Client(server.address) as c, pytest.raises(RemoteError) as info:
        c.predict("nope", [])
    assert info.value.code == "unknown_model"
    assert "nuclei" in info.value.message and "tissue" in info.value.message


def test_empty_message_after_delimiter(server):
    reply = raw_request(server.address, [b""])
    assert reply["ok"] is False


def test_limits_checked_before_decoding(small_server):
    addr = small_server.address
    five = [{"x": 0, "y": 0, "width": 1, "height": 1}] * 5
    r = raw_request(addr, [hdr(op="predict", model="dark", tiles=five), *([b"\0\0\0"] * 5)])
    assert r["error"]["code"] == "limit_exceeded" and "4" in r["error"]["message"]
    big = [{"x": 0, "y": 0, "width": 300, "height": 300}]
    r = raw_request(addr, [hdr(op="predict", model="dark", tiles=big), b"\0" * 10])
    assert r["error"]["code"] == "limit_exceeded"
    # A PNG whose header claims a huge image is refused from its IHDR, before decoding.
    _, png = cv2.imencode(".png", np.zeros((300, 300, 3), np.uint8))
    tiny = [{"x": 0, "y": 0, "width": 10, "height": 10, "encoding": "png"}]
    r = raw_request(addr, [hdr(op="predict", model="dark", tiles=tiny), png.tobytes()])
    assert r["error"]["code"] == "bad_tile" and "300x300" in r["error"]["message"]
    # Total request bytes over the cap (1 MiB here) but each frame under libzmq's per-frame cap.
    r = raw_request(addr, [hdr(op="predict", model="dark", tiles=[]), b"\0" * 600_000, b"\0" * 600_000])
    assert r["error"]["code"] == "limit_exceeded"
    assert raw_request(addr, [hdr(op="hello")])["ok"] is True


# ---- jobs ---------------------------------------------------------------------------------------------
def grid_tiles(img: np.ndarray, tile: int) -> list[tuple[TileSpec, np.ndarray]]:
    out = []
    for y in range(0, img.shape[0], tile):
        for x in range(0, img.shape[1], tile):
            px = np.ascontiguousarray(img[y:y + tile, x:x + tile])
            out.append((TileSpec(x, y, px.shape[1], px.shape[0]), px))
    return out


def test_job_lifecycle_progress_and_paging(server):
    img = np.full((256, 256, 3), 240, np.uint8)
    for i in range(16):  # one dark square inside each 64 px tile
        y, x = divmod(i, 4)
        img[y * 64 + 10:y * 64 + 30, x * 64 + 10:x * 64 + 40] = 10
    tiles = grid_tiles(img, 64)
    with Client(server.address) as c:
        job = c.job_open("dark", ImageInfo(name="grid"), expected_tiles=16)
        r = c.job_tiles(job, tiles[:10])
        assert (r["accepted"], r["skipped"], r["tiles_done"], r["tiles_expected"]) == (10, 0, 10, 16)
        st = c.job_status(job)
        assert st["state"] == "running" and st["tiles_done"] == 10 and st["features"] == 10
        assert st["tiles_per_s"] > 0 and st["eta_s"] is not None and st["eta_s"] >= 0
        r = c.job_tiles(job, tiles[5:])  # 5 re-sent tiles are skipped, not doubled
        assert (r["accepted"], r["skipped"], r["tiles_done"]) == (6, 5, 16)
        assert c.job_finish(job)["state"] == "done"
        pages = []
        offset = 0
        while offset is not None:
            page = c.request({"op": "job.results", "job": job, "offset": offset, "limit": 6})
            pages.append(len(page["features"]))
            offset = page["next_offset"]
        assert pages == [6, 6, 4]
        feats = list(c.job_results(job, page_size=5))
        assert len(feats) == 16 and len({f["id"] for f in feats}) == 16
        assert all(shape(f["geometry"]).area == pytest.approx(600, rel=0.01) for f in feats)
        with pytest.raises(RemoteError) as info:
            c.job_tiles(job, tiles[:1])
        assert info.value.code == "job_state"
        c.job_close(job)
        with pytest.raises(RemoteError) as info:
            c.job_status(job)
        assert info.value.code == "unknown_job"


def test_cancel_stops_a_batch_mid_way(server):
    img = np.full((64, 64 * 40, 3), 240, np.uint8)
    tiles = grid_tiles(img, 64)  # 40 tiles at 50 ms each on the 'slow' model
    with Client(server.address) as c, Client(server.address) as other:
        job = c.job_open("slow", expected_tiles=40)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(c.job_tiles(job, tiles)))
        t0 = time.monotonic()
        t.start()
        time.sleep(0.3)
        assert other.job_cancel(job)["state"] == "cancelled"
        t.join(10)
        assert time.monotonic() - t0 < 1.5
        assert 0 < result["accepted"] < 40 and result["state"] == "cancelled"
        with pytest.raises(RemoteError) as info:
            other.job_tiles(job, tiles[:1])
        assert info.value.code == "job_state"
        assert other.job_status(job)["state"] == "cancelled"


def test_jobs_of_vanished_clients_expire(small_server):
    with Client(small_server.address) as c:
        job = c.job_open("dark")
        time.sleep(2.5)
        with pytest.raises(RemoteError) as info:
            c.job_status(job)
    assert info.value.code == "unknown_job" and "expired" in info.value.message
    assert len(small_server.server.jobs) == 0


def test_concurrent_clients_get_their_own_answers(server):
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            with Client(server.address) as c:
                for rep in range(5):
                    side = 10 + k * 5 + rep
                    img = dark_square_image(64, box=(2, 2, 2 + side, 2 + side))
                    feats = c.predict("dark", [(TileSpec(k * 1000, rep * 1000, 64, 64), img)])
                    geom = shape(feats[0]["geometry"])
                    assert geom.area == pytest.approx(side * side, rel=0.01)
                    assert geom.bounds[0] == pytest.approx(k * 1000 + 2, abs=0.01)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors


def test_client_reports_missing_server_within_timeout():
    t0 = time.monotonic()
    with Client("tcp://127.0.0.1:1", timeout_s=0.5) as c, pytest.raises(ServerUnavailableError) as info:
        c.hello()
    assert time.monotonic() - t0 < 2
    assert "qpbridge serve" in str(info.value)


def test_features_are_valid_qupath_geojson(server):
    rng = np.random.default_rng(3)
    img = np.where(rng.random((128, 128, 1)) < 0.5, 20, 240).astype(np.uint8).repeat(3, axis=2)  # noise
    with Client(server.address) as c:
        feats = c.predict("dark", [(TileSpec(0, 0, 128, 128), img)])
    assert feats
    text = json.dumps(feats, allow_nan=False)  # raises on NaN / Infinity
    assert "NaN" not in text
    for f in feats:
        geom = shape(f["geometry"])
        assert geom.is_valid and not geom.is_empty
        assert shapely.set_precision(geom, 0.01).is_valid
        cls = f["properties"]["classification"]
        assert set(cls) == {"name", "color"}
