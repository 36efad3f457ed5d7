"""Masks from flows: Cellpose's gradient dynamics, in 2D and 3D.

Every voxel whose cell probability is above ``cellprob_threshold`` follows the flow field
(``dP / 5``, trilinear interpolation, clamped to the volume) for ``niter`` Euler steps. Voxels of
one cell end up at the same sink; the histogram of end points has a peak per cell. Peaks
(local maxima over 5 voxels with more than 10 arrivals) seed masks, grown over neighbouring
bins with more than 2 arrivals; each voxel takes the mask of the bin it ended in. Masks larger
than ``max_size_fraction`` of the volume are dropped, holes are filled plane by plane, masks
under ``min_size`` voxels removed, labels renumbered 1..N.

Speed: the integration runs in parallel over foreground voxels only, and a voxel stops as soon as
it has stopped moving (less than ``STILL`` voxels over ``STILL_STEPS`` steps: it sits in a sink
and further steps would only jitter around it). Seeds are searched only among occupied bins.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numba
import numpy as np
from scipy import ndimage

from .cancel import CancelToken, ProgressFn, check_cancel, report

STILL = 0.1  # voxels moved over STILL_STEPS steps below which a voxel is at its sink
STILL_STEPS = 10
SEED_MIN = 10  # a histogram peak needs more arrivals than this to seed a mask
GROW_MIN = 2  # bins with more arrivals than this join a neighbouring seed's mask
GROW_STEPS = 5


@numba.njit(inline="always")
def _clamp(v, hi):
    return min(max(v, 0.0), hi)


@numba.njit(inline="always")
def _trilinear(flow, c, z0, z1, y0, y1, x0, x1, w000, w001, w010, w011, w100, w101, w110, w111):
    return (w000 * flow[c, z0, y0, x0] + w001 * flow[c, z0, y0, x1]
            + w010 * flow[c, z0, y1, x0] + w011 * flow[c, z0, y1, x1]
            + w100 * flow[c, z1, y0, x0] + w101 * flow[c, z1, y0, x1]
            + w110 * flow[c, z1, y1, x0] + w111 * flow[c, z1, y1, x1])


@numba.njit(parallel=True, cache=True, fastmath=True)
def _follow_3d(flow, scale, starts, niter, still, still_steps, ends):
    """Euler integration along ``scale`` x ``flow`` (3, Z, Y, X) of the voxels whose flat
    indices are ``starts``; writes the flat index of each end voxel (rounded) to ``ends``."""
    _, lz, ly, lx = flow.shape
    hz, hy, hx = lz - 1.0, ly - 1.0, lx - 1.0
    for i in numba.prange(starts.shape[0]):
        idx = starts[i]
        z = np.float32(idx // (ly * lx))
        y = np.float32((idx // lx) % ly)
        x = np.float32(idx % lx)
        az, ay, ax = z, y, x
        for t in range(niter):
            z0 = min(int(z), lz - 2) if lz > 1 else 0
            y0 = min(int(y), ly - 2) if ly > 1 else 0
            x0 = min(int(x), lx - 2) if lx > 1 else 0
            fz, fy, fx = z - z0, y - y0, x - x0
            z1 = z0 + 1 if lz > 1 else 0
            y1 = y0 + 1 if ly > 1 else 0
            x1 = x0 + 1 if lx > 1 else 0
            w000 = (1 - fz) * (1 - fy) * (1 - fx)
            w001 = (1 - fz) * (1 - fy) * fx
            w010 = (1 - fz) * fy * (1 - fx)
            w011 = (1 - fz) * fy * fx
            w100 = fz * (1 - fy) * (1 - fx)
            w101 = fz * (1 - fy) * fx
            w110 = fz * fy * (1 - fx)
            w111 = fz * fy * fx
            sz = _trilinear(flow, 0, z0, z1, y0, y1, x0, x1,
                            w000, w001, w010, w011, w100, w101, w110, w111)
            sy = _trilinear(flow, 1, z0, z1, y0, y1, x0, x1,
                            w000, w001, w010, w011, w100, w101, w110, w111)
            sx = _trilinear(flow, 2, z0, z1, y0, y1, x0, x1,
                            w000, w001, w010, w011, w100, w101, w110, w111)
            z = _clamp(z + scale * sz, hz)
            y = _clamp(y + scale * sy, hy)
            x = _clamp(x + scale * sx, hx)
            if (t + 1) % still_steps == 0:
                if abs(z - az) + abs(y - ay) + abs(x - ax) < still:
                    break
                az, ay, ax = z, y, x
        ends[i] = (int(z + 0.5) * ly + int(y + 0.5)) * lx + int(x + 0.5)


@numba.njit(cache=True)
def _histogram(ends, size):
    h = np.zeros(size, np.int32)
    for i in range(ends.shape[0]):
        h[ends[i]] += 1
    return h


@numba.njit(parallel=True, cache=True)
def _assign(starts, ends, M, labels):
    for i in numba.prange(starts.shape[0]):
        labels[starts[i]] = M[ends[i]]


@numba.njit(cache=True)
def _seeds(h_flat, occupied, shape, radius, seed_min):
    """Occupied bins that are the maximum of their (2r+1)^3 neighbourhood, with > seed_min."""
    lz, ly, lx = shape
    out = np.empty(occupied.shape[0], np.int64)
    n = 0
    for k in range(occupied.shape[0]):
        idx = occupied[k]
        v = h_flat[idx]
        if v <= seed_min:
            continue
        z = idx // (ly * lx)
        y = (idx // lx) % ly
        x = idx % lx
        is_max = True
        for dz in range(-radius, radius + 1):
            zz = z + dz
            if zz < 0 or zz >= lz:
                continue
            for dy in range(-radius, radius + 1):
                yy = y + dy
                if yy < 0 or yy >= ly:
                    continue
                for dx in range(-radius, radius + 1):
                    xx = x + dx
                    if xx < 0 or xx >= lx:
                        continue
                    if h_flat[(zz * ly + yy) * lx + xx] > v:
                        is_max = False
                        break
                if not is_max:
                    break
            if not is_max:
                break
        if is_max:
            out[n] = idx
            n += 1
    return out[:n]


@numba.njit(cache=True)
def _grow(h_flat, seeds, shape, grow_min, steps, M):
    """Label each seed's region: bins with > grow_min arrivals reachable in ``steps`` moves
    (26-connected) from the seed. Seeds come strongest first; labelled bins are kept."""
    lz, ly, lx = shape
    frontier = np.empty(4096, np.int64)
    nxt = np.empty(4096, np.int64)
    for s in range(seeds.shape[0]):
        label = s + 1
        if M[seeds[s]] != 0:
            continue
        M[seeds[s]] = label
        frontier[0] = seeds[s]
        nf = 1
        for _ in range(steps):
            nn = 0
            for f in range(nf):
                idx = frontier[f]
                z = idx // (ly * lx)
                y = (idx // lx) % ly
                x = idx % lx
                for dz in range(-1, 2):
                    zz = z + dz
                    if zz < 0 or zz >= lz:
                        continue
                    for dy in range(-1, 2):
                        yy = y + dy
                        if yy < 0 or yy >= ly:
                            continue
                        for dx in range(-1, 2):
                            xx = x + dx
                            if xx < 0 or xx >= lx:
                                continue
                            j = (zz * ly + yy) * lx + xx
                            if M[j] == 0 and h_flat[j] > grow_min:
                                M[j] = label
                                if nn == nxt.shape[0]:
                                    bigger = np.empty(nn * 2, np.int64)
                                    bigger[:nn] = nxt[:nn]
                                    nxt = bigger
                                nxt[nn] = j
                                nn += 1
            if nn == 0:
                break
            if frontier.shape[0] < nn:
                frontier = np.empty(nxt.shape[0], np.int64)
            frontier[:nn] = nxt[:nn]
            nf = nn


def follow_flows(dP: np.ndarray, starts: np.ndarray, niter: int = 200,
                 scale: float = 0.2) -> np.ndarray:
    """Flat indices of the voxels where the voxels ``starts`` (flat indices) end after
    ``niter`` Euler steps along ``scale`` x ``dP`` (3, Z, Y, X); Cellpose's scale is 1/5."""
    flow = np.ascontiguousarray(dP, dtype=np.float32)
    ends = np.empty(starts.shape[0], np.int64)
    _follow_3d(flow, np.float32(scale), starts.astype(np.int64, copy=False), int(niter),
               np.float32(STILL), STILL_STEPS, ends)
    return ends


