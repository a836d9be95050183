"""A training-tile folder (docs/training.md, "Dataset layout", format ``instance``) from images with Aperio
ImageScope XML nucleus outlines, as MoNuSeg ships them: ``python -m qpbridge.training.monuseg SRC -o DIR``.

Each ``<name>.tif`` in SRC with a ``<name>.xml`` beside it is resampled to ``--mpp`` (the XML's
``MicronsPerPixel`` gives the source's pixel size; within 1 % the pixels are used as they are, as the engine
does), every ``<Region>`` polygon is filled as one instance (a later region wins where two overlap), and the
image is cut into ``--tile`` px tiles overlapping by ``--overlap`` px, the last one flush with the edge. The
split is by image and fixed: the ``--val`` images (by default three MoNuSeg images, one lung, one breast and
one kidney, organs that keep other images in training) are validation, the rest training.
"""

from __future__ import annotations

import argparse
import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qpbridge.errors import BadRequestError

DEFAULT_VAL = ("TCGA-21-5786-01Z-00-DX1", "TCGA-AR-A1AS-01Z-00-DX1", "TCGA-B0-5710-01Z-00-DX1")
MONUSEG_LICENCE = "CC BY-NC-SA 4.0"
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


def read_imagescope(path: Path) -> tuple[float | None, list[np.ndarray]]:
    """(MicronsPerPixel or None, one (n, 2) float array of x, y vertices per region) of an ImageScope XML."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise BadRequestError(f"{path} is not valid ImageScope XML: {exc}") from None
    mpp_text = root.get("MicronsPerPixel")
    mpp = float(mpp_text) if mpp_text else None
    polygons = []
    for region in root.iter("Region"):
        pts = [(float(v.get("X", "nan")), float(v.get("Y", "nan"))) for v in region.iter("Vertex")]
        arr = np.asarray(pts, dtype=np.float64)
        if len(arr) >= 3 and np.isfinite(arr).all():
            polygons.append(arr)
    return (mpp if mpp and mpp > 0 else None), polygons


def rasterise(polygons: Sequence[np.ndarray], shape: tuple[int, int], scale: float = 1.0) -> np.ndarray:
    """Instance labels (int32, 1..n in region order) of polygons in source pixels, drawn at ``scale``."""
    labels = np.zeros(shape, dtype=np.int32)
    shift = 4  # sub-pixel vertices: coordinates in 1/16 px
    for i, poly in enumerate(polygons, start=1):
        pts = np.round(poly * scale * (1 << shift)).astype(np.int32).reshape(-1, 1, 2)
        cv2.fillPoly(labels, [pts], color=int(i), shift=shift)
    return labels


def _starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    step = max(1, tile - overlap)
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _tile_name(source: str, x: int, y: int, w: int, h: int, downsample: float) -> str:
    d = "" if abs(downsample - 1) < 1e-9 else f"d={f'{downsample:.3f}'.rstrip('0').rstrip('.')},"
    return f"{source} [{d}x={x},y={y},w={w},h={h}]"


def build_dataset(src: Path, out: Path, *, mpp: float = 0.25, tile: int = 512, overlap: int = 0,
                  val: Sequence[str] = DEFAULT_VAL, default_mpp: float | None = None,
                  licence: str | None = MONUSEG_LICENCE) -> dict[str, Any]:
    """Write the tile folder ``out`` from the images + XML in ``src``; returns its ``dataset.json``."""
    pairs = sorted((p, p.with_suffix(".xml")) for p in Path(src).iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and p.with_suffix(".xml").is_file())
    if not pairs:
        raise BadRequestError(f"{src} holds no image with an ImageScope .xml beside it")
    stems = {p.stem for p, _ in pairs}
    missing = [v for v in val if Path(v).stem not in stems]
    if missing:
        raise BadRequestError(f"--val image(s) not in {src}: {', '.join(missing)}")
    val_set = {Path(v).stem for v in val}
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    tiles: list[dict[str, Any]] = []
    sources: list[dict[str, Any]] = []
    for image_path, xml_path in pairs:
        src_mpp, polygons = read_imagescope(xml_path)
        src_mpp = src_mpp or default_mpp
        if src_mpp is None:
            raise BadRequestError(f"{xml_path} gives no MicronsPerPixel: pass --source-mpp")
        bgr = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise BadRequestError(f"cannot read {image_path}")
        rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        downsample = mpp / src_mpp
        if abs(downsample - 1.0) <= 0.01:
            downsample = 1.0
        scale = 1.0 / downsample
        h, w = (round(rgb.shape[0] * scale), round(rgb.shape[1] * scale)) if downsample != 1.0 else rgb.shape[:2]
        if downsample != 1.0:
            interp = cv2.INTER_AREA if downsample > 1 else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, (w, h), interpolation=interp)
        labels = rasterise(polygons, (h, w), scale)
        split = "val" if image_path.stem in val_set else "train"
        sources.append({"name": image_path.name, "path": str(image_path.resolve()),
                        "annotations": str(xml_path.resolve()), "width": int(bgr.shape[1]),
                        "height": int(bgr.shape[0]), "mpp": src_mpp, "split": split, "objects": len(polygons)})
        for ty in _starts(h, tile, overlap):
            for tx in _starts(w, tile, overlap):
                th, tw = min(tile, h - ty), min(tile, w - tx)
                fx, fy = round(tx * downsample), round(ty * downsample)
                fw, fh = round(tw * downsample), round(th * downsample)
                name = _tile_name(image_path.name, fx, fy, fw, fh, downsample)
                crop = labels[ty:ty + th, tx:tx + tw]
                ids, inverse = np.unique(crop, return_inverse=True)
                relabelled = inverse.reshape(crop.shape).astype(np.uint16) + (0 if ids[0] == 0 else 1)
                cv2.imwrite(str(out / "images" / f"{name}.png"),
                            cv2.cvtColor(np.ascontiguousarray(rgb[ty:ty + th, tx:tx + tw]), cv2.COLOR_RGB2BGR))
                cv2.imwrite(str(out / "masks" / f"{name}.png"), relabelled)
                tiles.append({"image": f"images/{name}.png", "mask": f"masks/{name}.png",
                              "source": image_path.name, "x": fx, "y": fy, "w": fw, "h": fh,
                              "downsample": downsample, "mpp": mpp, "split": split,
                              "objects": int(len(ids) - (1 if ids[0] == 0 else 0))})
    info = {
        "version": 1, "created_by": "qpbridge.training.monuseg", "format": "instance", "mode": "instances",
        "mpp": mpp, "tile_size": tile, "overlap": overlap, "background": 0,
        "classes": [{"name": "Nucleus", "label": 1, "color": [30, 60, 200]}], "licence": licence,
        "split": {"method": "fixed", "train": sorted(s["name"] for s in sources if s["split"] == "train"),
                  "val": sorted(s["name"] for s in sources if s["split"] == "val")},
        "sources": sources, "tiles": tiles,
    }
    labels_json = {"mode": "instances", "images": "images", "masks": "masks", "mpp": mpp,
                   "labels": {"Nucleus": 1}}
    (out / "labels.json").write_text(json.dumps(labels_json, indent=1), encoding="utf-8")
    (out / "dataset.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    return info


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qpbridge.training.monuseg", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="folder of images with ImageScope .xml beside them")
    p.add_argument("-o", "--out", type=Path, required=True, help="dataset folder to write")
    p.add_argument("--mpp", type=float, default=0.25, help="µm/px of the tiles (default 0.25)")
    p.add_argument("--tile", type=int, default=512, help="tile size in px (default 512)")
    p.add_argument("--overlap", type=int, default=0,
                   help="least tile overlap in px (default 0; the last tile of a row or column is flush with the edge)")
    p.add_argument("--val", nargs="+", default=list(DEFAULT_VAL), help="validation images (names without suffix)")
    p.add_argument("--source-mpp", type=float, default=0.25,
                   help="µm/px of images whose XML gives none (default 0.25: MoNuSeg is 40x)")
    args = p.parse_args(argv)
    if args.mpp <= 0 or args.tile < 16 or not 0 <= args.overlap < args.tile or not math.isfinite(args.mpp):
        p.error("need --mpp > 0, --tile >= 16 and 0 <= --overlap < --tile")
    try:
        info = build_dataset(args.src, args.out, mpp=args.mpp, tile=args.tile, overlap=args.overlap, val=args.val,
                             default_mpp=args.source_mpp)
    except BadRequestError as err:
        print(f"qpbridge: error: {err}")
        return 1
    n = {s: sum(t["split"] == s for t in info["tiles"]) for s in ("train", "val")}
    print(f"{len(info['tiles'])} tiles ({n['train']} train, {n['val']} val) from {len(info['sources'])} images "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
