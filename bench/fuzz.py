"""Fuzz a real qpbridge server with N mutated messages and report what became of each.

    .venv/bin/python bench/fuzz.py 10000 [--seed 1] [--json out.json]

Starts ``qpbridge serve`` as its own process on a free loopback port (with a slide root holding a small
pyramid TIFF and a link leading out of it), then sends N messages: valid requests of every op with one
mutation each (field types, huge/negative/non-finite numbers, deep nesting, odd Unicode, NUL bytes and
long names in paths, frame counts, corrupt and oversized tiles, PNG/JPEG decode bombs, raw header bytes).
Every message must get a reply; after every message the process must be alive, and `hello` must answer
within a second every 20 messages. A crash restarts the server and is counted. Exit status 1 when
anything crashed, wedged, stalled `hello` or answered ``internal``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import zmq

REPLY_TIMEOUT_S = 20.0
HELLO_EVERY = 20
HELLO_TIMEOUT_S = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out.get("VmRSS", 0.0), out.get("VmHWM", 0.0)


def make_fixtures(root: Path) -> dict[str, Any]:
    import tifffile

    slides = root / "slides"
    slides.mkdir()
    img = np.full((512, 512, 3), 235, np.uint8)
    img[100:300, 150:400] = (150, 60, 140)
    slide = slides / "small.tif"
    tifffile.imwrite(slide, img, tile=(256, 256), photometric="rgb", resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    secret = root / "secret.tif"
    secret.write_bytes(slide.read_bytes())
    (slides / "out.tif").symlink_to(secret)
    (slides / "loop.tif").symlink_to(slides / "loop.tif")
    os.mkfifo(slides / "fifo.tif")
    return {"root": slides, "slide": slide, "secret": secret}


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.args, self.env = args, env
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Wire:
    """DEALER sockets to the server; a fresh one every few messages (new clients, fresh fair shares)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.ctx = zmq.Context()
        self.sock: zmq.Socket | None = None
        self.uses = 0

    def socket(self) -> zmq.Socket:
        if self.sock is None or self.uses >= 8:
            if self.sock is not None:
                self.sock.close(linger=0)
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.address)
            self.uses = 0
        self.uses += 1
        return self.sock

    def exchange(self, frames: list[bytes], timeout_s: float) -> dict[str, Any] | None:
        sock = self.socket()
        sock.send_multipart([b"", *frames])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sock.poll(int((deadline - time.monotonic()) * 1000) + 1):
                parts = sock.recv_multipart()
                try:
                    reply = json.loads(parts[-1].decode("utf-8"))
                except (ValueError, UnicodeDecodeError):
                    return {"ok": False, "error": {"code": "UNPARSEABLE_REPLY"}}
                return reply if isinstance(reply, dict) else {"ok": False, "error": {"code": "UNPARSEABLE_REPLY"}}
        self.sock.close(linger=0) if self.sock is not None else None
        self.sock = None
        return None

    def hello_ok(self, timeout_s: float) -> bool:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.address)
        try:
            sock.send_multipart([b"", b'{"op":"hello","v":1}'])
            return bool(sock.poll(int(timeout_s * 1000)))
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
        self.ctx.term()


