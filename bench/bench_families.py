"""Per model family: model-only vs end-to-end tiles/s at the card's tile size, fp32 vs mixed precision.

    python bench/bench_families.py [--families smp maskrcnn hovernet gradcam cyclegan pipeline pipeline-host]
                                   [--device auto|cpu|cuda] [--precision fp32 fp16] [--tiles 16]
                                   [--slide-tiles 16] [--json out.json]

Each family has an entry in ``FAMILIES``: a function that writes a model folder (the shipped card of the
family's seed model, with randomly initialised weights of the real architecture saved in the family's native
format) and says how large a generated slide must be for about ``--slide-tiles`` planned tiles:

- ``smp``: ``models/histo_unet`` (Unet / efficientnet-b0, 4 classes, smp ``save_pretrained`` folder, 256 px);
- ``maskrcnn``: ``models/detectron2_nuclei`` (Mask R-CNN R50-FPN as a detectron2 model-zoo pickle, 512 px);
- ``hovernet``: ``models/hovernet-monuseg`` (width-32 HoVer network, state dict, 512 px at 0.25 µm/px) with its
  trained weights when ``models/hovernet-monuseg/weights.pt`` is there (else random ones: the maps then find
  few or no nuclei and the post-processing numbers mean little), on MoNuSeg pixels when ``../shared/data`` is
  there (else generated H&E-like ones);
- ``gradcam``: ``models/histosegnet-func`` (ResNet-18 classifier, Grad-CAM of layer4 with one backward pass per
  class, HistoSegNet adjustment, guided filter, 224 px);
- ``cyclegan``: ``models/ihc2he`` (CycleGAN ResNet generator, 9 blocks, ngf 64, 256 px). A translator makes no
  objects: model-only is ``translate`` on ready tiles and end to end is ``qpbridge translate``'s path
  (``qpbridge.translation.translate_image``: overlapping tiles, cosine blending) over an in-memory image of
  about ``--slide-tiles`` tiles;
- ``pipeline``: ``ihc2he`` chained before a small TorchScript segmenter (2 classes, 256 px at 0.5 µm/px): both
  stages in one forward pass on the device;
- ``pipeline-host``: ``models/ihc2he-nuclei`` (the built-in CPU nucleus detector as last stage: translated
  tiles come back to the host; forward is the translator alone).

For each family, device and precision it measures (numbers printed, nothing asserted):

- forward: the bare torch forward pass on a ready batch on the device (the ceiling), when the family exposes
  its device worker's model;
- maps (hovernet): the network's maps of ready tiles (``HoverNetFamily.maps``: the device worker, no
  watershed), and post ms/tile: HoVer-Net's watershed of one tile's maps on one thread
  (``bench/bench_hovernet_post.py`` compares one thread with the pool);
- model-only: ``family.predict_native`` on uint8 tiles already in memory (the device worker's batching, the
  copies and the family's own post-processing: softmax for semantic families, label painting for instances,
  the watershed on the shared pool for hovernet), in batches of the card's batch size (or ``--tiles`` if
  smaller);
- end to end: ``annotate_slide`` on a generated JPEG pyramidal TIFF (reading, the model, blending or instance
  de-duplication, vectorising, features), tiles/s, and its ratio to model-only.

fp16/bf16 run on CUDA only; on a CPU every card runs fp32 (the worker says so) and they are skipped. A table
of all runs is printed at the end. Exits non-zero if a run fails. To add a family, write
``make_<family>(root, precision, slide_tiles) -> Case`` and add it to ``FAMILIES``.
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python_server"))
MONUSEG = REPO.parent / "shared" / "data" / "monuseg-train" / "TCGA-21-5784-01Z-00-DX1.tif"


@dataclass
class Case:
    """A model folder to bench and the generated slide it runs on (full-resolution size and µm/px).

    ``source``: the pixels that tiles and slide are cut from (default: generated H&E-like ones);
    ``translation``: an image-translation card (no objects: end to end through ``translate_image`` on an
    in-memory image of ``slide_px``); ``note``: printed with the results (weights, where a stage runs)."""

    folder: Path
    slide_px: tuple[int, int]
    slide_mpp: float
    source: np.ndarray | None = None
    translation: bool = False
    note: str = ""


def _copy_card(name: str, root: Path, precision: str, **params: Any) -> Path:
    """The shipped card ``models/<name>`` in ``root``, with ``params`` (precision ...) set; a pipeline's
    stages that are already in ``root`` (copied there first) named as they are there."""
    folder = root / f"{name}-{precision}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(REPO / "models" / name, folder)
    card = json.loads((folder / "config.json").read_text())
    card["name"] = folder.name  # a card's name is its folder's, and must not shadow the built-in card
    card["params"] = {**card.get("params", {}), "precision": precision, **params}
    if "pipeline" in card:
        card["pipeline"] = [f"{s}-{precision}" if (root / f"{s}-{precision}").is_dir() else s
                            for s in card["pipeline"]]
    (folder / "config.json").write_text(json.dumps(card, indent=2))
    return folder


def _slide_for(folder: Path, tiles: int, mpp: float) -> tuple[int, int]:
    """Full-resolution size (at ``mpp``) of a square slide whose plan for the card in ``folder`` has about
    ``tiles`` tiles (at the card's planned overlap: instance cards overlap by twice their largest object)."""
    from qpbridge.cards import load_model_folder

    card = load_model_folder(folder)
    size, overlap = card.tile_size, card.plan_overlap
    per_side = max(1, round(tiles ** 0.5))
    canvas = size + (per_side - 1) * (size - overlap)
    px = int(canvas * card.mpp / mpp)
    return px, px


def make_smp(root: Path, precision: str, slide_tiles: int) -> Case:
    """Histo_Unet: the full Unet / efficientnet-b0 (4 classes), as an smp save_pretrained folder."""
    import segmentation_models_pytorch as smp
    import torch

    folder = _copy_card("histo_unet", root, precision)
    torch.manual_seed(0)
    smp.Unet(encoder_name="efficientnet-b0", encoder_weights=None, classes=4).save_pretrained(
        str(folder / "weights"))
    return Case(folder, _slide_for(folder, slide_tiles, 0.5), 0.5)


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
    return Case(folder, _slide_for(folder, slide_tiles, 0.25), 0.25)


def make_hovernet(root: Path, precision: str, slide_tiles: int) -> Case:
    """hovernet-monuseg: its trained weights when they are there, else a random network of its arch."""
    import torch

    from qpbridge.families.hovernet_net import HoverArch, HoverNet

    folder = _copy_card("hovernet-monuseg", root, precision)
    card = json.loads((folder / "config.json").read_text())
    trained = REPO / "models" / "hovernet-monuseg" / "weights.pt"
    if trained.is_file():
        shutil.copy(trained, folder / "weights.pt")
    else:
        torch.manual_seed(0)
        torch.save(HoverNet(HoverArch.from_params(card["params"])).state_dict(), str(folder / "weights.pt"))
    source = None
    if MONUSEG.is_file():
        import cv2

        bgr = cv2.imread(str(MONUSEG))
        source = None if bgr is None else np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    note = ("trained" if trained.is_file() else "random") + " weights, " + \
        ("MoNuSeg pixels" if source is not None else "generated pixels")
    return Case(folder, _slide_for(folder, slide_tiles, card["mpp"]), card["mpp"], source=source, note=note)


def make_gradcam(root: Path, precision: str, slide_tiles: int) -> Case:
    """histosegnet-func: a random torchvision ResNet-18 with the card's three classifier outputs."""
    import torch
    import torchvision

    folder = _copy_card("histosegnet-func", root, precision)
    card = json.loads((folder / "config.json").read_text())
    torch.manual_seed(0)
    k = len(card["params"]["classifier_classes"])
    torch.save(torchvision.models.resnet18(weights=None, num_classes=k).state_dict(), folder / "classifier.pth")
    return Case(folder, _slide_for(folder, slide_tiles, 0.5), 0.5)


def _ihc2he(root: Path, precision: str) -> Path:
    """The ihc2he card with a random CycleGAN ResNet generator of its size."""
    import torch

    from qpbridge.families.cyclegan import ResnetGenerator

    folder = _copy_card("ihc2he", root, precision)
    params = json.loads((folder / "config.json").read_text())["params"]
    torch.manual_seed(0)
    torch.save(ResnetGenerator(ngf=params["ngf"], n_blocks=params["n_blocks"]).state_dict(),
               folder / "latest_net_G_A.pth")
    return folder


def make_cyclegan(root: Path, precision: str, slide_tiles: int) -> Case:
    """ihc2he: end to end through ``translate_image`` (an in-memory image at the card's µm/px)."""
    folder = _ihc2he(root, precision)
    card = json.loads((folder / "config.json").read_text())
    return Case(folder, _slide_for(folder, slide_tiles, card["mpp"]), card["mpp"], translation=True)


def make_pipeline(root: Path, precision: str, slide_tiles: int) -> Case:
    """ihc2he chained before a small TorchScript segmenter, both on the device in one forward pass."""
    import torch

    stage = _ihc2he(root, precision)
    seg = root / f"seg-{precision}"
    seg.mkdir(parents=True, exist_ok=True)
    classes = [{"name": "Background", "color": [255, 255, 255], "emit": False},
               {"name": "Nucleus", "color": [30, 60, 200]}]
    base = {"schema_version": 1, "task": "semantic-segmentation", "object_type": "detection", "classes": classes,
            "tile": {"size": 256, "overlap": 64, "batch_size": 16}, "mpp": 0.5, "requires_mpp": True,
            "params": {"precision": precision, "tissue_filter": False}}
    (seg / "config.json").write_text(json.dumps({**base, "name": seg.name, "family": "torchscript-segmentation",
                                                 "weights": "seg.pt"}))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 2, 1)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, torch.rand(1, 3, 256, 256)), str(seg / "seg.pt"))
    chain = root / f"ihc2he-seg-{precision}"
    chain.mkdir(exist_ok=True)
    card = {**base, "name": chain.name, "family": "pipeline", "pipeline": [stage.name, seg.name]}
    (chain / "config.json").write_text(json.dumps(card))
    return Case(chain, _slide_for(chain, slide_tiles, 0.5), 0.5, note="both stages on the device")


