"""Model-only vs end-to-end tiles/s of the cyclegan, pipeline and gradcam families (prints measured numbers).

    python bench/bench_families_fam2.py [--device auto|cpu|cuda] [--precision fp32 fp16]
                                        [--families cyclegan pipeline pipeline-host gradcam]
                                        [--tiles 8] [--image-px 768] [--json out.json]

Each family runs its shipped card's architecture and tile size with random weights (speed only), loaded
through the real card path from a temporary models directory:

- ``cyclegan``: ``models/ihc2he`` (ResNet generator, 9 blocks, ngf 64, 256 px). Model-only: ``translate`` on
  ready uint8 tiles in the card's batches; end to end: ``qpbridge translate``'s ``translate_image`` over an
  in-memory image (overlapping tiles, cosine blending).
- ``pipeline``: ``ihc2he`` chained before a small torch segmenter (TorchScript, 2 classes, 256 px at
  0.5 µm/px): both stages in one forward pass on the device. ``pipeline-host``: the shipped
  ``ihc2he-nuclei`` (the built-in CPU nucleus detector as last stage: translated tiles come back to the host).
  Model-only: ``predict_native`` on ready tiles (outputs left on the device on CUDA); end to end:
  ``annotate_image`` (plan, batches, stitching, features).
- ``gradcam``: ``models/histosegnet-func`` (ResNet-18, Grad-CAM of layer4 with one backward pass per class,
  HistoSegNet adjustment, guided filter, 224 px). Model-only / end to end as for ``pipeline``.

fp16/bf16 run on CUDA only (skipped on a CPU). Exits non-zero if a run fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class TinySegmenter:
    """A small fully convolutional 2-class segmenter, standing in for a torch nucleus model."""

    @staticmethod
    def build() -> Any:
        import torch

        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                                   torch.nn.Conv2d(32, 2, 1)).eval()


def models_dir(root: Path, precision: str) -> Path:
    """The shipped cards with random weights of their architectures, and a device pipeline card."""
    import torch
    import torchvision

    from qpbridge.families.cyclegan import ResnetGenerator

    for name in ("ihc2he", "ihc2he-nuclei", "histosegnet-func"):  # renamed: the built-ins keep their names
        shutil.copytree(REPO / "models" / name, root / f"b-{name}")
        card = json.loads((root / f"b-{name}" / "config.json").read_text())
        card["name"] = f"b-{name}"
        card.setdefault("params", {})["precision"] = precision
        if "pipeline" in card:
            card["pipeline"] = ["b-ihc2he", *card["pipeline"][1:]]
        (root / f"b-{name}" / "config.json").write_text(json.dumps(card))
    torch.manual_seed(0)
    torch.save(ResnetGenerator().state_dict(), root / "b-ihc2he" / "latest_net_G_A.pth")
    torch.save(torchvision.models.resnet18(weights=None, num_classes=3).state_dict(),
               root / "b-histosegnet-func" / "classifier.pth")
    seg = root / "seg"
    seg.mkdir()
    classes = [{"name": "Background", "color": [255, 255, 255], "emit": False},
               {"name": "Nucleus", "color": [30, 60, 200]}]
    base = {"schema_version": 1, "task": "semantic-segmentation", "object_type": "detection", "classes": classes,
            "tile": {"size": 256, "overlap": 64, "batch_size": 16}, "mpp": 0.5, "requires_mpp": True,
            "params": {"precision": precision, "tissue_filter": False}}
    (seg / "config.json").write_text(json.dumps({**base, "name": "seg", "family": "torchscript-segmentation",
                                                 "weights": "seg.pt"}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(TinySegmenter.build(), torch.rand(1, 3, 256, 256)), str(seg / "seg.pt"))
    chain = root / "ihc2he-seg"
    chain.mkdir()
    (chain / "config.json").write_text(json.dumps({**base, "name": "ihc2he-seg", "family": "pipeline",
                                                   "pipeline": ["b-ihc2he", "seg"]}))
    return root


def texture(h: int, w: int, seed: int = 0) -> np.ndarray:
    import cv2

    rng = np.random.default_rng(seed)
    small = rng.integers(90, 230, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
    img = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.integers(-15, 15, img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench_one(family: str, root: Path, device: str, n_tiles: int, image_px: int) -> dict[str, Any]:
    from qpbridge.annotate import annotate_image
    from qpbridge.engine import Engine
    from qpbridge.translation import tile_starts, translate_image, translator

    name = {"cyclegan": "b-ihc2he", "pipeline": "ihc2he-seg", "pipeline-host": "b-ihc2he-nuclei",
            "gradcam": "b-histosegnet-func"}[family]
    engine = Engine(root, device=device)
    card = engine.card(name)
    t0 = time.perf_counter()
    model = engine.model(name)
    load_s = time.perf_counter() - t0
    size = card.tile_size
    tiles = [texture(size, size, seed=i) for i in range(n_tiles)]
    batch = max(1, card.batch_size)
    on_device = device.startswith("cuda")

    def model_only() -> None:
        for s in range(0, n_tiles, batch):
            chunk = tiles[s:s + batch]
            if family == "cyclegan":
                model.translate(chunk)  # type: ignore[attr-defined]
            else:
                model.predict_native(chunk, on_device=on_device)
        sync(device)

    model_only()  # warm-up (cudnn autotune, allocator)
    t0 = time.perf_counter()
    model_only()
    model_s = time.perf_counter() - t0
    image = texture(image_px, image_px, seed=99)
    t0 = time.perf_counter()
    if family == "cyclegan":
        translate_image(image, translator(engine, name), size, card.overlap, batch=batch)
        e2e_tiles = len(tile_starts(image_px, size, card.overlap)) ** 2
    else:
        _, stats = annotate_image(engine, name, image, card.mpp)
        e2e_tiles = stats.tiles
    sync(device)
    e2e_s = time.perf_counter() - t0
    close = getattr(model, "close", None)
    if callable(close):
        close()
    precision = getattr(getattr(model, "worker", None), "precision", "fp32")
    return {"family": family, "card": name, "device": device, "precision": precision, "tile_px": size,
            "load_s": round(load_s, 2), "model_only_tiles_per_s": round(n_tiles / model_s, 2),
            "end_to_end_tiles": e2e_tiles, "end_to_end_tiles_per_s": round(e2e_tiles / e2e_s, 2),
            "end_to_end_vs_model_only": round((e2e_tiles / e2e_s) / (n_tiles / model_s), 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16"])
    p.add_argument("--families", nargs="+", default=["cyclegan", "pipeline", "pipeline-host", "gradcam"])
    p.add_argument("--tiles", type=int, default=8, help="tiles for the model-only measure")
    p.add_argument("--image-px", type=int, default=768, help="side of the end-to-end image, in model pixels")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO / "python_server"))
    from qpbridge.devices import resolve_device

    device = resolve_device(args.device)
    results, failed = [], False
    for precision in args.precision:
        if precision != "fp32" and not device.startswith("cuda"):
            print(f"{precision}: skipped on {device} (CPU runs fp32)")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            root = models_dir(Path(tmp), precision)
            for family in args.families:
                try:
                    r = bench_one(family, root, device, args.tiles, args.image_px)
                except Exception:
                    traceback.print_exc()
                    failed = True
                    continue
                results.append(r)
                print(f"{r['family']:<14} {r['device']:<7} {r['precision']:<5} {r['tile_px']} px: model-only "
                      f"{r['model_only_tiles_per_s']:8.2f} tiles/s, end to end {r['end_to_end_tiles_per_s']:8.2f} "
                      f"tiles/s ({r['end_to_end_tiles']} tiles, {100 * r['end_to_end_vs_model_only']:.0f}% of "
                      f"model-only), load {r['load_s']} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
