"""Estimating the object diameter, so that a default run needs no parameter.

Cellpose 3 regresses the diameter from the network's style vector with a size model trained
per network, then refines it from a first pass of masks. cp3d keeps only the refinement, which
works for any network (a user's fine-tuned one too, with no size model to train): segment a few
XY planes in 2D at a trial diameter, measure the median diameter of their masks, and repeat at
the measured diameter until it settles. A network run far from its training scale splits or
merges objects, so the first pass tries a few trial diameters and starts from one whose masks
agree with it. The two failures are not alike: a trial too small splits objects into pieces a
little larger than itself, and the refinement creeps up from there to the true size; a trial
too large can merge packed neighbours into blobs as large as the trial, which agree with it and
which no refinement splits again. So among the trials that agree, the smallest is taken.

The estimate is in Cellpose's units, the median diameter of 2D masks in XY planes (that of a
disk with the median area), the units of ``diam_labels`` and of the user's ``diameter``.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import numpy as np

from .cancel import CancelToken, ProgressFn, check_cancel, report
from .io import Volume

log = logging.getLogger("cp3d")

TRIAL_FACTORS = (0.5, 1.0, 2.0, 4.0)  # times the model's training diameter
MIN_DIAMETER, MAX_DIAMETER = 4.0, 1000.0
MIN_MASKS = 5  # a trial with fewer masks says nothing (one merged blob "agrees" with any size)
AGREE = math.log(1.25)  # |log(median / trial)| under which a trial's masks agree with it
MAX_SIDE = 384  # network-scale plane side: larger planes are cropped to their centre
# Refinements are cheap (a few 2D planes each) and may need to be many: a trial that splits
# textured nuclei into pieces measures pieces slightly larger than itself, and the estimate
# creeps up 10-30% a step to the true size (a real nuclear stain: 7 -> 22 px in 8 steps).
MAX_REFINEMENTS = 10


def mask_diameters(masks: np.ndarray, exclude_edges: bool = False) -> np.ndarray:
    """Diameter of the disk with each mask's area, for a 2D label image or a stack of them.

    ``exclude_edges``: leave out masks cut by the plane's border (they look smaller), unless
    that would leave fewer than 5 in a plane."""
    masks = np.asarray(masks)
    planes = masks.reshape(-1, *masks.shape[-2:])
    out = []
    for plane in planes:
        counts = np.bincount(plane.ravel().astype(np.int64))
        counts[0] = 0
        if exclude_edges:
            edge = np.unique(np.concatenate([plane[0], plane[-1], plane[:, 0], plane[:, -1]]))
            inner = counts.copy()
            inner[edge] = 0
            if np.count_nonzero(inner) >= 5:
                counts = inner
        out.append(counts[counts > 0])
    areas = np.concatenate(out) if out else np.zeros(0)
    return np.sqrt(areas / math.pi) * 2.0


def pick_planes(lz: int, n_planes: int) -> np.ndarray:
    """``n_planes`` Z indices spread over the middle 80% of the stack (the ends are often dim)."""
    if lz <= n_planes:
        return np.arange(lz)
    lo, hi = 0.1 * (lz - 1), 0.9 * (lz - 1)
    return np.unique(np.round(np.linspace(lo, hi, n_planes)).astype(int))


def pick_trial(medians: dict[float, float], agree: float = AGREE) -> float:
    """The trial diameter to refine from, given the median mask diameter found at each: the
    smallest whose masks agree with it (see the module's docstring), else the closest."""
    def gap(trial: float) -> float:
        return abs(math.log(medians[trial] / trial))

    agreeing = [t for t in medians if gap(t) <= agree]
    return min(agreeing) if agreeing else min(medians, key=gap)


def estimate_diameter(
    volume: Union[Volume, np.ndarray],
    model=None,
    *,
    chan: int = 0,
    chan2: int = 0,
    all_channels: bool = False,
    invert: bool = False,
    sharpen_radius: float = 0.0,
    tile_norm: int = 0,
    n_planes: int = 6,
    trial_factors: Sequence[float] = TRIAL_FACTORS,
    max_refinements: int = MAX_REFINEMENTS,
    use_gpu: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> float:
    """Median diameter (XY pixels) of the objects in ``volume``, from 2D masks of a few planes.

    ``volume``: a :class:`Volume` or an array (Z, Y, X) / (Z, C, Y, X); a 2D image is one plane.
    Falls back to the model's training diameter, with a warning, when no object is found.
    """
    from .normalize import normalize_volume
    from .pipeline import _as_volume, _load, select_channels

    vol = _as_volume(volume)
    model = _load(model, use_gpu)
    default = float(model.diam_labels)
    z = pick_planes(vol.shape_zyx[0], n_planes)
    x = select_channels(vol.data[z], model.nchan, chan, chan2, all_channels, vol.path)
    x = normalize_volume(x, invert=invert, sharpen_radius=sharpen_radius, tile_norm=tile_norm)

    def measure(diameter: float) -> np.ndarray:
        check_cancel(cancel)
        return mask_diameters(_planes_masks(model, x, diameter, cancel), exclude_edges=True)

    steps = len(trial_factors) + max_refinements
    medians = {}  # trial -> median diameter of its masks
    for k, trial in enumerate(sorted(default * f for f in trial_factors)):
        d = measure(trial)
        report(progress, "size", (k + 1) / steps)
        if d.size >= MIN_MASKS:
            medians[trial] = float(np.median(d))
    if not medians:
        log.warning("%s: no object found to estimate the diameter; using the model's %.1f px",
                    vol.name, default)
        return default
    diameter = medians[pick_trial(medians)]
    for k in range(max_refinements):  # fine: run at the measured size until it settles
        d = measure(diameter)
        report(progress, "size", (len(trial_factors) + k + 1) / steps)
        if d.size == 0:
            break
        new = float(np.median(d))
        done = abs(new / diameter - 1.0) < 0.05
        diameter = new
        if done:
            break
    report(progress, "size", 1.0)
    diameter = float(np.clip(diameter, MIN_DIAMETER, MAX_DIAMETER))
    log.info("%s: estimated diameter %.1f px", vol.name, diameter)
    return diameter


def _planes_masks(model, x: np.ndarray, diameter: float, cancel) -> np.ndarray:
    """2D masks of the planes of ``x`` (C, Z, Y, X) with objects taken to be ``diameter`` px.

    Each plane is cropped to its centre so that it is at most ``MAX_SIDE`` pixels wide at the
    network's scale: enough objects to measure, at a bounded cost whatever the trial size."""
    from . import dynamics
    from .inference import predict_2d_stack

    rescale = float(model.diam_mean) / diameter
    side = max(32, int(MAX_SIDE / rescale))
    _, _, ly, lx = x.shape
    y0, x0 = max(0, (ly - side) // 2), max(0, (lx - side) // 2)
    x = x[:, :, y0:y0 + side, x0:x0 + side]
    dP, cellprob = predict_2d_stack(model.net, x, model.device, rescale=rescale, cancel=cancel)
    niter = int(round(200 * max(1.0, 1.0 / rescale)))
    return np.stack([
        dynamics.masks_from_flows(dP[:, k], cellprob[k], niter=niter, min_size=15,
                                  flow_threshold=0.4)
        for k in range(cellprob.shape[0])])
