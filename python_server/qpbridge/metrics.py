"""Evaluation metrics of the source projects, on label images.

- instance segmentation (HoVer-Net's ``metrics/stats_utils.py`` definitions): ``dice`` (binary Dice of
  foreground, HoVer-Net's DICE1), ``dice2`` (ensemble Dice), ``aji`` (MoNuSeg AJI: each true object paired with
  the prediction of highest IoU, a prediction may serve several), ``aji_plus`` (one-to-one pairing by the
  Hungarian method), ``dq``, ``sq``, ``pq`` (pairs with IoU > 0.5);
- centroids (IHC project): Hungarian pairing of centroids by distance, pairs farther than the radius dropped,
  then precision, recall, F1;
- semantic (HOTSPoT): pixel accuracy, IoU per class, mean IoU over classes present in truth or prediction;
- COCO AP, AP50, AP75 for boxes and masks through pycocotools (Detectron2 project).

A value that is undefined (e.g. PQ with no object in truth nor prediction) is NaN; means skip NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["INSTANCE_KEYS", "InstanceImage", "centroid_metrics", "centroids", "coco_metrics", "coco_metrics_per_image",
           "instance_metrics",
           "mean_metrics", "pair_counts", "semantic_metrics"]

INSTANCE_KEYS = ("dice", "dice2", "aji", "aji_plus", "dq", "sq", "pq")
_EPS = 1.0e-6  # HoVer-Net's guard in the AJI IoU and SQ denominators


def _relabel(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Labels 1..n in the order of the original ids (HoVer-Net's ``remap_label``), and n."""
    ids, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape)
    if ids.size and ids[0] == 0:
        return inverse.astype(np.int64), int(ids.size - 1)
    return inverse.astype(np.int64) + 1, int(ids.size)


