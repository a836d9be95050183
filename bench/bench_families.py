"""Per model family: model-only vs end-to-end tiles/s at the card's tile size, fp32 vs mixed precision.

    python bench/bench_families.py [--families smp maskrcnn] [--device auto|cpu|cuda] [--precision fp32 fp16]
                                   [--tiles 16] [--slide-tiles 16] [--json out.json]

Each family has an entry in ``FAMILIES``: a function that writes a model folder (the shipped card of the
family's seed model, with randomly initialised weights of the real architecture saved in the family's native
format) and says how large a generated slide must be for about ``--slide-tiles`` planned tiles. For each
family, device and precision it measures (numbers printed, nothing asserted):

- forward: the bare torch forward pass on a ready batch on the device (the ceiling), when the family exposes
  its device worker's model;
- model-only: ``family.predict_native`` on uint8 tiles already in memory (the device worker's batching, the
  copies and the family's own post-processing: softmax for semantic families, label painting for instances);
- end to end: ``annotate_slide`` on a generated JPEG pyramidal TIFF (reading, the model, blending or instance
  de-duplication, vectorising, features), tiles/s, and its ratio to model-only.

fp16/bf16 run on CUDA only; on a CPU every card runs fp32 (the worker says so) and they are skipped. To add a
family, write ``make_<family>(root, precision) -> Case`` and add it to ``FAMILIES``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python_server"))


@dataclass
class Case:
    """A model folder to bench and the generated slide it runs on (full-resolution size and µm/px)."""

    folder: Path
    slide_px: tuple[int, int]
    slide_mpp: float


def _copy_card(name: str, root: Path, precision: str, **params: Any) -> Path:
    """The shipped card ``models/<name>`` in ``root``, with ``params`` (precision ...) set."""
    folder = root / f"{name}-{precision}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(REPO / "models" / name, folder)
    card = json.loads((folder / "config.json").read_text())
    card["name"] = folder.name  # a card's name is its folder's, and must not shadow the built-in card
    card["params"] = {**card.get("params", {}), "precision": precision, **params}
    (folder / "config.json").write_text(json.dumps(card, indent=2))
    return folder


def _slide_for(card: dict[str, Any], tiles: int, mpp: float) -> tuple[int, int]:
    """Full-resolution size of a square slide whose plan has about ``tiles`` tiles."""
    size, overlap = card["tile"]["size"], card["tile"].get("overlap", 0)
    overlap = max(overlap, min(int(np.ceil(2 * card.get("params", {}).get("max_object_um", 0) / card["mpp"])),
                               size // 2))
    per_side = max(1, round(tiles ** 0.5))
    canvas = size + (per_side - 1) * (size - overlap)
    px = int(canvas * card["mpp"] / mpp)
    return px, px


def make_smp(root: Path, precision: str, slide_tiles: int) -> Case:
    """Histo_Unet: the full Unet / efficientnet-b0 (4 classes), as an smp save_pretrained folder."""
    import segmentation_models_pytorch as smp
    import torch

    folder = _copy_card("histo_unet", root, precision)
    torch.manual_seed(0)
    smp.Unet(encoder_name="efficientnet-b0", encoder_weights=None, classes=4).save_pretrained(
        str(folder / "weights"))
    card = json.loads((folder / "config.json").read_text())
    return Case(folder, _slide_for(card, slide_tiles, 0.5), 0.5)


def make_maskrcnn(root: Path, precision: str, slide_tiles: int) -> Case:
    """The detectron2 nucleus card: a random Mask R-CNN R50-FPN (BatchNorm statistics measured on one tile, so
    that it proposes boxes like a trained model) written as a detectron2 model-zoo pickle."""
    import pickle

    import torch
    from torchvision.ops import FrozenBatchNorm2d

    from qpbridge.families.detectron2_keys import torchvision_to_detectron2
    from qpbridge.families.maskrcnn import DETECTRON2_MEAN_RGB, MaskRCNNSettings, build_maskrcnn

    folder = _copy_card("detectron2_nuclei", root, precision)
    card = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    model = build_maskrcnn(2, MaskRCNNSettings(card["params"]), detectron2=True)
    tile = torch.from_numpy(he_like(card["tile"]["size"], 0)).permute(2, 0, 1).float()
    x = tile - torch.tensor(DETECTRON2_MEAN_RGB).view(3, 1, 1)

    def hook(module: Any, inputs: tuple[Any, ...]) -> None:
        module.running_mean.copy_(inputs[0].mean(dim=(0, 2, 3)))
        module.running_var.copy_(inputs[0].var(dim=(0, 2, 3)) + 1e-3)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    with torch.no_grad():
        model.backbone(x[None])
    for h in handles:
        h.remove()
    with open(folder / "model_final.pth", "wb") as f:
        pickle.dump({"model": torchvision_to_detectron2(model.state_dict())}, f)
    return Case(folder, _slide_for(card, slide_tiles, 0.25), 0.25)


FAMILIES: dict[str, Callable[[Path, str, int], Case]] = {
    "smp": make_smp,
    "maskrcnn": make_maskrcnn,
}


def he_like(size: int, seed: int) -> np.ndarray:
    """Pink tissue with purple nucleus-sized discs and some texture."""
    import cv2

    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (226, 170, 200)
    for _ in range(size * size // 700):
        cv2.circle(img, (int(rng.integers(0, size)), int(rng.integers(0, size))), int(rng.integers(6, 14)),
                   (90, 50, 140), -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def write_slide(path: Path, size: tuple[int, int], mpp: float) -> Path:
    import cv2
    import tifffile

    w, h = size
    tile = he_like(1024, 1)
    img = np.tile(tile, (h // 1024 + 1, w // 1024 + 1, 1))[:h, :w]
    img = np.ascontiguousarray(img)
    opts = {"tile": (256, 256), "photometric": "rgb", "compression": "jpeg", "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, subifds=1, resolution=(1e4 / mpp, 1e4 / mpp), **opts)
        half = cv2.resize(img, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
        tw.write(half, subfiletype=1, resolution=(1e4 / (2 * mpp), 1e4 / (2 * mpp)), **opts)
    return path


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def bench_case(family: str, case: Case, device: str, precision: str, n_tiles: int, root: Path) -> dict[str, Any]:
    import torch

    from qpbridge.annotate import annotate_slide
    from qpbridge.engine import Engine

    engine = Engine(case.folder.parent, device=device)
    name = json.loads((case.folder / "config.json").read_text())["name"]
    card = engine.card(name)
    t0 = time.perf_counter()
    model: Any = engine.model(name)
    load_s = time.perf_counter() - t0
    size = card.tile_size
    tiles = [he_like(size, 10 + i) for i in range(max(n_tiles, card.batch_size))]
    batch = max(1, card.batch_size)
    row: dict[str, Any] = {"family": family, "card": name, "device": device, "precision": precision,
                           "tile": size, "batch": batch, "load_s": round(load_s, 2)}
    worker = getattr(model, "worker", None)
    if worker is not None:
        row["runs"] = worker.precision + ("" if worker.precision == "fp32" else f" ({worker.weights})")

    def timed(fn: Callable[[], Any], n: int) -> float:
        fn()  # warm-up (first batch: allocations, kernel selection)
        _sync(device)
        t = time.perf_counter()
        done = 0
        while done < n:
            fn()
            done += batch
        _sync(device)
        return done / (time.perf_counter() - t)

    if worker is not None and worker.model is not None:
        x = torch.zeros((batch, 3, size, size), device=worker.device, dtype=worker.input_dtype)
        x += torch.from_numpy(np.stack(tiles[:batch])).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
        if worker.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)

        def forward() -> None:
            with torch.inference_mode(), worker._autocast():
                worker.model(x)

        row["forward_tiles_s"] = round(timed(forward, n_tiles), 2)
    on_device = device.startswith("cuda")
    chunk = tiles[:batch]
    row["model_only_tiles_s"] = round(timed(lambda: model.predict_native(chunk, on_device=on_device), n_tiles), 2)
    slide = write_slide(root / f"{family}-slide.tif", case.slide_px, case.slide_mpp)
    result = annotate_slide(engine, slide, name, tissue_filter=False)
    stats = result.stats
    row["slide_tiles"] = stats.tiles
    row["end_to_end_tiles_s"] = round(stats.tiles / stats.seconds, 2) if stats.seconds else 0.0
    row["end_to_end_vs_model_only"] = round(row["end_to_end_tiles_s"] / row["model_only_tiles_s"], 2)
    row["features"] = len(result.features)
    row["limit"] = stats.limit
    row["stages"] = stats.table()
    close = getattr(model, "close", None)
    if close is not None:
        close()
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="auto", help="auto: CPU, and CUDA too when torch sees a GPU")
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--tiles", type=int, default=16, help="tiles per model-only measurement")
    p.add_argument("--slide-tiles", type=int, default=16, help="about how many tiles the generated slide plans")
    p.add_argument("--json", type=Path, help="write the rows here too")
    args = p.parse_args(argv)
    import torch

    devices = ["cpu", "cuda"] if args.device == "auto" and torch.cuda.is_available() else \
        ["cpu"] if args.device == "auto" else [args.device]
    rows: list[dict[str, Any]] = []
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for family in args.families:
            for device in devices:
                for precision in args.precision:
                    if precision != "fp32" and not device.startswith("cuda"):
                        continue  # a CPU runs every card in fp32
                    try:
                        case = FAMILIES[family](root / "models", precision, args.slide_tiles)
                        row = bench_case(family, case, device, precision, args.tiles, root)
                    except Exception:
                        traceback.print_exc()
                        failed += 1
                        continue
                    rows.append(row)
                    print(f"{family:<9} {device:<5} {precision:<5} {row['tile']} px, batch {row['batch']}: "
                          f"forward {row.get('forward_tiles_s', '-')} tiles/s, model-only "
                          f"{row['model_only_tiles_s']} tiles/s, end to end {row['end_to_end_tiles_s']} tiles/s "
                          f"({row['end_to_end_vs_model_only']:.0%} of model-only) over {row['slide_tiles']} tiles, "
                          f"{row['features']} features; limit: {row['limit']}", flush=True)
                    print(f"          {row['stages']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