# ---- valid requests -----------------------------------------------------------------------------------
def png_bytes(w: int, h: int, rng: random.Random, bomb: bool = False) -> bytes:
    """A PNG of w x h; with ``bomb`` its IDAT is a tiny zlib stream that inflates to every row."""
    raw = b"".join(b"\0" + (b"\0" * (3 * w) if bomb else bytes(rng.randrange(256) for _ in range(3 * w)))
                   for _ in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def tile(x: int = 0, y: int = 0, w: int = 64, h: int = 64, ds: float = 1.0, enc: str = "raw") -> dict[str, Any]:
    return {"x": x, "y": y, "width": w, "height": h, "downsample": ds, "encoding": enc}


def base_messages(ctx: dict[str, Any], rng: random.Random) -> list[tuple[dict[str, Any], list[bytes]]]:
    px = bytes(rng.randrange(256) for _ in range(64 * 64 * 3))
    image = {"name": "fuzz.tif", "mpp": 0.5, "width": 4096, "height": 4096}
    job = ctx.get("job") or "0" * 16
    square = {"type": "Polygon", "coordinates": [[[0, 0], [300, 0], [300, 300], [0, 300], [0, 0]]]}
    return [
        ({"op": "hello", "client": {"name": "fuzz", "version": "1"}}, []),
        ({"op": "models"}, []),
        ({"op": "predict", "model": "tissue", "image": image, "tiles": [tile()]}, [px]),
        ({"op": "predict", "model": "nuclei", "image": image, "tiles": [tile(enc="png")]}, [ctx["png"]]),
        ({"op": "job.open", "model": "tissue", "image": image, "expected_tiles": 4}, []),
        ({"op": "job.open", "model": "tissue", "image": image, "region": {"x": 0, "y": 0, "width": 512, "height": 512},
          "roi": square}, []),
        ({"op": "job.tiles", "job": job, "tiles": [tile(64, 0)]}, [px]),
        ({"op": "job.status", "job": job}, []),
        ({"op": "job.results", "job": job, "offset": 0, "limit": 10}, []),
        ({"op": "job.finish", "job": job}, []),
        ({"op": "job.cancel", "job": job}, []),
        ({"op": "job.close", "job": job}, []),
        ({"op": "job.slide", "model": "tissue", "path": str(ctx["slide"]), "roi": square}, []),
    ]


# ---- mutations ----------------------------------------------------------------------------------------
def odd_values(rng: random.Random, ctx: dict[str, Any]) -> list[Any]:
    root = str(ctx["root"])
    return [None, True, False, 0, -1, 1, 2 ** 31, -(2 ** 31), 2 ** 53, 2 ** 63, -(2 ** 63), 1e308, -1e308, 1e-308,
            5e-324, 0.5, 1e20, 1e6, 65536, "", "x", "\x00", "a\x00b", "\udc00", "\ud800x", "\u202e", "é" * 300,
            "x" * 70000, "🦠" * 100, [], {}, [1, 2], {"a": 1}, [[[[[]]]]], {"type": "Polygon"},
            root + "/../secret.tif", root + "/out.tif", root + "/loop.tif", root + "/fifo.tif", root,
            "/etc/passwd", "/proc/self/environ", "relative.tif", root + "/" + "n" * 5000,
            root + "/small.tif\x00.txt", "/dev/zero", rng.random() * 10 ** rng.randrange(0, 300)]


def paths_of(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:4]):
            out += paths_of(v, (*prefix, i))
    return out