def make_pipeline_host(root: Path, precision: str, slide_tiles: int) -> Case:
    """ihc2he-nuclei: the translator on the device worker, the built-in nucleus detector on the host."""
    _ihc2he(root, precision)
    folder = _copy_card("ihc2he-nuclei", root, precision)
    return Case(folder, _slide_for(folder, slide_tiles, 0.5), 0.5,
                note="last stage on the host; forward = the translator")


FAMILIES: dict[str, Callable[[Path, str, int], Case]] = {
    "smp": make_smp,
    "maskrcnn": make_maskrcnn,
    "hovernet": make_hovernet,
    "gradcam": make_gradcam,
    "cyclegan": make_cyclegan,
    "pipeline": make_pipeline,
    "pipeline-host": make_pipeline_host,
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


def tiles_from(source: np.ndarray | None, size: int, n: int) -> list[np.ndarray]:
    """``n`` tiles of ``size`` px: crops of ``source`` (tiled when smaller) or generated H&E-like ones."""
    if source is None:
        return [he_like(size, 10 + i) for i in range(n)]
    big = _tiled(source, 2 * size, 2 * size)
    corners = [(y, x) for y in (0, size) for x in (0, size)]
    return [np.ascontiguousarray(big[y:y + size, x:x + size]) for y, x in (corners * n)[:n]]


def _tiled(source: np.ndarray, h: int, w: int) -> np.ndarray:
    sh, sw = source.shape[:2]
    return np.ascontiguousarray(np.tile(source, (h // sh + 1, w // sw + 1, 1))[:h, :w])


def write_slide(path: Path, size: tuple[int, int], mpp: float, source: np.ndarray | None = None) -> Path:
    import cv2
    import tifffile

    w, h = size
    img = _tiled(he_like(1024, 1) if source is None else source, h, w)
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
    batch = max(1, min(card.batch_size, n_tiles))
    tiles = tiles_from(case.source, size, batch)
    row: dict[str, Any] = {"family": family, "card": name, "device": device, "precision": precision,
                           "tile": size, "batch": batch, "load_s": round(load_s, 2)}
    if case.note:
        row["note"] = case.note
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

    try:
        if worker is not None and worker.model is not None:
            x = torch.zeros((batch, 3, size, size), device=worker.device, dtype=worker.input_dtype)
            x += torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).to(x.device, x.dtype) / 255.0
            if worker.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)

            def forward() -> None:
                with worker._grad_mode(), worker._autocast():  # gradcam's forward runs backward passes
                    worker.model(x)

            row["forward_tiles_s"] = round(timed(forward, n_tiles), 2)
        maps = getattr(model, "maps", None)  # hovernet: the network's maps without the watershed
        if callable(maps):
            row["maps_tiles_s"] = round(timed(lambda: maps(tiles), n_tiles), 2)
            tile_maps = maps(tiles)
            t = time.perf_counter()
            for m in tile_maps:
                model.postprocess(m)
            row["post_ms_tile"] = round(1000 * (time.perf_counter() - t) / len(tile_maps), 1)
        on_device = device.startswith("cuda")
        if case.translation:
            row["model_only_tiles_s"] = round(timed(lambda: model.translate(tiles), n_tiles), 2)
            row.update(_translate_end_to_end(engine, name, case, device))
        else:
            row["model_only_tiles_s"] = round(
                timed(lambda: model.predict_native(tiles, on_device=on_device), n_tiles), 2)
            slide = write_slide(root / f"{family}-slide.tif", case.slide_px, case.slide_mpp, case.source)
            result = annotate_slide(engine, slide, name, tissue_filter=False)
            stats = result.stats
            row["slide_tiles"] = stats.tiles
            row["end_to_end_tiles_s"] = round(stats.tiles / stats.seconds, 2) if stats.seconds else 0.0
            row["features"] = len(result.features)
            row["limit"] = stats.limit
            row["stages"] = stats.table()
        row["end_to_end_vs_model_only"] = round(row["end_to_end_tiles_s"] / row["model_only_tiles_s"], 2)
    finally:
        close = getattr(model, "close", None)
        if close is not None:
            close()
    return row


def _translate_end_to_end(engine: Any, name: str, case: Case, device: str) -> dict[str, Any]:
    """``qpbridge translate``'s path on an in-memory image of ``case.slide_px``: overlapping tiles through the
    translator in the card's batches, blended with the cosine window."""
    from qpbridge.translation import tile_starts, translate_image, translator

    card = engine.card(name)
    w, h = case.slide_px
    image = _tiled(he_like(1024, 1) if case.source is None else case.source, h, w)
    fn = translator(engine, name)
    t = time.perf_counter()
    translate_image(image, fn, card.tile_size, card.overlap, batch=max(1, card.batch_size))
    _sync(device)
    seconds = time.perf_counter() - t
    n = len(tile_starts(h, card.tile_size, card.overlap)) * len(tile_starts(w, card.tile_size, card.overlap))
    return {"slide_tiles": n, "end_to_end_tiles_s": round(n / seconds, 2) if seconds else 0.0,
            "stages": f"translate_image: {w}x{h} px, {n} tiles in {seconds:.2f} s"}


COLUMNS = [("family", "family", 13), ("device", "device", 6), ("precision", "prec", 5), ("tile", "tile", 4),
           ("batch", "batch", 5), ("forward_tiles_s", "forward", 8), ("maps_tiles_s", "maps", 7),
           ("post_ms_tile", "post ms", 7), ("model_only_tiles_s", "model", 7), ("end_to_end_tiles_s", "e2e", 7),
           ("end_to_end_vs_model_only", "e2e/mod", 7), ("slide_tiles", "tiles", 5), ("features", "feats", 6),
           ("limit", "limit", 9)]


def table(rows: list[dict[str, Any]]) -> str:
    """All runs, one line each; rates in tiles/s, post ms = hovernet's watershed per tile on one thread."""
    def cell(row: dict[str, Any], key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.0%}" if key == "end_to_end_vs_model_only" else str(v)

    lines = [" ".join(f"{title:<{w}}" for _, title, w in COLUMNS)]
    lines += [" ".join(f"{cell(r, key):<{w}}" for key, _, w in COLUMNS) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    p.add_argument("--device", default="auto", help="auto: CPU, and CUDA too when torch sees a GPU")
    p.add_argument("--precision", nargs="+", default=["fp32", "fp16"], choices=["fp32", "fp16", "bf16"])
    p.add_argument("--tiles", type=int, default=16,
                   help="tiles per model-only measurement, in batches of the card's batch size or of --tiles")
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
                    hover = f"maps {row['maps_tiles_s']} tiles/s, post {row['post_ms_tile']} ms/tile, " \
                        if "maps_tiles_s" in row else ""
                    objects = f", {row['features']} features; limit: {row['limit']}" if "features" in row else ""
                    note = f" [{row['note']}]" if "note" in row else ""
                    print(f"{family:<13} {device:<5} {precision:<5} {row['tile']} px, batch {row['batch']}: "
                          f"forward {row.get('forward_tiles_s', '-')} tiles/s, {hover}model-only "
                          f"{row['model_only_tiles_s']} tiles/s, end to end {row['end_to_end_tiles_s']} tiles/s "
                          f"({row['end_to_end_vs_model_only']:.0%} of model-only) over {row['slide_tiles']} "
                          f"tiles{objects}{note}", flush=True)
                    print(f"              {row['stages']}", flush=True)
    if rows:
        print()
        print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
