"""Reading microscopy tiffs into a (Z, C, Y, X) volume, and writing results atomically.

Axes are taken, in this order, from the caller (``z_axis`` / ``channel_axis``, indices into the
array as stored, Cellpose's convention), from ImageJ/OME metadata, or from the shape when only
one reading is plausible (planes x Y x X, planes x channels x Y x X). Anything else raises
:class:`AmbiguousAxesError` rather than guessing.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import tifffile

from .errors import InputError, OutputError

TIFF_SUFFIXES = (".tif", ".tiff")
# Above this many channels an axis is taken for space or time, not colour.
MAX_CHANNELS = 8
SUPPORTED_KINDS = "uif"  # unsigned, signed, float; bool/complex/object are refused


class AmbiguousAxesError(InputError):
    """The axes of an image cannot be told from its metadata or shape.

    ``shape`` is the stored array shape; ``suggested`` is a best guess of
    ``(z_axis, channel_axis)`` for a dialog to pre-fill (either may be None).
    """

    def __init__(self, problem: str, path, shape: Sequence[int], suggested=(None, None)):
        super().__init__(problem, path)
        self.shape = tuple(int(s) for s in shape)
        self.suggested = suggested


@dataclass
class Volume:
    """An image as the pipeline sees it: ``data`` is (Z, C, Y, X), Z = 1 for a 2D image."""

    data: np.ndarray
    path: Optional[Path] = None
    voxel_size: Optional[tuple[float, float, float]] = None  # (z, y, x) in micrometres
    axes: str = "ZCYX"  # axes of the file as stored, for messages and the GUI
    metadata: dict = field(default_factory=dict)

    @property
    def is_2d(self) -> bool:
        return self.data.shape[0] == 1

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        z, _, y, x = self.data.shape
        return z, y, x

    @property
    def nchan(self) -> int:
        return self.data.shape[1]

    @property
    def anisotropy(self) -> Optional[float]:
        """Z step over XY pixel size, from metadata; the default for ``anisotropy``."""
        if self.voxel_size is None:
            return None
        z, y, x = self.voxel_size
        xy = (y + x) / 2
        if z <= 0 or xy <= 0:
            return None
        return float(z / xy)

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<array>"


CLI_AXES_FIX = "give the channel axis as z_axis (--z_axis)"


def many_channels_hint(vol, fix: str = CLI_AXES_FIX) -> str:
    """For a single plane with more channels than a stain has: a hint that they may be Z planes
    (a stack saved as channels, as ImageJ does when asked) and ``fix``, what to do then; else
    ''. ``vol``: a :class:`Volume` or a lazily opened one (``shape_zyx`` and ``nchan``)."""
    n = vol.nchan
    if vol.shape_zyx[0] != 1 or n <= MAX_CHANNELS:
        return ""
    return f"; its {n} channels may be Z planes: if so, {fix}"


# --------------------------------------------------------------------------- reading


def read_volume(
    path: str | Path,
    z_axis: Optional[int] = None,
    channel_axis: Optional[int] = None,
    labels: bool = False,
) -> Volume:
    """Read a tiff as a (Z, C, Y, X) :class:`Volume`, with its voxel size when known.

    ``labels``: the file holds masks, so an all-zero image is valid (no objects).
    Raises :class:`InputError` (or :class:`AmbiguousAxesError`) naming the file and problem.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    if path.is_dir():
        raise InputError("is a folder, not an image (use --dir for folders)", path)
    try:
        with tifffile.TiffFile(path) as tif:
            if not tif.series:
                raise InputError("TIFF file holds no image", path)
            series = tif.series[0]
            meta_axes = series.axes
            data = series.asarray()
            voxel_size = _voxel_size(tif, series)
    except InputError:
        raise
    except MemoryError:
        raise InputError("volume too big to read into memory", path) from None
    except Exception as err:  # tifffile raises many kinds for broken files
        raise InputError(f"not a readable TIFF file ({_short(err)})", path) from None
    return volume_from_array(
        data, path=path, z_axis=z_axis, channel_axis=channel_axis,
        metadata_axes=meta_axes, voxel_size=voxel_size, check=not labels,
    )


