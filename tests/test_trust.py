"""A shared server no client can crash, wedge or exhaust: hostile messages, fair shares, clients that vanish,
CURVE authentication, the slide jail under a swap race. Real sockets on loopback, real files."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import stat
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import zmq

from conftest import start_server, write_pyramid
from qpbridge.client import Client
from qpbridge.errors import AuthenticationError, BadRequestError, QPBridgeError, RemoteError
from qpbridge.protocol import ImageInfo, Limits, TileSpec

REPO = Path(__file__).resolve().parents[1]


def dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    return sock


def exchange(address: str, frames: list[bytes], timeout_s: float = 10.0) -> dict:
    sock = dealer(address)
    try:
        sock.send_multipart([b"", *frames])
        assert sock.poll(int(timeout_s * 1000)), "no reply"
        return json.loads(sock.recv_multipart()[-1])
    finally:
        sock.close()


def hello_seconds(address: str) -> float:
    t0 = time.monotonic()
    assert exchange(address, [b'{"op":"hello","v":1}'], 5.0)["ok"]
    return time.monotonic() - t0


def bomb_png(w: int, h: int) -> bytes:
    """A valid w x h PNG whose IDAT is a tiny zlib stream of zeros: a decode bomb declared honestly."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\0" * ((3 * w + 1) * h), 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", raw) + chunk(b"IEND", b""))


def tile(**kw: object) -> dict:
    return {"x": 0, "y": 0, "width": 64, "height": 64, "downsample": 1.0, "encoding": "raw", **kw}


def send_slow(sock: zmq.Socket, tiles: int, request_id: int | None = None) -> None:
    """One predict of ``tiles`` blank 64 px tiles to the 'slow' model (50 ms a tile), on a raw DEALER."""
    header: dict = {"op": "predict", "v": 1, "model": "slow", "tiles": [tile()] * tiles}
    if request_id is not None:
        header["id"] = request_id
    sock.send_multipart([b"", json.dumps(header).encode(), *([bytes(64 * 64 * 3)] * tiles)])


