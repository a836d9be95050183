"""Transport and built-in model speed: prints measured numbers (not a test).

    python bench/bench_server.py [--server tcp://HOST:PORT] [--n 2000]

Without --server, a server is started in this process on a random loopback port.
Measures: hello round-trip p50/p99; predict round-trip of one 256 px and one 1024 px raw tile through the
server vs the same call in process (ratio); nuclei megapixels/s in process on this machine's CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

from qpbridge.client import Client
from qpbridge.engine import Engine
from qpbridge.protocol import ImageInfo, TileSpec
from qpbridge.server import Server

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg-train"


def he_image(size: int) -> tuple[np.ndarray, str]:
    """A real H&E crop at 0.5 µm/px when the shared data is there, else a synthetic one."""
    import cv2

    tifs = sorted(DATA.glob("*.tif"))
    if tifs:
        import tifffile

        img = tifffile.imread(tifs[0])[:, :, :3]
        img = cv2.resize(img, (img.shape[1] // 2, img.shape[0] // 2), interpolation=cv2.INTER_AREA)
        reps = (size // img.shape[0] + 1, size // img.shape[1] + 1, 1)
        return np.ascontiguousarray(np.tile(img, reps)[:size, :size]), tifs[0].name
    rng = np.random.default_rng(0)
    img = np.full((size, size, 3), (226, 170, 200), np.uint8)
    for x, y in rng.uniform(8, size - 8, (size * size // 900, 2)).astype(int):
        cv2.circle(img, (int(x), int(y)), 7, (90, 40, 140), -1)
    return img, "synthetic"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--server")
    ap.add_argument("--n", type=int, default=2000, help="hello round-trips")
    ap.add_argument("--reps", type=int, default=10, help="repetitions of each predict")
    args = ap.parse_args(argv)

    engine = Engine()
    running = None
    address = args.server
    if address is None:
        running = Server(engine, "tcp://127.0.0.1:*", workers=2)
        threading.Thread(target=running.serve_forever, daemon=True).start()
        address = running.address
    try:
        with Client(address) as c:
            c.hello()
            lat = []
            for _ in range(args.n):
                t = time.perf_counter()
                c.hello()
                lat.append((time.perf_counter() - t) * 1e3)
            print(f"hello round-trip over {args.n}: p50 {pct(lat, 0.5):.3f} ms, p99 {pct(lat, 0.99):.3f} ms")

            image = ImageInfo(name="bench", mpp=0.5)
            for size in (256, 1024):
                px, source = he_image(size)
                tile = [(TileSpec(0, 0, size, size), px)]
                engine.predict("nuclei", image, tile)  # warm up (loads the model)
                c.predict("nuclei", tile, image)
                local, remote = [], []
                for _ in range(args.reps):
                    t = time.perf_counter()
                    n_local = len(engine.predict("nuclei", image, tile))
                    local.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    n_remote = len(c.predict("nuclei", tile, image))
                    remote.append(time.perf_counter() - t)
                lm, rm = statistics.median(local), statistics.median(remote)
                print(f"predict nuclei, one {size} px raw tile ({source}, {n_local}/{n_remote} nuclei): "
                      f"in process {lm * 1e3:.1f} ms, through the server {rm * 1e3:.1f} ms, "
                      f"ratio {rm / lm:.3f} (server overhead {(rm - lm) * 1e3:.1f} ms)")

        px, source = he_image(2048)
        tiles = [(TileSpec(x, y, 512, 512), np.ascontiguousarray(px[y:y + 512, x:x + 512]))
                 for y in range(0, 2048, 512) for x in range(0, 2048, 512)]
        t = time.perf_counter()
        n = len(engine.predict("nuclei", image, tiles))
        dt = time.perf_counter() - t
        print(f"nuclei in process on CPU: {2048 * 2048 / 1e6 / dt:.2f} Mpx/s at 0.5 µm/px "
              f"({len(tiles)} tiles of 512 px, {n} nuclei, {dt:.2f} s, {source})")
    finally:
        if running is not None:
            running.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
