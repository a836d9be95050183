"""Hostile-client probes against a real server process: what each costs the server, and for how long.

    .venv/bin/python bench/probes.py [--grace 5]

Starts ``qpbridge serve`` (built-in models, CPU, a slide root) on a free loopback port and runs, one after
another: 50 clients that open jobs, send a batch and vanish; one client that pipelines 60 large predicts
and leaves; 64 PNG tiles of 4096^2; 30 frames of 40 MiB; a 400-vertex self-crossing ROI while others
call ``hello``; a 64x64 tile at mpp 1 and downsample 100; slide-path tricks including a link swapped
while the server opens it. For each: the answer, the server's peak RSS while it ran (sampled every
20 ms), how long until a fresh client's request is answered within a second again, and the RSS once
the server is idle (after the grace period). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz import ServerProcess, free_port, make_fixtures, png_bytes, rss_mib


class Sampler:
    """The peak RSS of a process while a probe runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak, self._stop = pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_mib(self.pid)[0])
            time.sleep(0.02)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def sock(ctx: zmq.Context, address: str) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def ask(ctx: zmq.Context, address: str, frames: list[bytes], timeout_s: float = 30.0) -> dict[str, Any] | None:
    s = sock(ctx, address)
    try:
        s.send_multipart([b"", *frames])
        if not s.poll(int(timeout_s * 1000)):
            return None
        return dict(json.loads(s.recv_multipart()[-1]))
    finally:
        s.close()


def code(reply: dict[str, Any] | None) -> str:
    if reply is None:
        return "NO REPLY"
    return "ok" if reply.get("ok") else str(reply["error"]["code"])


def hdr(**fields: Any) -> bytes:
    return json.dumps({"v": 1, **fields}).encode()


def tile(**kw: Any) -> dict[str, Any]:
    return {"x": 0, "y": 0, "width": 64, "height": 64, "downsample": 1.0, "encoding": "raw", **kw}


