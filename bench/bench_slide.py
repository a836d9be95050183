"""Whole-slide throughput vs the model-only ceiling, in one run: prints measured numbers (not a test).

    python bench/bench_slide.py [--device auto|cpu|cuda] [--size 8192] [--precision fp32 fp16]
                                [--batch 256] [--model-only-tiles 2048]

Builds SegFormer-B0 with random weights (speed only; HOTSPoT's architecture, 3 classes, 256 px tiles at
1 µm/px), saves it as a save_pretrained folder and serves it through the real card/engine path. Writes a
synthetic JPEG-compressed pyramidal TIFF of --size x --size px at 0.5 µm/px, then for each precision:
- model-only: the same model object fed ready uint8 tiles already in memory (tiles/s);
- end to end: `annotate_slide` on the slide (block reads on a thread pool, resize to 1 µm/px, model,
  blending and polygons), tiles/s; and the ratio of the two, peak host RSS and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def synthetic_slide(path: Path, size: int) -> Path:
    """Tissue-like texture with large blobs, pyramidal, JPEG tiles (what a scanner writes)."""
    import cv2
    import tifffile

    rng = np.random.default_rng(0)
    small = rng.integers(120, 235, (size // 64, size // 64, 3), dtype=np.uint8)
    img = cv2.resize(small, (size, size), interpolation=cv2.INTER_CUBIC)
    img = np.clip(img.astype(np.int16) + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        levels = 3
        for lvl in range(levels):
            ds = 2 ** lvl
            level = img if ds == 1 else cv2.resize(img, (size // ds, size // ds), interpolation=cv2.INTER_AREA)
            res = (1e4 / (0.5 * ds), 1e4 / (0.5 * ds))
            if lvl == 0:
                tw.write(level, subifds=levels - 1, resolution=res, **opts)
            else:
                tw.write(level, subfiletype=1, resolution=res, **opts)
    return path


def make_card(root: Path, precision: str, batch: int) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    weights = root / "b0-weights"
    if not weights.exists():
        SegformerForSemanticSegmentation(SegformerConfig(num_labels=3)).save_pretrained(weights)  # B0 defaults
    name = f"segformer-b0-{precision}"
    folder = root / name
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "schema_version": 1, "name": name, "family": "segformer-hf", "task": "semantic-segmentation",
        "object_type": "annotation",
        "classes": [{"name": "Background", "color": [255, 255, 255], "emit": False},
                    {"name": "Lobule", "color": [222, 120, 160]}, {"name": "Portal tract", "color": [30, 110, 220]}],
        "tile": {"size": 256, "overlap": 64, "batch_size": batch}, "mpp": 1.0,
        "postprocess": {"simplify_um": 2.0, "min_area_um2": 500.0},
        "params": {"precision": precision, "tissue_filter": False}, "weights": str(weights),
    }))
    return folder


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=8192, help="slide side in px at 0.5 µm/px")
    ap.add_argument("--precision", nargs="+", default=["fp32", "fp16"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--model-only-tiles", type=int, default=2048)
    ap.add_argument("--readers", type=int, default=4)
    args = ap.parse_args(argv)

    from qpbridge.annotate import annotate_slide
    from qpbridge.devices import resolve_device
    from qpbridge.engine import Engine

    device = resolve_device(args.device)
    import torch

    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "none"
    print(f"device {device} ({gpu}); torch {torch.__version__}; slide {args.size}x{args.size} px at 0.5 µm/px")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        slide = synthetic_slide(root / "slide.tif", args.size)
        print(f"wrote synthetic slide in {time.perf_counter() - t:.1f} s ({slide.stat().st_size / 1e6:.1f} MB)")
        for precision in args.precision:
            if precision != "fp32" and not device.startswith("cuda"):
                print(f"{precision}: skipped (mixed precision runs on CUDA only)")
                continue
            make_card(root, precision, args.batch)
            engine = Engine(root, device=device)
            name = f"segformer-b0-{precision}"
            model = engine.model(name)
            rng = np.random.default_rng(1)
            tiles = [rng.integers(0, 255, (256, 256, 3), dtype=np.uint8) for _ in range(args.batch)]
            model.predict(tiles)  # warm-up: kernels, allocator
            if device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            n = 0
            t = time.perf_counter()
            while n < args.model_only_tiles:
                model.predict(tiles)
                n += len(tiles)
            model_only = n / (time.perf_counter() - t)

            result = annotate_slide(engine, slide, name, tissue_filter=False, readers=args.readers)
            st = result.stats
            e2e = st.tiles / st.seconds
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            gpu_peak = (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
                        if device.startswith("cuda") else "")
            print(f"{precision}: model-only {model_only:.1f} tiles/s; end-to-end {e2e:.1f} tiles/s "
                  f"({st.tiles} tiles in {st.seconds:.2f} s: model {st.model_s:.2f} s, stitching {st.stitch_s:.2f} s, "
                  f"waiting for pixels {st.read_wait_s:.2f} s); end-to-end / model-only = {e2e / model_only:.2f}; "
                  f"{len(result.features)} polygons; peak RSS {rss:.0f} MiB{gpu_peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
