"""Model-only vs end-to-end tiles/s of the hovernet family (prints measured numbers).

    .venv/bin/python bench/bench_hovernet.py [--device auto|cpu|cuda] [--precision fp32 fp16] [--tiles 32]

The shipped ``models/hovernet-monuseg`` card (512 px tiles at 0.25 µm/px, width-32 network) with its trained
weights when ``models/hovernet-monuseg/weights.pt`` is there, else random ones (then the maps find no nuclei
and the post-processing numbers mean little: measure with the trained weights), loaded through the real card
path from a temporary models directory, on MoNuSeg pixels when ``../shared/data`` is there (else a generated
H&E-like image):

- model-only: the network's maps of ready tiles on the device worker (``HoverNetFamily.maps``);
- model + post-processing: ``predict`` (maps, then HoVer-Net's watershed per tile on the shared pool);
- end to end: ``annotate_image`` over an image of ``--tiles`` planned tiles (plan, batches, post-processing,
  seams, features).

fp16 runs on CUDA only (skipped on a CPU).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
MONUSEG = REPO.parent / "shared" / "data" / "monuseg-train" / "TCGA-21-5784-01Z-00-DX1.tif"


def image(side: int) -> np.ndarray:
    if MONUSEG.is_file():
        src = cv2.cvtColor(cv2.imread(str(MONUSEG)), cv2.COLOR_BGR2RGB)
        reps = math.ceil(side / src.shape[0])
        return np.ascontiguousarray(np.tile(src, (reps, reps, 1))[:side, :side])
    rng = np.random.default_rng(0)
    img = np.full((side, side, 3), (235, 170, 200), dtype=np.uint8)
    yy, xx = np.mgrid[:side, :side]
    for cy, cx in rng.integers(0, side, (side * side // 2000, 2)):
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 64] = (80, 55, 135)
    return img


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16"])
    p.add_argument("--tiles", type=int, default=32, help="tiles per measurement (default 32)")
    args = p.parse_args()

    import torch

    from qpbridge.annotate import annotate_image
    from qpbridge.devices import resolve_device
    from qpbridge.engine import Engine
    from qpbridge.families.hovernet import HoverNetFamily
    from qpbridge.families.hovernet_net import HoverArch, HoverNet

    device = resolve_device(args.device)
    card = json.loads((REPO / "models" / "hovernet-monuseg" / "config.json").read_text())
    size = int(card["tile"]["size"])
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precision:
            if precision != "fp32" and not device.startswith("cuda"):
                print(f"{precision}: skipped on {device}")
                continue
            folder = Path(tmp) / f"hover-{precision}"
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({**card, "name": folder.name,
                                                            "params": {**card["params"], "precision": precision}}))
            trained = REPO / "models" / "hovernet-monuseg" / "weights.pt"
            if trained.is_file():
                shutil.copy(trained, folder / "weights.pt")
            else:
                torch.manual_seed(0)
                torch.save(HoverNet(HoverArch.from_params(card["params"])).state_dict(), str(folder / "weights.pt"))
            engine = Engine(Path(tmp), device=device)
            model = engine.model(folder.name)
            assert isinstance(model, HoverNetFamily)
            batch = max(1, int(card["tile"].get("batch_size", 8)))
            src = image(size * 2)
            tiles = [src[y:y + size, x:x + size].copy() for y in (0, size) for x in (0, size)]
            tiles = (tiles * math.ceil(args.tiles / len(tiles)))[:args.tiles]
            model.maps(tiles[:batch])  # warm-up
            t0 = time.perf_counter()
            for i in range(0, len(tiles), batch):
                model.maps(tiles[i:i + batch])
            maps_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            for i in range(0, len(tiles), batch):
                model.predict(tiles[i:i + batch])
            predict_s = time.perf_counter() - t0
            # an image of about --tiles planned tiles at the card's overlap
            step = size - engine.card(folder.name).plan_overlap
            side = size + step * max(1, round(math.sqrt(args.tiles)) - 1)
            t0 = time.perf_counter()
            features, stats = annotate_image(engine, folder.name, image(side), card["mpp"], name="bench")
            e2e_s = time.perf_counter() - t0
            rows.append((precision, len(tiles) / maps_s, len(tiles) / predict_s, stats.tiles / e2e_s, stats.tiles,
                         len(features)))
            model.close()
    weights = "trained" if (REPO / "models" / "hovernet-monuseg" / "weights.pt").is_file() else "random"
    print(f"hovernet-monuseg ({size} px tiles, {weights} weights) on {device}")
    print(f"{'precision':<10} {'model-only':>12} {'+ post-proc':>12} {'end to end':>12}  (tiles/s; e2e tiles, nuclei)")
    for prec, m, pp, e2e, n, nf in rows:
        print(f"{prec:<10} {m:>12.2f} {pp:>12.2f} {e2e:>12.2f}  ({n}, {nf})")


if __name__ == "__main__":
    main()
