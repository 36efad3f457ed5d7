"""Stitch mode: link 2D masks of consecutive planes into 3D objects by overlap (IoU)."""

from __future__ import annotations

import numpy as np

from .metrics import matching_iou


def stitch3D(masks: np.ndarray, stitch_threshold: float = 0.25) -> np.ndarray:
    """Relabel a (Z, Y, X) stack of independent per-plane labels as 3D objects.

    Plane by plane (Cellpose's rule), each mask of plane z+1 takes the label of the mask in
    plane z it overlaps most, when that IoU is at least ``stitch_threshold`` and that mask is
    its best match too; otherwise it starts a new object.
    """
    masks = np.asarray(masks)
    out = np.zeros(masks.shape, np.int64)
    next_label = 1
    for z in range(masks.shape[0]):
        plane = masks[z]
        ids = np.unique(plane)
        ids = ids[ids > 0]
        mapping = {}
        if z > 0 and ids.size and out[z - 1].any():
            prev = out[z - 1]
            prev_ids = np.unique(prev)
            prev_ids = prev_ids[prev_ids > 0]
            # IoU of this plane's masks (rows) with the previous plane's objects (columns)
            iou = matching_iou(_dense(plane, ids), _dense(prev, prev_ids))
            if iou.size:
                best = iou.argmax(axis=1)
                best_iou = iou[np.arange(len(ids)), best]
                # one object continues through one mask only: keep the best mask per object
                owner = iou.argmax(axis=0)
                for k, label in enumerate(ids):
                    j = best[k]
                    if best_iou[k] >= stitch_threshold and owner[j] == k:
                        mapping[label] = int(prev_ids[j])
        for label in ids:
            if label not in mapping:
                mapping[label] = next_label
                next_label += 1
        lut = np.zeros(int(plane.max()) + 1, np.int64)
        for label, new in mapping.items():
            lut[label] = new
        out[z] = lut[plane]
    n = next_label - 1
    return out.astype(np.uint32 if n > 65535 else np.uint16)


def _dense(labels: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Labels mapped to 1..len(ids) in the order of ``ids`` (so IoU columns follow ``ids``)."""
    lut = np.zeros(int(labels.max()) + 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]