def volume_from_array(
    data: np.ndarray,
    path: Optional[str | Path] = None,
    z_axis: Optional[int] = None,
    channel_axis: Optional[int] = None,
    metadata_axes: Optional[str] = None,
    voxel_size: Optional[tuple[float, float, float]] = None,
    check: bool = True,
) -> Volume:
    """Arrange an array as (Z, C, Y, X) and (``check``) check it can be segmented."""
    path = Path(path) if path is not None else None
    data = np.asarray(data)
    if check:
        check_values(data, path)
    zyx_axes = _resolve_axes(data.shape, z_axis, channel_axis, metadata_axes, path)
    z, c = zyx_axes
    arranged = _arrange(data, z, c, path)
    axes = metadata_axes if (z_axis is None and channel_axis is None and metadata_axes) else (
        _describe_axes(data.ndim, z, c)
    )
    if arranged.shape[0] == 1 and voxel_size is not None:
        voxel_size = (1.0, voxel_size[1], voxel_size[2])
    return Volume(data=arranged, path=path, voxel_size=voxel_size, axes=axes)


def check_values(data: np.ndarray, path: Optional[Path] = None) -> None:
    """Refuse dtypes and values the pipeline cannot segment, with a message saying why."""
    if data.dtype.kind not in SUPPORTED_KINDS or data.dtype.itemsize > 8:
        raise InputError(
            f"unsupported pixel type {data.dtype} (use integer or floating-point images)", path
        )
    if data.size == 0:
        raise InputError(f"image is empty (shape {data.shape})", path)
    if data.dtype.kind == "f":
        finite = np.isfinite(data)
        if not finite.all():
            n_bad = int(data.size - np.count_nonzero(finite))
            raise InputError(
                f"image has {n_bad} NaN or infinite values; replace them before segmenting", path
            )
    lo, hi = data.min(), data.max()
    if lo == hi:
        raise InputError(f"image is constant (every voxel is {lo}): nothing to segment", path)


def _resolve_axes(shape, z_axis, channel_axis, metadata_axes,
                  path) -> tuple[Optional[int], Optional[int]]:
    """Return (z_axis, channel_axis) as indices into ``shape``; None where absent."""
    ndim = len(shape)
    for name, ax in (("z_axis", z_axis), ("channel_axis", channel_axis)):
        if ax is not None and not -ndim <= ax < ndim:
            raise InputError(f"{name}={ax} is out of range for an image of shape {shape}", path)
    z_axis = z_axis % ndim if z_axis is not None else None
    channel_axis = channel_axis % ndim if channel_axis is not None else None
    if z_axis is not None and z_axis == channel_axis:
        raise InputError(f"z_axis and channel_axis are the same axis ({z_axis})", path)

    if z_axis is not None or channel_axis is not None:
        rest = [s for i, s in enumerate(shape) if i not in (z_axis, channel_axis) and s > 1]
        if len(rest) > 2:
            raise AmbiguousAxesError(
                f"shape {tuple(shape)} has more axes than Z, channel, Y and X; "
                "give both z_axis and channel_axis", path, shape, (z_axis, channel_axis))
        return z_axis, channel_axis

    from_meta = _axes_from_metadata(shape, metadata_axes)
    if from_meta is not None:
        return from_meta

    guess = _axes_from_shape(shape)
    if guess is None:
        suggestion = _suggest_axes(shape)
        raise AmbiguousAxesError(
            f"cannot tell the axes of an image of shape {tuple(shape)}; "
            "give z_axis and channel_axis", path, shape, suggestion)
    return guess


