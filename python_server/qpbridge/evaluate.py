"""``qpbridge evaluate``: run a model on annotated images through the in-process engine and compute metrics.

The truth of each image is, first found: an annotation file beside it (ImageScope XML, QuPath GeoJSON; see
:func:`qpbridge.annotation_files.annotation_file_for`) or a label mask ``masks/<image stem>.png`` (16-bit:
instance labels, 8-bit: class labels). A dataset folder from ``export-tiles`` is evaluated on its validation
tiles. Metrics are computed at the image's full resolution (see :mod:`qpbridge.metrics`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qpbridge.errors import BadRequestError, MissingPixelSizeError

log = logging.getLogger("qpbridge")

__all__ = ["EvalItem", "EvalOptions", "evaluate", "find_items", "format_table"]

PLAIN = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}


@dataclass
class EvalOptions:
    model: str
    data: Path
    mpp: float | None = None
    radius_um: float = 3.0
    models_dir: Path | None = None
    device: str = "auto"
    match_iou: float = 0.5
    images: str | None = None


@dataclass
class EvalItem:
    """One image and where its truth comes from (an annotation file, or a mask)."""

    name: str
    image: Path
    annotations: Path | None = None
    mask: Path | None = None
    mask_mode: str | None = None      # "instances" | "semantic" for masks
    types: Path | None = None
    mpp: float | None = None          # from a dataset tile


def find_items(data: Path, pattern: str | None = None) -> tuple[list[EvalItem], list[str] | None]:
    """Images of ``data`` with their truth, and the class names of a dataset folder (None for plain folders)."""
    from qpbridge.annotation_files import annotation_file_for
    from qpbridge.dataset import DATASET_JSON, LABELS_JSON, load_dataset

    if not data.is_dir():
        raise BadRequestError(f"--data {data} is not a folder")
    items: list[EvalItem] = []
    classes: list[str] | None = None
    if (data / DATASET_JSON).is_file() or (data / LABELS_JSON).is_file():
        ds = load_dataset(data)
        tiles = ds.split("val") or ds.tiles
        if not ds.split("val"):
            log.warning("%s has no validation tiles: evaluating on all %d tiles", data, len(tiles))
        for t in tiles:
            items.append(EvalItem(t.image.name, t.image, mask=t.mask, mask_mode=ds.mode, types=t.types,
                                  mpp=t.mpp if t.mpp is not None else (None if ds.mpp is None else float(ds.mpp))))
        classes = ["Background", *[str(c["name"]) for c in sorted(ds.classes, key=lambda c: int(c["label"]))]]
    else:
        for f in sorted(data.iterdir()):
            if f.suffix.lower() not in PLAIN or not f.is_file():
                continue
            ann = annotation_file_for(f)
            mask = data / "masks" / (f.stem + ".png")
            if ann is not None:
                items.append(EvalItem(f.name, f, annotations=ann))
            elif mask.is_file():
                items.append(EvalItem(f.name, f, mask=mask))
    if pattern:
        items = [i for i in items if fnmatch.fnmatch(i.name, pattern)]
    if not items:
        raise BadRequestError(f"{data} holds no image with an annotation file (<stem>.xml, <stem>.geojson, "
                              "<image>.qpbridge.geojson) or a mask (masks/<stem>.png)"
                              + (f" matching {pattern!r}" if pattern else ""))
    return items, classes


def _read_mask(path: Path) -> tuple[np.ndarray, str]:
    """A label mask and how to read it: 16-bit = instances, 8-bit (grey or palette indices) = classes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise BadRequestError(f"cannot read the mask {path}: {exc}") from None
    if mode in ("P", "L"):
        return arr.astype(np.int64), "semantic"
    if mode.startswith("I") and arr.ndim == 2:
        return arr.astype(np.int64), "instances"
    raise BadRequestError(f"{path}: a mask must be one channel of labels (8-bit classes or 16-bit instances), "
                          f"not {mode}")


def _rasterise(objects: list[tuple[Any, str | None]], shape: tuple[int, int], label_of: Callable[[str | None], int]
               ) -> tuple[np.ndarray, np.ndarray, dict[int, int]]:
    """Instance labels (1..n, large objects first so small ones stay on top), class labels, class per id."""
    from qpbridge.tile_export import paint_geometry

    inst = np.zeros(shape, np.int32)
    types = np.zeros(shape, np.int32)
    cls_of: dict[int, int] = {}
    order = sorted(range(len(objects)), key=lambda i: -objects[i][0].area)
    for k, i in enumerate(order, start=1):
        geom, name = objects[i]
        lab = label_of(name)
        paint_geometry(inst, geom, 0, 0, 1.0, k)
        paint_geometry(types, geom, 0, 0, 1.0, lab)
        cls_of[k] = lab
    return inst, types, cls_of