def set_path(obj: Any, path: tuple[Any, ...], value: Any, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete and isinstance(obj, dict):
        obj.pop(path[-1], None)
    else:
        obj[path[-1]] = value


def big_roi(rng: random.Random, n: int) -> dict[str, Any]:
    pts = [[rng.uniform(0, 4000), rng.uniform(0, 4000)] for _ in range(n)]
    return {"type": "Polygon", "coordinates": [[*pts, pts[0]]]}


def mutate(header: dict[str, Any], frames: list[bytes], rng: random.Random,
           ctx: dict[str, Any]) -> tuple[str, list[bytes]]:
    """One mutation of a valid request; returns its kind and the message's frames."""
    header = json.loads(json.dumps(header))
    frames = list(frames)
    kind = rng.choice(["field", "field", "field", "field", "delete", "raw", "frames", "tiles", "numbers", "special"])
    raw: bytes | None = None
    if kind == "field":
        path = rng.choice(paths_of(header))
        set_path(header, path, rng.choice(odd_values(rng, ctx)))
    elif kind == "delete":
        set_path(header, rng.choice(paths_of(header)), None, delete=True)
    elif kind == "numbers":
        numeric = [p for p in paths_of(header) if isinstance(_get(header, p), (int, float))] or paths_of(header)
        set_path(header, rng.choice(numeric), rng.choice([1e20, 1e308, 2 ** 63, -(2 ** 63), -1, 0, 1e-300, 2 ** 31 - 1,
                                                          123456789, 1e9, 0.001, 1e5, 3.3e38]))
    elif kind == "frames":
        choice = rng.randrange(5)
        if choice == 0 and frames:
            frames.pop()
        elif choice == 1:
            frames += [b"\0" * rng.choice([0, 1, 100, 12288])] * rng.choice([1, 3, 300])
        elif choice == 2 and frames:
            frames[0] = frames[0][: rng.randrange(len(frames[0]) + 1)]
        elif choice == 3:
            frames = [bytes(rng.randrange(256) for _ in range(rng.randrange(64))), *frames]
        else:
            frames += [b"\0" * (4 << 20)] * rng.choice([2, 20])  # many frames, each under the frame cap
    elif kind == "tiles":
        header.setdefault("op", "predict")
        if header["op"] not in ("predict", "job.tiles"):
            header.update(op="predict", model=rng.choice(["tissue", "nuclei"]),
                          image={"mpp": rng.choice([0.5, 1, 1e-3, 1e3, 1e20])})
        choice = rng.randrange(6)
        if choice == 0:  # declared huge, few bytes
            header["tiles"] = [tile(w=4096, h=4096)]
            frames = [b"\0" * 100]
        elif choice == 1:  # PNG bomb, declared honestly: every pixel decoded
            n = rng.choice([8, 64])
            header["tiles"] = [tile(w=4096, h=4096, enc="png")] * n
            frames = [ctx["bomb"]] * n
        elif choice == 2:  # PNG that lies about its size
            header["tiles"] = [tile(w=64, h=64, enc="png")]
            frames = [png_bytes(64, 64, rng)[:33].replace(b"\0\0\0@\0\0\0@", struct.pack(">II", 60000, 60000))]
        elif choice == 3:  # a JPEG with a broken frame header
            header["tiles"] = [tile(enc="jpeg")]
            frames = [b"\xff\xd8\xff\xc0\x00\x11\x08" + bytes(rng.randrange(256) for _ in range(40))]
        elif choice == 4:  # resampling that would explode
            header["image"] = {"mpp": 1.0}
            header["tiles"] = [tile(ds=rng.choice([100.0, 1e5, 1e308]))]
            frames = [bytes(64 * 64 * 3)]
        else:
            header["tiles"] = [tile()] * rng.choice([2, 257, 1000])
            frames = [bytes(64 * 64 * 3)] * min(len(header["tiles"]), 300)
    elif kind == "special":
        choice = rng.randrange(5)
        if choice == 0:
            header.update(op="job.open", model="tissue", image={"mpp": rng.choice([0.5, 1e-3, 1e3])},
                          region={"x": 0, "y": 0, "width": rng.choice([2 ** 31 - 1, 10 ** 6, 512]),
                                  "height": rng.choice([2 ** 31 - 1, 10 ** 6, 512])},
                          roi=big_roi(rng, rng.choice([400, 4000])))
        elif choice == 1:
            header["roi"] = big_roi(rng, 200_000)
        elif choice == 2:
            depth = rng.choice([40, 1000, 100_000])
            header["tiles"] = "NEST"
            raw = json.dumps(header).replace('"NEST"', "[" * depth + "1" + "]" * depth).encode()
        elif choice == 3:
            header["op"] = rng.choice(["", "hello ", "HELLO", "job.", "__init__", "x" * 10000, "\udfff"])
        else:
            header.update(op="job.slide", model=rng.choice(["tissue", "/etc", "/" + "m" * 5000, "../x"]),
                          path=rng.choice(odd_values(rng, ctx)[-12:]))
    else:  # raw header bytes
        text = json.dumps(header, ensure_ascii=rng.random() < 0.5)
        choice = rng.randrange(9)
        if choice == 0:
            data = bytearray(text.encode("utf-8", "surrogatepass"))
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            raw = bytes(data)
        elif choice == 1:
            raw = text.encode("utf-8", "surrogatepass")[: rng.randrange(len(text))]
        elif choice == 2:
            raw = text.replace('"v": 1', '"v": 1, "op": "\\udc00\\ud800"').encode()
        elif choice == 3:
            raw = text.replace('"v": 1', '"v": ' + "9" * rng.choice([30, 4299, 5000])).encode()
        elif choice == 4:
            special = rng.choice(["NaN", "Infinity", "-Infinity", "1e999"])
            raw = text.replace('"v": 1', '"v": 1, "x": ' + special).encode()
        elif choice == 5:
            raw = ("[" * rng.choice([100, 1000, 100_000])).encode()
        elif choice == 6:
            raw = text.encode() + b"\xff\xfe"
        elif choice == 7:
            raw = rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"{}", b'{"op":1,"v":1}', b'{"op":"hello"}'])
        else:
            raw = ('{"v":1,"op":"hello","id":"' + "\\ud800" * 3 + '"}').encode()
    data = raw if raw is not None else json.dumps(header).encode("utf-8", "surrogatepass")
    return kind, [data, *frames]


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


