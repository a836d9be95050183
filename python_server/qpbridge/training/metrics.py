"""Instance metrics for validation during training: Dice, AJI and PQ (DQ, SQ) as HoVer-Net defines them.

``instance_metrics`` uses :func:`qpbridge.metrics.instance_metrics` when the package has it (``qpbridge
evaluate``'s metrics); this minimal implementation is the fallback so that training does not depend on it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _pairs(true: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(intersections (nt+1, np+1), true areas, pred areas) of labels renumbered 1..n."""
    t = _dense(true)
    p = _dense(pred)
    nt, npred = int(t.max()), int(p.max())
    inter = np.bincount(t.ravel().astype(np.int64) * (npred + 1) + p.ravel(),
                        minlength=(nt + 1) * (npred + 1)).reshape(nt + 1, npred + 1)
    return inter, inter.sum(axis=1), inter.sum(axis=0)


def _dense(labels: np.ndarray) -> np.ndarray:
    _, inv = np.unique(labels, return_inverse=True)
    out: np.ndarray = inv.reshape(labels.shape).astype(np.int64)
    if labels.min() > 0:  # no background: shift so 0 stays background
        out += 1
    return out


def minimal_instance_metrics(true: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> dict[str, float]:
    """``dice``, ``aji``, ``dq``, ``sq``, ``pq`` of one image (label images, 0 = background)."""
    inter, t_area, p_area = _pairs(true, pred)
    it, ip = inter[1:, 1:].astype(np.float64), None
    ta, pa = t_area[1:].astype(np.float64), p_area[1:].astype(np.float64)
    union = ta[:, None] + pa[None, :] - it
    iou = np.divide(it, union, out=np.zeros_like(it), where=union > 0)
    fg_t, fg_p = ta.sum(), pa.sum()
    both = float(it.sum())
    dice = 2.0 * both / (fg_t + fg_p) if fg_t + fg_p > 0 else 1.0
    # PQ: IoU > 0.5 matches are unique
    matched = iou > match_iou
    tp = int(matched.sum())
    fn = len(ta) - tp
    fp = len(pa) - tp
    dq = tp / (tp + 0.5 * fp + 0.5 * fn) if tp + fp + fn else 1.0
    sq = float(iou[matched].sum()) / tp if tp else 0.0
    # AJI: each true nucleus with its highest-IoU prediction; unused predictions add to the union
    if len(ta) and len(pa):
        best = np.argmax(iou, axis=1)
        has = iou[np.arange(len(ta)), best] > 0
        inter_sum = float(it[np.arange(len(ta)), best][has].sum())
        union_sum = float(union[np.arange(len(ta)), best][has].sum() + ta[~has].sum())
        used = np.zeros(len(pa), dtype=bool)
        used[best[has]] = True
        union_sum += float(pa[~used].sum())
        ip = inter_sum / union_sum if union_sum > 0 else 0.0
    else:
        ip = 1.0 if not len(ta) and not len(pa) else 0.0
    return {"dice": float(dice), "aji": float(ip), "dq": float(dq), "sq": float(sq), "pq": float(dq * sq)}


def instance_metrics(true: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    """The package's ``qpbridge.metrics.instance_metrics`` when present, else the minimal one here."""
    try:
        from qpbridge.metrics import instance_metrics as full  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return minimal_instance_metrics(true, pred)
    result: dict[str, Any] = full(true, pred)
    return result