def _smooth(dP: np.ndarray, sigma) -> np.ndarray:
    sigma = np.broadcast_to(np.asarray(sigma, dtype=float), (3,))
    if not np.any(sigma > 0):
        return dP
    out = np.empty_like(dP, dtype=np.float32)
    for c in range(dP.shape[0]):
        ndimage.gaussian_filter(dP[c], sigma, output=out[c])
    return out


def masks_from_flows(
    dP: np.ndarray,
    cellprob: np.ndarray,
    niter: int = 200,
    cellprob_threshold: float = 0.0,
    min_size: int = 15,
    flow3D_smooth: Union[float, Sequence[float]] = 0,
    max_size_fraction: float = 0.4,
    do_fill_holes: bool = True,
    flow_threshold: Optional[float] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> np.ndarray:
    """Instance masks (uint16, uint32 beyond 65535 masks) from flows and cell probability.

    ``dP`` is (3, Z, Y, X) as (dZ, dY, dX) at network scale (unit flows x 5), or (2, Y, X) with
    a 2D ``cellprob``. ``flow3D_smooth``: Gaussian std on the flows before the dynamics, one
    number or (Z, Y, X). ``flow_threshold`` applies to 2D input only (Cellpose's flow-error
    check); it does not apply in 3D.
    """
    dP = np.asarray(dP)
    cellprob = np.asarray(cellprob)
    is2d = cellprob.ndim == 2
    if is2d:
        dP = np.concatenate([np.zeros_like(dP[:1]), dP])[:, np.newaxis]
        cellprob = cellprob[np.newaxis]
    if dP.shape != (3, *cellprob.shape):
        raise ValueError(f"dP shape {dP.shape} does not match cellprob shape {cellprob.shape}")
    shape = cellprob.shape

    report(progress, "dynamics", 0.0)
    if not is2d:
        dP = _smooth(dP, flow3D_smooth)
    starts = np.flatnonzero(cellprob > cellprob_threshold)
    if starts.size == 0:
        return np.zeros(shape[1:] if is2d else shape, np.uint16)
    check_cancel(cancel)
    ends = follow_flows(dP, starts, niter)
    report(progress, "dynamics", 0.6)
    check_cancel(cancel)

    size = int(np.prod(shape))
    h = _histogram(ends, size)
    seeds = _seeds(h, np.flatnonzero(h), shape, 2, SEED_MIN)
    seeds = seeds[np.argsort(-h[seeds], kind="stable")]
    M = np.zeros(size, np.int32)
    _grow(h, seeds, shape, GROW_MIN, GROW_STEPS, M)
    del h
    labels = np.zeros(size, np.int32)
    _assign(starts, ends, M, labels)
    del M, ends, starts
    labels = labels.reshape(shape)
    report(progress, "dynamics", 0.8)

    if max_size_fraction is not None and max_size_fraction < 1:
        counts = np.bincount(labels.ravel())
        too_big = np.flatnonzero(counts > max_size_fraction * size)
        too_big = too_big[too_big > 0]
        if too_big.size:
            labels[np.isin(labels, too_big)] = 0
    if is2d:
        labels = labels[0]
        if flow_threshold is not None and flow_threshold > 0 and labels.max() > 0:
            labels = remove_bad_flow_masks(labels, dP[1:, 0], flow_threshold)
    labels = fill_holes_and_remove_small_masks(labels, min_size, do_fill_holes)
    report(progress, "dynamics", 1.0)
    return labels


def remove_bad_flow_masks(masks: np.ndarray, dP2: np.ndarray, flow_threshold: float) -> np.ndarray:
    """2D only: drop masks whose flows, recomputed from the mask, differ from the predicted
    ones by a mean squared error above ``flow_threshold`` (Cellpose's quality check)."""
    from .flows import masks_to_flows

    ideal = masks_to_flows(masks)
    err_map = ((ideal - dP2 / 5.0) ** 2).sum(axis=0)
    n = int(masks.max())
    counts = np.bincount(masks.ravel(), minlength=n + 1).astype(np.float64)
    errors = np.bincount(masks.ravel(), weights=err_map.ravel(), minlength=n + 1)
    mean_err = errors / np.maximum(counts, 1)
    bad = np.flatnonzero(mean_err > flow_threshold)
    bad = bad[bad > 0]
    if bad.size:
        masks = masks.copy()
        masks[np.isin(masks, bad)] = 0
    return masks


def fill_holes_and_remove_small_masks(masks: np.ndarray, min_size: int = 15,
                                      fill: bool = True) -> np.ndarray:
    """Remove masks under ``min_size`` pixels, fill holes (per XY plane in 3D, as Cellpose does)
    and renumber 1..N; uint16, or uint32 when N > 65535."""
    masks = np.asarray(masks)
    plane_only = None
    if masks.ndim == 3:
        plane_only = np.zeros((3, 3, 3), bool)
        plane_only[1] = ndimage.generate_binary_structure(2, 1)
    out = np.zeros(masks.shape, np.int64 if masks.max() > 2**31 else np.int32)
    n = 0
    for label, sl in enumerate(ndimage.find_objects(masks), start=1):
        if sl is None:
            continue
        region = masks[sl] == label
        npix = int(region.sum())
        if npix == 0 or (min_size > 0 and npix < min_size):
            continue
        if fill:
            region = ndimage.binary_fill_holes(region, structure=plane_only)
        n += 1
        out[sl][region] = n
    return out.astype(np.uint32 if n > 65535 else np.uint16)