# ---- run ----------------------------------------------------------------------------------------------
def run(n: int, seed: int, python: str = sys.executable, log: Any = None) -> dict[str, Any]:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="qpbridge-fuzz-"))
    ctx = make_fixtures(tmp)
    ctx["png"] = png_bytes(64, 64, rng)
    ctx["bomb"] = png_bytes(4096, 4096, rng, bomb=True)
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "python_server")}
    args = [python, "-m", "qpbridge", "--log-level", "error", "serve", "--bind", address, "--device", "cpu",
            "--workers", "2", "--slide-root", str(ctx["root"]), "--job-grace", "5", "--max-request-mb", "64"]
    server = ServerProcess(args, env)
    wire = Wire(address)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    internal: list[str] = []
    crashes = wedges = stalls = 0
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 60
        while not wire.hello_ok(1.0):
            if time.monotonic() > deadline or not server.alive():
                raise SystemExit("the server did not start")
        assert server.proc is not None
        bases = base_messages(ctx, rng)
        for _ in range(2):  # warm up (models loaded, imports done) before the memory baseline
            for header, frames in bases:
                wire.exchange([json.dumps({"v": 1, **header}).encode(), *frames], REPLY_TIMEOUT_S)
        time.sleep(1)
        rss_start, _ = rss_mib(server.proc.pid)
        for i in range(n):
            if i % 50 == 0:  # a live job id for the job.* ops
                reply = wire.exchange([json.dumps({"op": "job.open", "v": 1, "model": "tissue",
                                                   "image": {"mpp": 0.5}}).encode()], REPLY_TIMEOUT_S)
                ctx["job"] = (reply or {}).get("job")
                bases = base_messages(ctx, rng)
            header, frames = rng.choice(bases)
            kind, message = mutate({"v": 1, **header}, frames, rng, ctx)
            kinds[kind] += 1
            reply = wire.exchange(message, REPLY_TIMEOUT_S)
            if not server.alive():
                crashes += 1
                outcomes["CRASH"] += 1
                if log:
                    print(f"crash on message {i} ({kind}): {message[0][:300]!r}", file=log)
                server.start()
                back = time.monotonic() + 60
                while not wire.hello_ok(1.0):
                    if time.monotonic() > back:
                        raise SystemExit(f"the server did not come back within 60 s after message {i}")
                continue
            if reply is None:
                wedges += 1
                outcomes["NO REPLY"] += 1
                if log:
                    print(f"no reply to message {i} ({kind}): {message[0][:300]!r}", file=log)
                continue
            code = "ok" if reply.get("ok") else str((reply.get("error") or {}).get("code"))
            outcomes[code] += 1
            if code == "internal":
                internal.append(f"{(reply.get('error') or {}).get('message')}: {message[0][:200]!r}")
                if log:
                    print(f"internal on message {i}: {internal[-1]}", file=log)
            if i % HELLO_EVERY == 0 and not wire.hello_ok(HELLO_TIMEOUT_S):
                stalls += 1
                if log:
                    print(f"hello stalled after message {i} ({kind}): {message[0][:300]!r}", file=log)
        # Work of vanished clients ends within the grace period; memory comes back.
        time.sleep(8)
        wire.hello_ok(5.0)
        time.sleep(2)
        rss_end, rss_peak = rss_mib(server.proc.pid)
    finally:
        wire.close()
        server.stop()
    return {"messages": n, "seed": seed, "seconds": round(time.monotonic() - t0, 1), "crashes": crashes,
            "wedges": wedges, "hello_stalls": stalls, "internal": len(internal), "outcomes": dict(outcomes),
            "mutation_kinds": dict(kinds), "rss_start_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
            "rss_peak_mib": round(rss_peak, 1), "internal_examples": internal[:10]}


def table(result: dict[str, Any]) -> str:
    rows = [("messages", result["messages"]), ("seconds", result["seconds"]),
            ("server crashes", result["crashes"]), ("no reply (wedge)", result["wedges"]),
            ("hello over 1 s", result["hello_stalls"]), ("`internal` errors", result["internal"])]
    rows += [(f"reply `{k}`", v) for k, v in sorted(result["outcomes"].items(), key=lambda kv: -kv[1])]
    rows += [("RSS start / end / peak (MiB)",
              f"{result['rss_start_mib']} / {result['rss_end_mib']} / {result['rss_peak_mib']}")]
    return "\n".join(["| probe | result |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("n", type=int, help="number of mutated messages")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the result as JSON here")
    args = ap.parse_args()
    result = run(args.n, args.seed, log=sys.stderr)
    print(table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    bad = result["crashes"] or result["wedges"] or result["hello_stalls"] or result["internal"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