def recovery_s(ctx: zmq.Context, address: str, limit_s: float = 600) -> float:
    """Seconds until a fresh client's one-tile predict is answered within 1 s."""
    t0 = time.monotonic()
    frames = [hdr(op="predict", model="tissue", image={"mpp": 8.0}, tiles=[tile()]), bytes(64 * 64 * 3)]
    while time.monotonic() - t0 < limit_s:
        t = time.monotonic()
        reply = ask(ctx, address, frames, 1.0)
        if reply is not None and time.monotonic() - t < 1.0 and reply.get("ok"):
            return time.monotonic() - t0
    return float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--grace", type=float, default=5.0, help="the server's --job-grace (seconds)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="qpbridge-probes-"))
    fx = make_fixtures(tmp)
    address = f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "python_server")}
    server = ServerProcess([sys.executable, "-m", "qpbridge", "--log-level", "error", "serve", "--bind", address,
                            "--device", "cpu", "--workers", "2", "--slide-root", str(fx["root"]),
                            "--job-grace", str(args.grace)], env)
    ctx = zmq.Context()
    rows: list[tuple[str, str, float, float, float, float]] = []
    try:
        deadline = time.monotonic() + 60
        while ask(ctx, address, [hdr(op="hello")], 1.0) is None:
            if time.monotonic() > deadline:
                raise SystemExit("server did not start")
        assert server.proc is not None
        pid = server.proc.pid
        recovery_s(ctx, address)  # warm: models loaded
        ask(ctx, address, [hdr(op="predict", model="nuclei", image={"mpp": 0.5}, tiles=[tile(width=256, height=256)]),
                           bytes(256 * 256 * 3)])
        rng = random.Random(1)
        big = bytes(rng.getrandbits(8) for _ in range(512 * 512 * 3))

        def vanish50() -> str:
            socks, busy = [], 0
            for _ in range(50):
                s = sock(ctx, address)
                s.send_multipart([b"", hdr(op="job.open", model="tissue", image={"mpp": 8.0, "width": 8192,
                                                                                   "height": 8192},
                                           region={"x": 0, "y": 0, "width": 8192, "height": 8192})])
                assert s.poll(30000)
                reply = json.loads(s.recv_multipart()[-1])
                if not reply["ok"]:
                    busy += reply["error"]["code"] == "busy"
                    s.close()
                    continue
                plan = reply["plan"]["tiles"][:4]
                s.send_multipart([b"", hdr(op="job.tiles", job=reply["job"], tiles=[
                    {**t, "encoding": "raw"} for t in plan]),
                    *[bytes(t["width"] * t["height"] * 3) for t in plan]])
                socks.append(s)
            for s in socks:
                s.close()
            return f"{len(socks)} jobs opened and 4 tiles each sent, {busy} answered busy; clients gone"

        def pipeline60() -> str:
            s = sock(ctx, address)
            frames = [hdr(op="predict", model="nuclei", image={"mpp": 0.5},
                          tiles=[tile(width=512, height=512)] * 64), *([big] * 64)]
            for _ in range(60):
                s.send_multipart([b"", *frames])
            time.sleep(1.0)
            codes: dict[str, int] = {}
            while s.poll(200):
                c = code(json.loads(s.recv_multipart()[-1]))
                codes[c] = codes.get(c, 0) + 1
            s.close()
            return f"60 x 48 MiB predicts; answers before leaving: {codes}"

        def png64() -> str:
            bomb = png_bytes(4096, 4096, rng, bomb=True)
            r = ask(ctx, address, [hdr(op="predict", model="nuclei", image={"mpp": 0.5},
                                       tiles=[tile(width=4096, height=4096, encoding="png")] * 64), *([bomb] * 64)])
            return f"{code(r)} ({len(bomb) >> 10} KiB each)"

        def frames30() -> str:
            r = ask(ctx, address, [hdr(op="predict", model="nuclei", tiles=[]), *([b"\0" * (40 << 20)] * 30)])
            return code(r)

        def roi400() -> str:
            ring = [[rng.uniform(0, 4000), rng.uniform(0, 4000)] for _ in range(400)]
            s = sock(ctx, address)
            s.send_multipart([b"", hdr(op="job.open", model="nuclei", image={"mpp": 0.5},
                                       region={"x": 0, "y": 0, "width": 4000, "height": 4000},
                                       roi={"type": "Polygon", "coordinates": [[*ring, ring[0]]]})])
            worst = 0.0
            for _ in range(10):
                t = time.monotonic()
                ask(ctx, address, [hdr(op="hello")], 60)
                worst = max(worst, time.monotonic() - t)
            r = json.loads(s.recv_multipart()[-1]) if s.poll(60000) else None
            s.close()
            return f"{code(r)}; slowest of 10 hellos meanwhile {worst * 1000:.0f} ms"

        def resample() -> str:
            t = time.monotonic()
            r = ask(ctx, address, [hdr(op="predict", model="nuclei", image={"mpp": 1.0}, tiles=[tile(downsample=100)]),
                                   bytes(64 * 64 * 3)])
            return f"{code(r)} in {(time.monotonic() - t) * 1000:.0f} ms"

        def jail() -> str:
            root = fx["root"]
            tricks = [f"{root}/../secret.tif", f"{root}/out.tif", f"{root}/loop.tif", f"{root}/fifo.tif",
                      f"{root}/./../secret.tif", f"{root}/small.tif/../../secret.tif", "/etc/passwd",
                      f"{root}/{'n' * 5000}", f"{root}/a\0b", str(fx["secret"])]
            outcomes: dict[str, int] = {}
            for i in range(50):
                r = ask(ctx, address, [hdr(op="job.slide", model="tissue", path=tricks[i % len(tricks)])])
                outcomes[code(r)] = outcomes.get(code(r), 0) + 1
            # The swap race: a link flipped between an inside and an outside file while the server opens it.
            link, stop = root / "swap.tif", threading.Event()

            def flip() -> None:
                i = 0
                while not stop.is_set():
                    t = root / f".flip{i % 2}"
                    t.unlink(missing_ok=True)
                    t.symlink_to(fx["slide"] if i % 2 else fx["secret"])
                    os.replace(t, link)
                    i += 1

            flipper = threading.Thread(target=flip)
            flipper.start()
            opened = 0
            try:
                for _ in range(200):
                    r = ask(ctx, address, [hdr(op="job.slide", model="tissue", path=str(link))])
                    if r is not None and r.get("ok"):
                        opened += 1
                        ask(ctx, address, [hdr(op="job.close", job=r["job"])])
            finally:
                stop.set()
                flipper.join()
            secret_atime = os.stat(fx["secret"]).st_atime_ns
            return (f"50 path tricks: {outcomes}; swap race: {opened} of 200 opened, all of them the inside file "
                    f"(outside file's atime unchanged: {secret_atime == fx['secret_atime']})")

        fx["secret_atime"] = os.stat(fx["secret"]).st_atime_ns
        probes: list[tuple[str, Callable[[], str]]] = [
            ("50 clients open jobs, send a batch, vanish", vanish50),
            ("one client pipelines 60 large predicts and leaves", pipeline60),
            ("64 PNG tiles of 4096^2", png64),
            ("30 frames x 40 MiB", frames30),
            ("400-vertex self-crossing ROI", roi400),
            ("64x64 tile, mpp 1, downsample 100", resample),
            ("slide path jail", jail),
        ]
        for name, probe in probes:
            before = rss_mib(pid)[0]
            with Sampler(pid) as sampler:
                what = probe()
                rec = recovery_s(ctx, address)
            time.sleep(args.grace + 4.0)  # abandoned jobs cancelled, memory given back
            after = rss_mib(pid)[0]
            if not server.alive():
                what += " - SERVER DIED"
                server.start()
            rows.append((name, what, before, sampler.peak, rec, after))
    finally:
        ctx.term()
        server.stop()
    print("| probe | answer | RSS before (MiB) | peak | served again after (s) | RSS idle after (MiB) |")
    print("|---|---|---|---|---|---|")
    for name, what, before, peak, rec, after in rows:
        print(f"| {name} | {what} | {before:.0f} | {peak:.0f} | {rec:.1f} | {after:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