def _axes_from_metadata(shape, axes: Optional[str]):
    """Use tifffile's axes letters when they name Z/C unambiguously."""
    if not axes or len(axes) != len(shape):
        return None
    axes = axes.upper()
    # Y and X must be the two last non-sample axes for a microscopy stack.
    z = [i for i, a in enumerate(axes) if a == "Z" and shape[i] > 1]
    c = [i for i, a in enumerate(axes) if a in "CS" and shape[i] > 1]
    other = [i for i, a in enumerate(axes) if a not in "ZCSYX" and shape[i] > 1]
    if "Y" not in axes or "X" not in axes or len(z) > 1 or len(c) > 1:
        return None
    if other:
        # a generic axis (Q, I, T...) of length > 1 is a stack of planes only if nothing else is Z
        if len(other) == 1 and not z and axes[other[0]] in "QIT" and shape[other[0]] > MAX_CHANNELS:
            return other[0], (c[0] if c else None)
        return None
    return (z[0] if z else None), (c[0] if c else None)


def _axes_from_shape(shape):
    """Cellpose's defaults: planes x Y x X, planes x channels x Y x X, Y x X (x RGB)."""
    big = [i for i, s in enumerate(shape) if s > 1]
    dims = [shape[i] for i in big]
    if len(big) == 2:
        return None, None
    if len(big) == 3:
        if dims[2] <= 4 and dims[0] > MAX_CHANNELS and dims[1] > MAX_CHANNELS:
            return None, big[2]  # Y x X x RGB(A): a 2D colour image
        return big[0], None
    if len(big) == 4:
        if dims[1] <= MAX_CHANNELS < min(dims[0], dims[2], dims[3]):
            return big[0], big[1]
        if dims[3] <= 4 and min(dims[:3]) > MAX_CHANNELS:
            return big[0], big[3]
    return None


def _suggest_axes(shape):
    """Best guess for a dialog: the longest small-ish axis is Z, the smallest is channels."""
    big = [i for i, s in enumerate(shape) if s > 1]
    if len(big) < 3:
        return None, None
    yx = sorted(big, key=lambda i: shape[i])[-2:]
    rest = [i for i in big if i not in yx]
    rest.sort(key=lambda i: shape[i])
    channel = rest[0] if len(rest) >= 2 else None
    z = rest[-1]
    return z, channel


def _arrange(data, z_axis, channel_axis, path) -> np.ndarray:
    """Move Z and channel to the front and drop singleton axes: (Z, C, Y, X)."""
    ndim = data.ndim
    order = [a for a in (z_axis, channel_axis) if a is not None]
    rest = [i for i in range(ndim) if i not in order]
    arr = np.transpose(data, order + rest)
    lead = len(order)
    yx_shape = [s for s in arr.shape[lead:] if s > 1]
    if len(yx_shape) < 2:
        raise InputError(f"image of shape {data.shape} has fewer than two spatial axes", path)
    if len(yx_shape) > 2:
        raise AmbiguousAxesError(
            f"image of shape {data.shape} has more than Z, channel, Y and X axes", path,
            data.shape, _suggest_axes(data.shape))
    arr = arr.reshape(arr.shape[:lead] + tuple(yx_shape))
    if z_axis is None:
        arr = arr[np.newaxis]
    if channel_axis is None:
        arr = arr[:, np.newaxis]
    elif z_axis is None:
        pass  # (1, C, Y, X) already
    return np.ascontiguousarray(arr)


def _describe_axes(ndim, z, c) -> str:
    letters = ["?"] * ndim
    if z is not None:
        letters[z] = "Z"
    if c is not None:
        letters[c] = "C"
    free = [i for i in range(ndim) if letters[i] == "?"]
    if len(free) >= 2:
        letters[free[-2]], letters[free[-1]] = "Y", "X"
    return "".join(letters)


