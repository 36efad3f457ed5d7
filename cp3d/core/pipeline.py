"""``segment``: the whole pipeline on one volume, from raw voxels to instance masks.

Parameter names and meanings follow Cellpose's ``eval`` so that Cellpose users feel at home.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from .cancel import CancelToken, ProgressFn, check_cancel, report
from .errors import InputError, TooLargeError
from .io import Volume, many_channels_hint, volume_from_array

log = logging.getLogger("cp3d")

Smooth = Union[float, Sequence[float]]

# Above this rescale (objects under 7.5 px for diam_mean 30) a run is slow and off the bundled
# models' training range: say so (measured on 3.5-8 px nuclei: see the model card).
TINY_RESCALE = 4.0


@dataclass
class Result:
    """What a segmentation produced. ``dP`` is (3, Z, Y, X) in Cellpose's (dZ, dY, dX) order
    and scale; ``cellprob`` holds the combined logits (summed over views in 3D)."""

    masks: np.ndarray
    dP: np.ndarray
    cellprob: np.ndarray
    diameter: float
    anisotropy: float
    params: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    @property
    def n_masks(self) -> int:
        return int(self.masks.max()) if self.masks.size else 0


def select_channels(data: np.ndarray, nchan: int, chan: int = 0, chan2: int = 0,
                    all_channels: bool = False, path=None) -> np.ndarray:
    """Pick the network's input channels from (Z, C, Y, X) data, Cellpose's way.

    ``chan`` 0 = grayscale (mean of all channels), k = channel k (1-based); ``chan2`` 0 = none,
    k = channel k as the optional nuclear channel. Returns (nchan, Z, Y, X) float32.
    """
    z, c, y, x = data.shape
    if all_channels:
        if c != nchan:
            raise InputError(
                f"all_channels needs {nchan} channels for this model but the image has {c}", path)
        return np.ascontiguousarray(np.moveaxis(data, 1, 0), dtype=np.float32)
    for name, value in (("chan", chan), ("chan2", chan2)):
        if not 0 <= value <= c:
            raise InputError(f"{name}={value} but the image has {c} channel(s) (use 0..{c})", path)
    out = np.zeros((nchan, z, y, x), np.float32)
    out[0] = data.mean(axis=1) if chan == 0 else data[:, chan - 1]
    if chan2 > 0 and nchan > 1:
        out[1] = data[:, chan2 - 1]
    return out


def _as_volume(volume) -> Volume:
    if isinstance(volume, Volume):
        return volume
    return volume_from_array(np.asarray(volume))


def _load(model, use_gpu: bool):
    from .models import load_model, pick_device

    if hasattr(model, "net"):  # a loaded Model (or anything shaped like one)
        return model
    return load_model(model, device=pick_device(use_gpu))


def segment(
    volume: Union[Volume, np.ndarray],
    model=None,
    *,
    diameter: Optional[float] = None,
    anisotropy: Optional[float] = None,
    do_3D: bool = True,
    stitch_threshold: float = 0.0,
    flow3D_smooth: Smooth = 0,
    min_size: int = 15,
    cellprob_threshold: float = 0.0,
    flow_threshold: float = 0.4,
    niter: Optional[int] = None,
    chan: int = 0,
    chan2: int = 0,
    all_channels: bool = False,
    invert: bool = False,
    sharpen_radius: float = 0.0,
    tile_norm: int = 0,
    augment: bool = False,
    batch_size: int = 8,
    use_gpu: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> Result:
    """Segment a volume into 3D instance masks.

    ``volume`` is a :class:`Volume` or an array (Z, Y, X) / (Z, C, Y, X). ``model`` is a loaded
    ``Model``, a bundled/user model name, a ``.pth`` path, or None for the default model.
    ``do_3D`` runs the 2.5D pipeline; ``do_3D=False`` segments each XY plane in 2D and, with
    ``stitch_threshold > 0``, links planes by IoU. ``diameter`` None or 0 is estimated from
    the image (:func:`cp3d.core.size.estimate_diameter`); ``anisotropy`` None uses the voxel
    size from the file's metadata (else 1). ``augment`` averages the network's predictions on
    flipped copies of each plane (four times the network time).
    Raises :class:`InputError` for unusable input and :class:`Cancelled` when cancelled.
    """
    from . import dynamics
    from .inference import network_shape, predict_2d_stack, predict_3d
    from .normalize import normalize_volume

    vol = _as_volume(volume)
    path = vol.path
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    if do_3D and vol.is_2d:
        raise InputError("2D image (a single plane) given to 3D segmentation; segment it in 2D "
                         "(do_3D=False; in cp3d-cli, leave out --do_3D)" + many_channels_hint(vol),
                         path)
    if diameter is not None and diameter < 0:
        raise InputError(f"diameter must be positive, got {diameter}", path)
    if anisotropy is None:
        anisotropy = vol.anisotropy or 1.0
    if not anisotropy > 0:
        raise InputError(f"anisotropy must be positive, got {anisotropy}", path)
    _check_memory(vol, anisotropy, path)

    check_cancel(cancel)
    model = _load(model, use_gpu)
    estimated = not diameter
    if estimated:  # None or 0: measured from a first pass of 2D masks (core.size)
        from .size import estimate_diameter

        diameter = estimate_diameter(vol, model, chan=chan, chan2=chan2,
                                     all_channels=all_channels, invert=invert,
                                     sharpen_radius=sharpen_radius, tile_norm=tile_norm,
                                     progress=progress, cancel=cancel)
        times["size"] = time.perf_counter() - t0
    rescale = float(model.diam_mean) / float(diameter)
    if niter is None or niter == 0:
        niter = int(round(200 * max(1.0, 1.0 / rescale)))
    if do_3D and rescale > 1.0:  # the first check could not know the objects' size
        _check_memory(vol, anisotropy, path, rescale)
    if do_3D:  # the cost grows with the cube of diam_mean / diameter: tiny objects take long
        log.info("%s: diameter %.1f px, rescale %.2f: the network runs on %d x %d x %d voxels",
                 vol.name, diameter, rescale, *network_shape(vol.shape_zyx, rescale, anisotropy))
    if rescale > TINY_RESCALE:
        log.warning(
            "%s: objects of %.1f px are run %.1fx enlarged, which is slow, and models trained on "
            "larger objects (the bundled ones: 8-40 px) tend to make their masks too large; "
            "check the masks, and fine-tune on your own crops if they are off",
            vol.name, diameter, rescale)

    t_norm = time.perf_counter()
    report(progress, "normalize", 0.0)
    x = select_channels(vol.data, model.nchan, chan, chan2, all_channels, path)
    x = normalize_volume(x, invert=invert, sharpen_radius=sharpen_radius, tile_norm=tile_norm)
    report(progress, "normalize", 1.0)
    times["normalize"] = time.perf_counter() - t_norm

    t1 = time.perf_counter()
    net, device = model.net, model.device
    if do_3D:
        dP, cellprob = predict_3d(net, x, device, rescale=rescale, anisotropy=anisotropy,
                                  batch_size=batch_size, progress=progress, cancel=cancel,
                                  augment=augment)
    else:
        dP2, cellprob = predict_2d_stack(net, x, device, rescale=rescale,
                                         batch_size=batch_size, progress=progress, cancel=cancel,
                                         augment=augment)
        dP = np.concatenate([np.zeros_like(dP2[:1]), dP2], axis=0)
    del x
    times["network"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    check_cancel(cancel)
    if do_3D:
        masks = dynamics.masks_from_flows(
            dP, cellprob, niter=niter, cellprob_threshold=cellprob_threshold,
            min_size=min_size, flow3D_smooth=flow3D_smooth, progress=progress, cancel=cancel)
    else:
        masks = _masks_per_plane(dP[1:], cellprob, niter, cellprob_threshold, flow_threshold,
                                 min_size, stitch_threshold, progress, cancel)
    times["dynamics"] = time.perf_counter() - t2
    times["total"] = time.perf_counter() - t0
    report(progress, "dynamics", 1.0)

    params = dict(
        model=str(model.path or model.name), diameter=float(diameter),
        diameter_estimated=estimated, anisotropy=float(anisotropy),
        do_3D=do_3D, stitch_threshold=stitch_threshold, flow3D_smooth=flow3D_smooth,
        min_size=min_size, cellprob_threshold=cellprob_threshold, niter=niter, chan=chan,
        chan2=chan2, all_channels=all_channels, invert=invert, sharpen_radius=sharpen_radius,
        tile_norm=tile_norm, augment=augment,
    )
    log.info("%s: %d masks in %.1f s (%s)", vol.name, int(masks.max()), times["total"],
             ", ".join(f"{k} {v:.1f} s" for k, v in times.items() if k != "total"))
    return Result(masks=masks, dP=dP, cellprob=cellprob, diameter=float(diameter),
                  anisotropy=float(anisotropy), params=params, seconds=times)


def _masks_per_plane(dP2, cellprob, niter, cellprob_threshold, flow_threshold, min_size,
                     stitch_threshold, progress, cancel) -> np.ndarray:
    """2D masks for each XY plane; stitched across planes by IoU when asked (Cellpose's rule:
    ``min_size`` applies per plane)."""
    from . import dynamics
    from .stitch import stitch3D

    lz = cellprob.shape[0]
    planes = []
    for z in range(lz):
        check_cancel(cancel)
        planes.append(dynamics.masks_from_flows(
            dP2[:, z], cellprob[z], niter=niter, cellprob_threshold=cellprob_threshold,
            min_size=min_size, flow_threshold=flow_threshold))
        report(progress, "dynamics", (z + 1) / lz)
    if lz > 1 and stitch_threshold > 0:
        return stitch3D(np.stack(planes), stitch_threshold)
    dtype = np.uint32 if max(int(p.max()) for p in planes) > 65535 else np.uint16
    return np.stack(planes).astype(dtype)


def _check_memory(vol: Volume, anisotropy: float, path, rescale: float = 1.0) -> None:
    """Refuse, before starting, a volume whose working arrays would not fit in memory.

    ``rescale`` > 1 (objects smaller than ``diam_mean``) enlarges the 3D network grid in all
    three axes: the check is run again once the diameter is known."""
    try:
        import psutil

        available = psutil.virtual_memory().available
    except Exception:
        return
    z, y, x = vol.shape_zyx
    voxels = z * y * x
    # network grid (upsampled in Z, and by the rescale): input channels + 4 outputs, float32
    upsampled = voxels * max(1.0, anisotropy) * max(1.0, rescale) ** 3
    need = upsampled * (2 + 4) * 4 + voxels * (4 * 4 + 40)
    if need > available:
        enlarged = f" at {rescale:.1f}x for its objects' size" if rescale > 1.0 else ""
        raise TooLargeError(
            f"volume of {z}x{y}x{x} voxels needs about {need / 1e9:.1f} GB of memory to "
            f"segment{enlarged} but {available / 1e9:.1f} GB are free; crop or downsample it, "
            "or segment it blockwise", path)


def segment_file(path: Union[str, Path], model=None, z_axis=None, channel_axis=None,
                 **params) -> tuple[Volume, Result]:
    """Read then segment one file (a convenience for scripts)."""
    from .io import read_volume

    vol = read_volume(path, z_axis=z_axis, channel_axis=channel_axis)
    return vol, segment(vol, model, **params)