# ---- hostile messages ----------------------------------------------------------------------------------
_rng = random.Random(3)
RANDOM_RING = [[_rng.uniform(0, 4000), _rng.uniform(0, 4000)] for _ in range(400)]  # crosses itself everywhere
HOSTILE: dict[str, tuple[list[bytes], str]] = {
    "lone surrogate in op": ([b'{"op":"hello","v":1,"op":"\\udc00\\ud800"}'], "bad_request"),
    "lone surrogate in id": ([b'{"op":"hello","v":1,"id":"\\ud800"}'], "bad_request"),
    "nested 1000 deep": ([b'{"op":"hello","v":1,"x":' + b"[" * 1000 + b"]" * 1000 + b"}"], "bad_request"),
    "nested 100000 deep": ([b'{"op":"hello","v":1,"x":' + b"[" * 100000 + b"]" * 100000 + b"}"], "bad_request"),
    "integer of 4300 digits": ([b'{"op":"job.results","v":1,"job":"a","offset":' + b"9" * 4300 + b"}"],
                               "bad_request"),
    "integer of 5000 digits": ([b'{"op":"hello","v":' + b"9" * 5000 + b"}"], "bad_request"),
    "NaN": ([b'{"op":"hello","v":1,"x":NaN}'], "bad_request"),
    "1e999": ([b'{"op":"predict","v":1,"model":"nuclei","image":{"mpp":1e999},"tiles":[]}'], "bad_request"),
    "mpp 1e20 with a region": ([json.dumps({"op": "job.open", "v": 1, "model": "nuclei", "image": {"mpp": 1e20},
                                            "region": {"x": 0, "y": 0, "width": 1000, "height": 1000}}).encode()],
                               "bad_request"),
    "region of 2^31 px at tiny mpp": ([json.dumps({"op": "job.open", "v": 1, "model": "nuclei", "image": {"mpp": 0.001},
                                                   "region": {"x": 0, "y": 0, "width": 2 ** 31 - 1,
                                                              "height": 2 ** 31 - 1}}).encode()], "limit_exceeded"),
    "downsample 1e308": ([json.dumps({"op": "predict", "v": 1, "model": "nuclei", "image": {"mpp": 0.5},
                                      "tiles": [tile(downsample=1e308)]}).encode(), bytes(64 * 64 * 3)],
                         "bad_request"),
    "downsample 2^63": ([json.dumps({"op": "predict", "v": 1, "model": "nuclei", "image": {"mpp": 0.5},
                                     "tiles": [tile(downsample=2 ** 63)]}).encode(), bytes(64 * 64 * 3)],
                        "bad_request"),
    "x of 2^63": ([json.dumps({"op": "predict", "v": 1, "model": "nuclei", "image": {"mpp": 0.5},
                               "tiles": [tile(x=2 ** 63)]}).encode(), bytes(64 * 64 * 3)], "bad_request"),
    # 64x64 px at mpp 1 and downsample 100 would become 12,800^2 px at the model's 0.5 µm/px.
    "resampling to 12800^2": ([json.dumps({"op": "predict", "v": 1, "model": "nuclei", "image": {"mpp": 1},
                                           "tiles": [tile(downsample=100)]}).encode(), bytes(64 * 64 * 3)],
                              "limit_exceeded"),
    "NUL in a model path": ([b'{"op":"predict","v":1,"model":"/a\\u0000b","tiles":[]}'], "bad_request"),
    "over-long model name": ([json.dumps({"op": "predict", "v": 1, "model": "/" + "m" * 5000,
                                          "tiles": []}).encode()], "bad_request"),
    "id of 10000 characters": ([json.dumps({"op": "hello", "v": 1, "id": "i" * 10000}).encode()], "bad_request"),
    "op of 10000 characters": ([json.dumps({"op": "o" * 10000, "v": 1}).encode()], "unknown_op"),
    "ROI of 400 random vertices": ([json.dumps({
        "op": "job.open", "v": 1, "model": "nuclei", "image": {"mpp": 0.5},
        "region": {"x": 0, "y": 0, "width": 4000, "height": 4000},
        "roi": {"type": "Polygon", "coordinates": [[*RANDOM_RING, RANDOM_RING[0]]]}}).encode()], "bad_request"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_message_gets_a_structured_error_fast(server, case):
    frames, code = HOSTILE[case]
    t0 = time.monotonic()
    reply = exchange(server.address, frames)
    assert time.monotonic() - t0 < 3.0, f"{case} took {time.monotonic() - t0:.1f} s"
    got = "ok" if reply["ok"] else reply["error"]["code"]
    assert got == code, reply
    assert hello_seconds(server.address) < 1.0


def test_decoded_pixels_are_bounded_per_request(server):
    """64 PNG tiles of 4096^2 (a few KiB each) would decode to 3 GiB: refused from their headers."""
    png = bomb_png(4096, 4096)
    assert len(png) < 100_000
    header = {"op": "predict", "v": 1, "model": "nuclei", "image": {"mpp": 0.5},
              "tiles": [tile(width=4096, height=4096, encoding="png")] * 64}
    t0 = time.monotonic()
    reply = exchange(server.address, [json.dumps(header).encode(), *([png] * 64)])
    assert reply["error"]["code"] == "limit_exceeded" and "pixels" in reply["error"]["message"]
    assert time.monotonic() - t0 < 2.0


def test_frame_count_and_total_are_refused_while_reading(small_server):
    addr = small_server.address
    header = json.dumps({"op": "predict", "v": 1, "model": "dark", "tiles": []}).encode()
    reply = exchange(addr, [header, *([b"\0"] * 300)])
    assert reply["error"]["code"] == "limit_exceeded" and "frames" in reply["error"]["message"]
    # Each frame under the per-frame cap that ZeroMQ enforces (1 MiB here), all of them over the total.
    reply = exchange(addr, [header, *([b"\0" * 900_000] * 3)])
    assert reply["error"]["code"] == "limit_exceeded"
    assert hello_seconds(addr) < 1.0


def test_heavy_planning_runs_off_the_receiving_loop(server):
    """A job.open with a 40,000-vertex ROI over a region of about 76,000 tiles is planned on a pool: hello stays
    prompt while it is planned. Planned on the loop, a hello sent meanwhile would wait for the whole job.open;
    off it, a hello waits at most for the GIL (one large JSON encoding of the plan holds it for a moment), so
    its worst time is compared with the job's own time, which a loaded machine stretches alike."""
    angles = np.linspace(0, 2 * np.pi, 40_000, endpoint=False)
    ring = [[round(66000 + 65000 * np.cos(a), 1), round(66000 + 65000 * np.sin(a), 1)] for a in angles]
    header = {"op": "job.open", "v": 1, "model": "nuclei", "image": {"mpp": 0.5},
              "region": {"x": 0, "y": 0, "width": 132000, "height": 132000},
              "roi": {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}}
    sock = dealer(server.address)
    try:
        t0 = time.monotonic()
        sock.send_multipart([b"", json.dumps(header).encode()])
        time.sleep(0.05)
        worst = max(hello_seconds(server.address) for _ in range(5))
        assert sock.poll(60_000)
        reply = json.loads(sock.recv_multipart()[-1])
        job_s = time.monotonic() - t0
    finally:
        sock.close()
    assert reply["ok"], reply
    assert len(reply["plan"]["tiles"]) > 50_000
    assert worst < job_s / 3, f"hello took {worst:.2f} s while a job was planned in {job_s:.2f} s"
    with Client(server.address) as c:
        c.job_close(reply["job"])


# ---- fair shares and vanishing clients -----------------------------------------------------------------
def test_pipelining_client_gets_busy_and_others_are_served(models_dir):
    running = start_server(models_dir, Limits(max_client_requests=4), workers=1)
    try:
        greedy = dealer(running.address)
        for i in range(12):
            send_slow(greedy, 20, i)  # 1 s each
        time.sleep(0.1)
        with Client(running.address, timeout_s=10) as other:
            other.predict("dark", [(TileSpec(0, 0, 64, 64), np.zeros((64, 64, 3), np.uint8))])
        # Round-robin between clients: the other client is served right after the greedy request already
        # running, not behind its backlog. So when its answer is in, at most one greedy request has ended
        # (the next takes a second). Counting answers, not seconds, keeps this true on a slow machine.
        codes = []
        while greedy.poll(0):
            codes.append(json.loads(greedy.recv_multipart()[-1]))
        assert sum(r["ok"] for r in codes) <= 1, [r["ok"] for r in codes]
        while len(codes) < 12 and greedy.poll(5000):
            codes.append(json.loads(greedy.recv_multipart()[-1]))
        greedy.close()
        assert [r["error"]["details"]["retry_after_ms"] > 0 for r in codes if not r["ok"]] == [True] * 8
        assert sum(r["ok"] for r in codes) == 4
    finally:
        running.server.stop()
        running.thread.join(10)


def test_fair_queue_serves_the_client_served_longest_ago():
    """Requests that arrive one at a time (a pipelining client whose next request comes in just after its
    last was taken) must not put that client ahead of one that has not been served yet."""
    from qpbridge.server.router import _FairQueue, _Queued

    q = _FairQueue()
    item = lambda name: _Queued(name.encode(), lambda: None, lambda: None)  # noqa: E731
    q.put(b"greedy", item("g0"))
    assert q.get().route == b"g0"  # running; greedy's queue is empty now
    for i in (1, 2, 3):
        q.put(b"greedy", item(f"g{i}"))
    q.put(b"other", item("o0"))
    q.put(b"third", item("t0"))
    q.put(b"other", item("o1"))
    order = [q.get().route.decode() for _ in range(6)]
    assert order == ["o0", "t0", "g1", "o1", "g2", "g3"]
    q.close()
    assert q.get() is None


def test_requests_of_a_vanished_client_are_dropped_not_run(models_dir):
    """A client queues four slow requests and disconnects while the first runs: the three waiting ones
    can never be answered, so they are dropped at once instead of occupying the worker for 1.5 s."""
    running = start_server(models_dir, Limits(max_client_requests=4), workers=1)
    try:
        gone = dealer(running.address)
        for i in range(4):
            send_slow(gone, 10, i)  # 0.5 s each
        time.sleep(0.2)  # the first is running, three wait
        t0 = time.monotonic()
        gone.close(linger=0)
        while running.server.dropped_requests < 3 and time.monotonic() - t0 < 5:
            time.sleep(0.02)
        assert running.server.dropped_requests == 3
        # The worker is free once the running request ends, not after the whole backlog (2 s in all).
        with Client(running.address, timeout_s=10) as other:
            other.predict("dark", [(TileSpec(0, 0, 64, 64), np.zeros((64, 64, 3), np.uint8))])
        assert time.monotonic() - t0 < 1.2
        # A client that stays keeps all of its requests: nothing of its is dropped.
        stay = dealer(running.address)
        for i in range(3):
            send_slow(stay, 1, i)
        replies = [json.loads(stay.recv_multipart()[-1]) for _ in range(3) if stay.poll(5000)]
        stay.close()
        assert [r["ok"] for r in replies] == [True] * 3 and running.server.dropped_requests == 3
    finally:
        running.server.stop()
        running.thread.join(10)


def test_a_reused_socket_number_does_not_drop_the_new_client():
    """Socket numbers are reused: a disconnect reported late for an old connection on descriptor 9 must
    not drop the client now connected through descriptor 9 (another remote address)."""
    from qpbridge.server.router import gone_routes

    peers = {b"old": (9, "('127.0.0.1', 40000)"), b"new": (9, "('127.0.0.1', 40001)"),
             b"other": (11, "('127.0.0.1', 40002)"), b"unknown": (9, None)}
    assert gone_routes(peers, 9, "('127.0.0.1', 40001)") == {b"old"}
    assert gone_routes(peers, 9, None) == {b"old", b"new"}  # nothing on 9 now: both closed
    assert gone_routes(peers, 12, None) == set()


def test_blending_memory_of_running_jobs_is_budgeted(models_dir):
    # 'seams' (2 classes, 64 px tiles): a 4,000 px wide region needs (2 + 1) * 2 * 64 * 4000 * 4 B = 6 MB.
    running = start_server(models_dir, Limits(max_stitch_bytes=8 << 20))
    try:
        region = (0, 0, 4000, 600)
        with Client(running.address, timeout_s=30) as c, Client(running.address, timeout_s=3) as d:
            first = c.job_open_planned("seams", ImageInfo(mpp=1.0), region)
            with pytest.raises(RemoteError) as info:
                d.job_open_planned("seams", ImageInfo(mpp=1.0), region)
            assert info.value.code == "busy"
            with pytest.raises(RemoteError) as info:
                d.job_open_planned("seams", ImageInfo(mpp=1.0), (0, 0, 40000, 600))
            assert info.value.code == "limit_exceeded" and "MiB" in info.value.message
            c.job_close(first["job"])
            assert d.job_open_planned("seams", ImageInfo(mpp=1.0), region)["plan"]["tiles"]
    finally:
        running.server.stop()
        running.thread.join(10)


def test_python_client_retries_busy_answers(models_dir):
    running = start_server(models_dir, Limits(max_queued_requests=1), workers=1)
    try:
        greedy = dealer(running.address)
        send_slow(greedy, 20)
        time.sleep(0.1)
        probe = exchange(running.address, [json.dumps({"op": "predict", "v": 1, "model": "dark",
                                                       "tiles": []}).encode()])
        assert probe["error"]["code"] == "busy"
        with Client(running.address, timeout_s=30) as c:
            t0 = time.monotonic()
            assert c.predict("dark", [(TileSpec(0, 0, 64, 64), np.zeros((64, 64, 3), np.uint8))])
            assert time.monotonic() - t0 > 0.3  # it waited for the greedy request, retrying
        assert json.loads(greedy.recv_multipart()[-1])["ok"]
        greedy.close()
    finally:
        running.server.stop()
        running.thread.join(10)


def test_queued_bytes_are_bounded_server_wide(models_dir):
    running = start_server(models_dir, Limits(max_queued_bytes=1 << 20), workers=1)
    try:
        first = dealer(running.address)
        send_slow(first, 20)
        time.sleep(0.1)
        big = [tile(width=512, height=512)] * 2  # 1.5 MiB more than the 1 MiB queued budget allows
        header = {"op": "predict", "v": 1, "model": "dark", "tiles": big}
        reply = exchange(running.address, [json.dumps(header).encode(), *([bytes(512 * 512 * 3)] * 2)])
        assert reply["error"]["code"] == "busy" and "MiB" in reply["error"]["message"]
        assert json.loads(first.recv_multipart()[-1])["ok"]
        first.close()
    finally:
        running.server.stop()
        running.thread.join(10)


def test_job_of_a_vanished_client_is_cancelled_after_the_grace(models_dir, tmp_path):
    img = np.full((1200, 1600, 3), 235, np.uint8)  # 'slow': 130 tiles of 50 ms, longer than the grace
    img[100:300, 100:500] = 30
    slide = write_pyramid(tmp_path / "s.tif", img, mpp=0.5, levels=1)
    running = start_server(models_dir, Limits(job_grace_s=1.0), slide_roots=[tmp_path])
    try:
        gone = Client(running.address)
        tiles_job = gone.job_open("dark", ImageInfo(mpp=1.0))
        slide_job = gone.request({"op": "job.slide", "model": "slow", "path": str(slide)})["job"]
        gone.close()
        time.sleep(3.5)
        with Client(running.address) as c:
            for job in (tiles_job, slide_job):
                with pytest.raises(RemoteError) as info:
                    c.job_status(job)
                assert info.value.code == "unknown_job" and "without a request from its client" in info.value.message
            # The slide pool is free again: a job of a client that stays finishes.
            job = c.request({"op": "job.slide", "model": "dark", "path": str(slide)})["job"]
            deadline = time.monotonic() + 30
            while (st := c.job_status(job))["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert st["state"] == "done"
        assert len(running.server.jobs) == 1
    finally:
        running.server.stop()
        running.thread.join(10)


def test_running_jobs_per_client_are_capped(models_dir):
    running = start_server(models_dir, Limits(max_client_jobs=2))
    try:
        with Client(running.address, timeout_s=2) as c:
            c.job_open("dark")
            c.job_open("dark")
            with pytest.raises(RemoteError) as info:
                c.job_open("dark")
            assert info.value.code == "busy"
        with Client(running.address) as other:
            other.job_open("dark")
    finally:
        running.server.stop()
        running.thread.join(10)


# ---- CURVE ---------------------------------------------------------------------------------------------
@pytest.fixture
def curve_keys(tmp_path):
    from qpbridge.keys import new_key_pair

    server_pub, server_sec = new_key_pair(tmp_path / "server")
    _alice_pub, alice_sec = new_key_pair(tmp_path / "clients", "alice")
    _, mallory_sec = new_key_pair(tmp_path / "other", "mallory")
    return {"server_pub": server_pub, "server_sec": server_sec, "clients": tmp_path / "clients",
            "alice_sec": alice_sec, "mallory_sec": mallory_sec}


def test_keys_new_writes_a_private_secret(tmp_path, capsys):
    from qpbridge.cli import main

    assert main(["keys", "new", str(tmp_path / "k"), "--name", "lab"]) == 0
    secret = tmp_path / "k" / "lab.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert "secret-key" in secret.read_text() and "secret-key" not in (tmp_path / "k" / "lab.key").read_text()
    assert main(["keys", "new", str(tmp_path / "k"), "--name", "lab"]) == 1  # never overwrites a secret


def test_curve_refuses_clients_without_the_key(models_dir, curve_keys):
    running = start_server(models_dir, curve_secret=curve_keys["server_sec"])
    try:
        t0 = time.monotonic()
        with Client(running.address, timeout_s=10) as c, pytest.raises(AuthenticationError) as info:
            c.hello()
        assert "--server-key" in info.value.message and time.monotonic() - t0 < 3
        wrong = curve_keys["mallory_sec"].with_suffix(".key")
        with Client(running.address, timeout_s=10, server_key=wrong) as c, pytest.raises(AuthenticationError):
            c.hello()
        # A plain ZeroMQ client is never answered.
        sock = dealer(running.address)
        sock.send_multipart([b"", b'{"op":"hello","v":1}'])
        assert not sock.poll(1000)
        sock.close()
        with Client(running.address, server_key=curve_keys["server_pub"]) as c:
            assert "curve" in c.hello()["capabilities"]
            assert c.predict("dark", [(TileSpec(0, 0, 64, 64), np.zeros((64, 64, 3), np.uint8))])
        key_text = curve_keys["server_pub"].read_text().split('"')[1]
        with Client(running.address, server_key=key_text) as c:
            assert c.hello()["ok"]
    finally:
        running.server.stop()
        running.thread.join(10)


def test_curve_allow_list(models_dir, curve_keys, capsys):
    from qpbridge.cli import main

    running = start_server(models_dir, curve_secret=curve_keys["server_sec"], curve_clients=curve_keys["clients"])
    try:
        with Client(running.address, server_key=curve_keys["server_pub"], client_key=curve_keys["alice_sec"]) as c:
            assert c.hello()["ok"]
        for key in (None, curve_keys["mallory_sec"]):
            with Client(running.address, timeout_s=5, server_key=curve_keys["server_pub"], client_key=key) as c, \
                    pytest.raises(AuthenticationError):
                c.hello()
        assert main(["models", "--server", running.address, "--server-key", str(curve_keys["server_pub"]),
                     "--client-key", str(curve_keys["alice_sec"]), "--json"]) == 0
        assert "nuclei" in capsys.readouterr().out
        assert "QPBRIDGE_SERVER_KEY" not in os.environ
        assert main(["models", "--server", running.address, "--timeout", "3"]) == 1
        assert "CURVE" in capsys.readouterr().err
    finally:
        running.server.stop()
        running.thread.join(10)


def test_off_loopback_needs_curve_or_insecure(curve_keys):
    from qpbridge.engine import Engine
    from qpbridge.server import Server

    with pytest.raises(QPBridgeError, match="--curve-secret"):
        Server(Engine(None), "tcp://0.0.0.0:*")
    server = Server(Engine(None), "tcp://0.0.0.0:*", curve_secret=curve_keys["server_sec"])
    server.stop()
    server.serve_forever()  # returns at once: stopped before it started; closes its sockets
    insecure = Server(Engine(None), "tcp://0.0.0.0:*", allow_remote=True)
    insecure.stop()
    insecure.serve_forever()


# ---- slide jail ----------------------------------------------------------------------------------------
def test_slide_jail_holds_under_a_symlink_swap_race(tmp_path):
    from qpbridge.slides import open_in_roots

    root = tmp_path / "root"
    root.mkdir()
    inside = root / "inside.tif"
    inside.write_bytes(b"inside")
    outside = tmp_path / "outside.tif"
    outside.write_bytes(b"outside")
    link = root / "swap.tif"
    link.symlink_to(inside)
    stop = threading.Event()

    def swap() -> None:
        targets = [inside, outside]
        i = 0
        while not stop.is_set():
            tmp = root / f".swap{i % 2}"
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(targets[i % 2])
            os.replace(tmp, link)
            i += 1

    swapper = threading.Thread(target=swap)
    swapper.start()
    opened = refused = escapes = 0
    try:
        for _ in range(2000):
            try:
                handle = open_in_roots(str(link), [root])
            except BadRequestError:
                refused += 1
                continue
            with open(handle.handle_path, "rb") as f:
                if f.read() != b"inside":
                    escapes += 1
            handle.close()
            opened += 1
    finally:
        stop.set()
        swapper.join()
    assert escapes == 0
    assert opened > 0 and refused > 0, (opened, refused)  # the race was run both ways


@pytest.mark.parametrize("name", ["nul", "long", "loop", "fifo", "dir", "dotdot", "relative"])
def test_slide_jail_refuses_odd_paths(tmp_path, name):
    from qpbridge.slides import open_in_roots

    root = tmp_path / "root"
    root.mkdir()
    (root / "loop.tif").symlink_to(root / "loop.tif")
    os.mkfifo(root / "fifo.tif")
    (root / "d.tif").mkdir()
    (tmp_path / "x.tif").write_bytes(b"x")
    path = {"nul": f"{root}/a\0.tif", "long": f"{root}/{'n' * 5000}", "loop": f"{root}/loop.tif",
            "fifo": f"{root}/fifo.tif", "dir": f"{root}/d.tif", "dotdot": f"{root}/../x.tif",
            "relative": "x.tif"}[name]
    t0 = time.monotonic()
    with pytest.raises(BadRequestError):
        open_in_roots(path, [root])
    assert time.monotonic() - t0 < 1


def test_slide_job_reads_through_the_opened_file(models_dir, tmp_path):
    img = np.full((400, 600, 3), 235, np.uint8)
    img[100:300, 100:500] = 30
    root = tmp_path / "root"
    root.mkdir()
    slide = write_pyramid(root / "s.tif", img, mpp=0.5, levels=1)
    running = start_server(models_dir, slide_roots=[root])
    try:
        with Client(running.address) as c:
            for bad in (f"{root}/a\0.tif", f"{root}/{'n' * 5000}.tif"):
                with pytest.raises(RemoteError) as info:
                    c.request({"op": "job.slide", "model": "dark", "path": bad})
                assert info.value.code == "bad_request"
            job = c.request({"op": "job.slide", "model": "dark", "path": str(slide)})["job"]
            slide.unlink()  # the job holds the file it opened
            deadline = time.monotonic() + 30
            while (st := c.job_status(job))["state"] == "running" and time.monotonic() < deadline:
                time.sleep(0.1)
            assert st["state"] == "done" and st["features"] >= 1, st
    finally:
        running.server.stop()
        running.thread.join(10)


# ---- fuzz ----------------------------------------------------------------------------------------------
def _fuzz_module():
    spec = importlib.util.spec_from_file_location("qpbridge_fuzz", REPO / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_fuzz_two_thousand_mutations():
    result = _fuzz_module().run(2000, seed=11)
    assert result["crashes"] == 0 and result["wedges"] == 0, result
    assert result["hello_stalls"] == 0 and result["internal"] == 0, result
    assert sum(result["outcomes"].values()) == 2000
    assert result["rss_end_mib"] < result["rss_start_mib"] + 150, result