def _voxel_size(tif: tifffile.TiffFile, series) -> Optional[tuple[float, float, float]]:
    """(z, y, x) micrometres from OME or ImageJ metadata; None when absent."""
    try:
        if tif.is_ome and tif.ome_metadata:
            found = {}
            for key in ("PhysicalSizeZ", "PhysicalSizeY", "PhysicalSizeX"):
                m = re.search(rf'{key}="([0-9.eE+-]+)"', tif.ome_metadata)
                if m:
                    found[key[-1]] = float(m.group(1))
            if "X" in found:
                y = found.get("Y", found["X"])
                return (found.get("Z", 1.0) if "Z" in found else _missing_z(found), y, found["X"])
        if tif.is_imagej and tif.imagej_metadata is not None:
            ij = tif.imagej_metadata
            page = series.pages[0] if series.pages else tif.pages[0]
            x = _resolution(page, "XResolution")
            y = _resolution(page, "YResolution")
            z = ij.get("spacing")
            if x is None and z is None:
                return None
            x = x or 1.0
            y = y or x
            scale = _unit_scale(ij.get("unit"))
            return (float(z) * scale if z else x * scale, y * scale, x * scale)
    except Exception:
        return None
    return None


def _missing_z(found) -> float:
    return found["X"]


def _resolution(page, tag) -> Optional[float]:
    t = page.tags.get(tag)
    if t is None:
        return None
    num, den = t.value
    if num == 0:
        return None
    size = den / num
    return size if size > 0 and size != 1.0 else None


# metadata units other than micrometres (any spelling of which, or none, scales by 1)
_UNIT_TO_UM = {"nm": 1e-3, "nanometer": 1e-3, "mm": 1e3, "millimeter": 1e3, "cm": 1e4, "m": 1e6}


def _unit_scale(unit) -> float:
    """Factor from the metadata unit to micrometres."""
    if unit is None:
        return 1.0
    unit = str(unit).strip().lower().replace("\\u00b5", "µ")
    return _UNIT_TO_UM.get(unit, 1.0)


