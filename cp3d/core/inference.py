"""Running the network on planes, and Cellpose's 2.5D combination of YX, ZX and ZY predictions.

Speed on CPU comes from three choices, each measured by ``bench/inference.py``:
- planes up to ``WHOLE_PLANE_MAX`` pixels run whole, padded only to a multiple of 16, instead of
  being cut into 224-pixel tiles (a 128x128 plane padded to 224x224 wastes two thirds of the work);
- several small planes share one batch, so each forward pass does a useful amount of work;
- larger planes are tiled with 10% overlap and blended with a smooth taper, as Cellpose does.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cancel import CancelToken, ProgressFn, check_cancel, report

TILE = 224  # Cellpose's training crop; tiles are this size
TILE_OVERLAP = 0.1
WHOLE_PLANE_MAX = 512 * 512  # pixels; larger planes are tiled to bound memory
PIXELS_PER_BATCH = 8 * TILE * TILE  # batch_size=8 tiles of 224 -> this many pixels per pass

# (plane axes in ZYX, which flow component each of the network's (flow0, flow1) feeds)
# YX planes give dY, dX; ZX planes give dZ, dX; ZY planes give dZ, dY (Cellpose's run_3D).
VIEWS = {
    "YX": {"slice_axis": 0, "flow_to": (1, 2)},
    "ZX": {"slice_axis": 1, "flow_to": (0, 2)},
    "ZY": {"slice_axis": 2, "flow_to": (0, 1)},
}


def run_net(net: torch.nn.Module, batch: np.ndarray, device: torch.device,
            augment: bool = False) -> np.ndarray:
    """One forward pass on (N, C, H, W) float32; returns (N, 3, H, W) float32.

    ``augment`` (Cellpose's test-time augmentation): also predict the batch flipped in H, in W
    and in both, flip each output back, negate the flow along each flipped axis, and average
    the four; four times the work, for smoother, less orientation-biased predictions."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(batch)).to(device)
        if not augment:
            return _forward(net, x).float().cpu().numpy()
        acc = None
        for dims in ((), (2,), (3,), (2, 3)):
            y = _forward(net, torch.flip(x, dims) if dims else x).float()
            if dims:
                y = torch.flip(y, dims)
                sign = torch.ones(y.shape[1], device=y.device)
                for d in dims:  # flow0 is along H (dim 2), flow1 along W (dim 3)
                    sign[d - 2] = -1.0
                y = y * sign[None, :, None, None]
            acc = y if acc is None else acc + y
        return (acc / 4).cpu().numpy()


def _forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = net(x)
    return y[0] if isinstance(y, (tuple, list)) else y


def _pad_to(n: int, multiple: int = 16) -> int:
    return int(math.ceil(n / multiple) * multiple)


def taper(size: int, edge: float = 7.5) -> np.ndarray:
    """1D weight that is ~1 in the middle of a tile and falls smoothly to ~0 at its borders."""
    x = np.abs(np.arange(size) - (size - 1) / 2)
    return (1.0 / (1.0 + np.exp((x - (size / 2 - 20)) / edge))).astype(np.float32)


def predict_planes(
    net: torch.nn.Module,
    planes: np.ndarray,
    device: torch.device,
    batch_size: int = 8,
    on_batch: Optional[Callable[[int, int, np.ndarray], None]] = None,
    cancel: Optional[CancelToken] = None,
    progress: Optional[Callable[[float], None]] = None,
    augment: bool = False,
) -> Optional[np.ndarray]:
    """Predict (flow0, flow1, cellprob) for every plane of ``planes`` (N, C, H, W).

    When ``on_batch(start, stop, out)`` is given, results are handed over batch by batch
    (so a caller can add them into a larger array without holding all planes' outputs);
    otherwise a (N, 3, H, W) array is returned.
    """
    n, c, h, w = planes.shape
    result = None if on_batch is not None else np.zeros((n, 3, h, w), np.float32)

    def deliver(start, stop, out):
        if on_batch is not None:
            on_batch(start, stop, out)
        else:
            result[start:stop] = out

    if h * w <= WHOLE_PLANE_MAX:
        ph, pw = _pad_to(h), _pad_to(w)
        per_batch = max(1, (batch_size * TILE * TILE) // (ph * pw))
        buf = np.zeros((per_batch, c, ph, pw), np.float32)
        for start in range(0, n, per_batch):
            check_cancel(cancel)
            stop = min(n, start + per_batch)
            buf[: stop - start, :, :h, :w] = planes[start:stop]
            out = run_net(net, buf[: stop - start], device, augment)
            deliver(start, stop, out[:, :, :h, :w])
            if progress is not None:
                progress(stop / n)
    else:
        for i in range(n):
            check_cancel(cancel)
            out = _predict_tiled(net, planes[i], device, batch_size, cancel, augment)
            deliver(i, i + 1, out[np.newaxis])
            if progress is not None:
                progress((i + 1) / n)
    return result


def _tile_starts(length: int, tile: int) -> list[int]:
    if length <= tile:
        return [0]
    count = int(math.ceil((1.0 + 2 * TILE_OVERLAP) * length / tile))
    return list(np.linspace(0, length - tile, count).astype(int))


def _predict_tiled(net, plane: np.ndarray, device, batch_size: int, cancel,
                   augment: bool = False) -> np.ndarray:
    """Predict one large (C, H, W) plane in overlapping 224-px tiles, blended by a taper."""
    c, h, w = plane.shape
    th, tw = min(TILE, _pad_to(h)), min(TILE, _pad_to(w))
    ys, xs = _tile_starts(h, th), _tile_starts(w, tw)
    weight_tile = np.outer(taper(th), taper(tw))
    acc = np.zeros((3, h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    corners = [(y, x) for y in ys for x in xs]
    for b in range(0, len(corners), batch_size):
        check_cancel(cancel)
        chunk = corners[b:b + batch_size]
        batch = np.zeros((len(chunk), c, th, tw), np.float32)
        for k, (y, x) in enumerate(chunk):
            tile = plane[:, y:y + th, x:x + tw]
            batch[k, :, :tile.shape[1], :tile.shape[2]] = tile
        out = run_net(net, batch, device, augment)
        for k, (y, x) in enumerate(chunk):
            hh, ww = min(th, h - y), min(tw, w - x)
            wt = weight_tile[:hh, :ww]
            acc[:, y:y + hh, x:x + ww] += out[k, :, :hh, :ww] * wt
            wsum[y:y + hh, x:x + ww] += wt
    acc /= np.maximum(wsum, 1e-6)
    return acc


def resize_volume(vol: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Linear resampling of (C, Z, Y, X) to (C, *shape), pixel centres aligned (as cv2 does)."""
    if tuple(vol.shape[1:]) == tuple(shape):
        return vol
    c = vol.shape[0]
    out = np.empty((c, *shape), np.float32)
    src_z = vol.shape[1]
    for k in range(c):  # one channel at a time bounds the temporary memory
        t = torch.from_numpy(np.ascontiguousarray(vol[k], dtype=np.float32))
        if src_z == 1 and shape[0] == 1:
            r = F.interpolate(t[None], size=shape[1:], mode="bilinear", align_corners=False)[0]
        else:
            r = F.interpolate(t[None, None], size=shape, mode="trilinear",
                              align_corners=False)[0, 0]
        out[k] = r.numpy()
    return out


def network_shape(shape_zyx: Sequence[int], rescale: float,
                  anisotropy: float = 1.0) -> tuple[int, int, int]:
    """(Z, Y, X) of the grid the network runs on in 3D: the volume resampled by ``rescale``,
    and by ``anisotropy`` more in Z. Its size sets the cost of a 3D run."""
    lz, ly, lx = shape_zyx
    return (max(1, int(lz * anisotropy * rescale)), max(1, int(ly * rescale)),
            max(1, int(lx * rescale)))


def predict_3d(
    net: torch.nn.Module,
    vol: np.ndarray,
    device: torch.device,
    rescale: float = 1.0,
    anisotropy: float = 1.0,
    batch_size: int = 8,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    augment: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Cellpose's 2.5D prediction on a normalized (C, Z, Y, X) volume.

    The volume is resampled by ``rescale`` in all axes and by ``anisotropy`` more in Z, the
    network runs on every YX, ZX and ZY plane, and the outputs are combined as Cellpose does:
    each flow component is the sum of the two views that see it, cell probability the sum of
    all three. Results are resampled back to the input grid; dZ is divided by the anisotropy so
    that flows are in voxel units of that grid. Returns ``dP`` (3, Z, Y, X) and ``cellprob``.
    """
    target = network_shape(vol.shape[1:], rescale, anisotropy)
    work = resize_volume(vol, target)
    yf = np.zeros((4, *target), np.float32)

    for vi, (name, view) in enumerate(VIEWS.items()):
        check_cancel(cancel)
        ax = view["slice_axis"]
        f0, f1 = view["flow_to"]
        # planes as (N, C, H, W): move the slice axis of (C, Z, Y, X) to the front
        planes = np.moveaxis(work, ax + 1, 0)
        stage = f"prediction {name}"
        report(progress, stage, 0.0)

        def add(start, stop, out, ax=ax, f0=f0, f1=f1):
            # out is (n, 3, H, W) for planes start:stop along ``ax``; add into yf in place
            idx = [slice(None)] * 3
            idx[ax] = slice(start, stop)
            for comp, dest in ((0, f0), (1, f1), (2, 3)):
                yf[dest][tuple(idx)] += np.moveaxis(out[:, comp], 0, ax)

        predict_planes(
            net, planes, device, batch_size, on_batch=add, cancel=cancel,
            progress=lambda f, stage=stage: report(progress, stage, f), augment=augment,
        )
        report(progress, stage, 1.0)

    del work
    yf = resize_volume(yf, vol.shape[1:])
    if anisotropy != 1.0:
        yf[0] /= anisotropy
    return yf[:3], yf[3]


def predict_2d_stack(
    net: torch.nn.Module,
    vol: np.ndarray,
    device: torch.device,
    rescale: float = 1.0,
    batch_size: int = 8,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    augment: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Predict every XY plane of (C, Z, Y, X) on its own; returns dP (2, Z, Y, X), cellprob."""
    _, lz, ly, lx = vol.shape
    target = (lz, max(1, int(ly * rescale)), max(1, int(lx * rescale)))
    work = resize_volume(vol, target)
    planes = np.moveaxis(work, 1, 0)  # (Z, C, Y', X')
    out = predict_planes(
        net, planes, device, batch_size, cancel=cancel,
        progress=lambda f: report(progress, "prediction YX", f), augment=augment,
    )
    out = np.moveaxis(out, 0, 1)  # (3, Z, Y', X')
    out = resize_volume(out, (lz, ly, lx))
    return out[:2], out[2]