def pair_counts(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersection matrix [n_true, n_pred], true areas, pred areas) of two instance label images, after
    relabelling both to 1..n in order of their ids (row i is the (i+1)-th smallest true id)."""
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    t, nt = _relabel(np.asarray(true))
    p, np_ = _relabel(np.asarray(pred))
    t_area = np.bincount(t.ravel(), minlength=nt + 1)[1:].astype(np.float64)
    p_area = np.bincount(p.ravel(), minlength=np_ + 1)[1:].astype(np.float64)
    both = (t > 0) & (p > 0)
    joint = np.bincount((t[both] - 1) * max(np_, 1) + (p[both] - 1), minlength=nt * np_)
    return joint.reshape(nt, np_).astype(np.float64), t_area, p_area


def instance_metrics(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> dict[str, float]:
    """Dice, Dice2, AJI, AJI+, DQ, SQ, PQ of a predicted instance label image against the truth (HoVer-Net's
    definitions), plus the counts ``tp``, ``fp``, ``fn``, ``n_true``, ``n_pred`` of the PQ pairing.

    Both are 2-D integer images with 0 as background and one id per object (any ids, not only 1..n).
    """
    from scipy.optimize import linear_sum_assignment

    inter, t_area, p_area = pair_counts(true, pred)
    nt, np_ = inter.shape
    union = t_area[:, None] + p_area[None, :] - inter
    out: dict[str, float] = {"n_true": float(nt), "n_pred": float(np_)}

    fg_t, fg_p = t_area.sum(), p_area.sum()
    tb, pb = np.asarray(true) > 0, np.asarray(pred) > 0
    out["dice"] = 2.0 * float((tb & pb).sum()) / float(fg_t + fg_p) if fg_t + fg_p else math.nan
    touching = inter > 0
    total = (t_area[:, None] + p_area[None, :])[touching].sum()
    out["dice2"] = 2.0 * inter[touching].sum() / total if total else math.nan

    if nt == 0 and np_ == 0:
        out.update(aji=math.nan, aji_plus=math.nan, dq=math.nan, sq=math.nan, pq=math.nan, tp=0.0, fp=0.0, fn=0.0)
        return out

    # AJI: IoU with HoVer-Net's epsilon; zero where objects do not touch (union there is never used).
    iou_eps = np.where(touching, inter / (np.where(touching, union, 0) + _EPS), 0.0)
    if nt and np_:
        best = np.argmax(iou_eps, axis=1)
        paired_t = np.nonzero(iou_eps[np.arange(nt), best] > 0)[0]
        paired_p = best[paired_t]
    else:
        paired_t = paired_p = np.zeros(0, np.int64)
    a_inter = inter[paired_t, paired_p].sum()
    a_union = union[paired_t, paired_p].sum()
    a_union += t_area[np.setdiff1d(np.arange(nt), paired_t)].sum()
    a_union += p_area[np.setdiff1d(np.arange(np_), paired_p)].sum()
    out["aji"] = float(a_inter / a_union) if a_union else math.nan

    # AJI+: one-to-one pairing maximising the summed IoU.
    rows, cols = linear_sum_assignment(-iou_eps) if nt and np_ else (np.zeros(0, np.int64),) * 2
    keep = iou_eps[rows, cols] > 0
    rows, cols = rows[keep], cols[keep]
    b_union = union[rows, cols].sum() + t_area[np.setdiff1d(np.arange(nt), rows)].sum() \
        + p_area[np.setdiff1d(np.arange(np_), cols)].sum()
    out["aji_plus"] = float(inter[rows, cols].sum() / b_union) if b_union else math.nan

    # PQ: pairs with IoU > match_iou (unique when match_iou >= 0.5), else the Hungarian pairing above it.
    iou = np.where(touching, inter / np.where(touching, union, 1), 0.0)
    if match_iou >= 0.5:
        pt, pp = np.nonzero(iou > match_iou)
    else:
        pt, pp = linear_sum_assignment(-iou) if nt and np_ else (np.zeros(0, np.int64),) * 2
        ok = iou[pt, pp] > match_iou
        pt, pp = pt[ok], pp[ok]
    tp, fp, fn = len(pt), np_ - len(pp), nt - len(pt)
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = float(iou[pt, pp].sum() / (tp + _EPS))
    out.update(dq=dq, sq=sq, pq=dq * sq, tp=float(tp), fp=float(fp), fn=float(fn))
    return out


def centroids(labels: np.ndarray) -> np.ndarray:
    """Centroids ``[[x, y], ...]`` of each object in id order, in image coordinates as QuPath and the points files
    of docs/training.md use them (pixel (i, j) spans [i, i+1) x [j, j+1): its centre is at +0.5)."""
    from scipy import ndimage

    ids = np.unique(labels)
    ids = ids[ids != 0]
    if ids.size == 0:
        return np.zeros((0, 2))
    com = ndimage.center_of_mass(np.ones(labels.shape), labels, ids)
    return np.array([[c[1] + 0.5, c[0] + 0.5] for c in com], dtype=np.float64)


def centroid_metrics(true_xy: np.ndarray, pred_xy: np.ndarray, radius: float) -> dict[str, float]:
    """Precision, recall and F1 of predicted points against true points (same units as ``radius``).

    HoVer-Net's ``pair_coordinates``: the Hungarian pairing minimising the total distance, then pairs farther
    than ``radius`` count as unpaired.
    """
    from scipy.optimize import linear_sum_assignment

    true_xy = np.asarray(true_xy, np.float64).reshape(-1, 2)
    pred_xy = np.asarray(pred_xy, np.float64).reshape(-1, 2)
    tp = 0
    if len(true_xy) and len(pred_xy):
        dist = np.linalg.norm(true_xy[:, None, :] - pred_xy[None, :, :], axis=-1)
        rows, cols = linear_sum_assignment(dist)
        tp = int((dist[rows, cols] <= radius).sum())
    fp, fn = len(pred_xy) - tp, len(true_xy) - tp
    precision = tp / (tp + fp) if tp + fp else math.nan
    recall = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return {"precision": precision, "recall": recall, "f1": f1, "point_tp": float(tp), "point_fp": float(fp),
            "point_fn": float(fn)}


def semantic_metrics(true: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Pixel accuracy, IoU per class (``iou_<class>``, lower case) and mean IoU over the classes present in the
    truth or the prediction. ``classes[i]`` names label i (label 0 included, usually the background)."""
    true, pred = np.asarray(true), np.asarray(pred)
    if true.shape != pred.shape:
        raise ValueError(f"label images differ in shape: {true.shape} vs {pred.shape}")
    out: dict[str, Any] = {"pixel_accuracy": float((true == pred).mean()) if true.size else math.nan}
    ious = []
    for i, name in enumerate(classes):
        t, p = true == i, pred == i
        union = int((t | p).sum())
        iou = float((t & p).sum() / union) if union else math.nan
        out[f"iou_{name.lower().replace(' ', '_')}"] = iou
        if union:
            ious.append(iou)
    out["miou"] = float(np.mean(ious)) if ious else math.nan
    return out


@dataclass
class InstanceImage:
    """One image's objects for COCO evaluation: instance labels, the class of each id, and (predictions) a score
    per id (missing ids score 1)."""

    labels: np.ndarray
    classes: dict[int, int] | None = None
    scores: dict[int, float] | None = None


def _coco_objects(img: InstanceImage, image_id: int, with_score: bool) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils
    from scipy import ndimage

    labels = np.asarray(img.labels)
    ok = labels.size and labels.max() > 0 and labels.min() >= 0
    boxes = ndimage.find_objects(labels.astype(np.int64)) if ok else []
    objs = []
    for idx, sl in enumerate(boxes, start=1):
        if sl is None:
            continue
        m = np.zeros(labels.shape, np.uint8, order="F")
        m[sl] = labels[sl] == idx
        rle = mask_utils.encode(m)
        area = float(mask_utils.area(rle))
        bbox = [float(v) for v in mask_utils.toBbox(rle)]
        rle["counts"] = rle["counts"].decode("ascii")
        obj: dict[str, Any] = {"image_id": image_id, "category_id": (img.classes or {}).get(idx, 1),
                               "segmentation": rle, "bbox": bbox, "area": area, "iscrowd": 0}
        if with_score:
            obj["score"] = float((img.scores or {}).get(idx, 1.0))
        objs.append(obj)
    return objs


