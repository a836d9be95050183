"""HoVer-Net post-processing (``qpbridge.families.hovernet_post``) per tile: one thread vs the shared pool.

Maps are the ideal NP/HV maps of real MoNuSeg nuclei (``../shared/data/monuseg-train``, 512 px tiles at their
native ~0.25 µm/px), so the watershed sees real nucleus counts and shapes; prints ms/tile serial and on the
pool (one thread per core), and the speed-up; then the ms/tile of turning the watershed's labels into one
polygon per nucleus (``geometry.labels_to_polygons``, what instance stitching does with every tile).

    .venv/bin/python bench/bench_hovernet_post.py [--tiles 32]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from qpbridge import geometry
from qpbridge.annotation_files import read_imagescope_xml
from qpbridge.families.hovernet_post import HoverPostParams, hover_instances
from qpbridge.pools import postprocess_pool
from qpbridge.tile_export import paint_geometry
from qpbridge.training.targets import hv_maps

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "monuseg-train"


def tile_maps(n: int, size: int = 512) -> list[tuple[np.ndarray, np.ndarray]]:
    xmls = sorted(DATA.glob("*.xml"))
    if not xmls:
        raise SystemExit(f"needs the MoNuSeg images in {DATA}")
    out = []
    rng = np.random.default_rng(0)
    for i in range(n):
        labels = np.zeros((1000, 1000), np.int32)
        for k, obj in enumerate(read_imagescope_xml(xmls[i % len(xmls)]), start=1):
            paint_geometry(labels, obj.geometry, 0, 0, 1.0, k)
        y, x = rng.integers(0, 1000 - size, 2)
        crop = np.ascontiguousarray(labels[y:y + size, x:x + size])
        noise = rng.normal(0, 0.05, (2, size, size)).astype(np.float32)  # a model's maps are never exact
        out.append(((crop > 0).astype(np.float32), hv_maps(crop) + noise))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", type=int, default=32)
    args = p.parse_args()
    maps = tile_maps(args.tiles)
    params = HoverPostParams()

    def one(m: tuple[np.ndarray, np.ndarray]) -> int:
        return int(hover_instances(m[0], m[1], 0.25, params).max())

    one(maps[0])  # warm-up
    t0 = time.perf_counter()
    serial = [one(m) for m in maps]
    t_serial = time.perf_counter() - t0
    pool = postprocess_pool()
    t0 = time.perf_counter()
    parallel = list(pool.map(one, maps))
    t_pool = time.perf_counter() - t0
    assert serial == parallel
    print(f"{args.tiles} tiles of 512 px, {np.mean(serial):.0f} nuclei per tile, {os.cpu_count()} cores")
    print(f"one thread: {1000 * t_serial / args.tiles:.1f} ms/tile")
    print(f"pool:       {1000 * t_pool / args.tiles:.1f} ms/tile  ({t_serial / t_pool:.2f}x)")
    labels = [hover_instances(m[0], m[1], 0.25, params) for m in maps]
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        polygons = [geometry.labels_to_polygons(lab) for lab in labels]
        best = min(best, time.perf_counter() - t0)
    assert sum(len(p) for p in polygons) == sum(len(np.unique(lab)) - 1 for lab in labels)
    print(f"labels to polygons, one thread: {1000 * best / args.tiles:.2f} ms/tile (best of 3)")


if __name__ == "__main__":
    main()
