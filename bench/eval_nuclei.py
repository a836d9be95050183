"""Nucleus models on images with ImageScope XML outlines (MoNuSeg): Dice, AJI, PQ (DQ, SQ) per image and mean.

Each model runs through the engine as ``qpbridge predict`` runs it (planned tiles at the model's µm/px, seams
resolved), at the pixel size the XML gives; its detections are drawn back into a label image at full
resolution and compared with the XML's outlines. The metrics are ``qpbridge.metrics.instance_metrics`` when the
package has it, else the training module's own (HoVer-Net definitions).

    .venv/bin/python bench/eval_nuclei.py --data ../shared/data/monuseg-train \\
        --images TCGA-21-5786-01Z-00-DX1 TCGA-AR-A1AS-01Z-00-DX1 TCGA-B0-5710-01Z-00-DX1 \\
        --models nuclei models/hovernet-monuseg --device cuda -o validation.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from qpbridge.training.metrics import instance_metrics
from qpbridge.training.monuseg import DEFAULT_VAL, rasterise, read_imagescope

KEYS = ("dice", "aji", "dq", "sq", "pq")


def features_to_labels(features: list[dict[str, Any]], shape: tuple[int, int]) -> np.ndarray:
    """A label image (int32, 1..n in feature order) of the features' outer rings, in full-resolution pixels."""
    polygons: list[np.ndarray] = []
    for f in features:
        geom = f["geometry"]
        parts = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        for part in parts:
            polygons.append(np.asarray(part[0], dtype=np.float64))
    return rasterise(polygons, shape)


def evaluate(models: list[str], data: Path, images: list[str], device: str,
             default_mpp: float = 0.25) -> dict[str, Any]:
    from qpbridge.annotate import annotate_image
    from qpbridge.engine import Engine

    engine = Engine(None, device=device, any_model_path=True)
    out: dict[str, Any] = {"images": images, "models": {}}
    for name in models:
        rows = []
        for stem in images:
            mpp, polygons = read_imagescope(data / f"{stem}.xml")
            mpp = mpp or default_mpp
            rgb = cv2.cvtColor(cv2.imread(str(data / f"{stem}.tif")), cv2.COLOR_BGR2RGB)
            truth = rasterise(polygons, rgb.shape[:2])
            t0 = time.perf_counter()
            features, _ = annotate_image(engine, name, rgb, mpp, name=stem)
            seconds = time.perf_counter() - t0
            pred = features_to_labels(features, rgb.shape[:2])
            m = instance_metrics(truth, pred)
            rows.append({"image": stem, "mpp": mpp, "true": len(polygons), "found": len(features),
                         "seconds": round(seconds, 2), **{k: float(m[k]) for k in KEYS if k in m}})
        mean = {k: float(np.mean([r[k] for r in rows])) for k in KEYS if all(k in r for r in rows)}
        out["models"][name] = {"mean": mean, "per_image": rows}
    return out


def table(result: dict[str, Any]) -> str:
    lines = [f"{'model':<28} {'image':<26} {'true':>5} {'found':>5} " + " ".join(f"{k:>6}" for k in KEYS)]
    for name, res in result["models"].items():
        for r in res["per_image"]:
            lines.append(f"{Path(name).name:<28} {r['image']:<26} {r['true']:>5} {r['found']:>5} "
                         + " ".join(f"{r.get(k, float('nan')):>6.3f}" for k in KEYS))
        lines.append(f"{Path(name).name:<28} {'mean':<26} {'':>5} {'':>5} "
                     + " ".join(f"{res['mean'].get(k, float('nan')):>6.3f}" for k in KEYS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="folder of <image>.tif + <image>.xml")
    p.add_argument("--images", nargs="+", default=list(DEFAULT_VAL), help="image names without suffix")
    p.add_argument("--models", nargs="+", default=["nuclei"], help="model names or model folders")
    p.add_argument("--device", default="auto")
    p.add_argument("-o", "--output", type=Path, help="write the metrics as JSON")
    args = p.parse_args(argv)
    result = evaluate(args.models, args.data, args.images, args.device)
    print(table(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1), encoding="utf-8")
        print(f"-> {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