def evaluate(opts: EvalOptions, out: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``opts.model`` on every image of ``opts.data`` and return the report (means at top level, per-image
    rows under ``images``)."""
    from shapely.geometry import shape as to_shape

    from qpbridge.annotate import annotate_image
    from qpbridge.annotation_files import read_annotations
    from qpbridge.cards import require_weights
    from qpbridge.devices import resolve_device
    from qpbridge.engine import Engine
    from qpbridge.images import read_image
    from qpbridge.metrics import (
        InstanceImage,
        centroid_metrics,
        centroids,
        coco_metrics_per_image,
        instance_metrics,
        mean_metrics,
        semantic_metrics,
    )

    items, ds_classes = find_items(opts.data, opts.images)
    engine = Engine(opts.models_dir, device=resolve_device(opts.device), any_model_path=True)
    card = engine.card(opts.model)
    require_weights(card.to_wire())
    instance_model = card.task == "instance-segmentation"
    emitted = [c.name for c in card.classes if getattr(c, "emit", True)]
    classes: list[str] = list(ds_classes) if ds_classes else ["Background"]

    def label_of(name: str | None) -> int:
        name = name or (emitted[0] if len(emitted) == 1 else "Object")
        if name not in classes:
            classes.append(name)
        return classes.index(name)

    rows: list[dict[str, Any]] = []
    coco_truth: list[InstanceImage] = []
    coco_pred: list[InstanceImage] = []
    coco_rows: list[int] = []
    for n, item in enumerate(items, 1):
        rgb, file_mpp = read_image(item.image)
        mpp = opts.mpp or item.mpp or file_mpp
        if mpp is None and card.requires_mpp:
            raise MissingPixelSizeError(f"{item.image.name} records no pixel size (µm/px): pass --mpp (MoNuSeg's "
                                        "TIFFs: 0.25)")
        h, w = rgb.shape[:2]
        # Truth.
        if item.annotations is not None:
            objs = read_annotations(item.annotations)
            true_inst, true_types, true_cls = _rasterise([(o.geometry, o.class_name) for o in objs], (h, w),
                                                         label_of)
            truth_mode = "instances"
        else:
            assert item.mask is not None
            arr, mode = _read_mask(item.mask)
            truth_mode = item.mask_mode or mode
            if arr.shape != (h, w):
                raise BadRequestError(f"{item.mask} is {arr.shape[1]} x {arr.shape[0]} px, its image "
                                      f"{w} x {h}: masks must have the image's size")
            if truth_mode == "instances":
                true_inst = arr
                if item.types is not None and item.types.is_file():
                    true_types = _read_mask(item.types)[0]
                else:
                    true_types = (arr > 0).astype(np.int64) * label_of(None)
                true_cls = {int(i): int(np.bincount(true_types[arr == i]).argmax()) for i in np.unique(arr) if i}
            else:
                true_inst, true_types, true_cls = np.zeros_like(arr), arr, {}
        # Prediction.
        t0 = time.perf_counter()
        features, _stats = annotate_image(engine, opts.model, rgb, mpp, name=item.name)
        seconds = time.perf_counter() - t0
        pred_objs = []
        for f in features:
            cls = (f.get("properties") or {}).get("classification") or {}
            pred_objs.append((to_shape(f["geometry"]), cls.get("name") if isinstance(cls, dict) else None))
        pred_inst, pred_types, pred_cls = _rasterise(pred_objs, (h, w), label_of)

        row: dict[str, Any] = {"image": item.name, "seconds": round(seconds, 3)}
        if truth_mode == "instances" and instance_model:
            row.update(instance_metrics(true_inst, pred_inst, opts.match_iou))
            px = opts.radius_um / mpp if mpp else opts.radius_um
            row.update(centroid_metrics(centroids(true_inst), centroids(pred_inst), px))
            coco_rows.append(len(rows))
            coco_truth.append(InstanceImage(true_inst, true_cls))
            coco_pred.append(InstanceImage(pred_inst, pred_cls))
        row.update(semantic_metrics(true_types, pred_types, classes))
        rows.append(row)
        out(f"[{n}/{len(items)}] {item.name}: " + ", ".join(
            f"{k} {row[k]:.3f}" for k in ("pq", "aji", "dice", "f1", "miou") if k in row and _num(row[k])))
    pooled: dict[str, float] = {}
    if coco_truth:  # one COCO matching pass gives the AP of each image and of all together
        pooled, per_image = coco_metrics_per_image(coco_truth, coco_pred, classes[1:])
        for idx, ap in zip(coco_rows, per_image, strict=True):
            rows[idx].update(ap)
    report: dict[str, Any] = {"model": opts.model, "data": str(opts.data), "mpp": opts.mpp,
                              "radius_um": opts.radius_um, "match_iou": opts.match_iou, "classes": classes}
    means = mean_metrics(rows)
    # Class IoUs of classes that appeared only in later images: NaN where the class never showed.
    report.update({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in means.items()})
    if pooled:
        report["coco_pooled"] = {k: (None if math.isnan(v) else v) for k, v in pooled.items()}
    report["images"] = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
                        for r in rows]
    return report


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


TABLE_KEYS = ("n_true", "n_pred", "dice", "aji", "aji_plus", "dq", "sq", "pq", "f1", "ap", "ap50", "bbox_ap50",
              "pixel_accuracy", "miou")


def format_table(report: dict[str, Any]) -> str:
    """Per-image rows and the mean, columns for the metrics present."""
    rows = report["images"]
    keys = [k for k in TABLE_KEYS if any(_num(r.get(k)) for r in rows)]
    name_w = max(len("mean"), *(len(r["image"]) for r in rows))

    def cell(v: Any, k: str) -> str:
        if not _num(v):
            return "-"
        return f"{v:.0f}" if k.startswith("n_") else f"{v:.3f}"

    lines = ["  ".join([f"{'image':<{name_w}}", *(f"{k:>9}" for k in keys)])]
    for r in [*rows, {"image": "mean", **{k: report.get(k) for k in keys}}]:
        lines.append("  ".join([f"{r['image']:<{name_w}}", *(f"{cell(r.get(k), k):>9}" for k in keys)]))
    return "\n".join(lines)