def coco_metrics(truth: Sequence[InstanceImage], preds: Sequence[InstanceImage],
                 categories: Sequence[str] = ("Nucleus",)) -> dict[str, float]:
    """COCO AP, AP50, AP75 for masks (``ap``, ``ap50``, ``ap75``) and boxes (``bbox_ap``...) over all images at
    once, as pycocotools' COCOeval computes them (AP averaged over IoU 0.50:0.95 and categories), with the limit
    of detections per image raised from 100 to cover every object. Category i+1 is ``categories[i]``."""
    return coco_metrics_per_image(truth, preds, categories)[0]


def coco_metrics_per_image(truth: Sequence[InstanceImage], preds: Sequence[InstanceImage],
                           categories: Sequence[str] = ("Nucleus",)
                           ) -> tuple[dict[str, float], list[dict[str, float]]]:
    """:func:`coco_metrics` over all images, and for each image alone (one matching pass serves both)."""
    import contextlib
    import copy
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(truth) != len(preds):
        raise ValueError("truth and predictions hold different numbers of images")
    keys = [_coco_key(kind, m) for kind in ("segm", "bbox") for m in ("ap", "ap50", "ap75")]
    gt_anns, dt_anns, images = [], [], []
    for i, (t, p) in enumerate(zip(truth, preds, strict=True), start=1):
        images.append({"id": i, "width": int(t.labels.shape[1]), "height": int(t.labels.shape[0])})
        gt_anns += _coco_objects(t, i, with_score=False)
        dt_anns += _coco_objects(p, i, with_score=True)
    for k, a in enumerate(gt_anns, start=1):
        a["id"] = k
    pooled: dict[str, float] = dict.fromkeys(keys, math.nan)
    per_image: list[dict[str, float]] = [dict.fromkeys(keys, math.nan) for _ in images]
    if not gt_anns:
        return pooled, per_image
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(categories)]
    max_dets = max(100, max((len(_coco_ids(p)) for p in preds), default=0))
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": gt_anns, "categories": cats}
        gt.createIndex()
        for kind in ("segm", "bbox"):
            if not dt_anns:
                zero = {_coco_key(kind, m): 0.0 for m in ("ap", "ap50", "ap75")}
                pooled.update(zero)
                for row in per_image:
                    row.update(zero)
                continue
            dt = gt.loadRes([dict(a) for a in dt_anns])
            ev = COCOeval(gt, dt, kind)
            ev.params.maxDets = [1, 10, max_dets]
            ev.params.areaRng, ev.params.areaRngLbl = [[0.0, 1e10]], ["all"]  # small/medium/large: not reported
            ev.evaluate()
            ev.accumulate()
            pooled.update(_ap_from(ev, kind))
            n_img, n_cat = len(images), len(ev._paramsEval.catIds)
            for idx in range(n_img):
                # accumulate() over one image: its slice of the per-image matches (ordered category, area, image)
                sub = copy.copy(ev)
                sub._paramsEval = copy.deepcopy(ev._paramsEval)
                sub._paramsEval.imgIds = [ev._paramsEval.imgIds[idx]]
                sub.params = copy.deepcopy(sub._paramsEval)
                sub.evalImgs = [ev.evalImgs[k * n_img + idx] for k in range(n_cat)]
                sub.accumulate()
                per_image[idx].update(_ap_from(sub, kind))
    return pooled, per_image


def _ap_from(ev: Any, kind: str) -> dict[str, float]:
    """AP, AP50, AP75 from accumulated precision [iou, recall, class, area, maxDets] at the largest maxDets
    (COCOeval.summarize() reads AP@[.5:.95] at 100 detections whatever maxDets says: too few for nuclei)."""
    prec = ev.eval["precision"][:, :, :, 0, -1]
    ious = [round(float(v), 2) for v in ev.params.iouThrs]
    out = {}
    for m, sel in (("ap", slice(None)), ("ap50", ious.index(0.5)), ("ap75", ious.index(0.75))):
        p = prec[sel]
        p = p[p > -1]  # -1: a class without any object
        out[_coco_key(kind, m)] = float(p.mean()) if p.size else math.nan
    return out


def _coco_key(kind: str, metric: str) -> str:
    return metric if kind == "segm" else f"{kind}_{metric}"


def _coco_ids(img: InstanceImage) -> np.ndarray:
    ids = np.unique(img.labels)
    return ids[ids != 0]


def mean_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Mean of each numeric metric over images, skipping NaN (None when no image defines it)."""
    keys: list[str] = []
    for r in rows:
        keys += [k for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys]
    out: dict[str, Any] = {}
    for k in keys:
        vals = [float(r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not math.isnan(float(r[k]))]
        out[k] = float(np.mean(vals)) if vals else math.nan
    return out