def list_images(folder: str | Path, look_one_level_down: bool = False,
                img_filter: str = "") -> list[Path]:
    """Tiffs in a folder (and its subfolders when asked), skipping cp3d's own outputs."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError("folder not found", folder)
    folders = [folder]
    if look_one_level_down:
        folders += sorted(p for p in folder.iterdir() if p.is_dir())
    images = []
    for f in folders:
        for p in sorted(f.iterdir()):
            if p.suffix.lower() not in TIFF_SUFFIXES or not p.is_file():
                continue
            stem = p.stem
            if stem.endswith("_cp_masks") or stem.endswith("_masks") or stem.endswith("_flows"):
                continue
            if img_filter and not stem.endswith(img_filter):
                continue
            images.append(p)
    return images


# --------------------------------------------------------------------------- writing


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see half a file."""
    path = Path(path)
    folder = path.parent
    check_writable(folder)
    # created like any new file (mode 0666 less the umask), not mkstemp's owner-only 0600
    tmp = str(folder / f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def check_writable(folder: str | Path) -> None:
    """Raise :class:`OutputError` if results cannot be written into ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise OutputError(f"cannot create output folder ({err.strerror})", folder) from None
    if not folder.is_dir():
        raise OutputError("output location is not a folder", folder)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError("output folder is not writable", folder)


def imwrite(path: str | Path, data: np.ndarray, voxel_size=None,
            axes: Optional[str] = None) -> Path:
    """Write an ImageJ-compatible tiff atomically, with voxel size when known."""
    data = np.asarray(data)
    if axes is None:
        axes = {2: "YX", 3: "ZYX", 4: "ZCYX"}[data.ndim]
    kwargs = {}
    if voxel_size is not None:
        z, y, x = voxel_size
        kwargs["resolution"] = (1.0 / x, 1.0 / y)
        kwargs["metadata"] = {"axes": axes, "spacing": z, "unit": "um"}
    else:
        kwargs["metadata"] = {"axes": axes}
    if data.dtype == np.uint32 or data.dtype.kind == "f" and data.dtype != np.float32:
        imagej = False  # ImageJ hyperstacks hold 8/16-bit and float32 only
        kwargs.pop("resolution", None)
        kwargs["metadata"] = {"axes": axes}
    else:
        imagej = True

    def write(tmp):
        tifffile.imwrite(tmp, data, imagej=imagej, photometric="minisblack",
                         compression="zlib" if data.dtype.kind in "ui" else None, **kwargs)

    return atomic_write(path, write)


def output_base(image_path: str | Path, savedir: Optional[str | Path] = None) -> Path:
    """NAME without suffix, in ``savedir`` or beside the image."""
    image_path = Path(image_path)
    folder = Path(savedir) if savedir is not None else image_path.parent
    return folder / image_path.stem


def seg_npy_path(image_path: str | Path, savedir: Optional[str | Path] = None) -> Path:
    return output_base(image_path, savedir).with_name(Path(image_path).stem + "_seg.npy")


def masks_tif_path(image_path: str | Path, savedir: Optional[str | Path] = None) -> Path:
    return output_base(image_path, savedir).with_name(Path(image_path).stem + "_cp_masks.tif")


def masks_zarr_path(image_path: str | Path, savedir: Optional[str | Path] = None) -> Path:
    """Where blockwise labels go: ``NAME_cp_masks.zarr``."""
    return output_base(image_path, savedir).with_name(Path(image_path).stem + "_cp_masks.zarr")


def _short(err: Exception) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:200]


# --------------------------------------------------------------------------- Cellpose _seg.npy


def masks_to_outlines(masks: np.ndarray) -> np.ndarray:
    """Boolean outlines drawn per XY plane (as Cellpose does in 3D): a mask pixel whose
    4-neighbour in the plane belongs to another label or to background."""
    m = masks if masks.ndim == 3 else masks[np.newaxis]
    out = np.zeros(m.shape, bool)
    fg = m > 0
    out[:, 1:, :] |= m[:, 1:, :] != m[:, :-1, :]
    out[:, :-1, :] |= m[:, :-1, :] != m[:, 1:, :]
    out[:, :, 1:] |= m[:, :, 1:] != m[:, :, :-1]
    out[:, :, :-1] |= m[:, :, :-1] != m[:, :, 1:]
    out[:, 0, :] = out[:, -1, :] = True
    out[:, :, 0] |= True
    out[:, :, -1] |= True
    out &= fg
    return out if masks.ndim == 3 else out[0]


def flows_to_rgb(dP: np.ndarray) -> np.ndarray:
    """Cellpose's colour-wheel picture of flows (its ``dx_to_circ``): hue from the angle of
    the first two components, brightness from the normalised magnitude; uint8 (..., 3)."""
    from .normalize import normalize99

    mag = 255 * np.clip(normalize99(np.sqrt(np.sum(dP.astype(np.float32) ** 2, axis=0))), 0, 1)
    mag /= 2
    angles = np.arctan2(dP[1], dP[0]) + np.pi
    rgb = np.empty((*dP.shape[1:], 3), np.uint8)
    for k in range(3):
        rgb[..., k] = np.clip(mag * (np.cos(angles + 2 * np.pi * k / 3) + 1), 0, 255)
    return rgb


def save_seg_npy(
    path: str | Path,
    masks: np.ndarray,
    dP: Optional[np.ndarray],
    cellprob: Optional[np.ndarray],
    image_path: str | Path,
    diameter: float,
    chan_choose=(0, 0),
    extra: Optional[dict] = None,
) -> Path:
    """Write a ``_seg.npy`` the Cellpose GUI opens: the keys and flow layout Cellpose writes
    (masks, outlines, chan_choose, ismanual, filename, flows, diameter), atomically."""
    masks = np.asarray(masks)
    n = int(masks.max()) if masks.size else 0
    dtype = np.uint16 if n < 2**16 - 1 else np.uint32
    outlines = masks * masks_to_outlines(masks)
    flows: list = []
    if dP is not None and cellprob is not None:
        from .normalize import normalize99

        cp_u8 = (np.clip(normalize99(cellprob), 0, 1) * 255).astype(np.uint8)
        if masks.ndim == 3:
            flows = [
                flows_to_rgb(dP),
                cp_u8,
                np.clip(dP[0] / 10 * 127 + 127, 0, 255).astype(np.uint8),
                [],
                np.concatenate((dP, cellprob[np.newaxis]), axis=0).astype(np.float32),
            ]
        else:
            flows = [
                flows_to_rgb(dP)[np.newaxis],
                cp_u8[np.newaxis],
                np.zeros((1, *masks.shape, 3), np.uint8),
                [],
                np.concatenate((dP, cellprob[np.newaxis]), axis=0).astype(np.float32),
            ]
    dat = {
        "outlines": outlines.astype(dtype),
        "masks": masks.astype(dtype),
        "chan_choose": list(chan_choose),
        "ismanual": np.zeros(n, bool),
        "filename": str(image_path),
        "flows": flows,
        "diameter": float(diameter),
    }
    if extra:
        dat.update(extra)
    return atomic_write(path, lambda tmp: _np_save(tmp, dat))


def _np_save(tmp: str, dat: dict) -> None:
    with open(tmp, "wb") as fh:
        np.save(fh, np.array(dat, dtype=object), allow_pickle=True)


def load_seg_npy(path: str | Path) -> dict:
    """Read a Cellpose/cp3d ``_seg.npy`` (a pickled dict) with a clear error when broken."""
    path = Path(path)
    try:
        dat = np.load(path, allow_pickle=True).item()
    except FileNotFoundError:
        raise InputError("file not found", path) from None
    except Exception as err:
        raise InputError(f"not a readable _seg.npy file ({_short(err)})", path) from None
    if not isinstance(dat, dict) or "masks" not in dat:
        raise InputError("not a _seg.npy file (no 'masks' entry)", path)
    return dat


def save_results(volume: Volume, result, savedir: Optional[str | Path] = None,
                 save_tif: bool = True, save_npy: bool = True) -> list[Path]:
    """Write ``NAME_cp_masks.tif`` and ``NAME_seg.npy`` beside the image (or in ``savedir``).

    Each file is written to a temporary name and renamed, so an interrupted save never leaves
    a half-written result. Returns the paths written.
    """
    if volume.path is None:
        raise OutputError("the volume has no file name; give savedir and a name to save it")
    folder = Path(savedir) if savedir is not None else volume.path.parent
    check_writable(folder)
    masks = result.masks
    if masks.ndim == 3 and masks.shape[0] == 1:
        masks2d = masks[0]
    else:
        masks2d = None
    written = []
    if save_tif:
        written.append(imwrite(masks_tif_path(volume.path, folder),
                               masks2d if masks2d is not None else masks,
                               voxel_size=None if masks2d is not None else volume.voxel_size))
    if save_npy:
        if masks2d is not None:
            m, dP, cp = masks2d, result.dP[1:, 0], result.cellprob[0]
        else:
            m, dP, cp = masks, result.dP, result.cellprob
        chans = (result.params.get("chan", 0), result.params.get("chan2", 0))
        extra = {
            "model_path": result.params.get("model", ""),
            "cellprob_threshold": result.params.get("cellprob_threshold", 0.0),
            "flow_threshold": result.params.get("flow_threshold", 0.4),
            "anisotropy": result.anisotropy,
            "voxel_size": volume.voxel_size,
            "cp3d_params": dict(result.params),
        }
        written.append(save_seg_npy(seg_npy_path(volume.path, folder), m, dP, cp,
                                    volume.path, result.diameter, chans, extra))
    return written
