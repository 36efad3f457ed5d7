"""Matching predicted masks to ground truth: IoU, and average precision as Cellpose defines it
(AP = TP / (TP + FP + FN) at an IoU threshold, with an optimal one-to-one matching)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def _relabel(masks: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N (0 kept), so matrices are as small as the object count."""
    uniq, inv = np.unique(masks, return_inverse=True)
    if uniq[0] != 0:
        inv = inv + 1
    return inv.reshape(masks.shape)


def label_overlap(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """(n_gt + 1, n_pred + 1) pixel counts of every pair of labels (row/column 0 = background)."""
    g = _relabel(np.asarray(gt)).ravel()
    p = _relabel(np.asarray(pred)).ravel()
    n_g, n_p = int(g.max()) + 1, int(p.max()) + 1
    return np.bincount(g * n_p + p, minlength=n_g * n_p).reshape(n_g, n_p)


def matching_iou(gt: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """IoU of every ground-truth object (rows) with every predicted object (columns)."""
    overlap = label_overlap(gt, pred).astype(np.float64)
    area_g = overlap.sum(axis=1, keepdims=True)
    area_p = overlap.sum(axis=0, keepdims=True)
    iou = overlap / np.maximum(area_g + area_p - overlap, 1)
    return iou[1:, 1:]


def true_positives(iou: np.ndarray, threshold: float) -> int:
    """Largest number of one-to-one matches with IoU >= threshold (Hungarian assignment)."""
    n_min = min(iou.shape)
    if n_min == 0:
        return 0
    costs = -(iou >= threshold).astype(float) - iou / (2 * n_min)
    rows, cols = linear_sum_assignment(costs)
    return int((iou[rows, cols] >= threshold).sum())


def average_precision(gt: np.ndarray, pred: np.ndarray,
                      thresholds: Sequence[float] = (0.5, 0.75, 0.9)):
    """Return (ap, tp, fp, fn), each an array over ``thresholds``."""
    iou = matching_iou(gt, pred)
    n_true, n_pred = iou.shape
    tp = np.array([true_positives(iou, t) for t in thresholds])
    fp = n_pred - tp
    fn = n_true - tp
    denom = tp + fp + fn
    ap = np.where(denom > 0, tp / np.maximum(denom, 1), 1.0)
    return ap, tp, fp, fn


def ignore_small_truth(gt: np.ndarray, pred: np.ndarray,
                       fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """``gt`` and ``pred`` without the ground-truth objects smaller than ``fraction`` times the
    median object's volume, and without the predicted masks lying mostly (over half) inside them.

    In a crop of packed tissue the cells cut by the crop's faces leave slivers of a few voxels
    to a few hundred, which no model can be expected to find and which count as misses in AP.
    Scored this way they count neither as misses nor, where a mask covers one, as false
    positives; a mask that merges a sliver into a whole cell is judged on the whole cell."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    counts = np.bincount(gt.ravel().astype(np.int64))
    sizes = counts[1:][counts[1:] > 0]
    if fraction <= 0 or sizes.size == 0:
        return gt, pred
    small = np.flatnonzero(counts < fraction * np.median(sizes))
    small = small[small > 0]
    ignored = np.isin(gt, small)
    pred_ids = pred.ravel().astype(np.int64)
    inside = np.bincount(pred_ids[ignored.ravel()], minlength=int(pred_ids.max()) + 1)
    total = np.bincount(pred_ids, minlength=int(pred_ids.max()) + 1)
    dropped = np.flatnonzero(inside > 0.5 * total)
    dropped = dropped[dropped > 0]
    return np.where(ignored, 0, gt), np.where(np.isin(pred, dropped), 0, pred)
