"""Training planes: 2D samples cut from annotated images and volumes.

The network only ever sees 2D images, so a 3D volume becomes its YX, ZY and ZX planes, with Z
first resampled by the anisotropy so that every plane looks like an XY plane (the 2.5D inference
runs the network on exactly such planes). A volume is normalized as a whole, 1st-99th
percentile per channel, as inference normalizes it. Each plane's target flows are computed once
here (:func:`cp3d.core.flows.masks_to_flows`); :mod:`cp3d.core.train` augments and trains.

Kept apart from the training loop so that the planes a volume gives depend on this module (and
the ones it calls), not on changes to the loop: ``scripts/train_bundled.py`` keys its cache of
cut volumes on this source.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage

from .cancel import CancelToken, check_cancel
from .errors import TrainingError
from .flows import masks_to_flows

log = logging.getLogger("cp3d")

MIN_DIAMETER = 5.0  # Cellpose clips training diameters below 5 px


@dataclass
class Sample:
    """One 2D training plane: normalized image (C, Y, X), labels (Y, X), unit flows (2, Y, X)."""

    image: np.ndarray
    masks: np.ndarray
    flows: np.ndarray
    diameter: float
    source: str = ""

    @property
    def n_masks(self) -> int:
        return int(len(np.unique(self.masks)) - 1)


@dataclass
class TrainingPair:
    """A training image and its labels, as read from disk.

    ``image``: (Z, C, Y, X) as :class:`cp3d.core.io.Volume` holds it, or (Z, Y, X) for one
    channel; 2D images are Z = 1. ``masks``: (Z, Y, X) or (Y, X) labels, 0 = background.
    """

    image: np.ndarray
    masks: np.ndarray
    anisotropy: float = 1.0
    source: str = ""


def median_diameter(masks: np.ndarray) -> float:
    """Cellpose's object diameter: median of sqrt(area) over objects, as a disk's diameter."""
    counts = np.bincount(np.asarray(masks).ravel().astype(np.int64))[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0
    return float(np.median(np.sqrt(counts)) / (math.sqrt(math.pi) / 2))


def make_sample(image: np.ndarray, masks: np.ndarray, source: str = "",
                normalize: bool = True) -> Sample:
    """A training plane from a (C, Y, X) or (Y, X) image and its (Y, X) labels.

    ``normalize``: map each channel's 1st..99th percentile to 0..1 (skip when the plane comes
    from a volume normalized as a whole)."""
    from .normalize import normalize99

    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[np.newaxis]
    masks = np.asarray(masks)
    if image.ndim != 3 or masks.ndim != 2:
        raise TrainingError(f"expected a 2D image and 2D masks, got shapes {image.shape} and "
                            f"{masks.shape}", source or None)
    if masks.shape != image.shape[1:]:
        raise TrainingError(f"image shape {image.shape[1:]} and mask shape {masks.shape} differ",
                            source or None)
    if masks.max() <= 0:
        raise TrainingError("mask image is empty (no objects)", source or None)
    if normalize:
        image = np.stack([normalize99(c) for c in image])
    masks = masks.astype(np.int32)
    flows = masks_to_flows(masks)
    diameter = max(median_diameter(masks), MIN_DIAMETER)
    return Sample(np.ascontiguousarray(image), masks, flows, diameter, source)


def _plane_indices(n: int, k: Optional[int], rng: np.random.Generator) -> np.ndarray:
    """``k`` evenly spaced planes out of ``n`` with a random phase (all when k is None)."""
    if k is None or k >= n:
        return np.arange(n)
    step = n / k
    return np.unique((rng.random() * step + step * np.arange(k)).astype(int).clip(0, n - 1))


def volume_slices(image: np.ndarray, masks: np.ndarray, anisotropy: float = 1.0,
                  n_per_axis: Optional[int] = 8, seed: int = 0, source: str = "",
                  min_objects: int = 1, nchan: Optional[int] = None, chan: int = 0,
                  chan2: int = 0, all_channels: bool = False) -> list[Sample]:
    """Training planes from a volume: YX, ZY and ZX planes, Z resampled by ``anisotropy``.

    ``image`` (Z, C, Y, X) or (Z, Y, X); ``masks`` (Z, Y, X). Channels are picked as at
    inference (``chan``/``chan2``, Cellpose's convention) into ``nchan`` network inputs (default:
    the image's channel count; ``all_channels``: every channel as is), and the volume is
    normalized as a whole. ``n_per_axis`` planes
    per axis, evenly spaced (None: all). Planes with fewer than ``min_objects`` objects are
    skipped. A volume with one plane (Z = 1) is a 2D image.
    """
    from .normalize import normalize_volume
    from .pipeline import select_channels

    image = np.asarray(image)
    masks = np.asarray(masks)
    if masks.ndim == 2:
        masks = masks[np.newaxis]
    if image.ndim == masks.ndim:  # (Z, Y, X): one channel
        image = image[:, np.newaxis]
    if image.ndim != 4 or masks.ndim != 3:
        raise TrainingError(f"expected a (Z, C, Y, X) image and (Z, Y, X) masks, got shapes "
                            f"{image.shape} and {masks.shape}", source or None)
    if image.shape[:1] + image.shape[2:] != masks.shape:
        raise TrainingError(f"image shape {image.shape[:1] + image.shape[2:]} (Z, Y, X) and "
                            f"mask shape {masks.shape} differ", source or None)
    if masks.max() <= 0:
        raise TrainingError("mask image is empty (no objects)", source or None)
    if not anisotropy > 0:
        raise TrainingError(f"anisotropy must be positive, got {anisotropy}", source or None)
    nchan = nchan or image.shape[1]
    try:
        x = select_channels(image, nchan, chan, chan2, all_channels, path=source or None)
    except Exception as err:  # InputError about channels: a training problem here
        raise TrainingError(getattr(err, "problem", str(err)), source or None) from None
    x = normalize_volume(x)  # (nchan, Z, Y, X)
    masks = masks.astype(np.int32)
    rng = np.random.default_rng(seed)
    axes = (0,) if masks.shape[0] == 1 else (0, 1, 2)
    if len(axes) == 3 and anisotropy != 1.0:
        nz = max(1, int(round(masks.shape[0] * anisotropy)))
        zoom = (nz / masks.shape[0], 1.0, 1.0)
        x = np.stack([ndimage.zoom(c, zoom, order=1) for c in x])
        masks = ndimage.zoom(masks, zoom, order=0)
    samples = []
    for axis in axes:
        for i in _plane_indices(masks.shape[axis], n_per_axis, rng):
            m = np.take(masks, i, axis=axis)
            if m.max() <= 0 or len(np.unique(m)) - 1 < min_objects:
                continue
            img = np.take(x, i, axis=axis + 1)
            name = f"{source}:{'ZYX'[axis]}={i}" if len(axes) == 3 else source
            samples.append(make_sample(img, m, name, normalize=False))
    return samples


def pair_samples(pairs: Sequence[TrainingPair], nchan: int, n_per_axis: Optional[int] = 16,
                 min_train_masks: int = 5, chan: int = 0, chan2: int = 0, seed: int = 0,
                 what: str = "training", cancel: Optional[CancelToken] = None) -> list[Sample]:
    """Training planes of every pair, dropping planes with fewer than ``min_train_masks``
    objects (Cellpose drops such images); :class:`TrainingError` when none is left."""
    samples: list[Sample] = []
    for k, p in enumerate(pairs):
        check_cancel(cancel)
        got = volume_slices(p.image, p.masks, p.anisotropy, n_per_axis, seed=seed + k,
                            source=p.source, min_objects=1, nchan=nchan, chan=chan, chan2=chan2)
        kept = [s for s in got if s.n_masks >= min_train_masks]
        if len(kept) < len(got):
            log.warning("%s: %d of %d planes have fewer than %d masks and are not used",
                        p.source or "image", len(got) - len(kept), len(got), min_train_masks)
        samples += kept
    if pairs and not samples:
        raise TrainingError(f"no {what} image has at least {min_train_masks} masks "
                            "(lower min_train_masks to use sparser images)")
    return samples


def check_training_data(samples: Sequence[Sample]) -> None:
    if len(samples) == 0:
        raise TrainingError("no training images with masks were found")
    nchan = {s.image.shape[0] for s in samples}
    if len(nchan) > 1:
        raise TrainingError(f"training images have different channel counts: {sorted(nchan)}")


def split_validation(pairs: Sequence[TrainingPair], fraction: float, seed: int = 0
                     ) -> tuple[list[TrainingPair], list[TrainingPair]]:
    """Hold out whole images (never planes of a training volume) for validation."""
    pairs = list(pairs)
    if fraction <= 0:
        return pairs, []
    if len(pairs) < 2:
        raise TrainingError("a validation split needs at least 2 images, got "
                            f"{len(pairs)} (give a separate test folder or no split)")
    n_val = min(len(pairs) - 1, max(1, int(round(fraction * len(pairs)))))
    order = np.random.default_rng(seed).permutation(len(pairs))
    val = set(order[:n_val].tolist())
    return ([p for i, p in enumerate(pairs) if i not in val],
            [p for i, p in enumerate(pairs) if i in val])


__all__ = [
    "MIN_DIAMETER", "Sample", "TrainingPair", "median_diameter", "make_sample", "volume_slices",
    "pair_samples", "check_training_data", "split_validation",
]
