"""Flows from masks: the heat-diffusion field Cellpose trains its network to predict.

For every object a heat source sits at its "centre" (the object pixel nearest the mean of its
coordinates). Heat diffuses inside the object only: at each step every object pixel takes the
mean of its neighbourhood (3x3 in 2D, itself and its 6 face neighbours in 3D), pixels of other
objects and background counting as zero, after the source is incremented. The flow is the
central-difference gradient of the result (other objects read as zero), normalised to unit
length. Steps: 2 x the largest
object extent in 2D, 6 x in 3D (Cellpose 3's rule).

All objects diffuse at once in one numba loop over foreground pixels, so a volume with a
thousand objects costs one pass, not a thousand.
"""

from __future__ import annotations

import numba
import numpy as np
from scipy import ndimage


# fusion off: fused, the two loops below would read neighbours already overwritten in the same
# step (a race that made flows differ from run to run by up to 1e-3)
@numba.njit(parallel={"fusion": False}, cache=True)
def _diffuse(T, pix, nbr, centres, niter):
    """Jacobi steps of masked neighbourhood averaging with sources at ``centres``.

    T: flat padded heat array (float64); pix: flat index of each foreground pixel; nbr: (n, k)
    flat indices of each pixel's neighbourhood, 0 (an always-zero pad cell) where the neighbour
    belongs to another object or to background.
    """
    n, k = nbr.shape
    buf = np.empty(n, np.float64)
    for _ in range(niter):
        for c in range(centres.shape[0]):
            T[centres[c]] += 1.0
        for i in numba.prange(n):
            s = 0.0
            for j in range(k):
                s += T[nbr[i, j]]
            buf[i] = s / k
        for i in numba.prange(n):
            T[pix[i]] = buf[i]


def _centres(masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per object: the pixel nearest the mean of its coordinates, and its bounding-box extent."""
    slices = ndimage.find_objects(masks)
    centres, extents = [], []
    for label, sl in enumerate(slices, start=1):
        if sl is None:
            continue
        coords = np.nonzero(masks[sl] == label)
        pts = np.stack(coords, axis=1).astype(np.float64)
        best = np.argmin(((pts - pts.mean(axis=0)) ** 2).sum(axis=1))
        centres.append([c[best] + s.start for c, s in zip(coords, sl)])
        extents.append([s.stop - s.start for s in sl])
    return (np.array(centres, np.int64).reshape(-1, masks.ndim),
            np.array(extents).reshape(-1, masks.ndim))


def masks_to_flows(masks: np.ndarray, niter: int | None = None) -> np.ndarray:
    """Unit flows (ndim, *shape) float32 pointing to each object's centre; zero on background.

    ``masks`` is a 2D (Y, X) or 3D (Z, Y, X) label image (0 = background).
    """
    masks = np.asarray(masks)
    if masks.ndim not in (2, 3):
        raise ValueError(f"masks must be 2D or 3D, got shape {masks.shape}")
    masks = masks.astype(np.int64) if masks.dtype.kind not in "iu" else masks
    flows = np.zeros((masks.ndim, *masks.shape), np.float32)
    if masks.max() == 0:
        return flows
    centres, extents = _centres(masks)
    if niter is None:
        if masks.ndim == 2:
            niter = int(2 * (extents.sum(axis=1) + 2).max())
        else:
            niter = int(6 * (extents + 1).sum(axis=1).max())

    padded = np.pad(masks, 1)
    shape = padded.shape
    strides = np.array([int(np.prod(shape[d + 1:])) for d in range(masks.ndim)])
    coords = np.nonzero(padded)
    pix = np.ravel_multi_index(coords, shape).astype(np.int64)
    labels = padded.ravel()[pix]
    if masks.ndim == 2:
        offsets = [dy * strides[0] + dx * strides[1] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    else:
        offsets = [0] + [sign * strides[d] for d in range(3) for sign in (1, -1)]
    offsets = np.array(offsets, np.int64)
    nbr = pix[:, None] + offsets[None, :]
    same = padded.ravel()[nbr] == labels[:, None]
    nbr = np.where(same, nbr, 0)  # flat index 0 is a pad corner: always zero heat
    centre_flat = np.ravel_multi_index(tuple((centres + 1).T), shape).astype(np.int64)

    T = np.zeros(padded.size, np.float64)
    _diffuse(T, pix, nbr, centre_flat, niter)

    # gradient with other objects' heat read as zero (each object on its own, as in Cellpose's
    # per-object CPU version), so boundary flows never point into a neighbour
    flat = flows.reshape(masks.ndim, -1)
    inner = np.ravel_multi_index(tuple(c - 1 for c in coords), masks.shape)
    lab_flat = padded.ravel()
    for d in range(masks.ndim):
        up, down = pix + strides[d], pix - strides[d]
        t_up = np.where(lab_flat[up] == labels, T[up], 0.0)
        t_down = np.where(lab_flat[down] == labels, T[down], 0.0)
        flat[d, inner] = t_up - t_down
    norm = np.sqrt((flat[:, inner] ** 2).sum(axis=0)) + 1e-20
    flat[:, inner] /= norm
    return flows
