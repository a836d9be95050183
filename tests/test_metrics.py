"""Metrics against small cases computed by hand (HoVer-Net definitions, COCO AP, centroid matching)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qpbridge.metrics import (
    InstanceImage,
    centroid_metrics,
    centroids,
    coco_metrics,
    coco_metrics_per_image,
    instance_metrics,
    mean_metrics,
    semantic_metrics,
)


def test_aji_counts_unmatched_prediction_and_unmatched_truth() -> None:
    true = np.zeros((6, 8), np.int32)
    true[0:2, 0:2] = 1                  # 4 px, overlapped by prediction 5
    true[0:2, 4:6] = 2                  # 4 px, missed
    pred = np.zeros_like(true)
    pred[0:2, 0:3] = 5                  # 6 px: 4 inside true 1
    pred[4, 0:3] = 7                    # 3 px false positive
    m = instance_metrics(true, pred)
    # AJI = 4 / (union(t1, p5) = 6  + missed truth 4 + unmatched prediction 3)
    assert m["aji"] == pytest.approx(4 / 13, abs=1e-6)
    assert m["aji_plus"] == pytest.approx(4 / 13, abs=1e-6)
    # IoU(t1, p5) = 4/6 > 0.5: tp 1, fp 1 (p7), fn 1 (t2)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 1)
    assert m["dq"] == pytest.approx(0.5)
    assert m["sq"] == pytest.approx(4 / 6, abs=1e-5)
    assert m["pq"] == pytest.approx(1 / 3, abs=1e-5)
    assert m["dice"] == pytest.approx(2 * 4 / (8 + 9))
    assert m["dice2"] == pytest.approx(2 * 4 / (4 + 6))


def test_aji_reuses_a_prediction_and_aji_plus_does_not() -> None:
    true = np.array([[1, 1, 2, 2]])
    pred = np.array([[3, 3, 3, 3]])
    m = instance_metrics(true, pred)
    assert m["aji"] == pytest.approx((2 + 2) / (4 + 4), abs=1e-6)   # both truths pair with the one prediction
    assert m["aji_plus"] == pytest.approx(2 / (4 + 2), abs=1e-6)    # one pair; the other truth joins the union
    assert m["pq"] == 0 and m["tp"] == 0 and m["fp"] == 1 and m["fn"] == 2  # IoU 0.5 is not > 0.5


def test_pq_with_matched_and_unmatched_mix() -> None:
    true = np.zeros((5, 5), np.int32)
    pred = np.zeros_like(true)
    true[0, :] = 1
    pred[0, :] = 10                     # IoU 1
    true[2, 0:3] = 2
    pred[2, :] = 20                     # IoU 3/5
    true[4, 0:4] = 3
    pred[4, 3:5] = 30                   # IoU 1/5: an fp and an fn
    m = instance_metrics(true, pred)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 1, 1)
    assert m["dq"] == pytest.approx(2 / 3)
    assert m["sq"] == pytest.approx((1 + 0.6) / 2, abs=1e-5)
    assert m["pq"] == pytest.approx(2 / 3 * 0.8, abs=1e-5)
    assert m["aji"] == pytest.approx((5 + 3 + 1) / (5 + 5 + 5), abs=1e-6)
    # Ids need not be contiguous, and swapping truth and prediction keeps the PQ counts mirrored.
    r = instance_metrics(pred, true)
    assert (r["tp"], r["fp"], r["fn"]) == (2, 1, 1) and r["pq"] == pytest.approx(m["pq"])


def test_empty_cases() -> None:
    z = np.zeros((4, 4), np.int32)
    one = z.copy()
    one[1:3, 1:3] = 1
    assert math.isnan(instance_metrics(z, z)["pq"])
    m = instance_metrics(one, z)
    assert m["pq"] == 0 and m["aji"] == 0 and m["fn"] == 1 and m["dice"] == 0
    m = instance_metrics(z, one)
    assert m["pq"] == 0 and m["aji"] == 0 and m["fp"] == 1
    p = instance_metrics(one, one * 4)
    assert p["pq"] == pytest.approx(1, abs=1e-5) and p["aji"] == pytest.approx(1, abs=1e-5) and p["dice"] == 1


def test_centroid_matching_hungarian_with_radius() -> None:
    true = np.array([[0, 0], [10, 0]])
    pred = np.array([[1, 0], [30, 0], [10, 2]])
    m = centroid_metrics(true, pred, radius=3)
    assert (m["point_tp"], m["point_fp"], m["point_fn"]) == (2, 1, 0)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == 1 and m["f1"] == pytest.approx(0.8)
    m = centroid_metrics(true, pred, radius=1.5)     # (10, 2) is 2 away: no longer a pair
    assert (m["point_tp"], m["point_fp"], m["point_fn"]) == (1, 2, 1)
    labels = np.zeros((5, 6), np.int32)
    labels[0:2, 0:2] = 3
    labels[4, 3:6] = 1
    assert centroids(labels).tolist() == [[4.5, 4.5], [1.0, 1.0]]  # pixel centres at +0.5, as QuPath


def test_semantic_accuracy_and_iou() -> None:
    true = np.array([[0, 1], [1, 2]])
    pred = np.array([[0, 1], [2, 2]])
    m = semantic_metrics(true, pred, ["Background", "Portal tract", "Lobule", "Other"])
    assert m["pixel_accuracy"] == 0.75
    assert (m["iou_background"], m["iou_portal_tract"], m["iou_lobule"]) == (1.0, 0.5, 0.5)
    assert math.isnan(m["iou_other"]) and m["miou"] == pytest.approx(2 / 3)


def test_coco_ap_perfect_and_half_recall() -> None:
    true = np.zeros((40, 40), np.int32)
    true[2:12, 2:12] = 1
    true[20:32, 20:30] = 2
    perfect = coco_metrics([InstanceImage(true)], [InstanceImage(true.copy())])
    for k in ("bbox_ap", "bbox_ap50", "bbox_ap75", "ap", "ap50", "ap75"):
        assert perfect[k] == pytest.approx(1.0), k
    half = np.where(true == 2, 2, 0)
    m = coco_metrics([InstanceImage(true)], [InstanceImage(half)])
    # Precision 1 up to recall 0.5, nothing after: 51 of COCO's 101 recall points.
    assert m["ap50"] == pytest.approx(51 / 101) and m["bbox_ap"] == pytest.approx(51 / 101)


def test_coco_many_objects_and_per_image() -> None:
    """More than COCO's default 100 detections per image, and per-image AP from one pass equal to each alone."""
    grid = np.zeros((300, 300), np.int32)
    for i in range(15):
        for j in range(10):
            grid[i * 20 + 2:i * 20 + 14, j * 30 + 2:j * 30 + 20] = i * 10 + j + 1  # 150 objects
    assert coco_metrics([InstanceImage(grid)], [InstanceImage(grid.copy())])["ap"] == pytest.approx(1.0)
    second = np.where(grid % 3 == 0, grid, 0)
    shifted = np.roll(second, 3, axis=1)      # 12 x 18 boxes moved 3 px: IoU 15/21 = 0.71
    pooled, per = coco_metrics_per_image([InstanceImage(grid), InstanceImage(second)],
                                         [InstanceImage(grid.copy()), InstanceImage(shifted)])
    alone = coco_metrics([InstanceImage(second)], [InstanceImage(shifted)])
    assert per[0]["ap"] == pytest.approx(1.0) and per[1] == pytest.approx(alone)
    assert alone["ap50"] == pytest.approx(1.0) and alone["ap75"] == 0.0 and alone["bbox_ap50"] == pytest.approx(1.0)
    # IoU 0.71 passes the thresholds 0.50 .. 0.70 (5 of 10): AP 0.5.
    assert alone["ap"] == pytest.approx(0.5)
    assert per[1]["ap"] < pooled["ap"] < 1


def test_mean_skips_nan() -> None:
    assert mean_metrics([{"pq": 0.5, "name": "a"}, {"pq": math.nan}, {"pq": 0.7}]) == {"pq": pytest.approx(0.6)}
