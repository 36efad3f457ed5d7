"""Average precision of a model on volumes with ground truth, through the full pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .errors import InputError

THRESHOLDS = (0.5, 0.75, 0.9)


@dataclass
class Score:
    name: str
    ap: tuple[float, ...]
    n_true: int
    n_pred: int
    seconds: float


def score_masks(gt: np.ndarray, pred: np.ndarray, thresholds: Sequence[float] = THRESHOLDS):
    """AP = TP / (TP + FP + FN) at each IoU threshold (Cellpose's definition)."""
    from .metrics import average_precision

    ap, *_ = average_precision(gt, pred, thresholds=tuple(thresholds))
    return tuple(float(a) for a in np.atleast_1d(ap))


def score_volume(name: str, gt: np.ndarray, masks: np.ndarray, seconds: float,
                 thresholds: Sequence[float] = THRESHOLDS, ignore_small: float = 0.0) -> Score:
    """One volume's row: AP and object counts, without the ground-truth objects under
    ``ignore_small`` x the median volume and the masks mostly inside them when it is > 0
    (:func:`cp3d.core.metrics.ignore_small_truth`)."""
    from .metrics import ignore_small_truth

    gt, masks = ignore_small_truth(gt, masks, ignore_small)
    return Score(name, score_masks(gt, masks, thresholds), int(len(np.unique(gt)) - 1),
                 int(len(np.unique(masks)) - 1), seconds)


def find_pairs(folder: Path, mask_filter: str = "_masks", img_filter: str = "",
               look_one_level_down: bool = False) -> list[tuple[Path, Path]]:
    """(image, ground-truth masks) pairs: NAME.tif with NAME{mask_filter}.tif beside it."""
    from .io import TIFF_SUFFIXES, list_images

    pairs = []
    for img in list_images(folder, look_one_level_down, img_filter):
        if img.stem.endswith(mask_filter):
            continue
        stem = img.stem
        if img_filter and stem.endswith(img_filter):
            stem = stem[: -len(img_filter)]
        for suffix in TIFF_SUFFIXES:
            gt = img.with_name(stem + mask_filter + suffix)
            if gt.exists():
                pairs.append((img, gt))
                break
    if not pairs:
        raise InputError(f"no image with a ground-truth file NAME{mask_filter}.tif", folder)
    return pairs


def evaluate(pairs: Iterable[tuple[Path, Path]], model, thresholds=THRESHOLDS,
             ignore_small: float = 0.0, **params) -> list[Score]:
    """Segment each image and score it against its ground truth (:func:`score_volume`;
    ``ignore_small`` > 0 leaves out objects such as cells cut by a crop's faces)."""
    from .io import read_volume
    from .pipeline import segment

    z_axis = params.pop("z_axis", None)
    channel_axis = params.pop("channel_axis", None)
    scores = []
    for img_path, gt_path in pairs:
        vol = read_volume(img_path, z_axis=z_axis, channel_axis=channel_axis)
        gt = read_volume(gt_path).data[:, 0]
        if gt.shape != vol.shape_zyx:
            raise InputError(f"ground truth shape {gt.shape} differs from the image's "
                             f"{vol.shape_zyx}", gt_path)
        result = segment(vol, model, **params)
        scores.append(score_volume(img_path.name, gt, result.masks,
                                   result.seconds.get("total", 0.0), thresholds, ignore_small))
    return scores


def format_table(scores: Sequence[Score], thresholds=THRESHOLDS, mean: bool = True) -> str:
    width = max([32] + [len(s.name) for s in scores])  # names are never cut
    head = (f"{'volume':{width}s} " + " ".join(f"AP@{t:<4}" for t in thresholds)
            + "   GT  pred  seconds")
    lines = [head, "-" * len(head)]
    for s in scores:
        lines.append(f"{s.name:{width}s} " + " ".join(f"{a:7.3f}" for a in s.ap)
                     + f" {s.n_true:5d} {s.n_pred:5d} {s.seconds:8.1f}")
    if mean and len(scores) > 1:
        avg = np.mean([s.ap for s in scores], axis=0)
        lines.append(f"{'mean':{width}s} " + " ".join(f"{a:7.3f}" for a in avg))
    return "\n".join(lines)


def synthetic_case(seed: int, kind: str = "nuclei", overrides: Optional[dict] = None,
                   diameter: Optional[float] = None):
    """(volume, ground truth, meta, segment kwargs) of one evaluation volume of the generator.

    Cells: every even seed has a nuclear channel, given as chan2 (chan=1, chan2=2).
    ``overrides``: drawn parameters to replace (:func:`cp3d.core.synth.random_volume`);
    ``diameter``: the object diameter instead of the drawn one."""
    import numpy as np

    from .io import volume_from_array
    from .synth import random_volume

    two = kind == "cells" and seed % 2 == 0
    img, gt, meta = random_volume(seed, kind, diameter=diameter, nuclear_channel=two,
                                  dtype=np.uint16, overrides=overrides)
    vol = volume_from_array(img, z_axis=0 if two else None, channel_axis=1 if two else None)
    return vol, gt, meta, (dict(chan=1, chan2=2) if two else {})
