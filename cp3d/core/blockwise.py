"""Blockwise segmentation of volumes larger than memory, on dask.

The volume is read lazily (a tiff through tifffile's zarr store, or a zarr / OME-Zarr array) and
cut into a grid of non-overlapping *core* blocks. Each block is segmented by the usual 2.5D
pipeline (network on YX, ZX, ZY planes, 3D dynamics) on its core grown by a *halo* of about one
cell diameter on every side, so neighbouring blocks see each other's border cells whole (they
overlap by about two diameters). Intensity percentiles are computed once, on a subsample of the
whole volume, and given to every block, so all blocks normalize alike.

Each block keeps its labels inside its core (numbered 1..n), plus two thin slabs per face: its
own labels just inside the face (``edge``) and its labels just beyond the face, in the
neighbour's core (``margin``). Merging compares, on each face, one block's margin with the
other's edge: two labels are the same cell when each is the other's best partner there and
they share more than half of the smaller one's voxels. Connected components of that label
graph give the final labels, so a cell cut by a block face comes out whole; pieces left smaller
than ``min_size`` voxels in all are dropped.

Restart: every finished block writes its core labels into ``blocks.zarr`` in a scratch folder
and then, atomically, a marker file with its face slabs. A rerun with the same input and
settings skips blocks that have a marker. The merged labels are written to a temporary zarr
that is renamed to its final name only when complete, and the scratch folder is then removed.

Blocks are dask tasks: the local threaded scheduler by default, a ``distributed.LocalCluster``
of processes when ``n_workers > 1``, or an existing cluster (``dask_scheduler="tcp://..."``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .cancel import CancelToken, check_cancel
from .errors import Cancelled, InputError

log = logging.getLogger("cp3d")

BLOCK_SIZE = 0  # 0: chosen from the memory each block may use (choose_block_size)
BLOCK_MEMORY = 4e9  # bytes one block may use by default (less when memory_limit says so)
PROCESS_BYTES = 0.8e9  # a worker's fixed memory: model, torch and numba runtime, dask
SCRATCH_SUFFIX = "_blockwise"  # NAME_blockwise/ beside the output: per-block results, markers
MATCH_FRACTION = 0.5  # two labels are one cell when they share more than this of the smaller


# --------------------------------------------------------------------------- lazy input


@dataclass
class LazyVolume:
    """A (Z, C, Y, X) view of an image on disk (tiff or zarr) that reads only what is asked.

    It pickles without its open file handle, so dask can send it to other processes; each
    process reopens the file on first read. ``array`` may instead hold an in-memory array
    (Z, C, Y, X), for tests and for the Python API.
    """

    path: Optional[Path]
    kind: str  # "tiff", "zarr" or "array"
    stored_shape: tuple
    dtype: str
    z_axis: Optional[int]
    channel_axis: Optional[int]
    yx_axes: tuple
    voxel_size: Optional[tuple] = None
    key: Optional[str] = None  # array inside a zarr group (OME-Zarr level 0)
    array: Any = None

    def __getstate__(self):
        state = dict(self.__dict__)
        if self.kind != "array":
            state["array"] = None
        return state

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        s = self.stored_shape
        z = s[self.z_axis] if self.z_axis is not None else 1
        return int(z), int(s[self.yx_axes[0]]), int(s[self.yx_axes[1]])

    @property
    def nchan(self) -> int:
        return int(self.stored_shape[self.channel_axis]) if self.channel_axis is not None else 1

    @property
    def anisotropy(self) -> Optional[float]:
        if self.voxel_size is None:
            return None
        z, y, x = self.voxel_size
        xy = (y + x) / 2
        return float(z / xy) if z > 0 and xy > 0 else None

    @property
    def name(self) -> str:
        return self.path.name if self.path is not None else "<array>"

    def _open(self):
        if self.array is None:
            import zarr

            if self.kind == "tiff":
                import tifffile

                z = zarr.open(tifffile.imread(self.path, aszarr=True), mode="r")
            else:
                z = zarr.open(str(self.path), mode="r")
            if self.key is not None:
                z = z[self.key]
            elif not hasattr(z, "shape"):  # a group (pyramid): level 0
                z = z["0"]
            self.array = z
        return self.array

    def read(self, zs: slice, ys: slice, xs: slice) -> np.ndarray:
        """Voxels [zs, :, ys, xs] as a (Z, C, Y, X) numpy array."""
        arr = self._open()
        if self.kind == "array":
            return np.asarray(arr[zs, :, ys, xs])
        ndim = len(self.stored_shape)
        idx: list = [0] * ndim
        order = []
        for ax, sl in ((self.z_axis, zs), (self.channel_axis, slice(None)),
                       (self.yx_axes[0], ys), (self.yx_axes[1], xs)):
            if ax is not None:
                idx[ax] = sl
        for ax in range(ndim):
            if isinstance(idx[ax], slice):
                order.append(ax)
        data = np.asarray(arr[tuple(idx)])
        want = [a for a in (self.z_axis, self.channel_axis, *self.yx_axes) if a is not None]
        data = np.transpose(data, [order.index(a) for a in want])
        if self.z_axis is None:
            data = data[np.newaxis]
        if self.channel_axis is None:
            data = data[:, np.newaxis]
        return data


def estimate_diameter_lazily(src: LazyVolume, model, max_side: int = 1024, **kw) -> float:
    """:func:`cp3d.core.size.estimate_diameter` on the centres of a few planes, read alone."""
    from .io import Volume
    from .size import estimate_diameter, pick_planes

    lz, ly, lx = src.shape_zyx
    y0, x0 = max(0, (ly - max_side) // 2), max(0, (lx - max_side) // 2)
    ys, xs = slice(y0, y0 + max_side), slice(x0, x0 + max_side)
    planes = np.concatenate([src.read(slice(z, z + 1), ys, xs) for z in pick_planes(lz, 6)])
    return estimate_diameter(Volume(planes, path=src.path), model, **kw)


def _is_zarr_path(path: Path) -> bool:
    return path.suffix.lower() == ".zarr" or (path.is_dir() and any(
        (path / n).exists() for n in ("zarr.json", ".zarray", ".zgroup")))


def open_lazy(path: Union[str, Path], z_axis: Optional[int] = None,
              channel_axis: Optional[int] = None) -> LazyVolume:
    """Open a tiff, zarr array or OME-Zarr image for blockwise reading (nothing is loaded)."""
    from .io import _resolve_axes, _voxel_size

    path = Path(path)
    if not path.exists():
        raise InputError("file not found", path)
    meta_axes = None
    voxel_size = None
    key = None
    try:
        if _is_zarr_path(path):
            import zarr

            kind = "zarr"
            z = zarr.open(str(path), mode="r")
            if not hasattr(z, "shape"):
                key, meta_axes, voxel_size = _ome_level0(z)
                z = z[key]
            shape, dtype = tuple(z.shape), str(z.dtype)
        else:
            import tifffile

            kind = "tiff"
            with tifffile.TiffFile(path) as tif:
                if not tif.series:
                    raise InputError("TIFF file holds no image", path)
                series = tif.series[0]
                shape, dtype, meta_axes = tuple(series.shape), str(series.dtype), series.axes
                voxel_size = _voxel_size(tif, series)
    except InputError:
        raise
    except Exception as err:
        raise InputError(f"cannot open for blockwise reading ({str(err)[:200]})", path) from None
    if np.dtype(dtype).kind not in "uif":
        raise InputError(f"unsupported pixel type {dtype} (use integer or floating-point images)",
                         path)
    zc = _resolve_axes(shape, z_axis, channel_axis, meta_axes, path)
    rest = [i for i in range(len(shape)) if i not in zc and shape[i] > 1]
    if len(rest) != 2:
        raise InputError(f"image of shape {shape} does not have exactly two spatial axes "
                         "besides Z and channels", path)
    zax, cax = zc
    if zax is not None and shape[zax] == 1:
        zax = None
    return LazyVolume(path=path, kind=kind, stored_shape=shape, dtype=dtype, z_axis=zax,
                      channel_axis=cax, yx_axes=tuple(rest), voxel_size=voxel_size, key=key)


def _ome_level0(group) -> tuple[str, Optional[str], Optional[tuple]]:
    """Level-0 array name, axes letters and (z, y, x) voxel size of an OME-Zarr image group."""
    attrs = dict(group.attrs)
    attrs = attrs.get("ome", attrs)
    ms = attrs.get("multiscales")
    if not ms:
        names = sorted(k for k in group.keys())
        if not names:
            raise InputError("zarr group holds no array")
        return names[0], None, None
    first = ms[0]
    ds = first["datasets"][0]
    axes = None
    if "axes" in first:
        axes = "".join((a["name"] if isinstance(a, dict) else str(a))[0].upper()
                       for a in first["axes"])
    voxel = None
    for t in ds.get("coordinateTransformations", []):
        if t.get("type") == "scale" and axes and "X" in axes and "Y" in axes:
            scale = t["scale"]
            x, y = scale[axes.index("X")], scale[axes.index("Y")]
            z = scale[axes.index("Z")] if "Z" in axes else x
            voxel = (float(z), float(y), float(x))
    return ds["path"], axes, voxel


def lazy_from_array(data: np.ndarray, voxel_size=None, path=None) -> LazyVolume:
    """Wrap an in-memory (Z, C, Y, X) array (or a :class:`~cp3d.core.io.Volume`)."""
    if hasattr(data, "data") and hasattr(data, "shape_zyx"):  # a Volume
        voxel_size = voxel_size or data.voxel_size
        path = path or data.path
        data = data.data
    data = np.asarray(data)
    if data.ndim == 3:
        data = data[:, np.newaxis]
    return LazyVolume(path=Path(path) if path else None, kind="array",
                      stored_shape=tuple(data.shape), dtype=str(data.dtype), z_axis=0,
                      channel_axis=1, yx_axes=(2, 3), voxel_size=voxel_size, array=data)


# --------------------------------------------------------------------------- normalization


def global_percentiles(src: LazyVolume, nchan: int, chan: int = 0, chan2: int = 0,
                       all_channels: bool = False, sharpen_radius: float = 0.0,
                       lower: float = 1.0, upper: float = 99.0) -> list[tuple[float, float]]:
    """(low, high) percentiles per network channel, from the same strided subsample of the whole
    volume that the in-memory pipeline uses (exact for volumes up to 224^3 voxels); read plane
    by plane, so memory stays at a few planes."""
    from .normalize import _SUBSAMPLE_ABOVE, sharpen
    from .pipeline import select_channels

    lz, ly, lx = src.shape_zyx
    if lz * ly * lx <= _SUBSAMPLE_ABOVE:
        steps = (1, 1, 1)
    else:
        steps = (max(1, lz // 50) if lz > 1 else 1, max(1, ly // 224), max(1, lx // 224))
    parts = []
    for z0 in range(0, lz, steps[0]):
        plane = src.read(slice(z0, z0 + 1), slice(None), slice(None))
        x = select_channels(plane, nchan, chan, chan2, all_channels, src.path)
        if sharpen_radius > 0:
            x = np.stack([sharpen(x[c], sharpen_radius) for c in range(x.shape[0])])
        parts.append(x[:, :, ::steps[1], ::steps[2]])
    sample = np.concatenate(parts, axis=1)
    if not np.isfinite(sample).all():
        raise InputError("image has NaN or infinite values; replace them before segmenting",
                         src.path)
    out = []
    for c in range(sample.shape[0]):
        lo, hi = np.percentile(sample[c], [lower, upper])
        out.append((float(lo), float(hi)))
    return out


def normalize_block(x: np.ndarray, percentiles, invert: bool = False,
                    sharpen_radius: float = 0.0) -> np.ndarray:
    """Normalize a (C, Z, Y, X) block with global per-channel (low, high) percentiles, exactly
    as :func:`cp3d.core.normalize.normalize_volume` does with the block's own."""
    from .normalize import sharpen

    out = np.empty(x.shape, np.float32)
    for c in range(x.shape[0]):
        ch = x[c].astype(np.float32, copy=False)
        if sharpen_radius > 0:
            ch = sharpen(ch, sharpen_radius)
        lo, hi = percentiles[c]
        if hi - lo <= 1e-3:
            out[c] = 0
        else:
            t = ch - np.float32(lo)
            t /= np.float32(hi - lo)
            out[c] = (1.0 - t) if invert else t
    return out


# --------------------------------------------------------------------------- the block grid


@dataclass(frozen=True)
class Block:
    index: tuple  # (i, j, k) in the grid
    core: tuple  # ((z0, z1), (y0, y1), (x0, x1))
    ext: tuple  # core grown by the halo, clipped to the volume

    @property
    def key(self) -> str:
        return "_".join(str(i) for i in self.index)


def block_grid(shape: Sequence[int], block_size: Sequence[int],
               halo: Sequence[int]) -> list[Block]:
    """Core blocks tiling ``shape`` (Z, Y, X), each with its halo-grown region, in C order."""
    edges = []
    for n, b in zip(shape, block_size):
        b = max(1, int(b))
        starts = list(range(0, n, b))
        edges.append([(s, min(n, s + b)) for s in starts])
    blocks = []
    for index in product(*(range(len(e)) for e in edges)):
        core = tuple(edges[a][i] for a, i in enumerate(index))
        ext = tuple((max(0, c0 - h), min(n, c1 + h))
                    for (c0, c1), h, n in zip(core, halo, shape))
        blocks.append(Block(index=tuple(index), core=core, ext=ext))
    return blocks


def _as3(v) -> tuple[int, int, int]:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 3
    v = tuple(int(x) for x in v)
    if len(v) != 3:
        raise ValueError("give one number or three (Z, Y, X)")
    return v


# --------------------------------------------------------------------------- one block


@dataclass
class Job:
    """Everything a block task needs (pickled to workers: keep it small)."""

    src: LazyVolume
    scratch: str
    model: Any  # a loaded Model (threads), or a name/path that workers load once
    percentiles: list
    rescale: float
    anisotropy: float
    niter: int
    margin: tuple
    params: dict = field(default_factory=dict)
    shape: tuple = ()
    grid: tuple = ()  # number of blocks along Z, Y, X
    threads: Optional[int] = None
    use_gpu: bool = False


_MODEL_CACHE: dict = {}


def _get_model(model, use_gpu: bool):
    if hasattr(model, "net"):
        return model
    key = (str(model), use_gpu)
    if key not in _MODEL_CACHE:
        from .models import load_model, pick_device

        _MODEL_CACHE[key] = load_model(model, device=pick_device(use_gpu))
    return _MODEL_CACHE[key]


def segment_block(data: np.ndarray, job: Job, cancel: Optional[CancelToken] = None) -> np.ndarray:
    """The 2.5D pipeline on one (Z, C, Y, X) block region: labels (Z, Y, X).

    Kept as a module-level function so tests can wrap it (to simulate a crash, say).
    ``cancel`` is checked between network batches and dynamics steps, so a Cancel does not
    wait for the block to finish."""
    from . import dynamics
    from .inference import predict_3d
    from .pipeline import select_channels

    model = _get_model(job.model, job.use_gpu)
    p = job.params
    x = select_channels(data, model.nchan, p["chan"], p["chan2"], p["all_channels"], job.src.path)
    x = normalize_block(x, job.percentiles, p["invert"], p["sharpen_radius"])
    dP, cellprob = predict_3d(model.net, x, model.device, rescale=job.rescale,
                              anisotropy=job.anisotropy, batch_size=p["batch_size"],
                              augment=p.get("augment", False))
    del x
    # the whole-volume run drops masks above 40% of the volume; keep that absolute size
    fraction = 0.4 * float(np.prod(job.shape)) / float(cellprob.size)
    return dynamics.masks_from_flows(
        dP, cellprob, niter=job.niter, cellprob_threshold=p["cellprob_threshold"],
        min_size=p["min_size"], flow3D_smooth=p["flow3D_smooth"], max_size_fraction=fraction,
        cancel=cancel)


def _marker(scratch: Union[str, Path], block: Block) -> Path:
    return Path(scratch) / "done" / f"{block.key}.npz"


def _face_slabs(labels: np.ndarray, lut: np.ndarray, block: Block, job: Job) -> dict:
    """Per face with a neighbour: this block's labels just inside (edge) and just beyond
    (margin) the face, both numbered like its core labels (0 for labels not in the core)."""
    out = {}
    ext0 = [e[0] for e in block.ext]
    for axis in range(3):
        c0, c1 = block.core[axis]
        n_blocks = job.grid[axis]
        i = block.index[axis]
        for side, has_neighbour in ((0, i > 0), (1, i < n_blocks - 1)):
            if not has_neighbour:
                continue
            m = job.margin[axis]
            own = min(m, c1 - c0)
            if side == 1:
                beyond = min(m, job.shape[axis] - c1, _neighbour_extent(job, axis, i + 1))
                edge_rng, margin_rng = (c1 - own, c1), (c1, c1 + beyond)
            else:
                beyond = min(m, _neighbour_extent(job, axis, i - 1))
                edge_rng, margin_rng = (c0, c0 + own), (c0 - beyond, c0)
            for name, rng in (("edge", edge_rng), ("margin", margin_rng)):
                sl = []
                for a in range(3):
                    lo, hi = rng if a == axis else block.core[a]
                    sl.append(slice(lo - ext0[a], hi - ext0[a]))
                out[f"{name}{axis}{side}"] = lut[labels[tuple(sl)]]
    return out


def _neighbour_extent(job: Job, axis: int, i: int) -> int:
    b = job.params["block_size"][axis]
    return min(job.shape[axis], (i + 1) * b) - i * b


def run_block(block: Block, job: Job, cancel: Optional[CancelToken] = None) -> int:
    """Segment one block unless its marker exists; returns its number of labels (-1: skipped)."""
    marker = _marker(job.scratch, block)
    if marker.exists():
        return -1
    check_cancel(cancel)
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)
    data = job.src.read(*(slice(a, b) for a, b in block.ext))
    labels = segment_block(data, job, cancel=cancel)
    del data
    core_sl = tuple(slice(c0 - e0, c1 - e0) for (c0, c1), (e0, _) in zip(block.core, block.ext))
    core = labels[core_sl]
    ids = np.unique(core)
    ids = ids[ids > 0]
    lut = np.zeros(int(labels.max()) + 1, np.uint32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint32)
    core_local = lut[core]
    slabs = _face_slabs(labels, lut, block, job)
    del labels
    sizes = np.bincount(core_local.ravel(), minlength=len(ids) + 1).astype(np.int64)

    import zarr

    arr = zarr.open_array(str(Path(job.scratch) / "blocks.zarr"), mode="r+")
    arr[tuple(slice(a, b) for a, b in block.core)] = core_local
    tmp = marker.with_name(f".{marker.stem}.{uuid.uuid4().hex[:8]}.part.npz")
    np.savez_compressed(tmp, n=np.int64(len(ids)), sizes=sizes, **slabs)
    os.replace(tmp, marker)
    return int(len(ids))


# --------------------------------------------------------------------------- merging


def _best_partner(own: np.ndarray, other: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """For each label 0..n-1 of ``own``, the ``other`` label it shares most voxels with (0 for
    none) over the overlap pairs (own, other, counts); ties go to the pair listed first."""
    order = np.lexsort((counts, own))  # by label, then share ascending: a group's last is best
    last = np.flatnonzero(np.append(own[order][1:] != own[order][:-1], True))
    best = np.zeros(n, np.int64)
    best[own[order][last]] = other[order][last]  # one write per label
    return best


def _pairs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label pairs (a, b) of two co-registered slabs that are one object: each is the other's
    best partner (most shared voxels) and they share more than MATCH_FRACTION of the smaller
    one's voxels in the slab. Returns (K, 2) local labels."""
    a = a.ravel().astype(np.int64)
    b = b.ravel().astype(np.int64)
    both = (a > 0) & (b > 0)
    if not both.any():
        return np.zeros((0, 2), np.int64)
    size_a = np.bincount(a)
    size_b = np.bincount(b)
    keys, counts = np.unique(a[both] * len(size_b) + b[both], return_counts=True)
    pa, pb = keys // len(size_b), keys % len(size_b)
    keep = counts > MATCH_FRACTION * np.minimum(size_a[pa], size_b[pb])
    # mutual best partners only: a label that one block sees spanning two cells must not
    # bridge them into one
    keep &= _best_partner(pa, pb, counts, len(size_a))[pa] == pb
    keep &= _best_partner(pb, pa, counts, len(size_b))[pb] == pa
    return np.stack([pa[keep], pb[keep]], axis=1)


def merge_labels(blocks: list[Block], scratch: Union[str, Path], grid: tuple,
                 min_size: int) -> tuple[list[np.ndarray], int]:
    """Join labels across block faces; returns a lookup table per block (local label -> final
    label, 0 kept) and the number of final labels."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    by_index = {b.index: b for b in blocks}
    counts = []
    sizes = []
    for b in blocks:
        with np.load(_marker(scratch, b)) as z:
            counts.append(int(z["n"]))
            sizes.append(z["sizes"][1:])
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    pos = {b.index: k for k, b in enumerate(blocks)}
    edges = []
    for b in blocks:
        with np.load(_marker(scratch, b)) as zb:
            for axis in range(3):
                if b.index[axis] == 0:
                    continue
                nidx = list(b.index)
                nidx[axis] -= 1
                nb = by_index[tuple(nidx)]
                with np.load(_marker(scratch, nb)) as zn:
                    # nb's labels beyond its high face vs b's own labels inside its low face,
                    # and b's labels beyond its low face vs nb's own inside its high face
                    for lo_arr, hi_arr in ((zn[f"margin{axis}1"], zb[f"edge{axis}0"]),
                                           (zn[f"edge{axis}1"], zb[f"margin{axis}0"])):
                        p = _pairs(lo_arr, hi_arr)
                        if len(p):
                            edges.append(np.stack([p[:, 0] + offsets[pos[nb.index]],
                                                   p[:, 1] + offsets[pos[b.index]]], axis=1))
    n_nodes = total + 1
    if edges:
        e = np.concatenate(edges)
        graph = coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])),
                           shape=(n_nodes, n_nodes))
    else:
        graph = coo_matrix((n_nodes, n_nodes), dtype=np.int8)
    n_comp, comp = connected_components(graph, directed=False)
    node_size = np.concatenate([[0]] + [s.astype(np.int64) for s in sizes]) if sizes else \
        np.zeros(1, np.int64)
    comp_size = np.bincount(comp, weights=node_size, minlength=n_comp)
    # final numbering follows the first (lowest) global label of each object
    first = np.full(n_comp, n_nodes, np.int64)
    np.minimum.at(first, comp, np.arange(n_nodes))
    keep = comp_size >= max(1, min_size)
    keep[comp[0]] = False  # background
    order = np.argsort(first, kind="stable")
    order = order[keep[order]]
    final = np.zeros(n_comp, np.int64)
    final[order] = np.arange(1, len(order) + 1)
    node_final = final[comp]
    luts = []
    for k in range(len(blocks)):
        lut = np.zeros(counts[k] + 1, np.int64)
        lut[1:] = node_final[offsets[k] + 1:offsets[k + 1] + 1]
        luts.append(lut)
    return luts, len(order)


def _write_final_block(block: Block, lut: np.ndarray, scratch: str, target: str) -> None:
    import zarr

    src = zarr.open_array(str(Path(scratch) / "blocks.zarr"), mode="r")
    dst = zarr.open_array(target, mode="r+")
    sl = tuple(slice(a, b) for a, b in block.core)
    dst[sl] = lut.astype(dst.dtype)[np.asarray(src[sl])]


# --------------------------------------------------------------------------- running


@dataclass
class BlockwiseResult:
    """Where the merged labels are, and how the run went."""

    zarr_path: Path
    n_masks: int
    shape: tuple
    n_blocks: int
    n_computed: int  # blocks segmented in this run (the others were done before)
    diameter: float
    anisotropy: float
    params: dict
    seconds: dict

    def load(self) -> np.ndarray:
        import zarr

        return np.asarray(zarr.open_array(str(self.zarr_path), mode="r")[...])


def _block_bytes(ext_shape, rescale: float, anisotropy: float, nchan: int) -> float:
    """Peak memory of a worker segmenting one block of ``ext_shape`` voxels.

    Measured on the in-memory pipeline (bench/blockwise.py, peak RSS): about 27 bytes per
    voxel at network scale while predicting (normalized input and the summed flows), 36 per
    voxel during the dynamics (flows, cell probability, seeds and labels), on top of the
    process's fixed memory; the input block and its labels add a few bytes per voxel."""
    voxels = float(np.prod(ext_shape))
    work = voxels * rescale**3 * max(1.0, anisotropy)
    predict = work * (4 * nchan + 16) + (voxels * 16 if work != voxels else 0.0)
    return PROCESS_BYTES + max(predict, voxels * 40.0) + voxels * (2 * nchan + 6)


def output_chunks(block_size: Sequence[int], shape: Sequence[int],
                  largest: int = 64, smallest: int = 16) -> tuple[int, int, int]:
    """Chunks of the labels zarr: small enough that a viewer reads a plane without
    decompressing whole blocks, and dividing the block size, so that blocks written at once
    never share a chunk. Per axis, the largest divisor of the block edge up to ``largest``;
    the block edge itself when it has none from ``smallest`` up."""
    out = []
    for b, n in zip(block_size, shape):
        b = min(b, n)
        div = next((d for d in range(min(b, largest), smallest - 1, -1) if b % d == 0), b)
        out.append(div)
    return tuple(out)


def _axis_ext_total(n: int, count: int, halo: int) -> int:
    """Voxels read along one axis by ``count`` equal blocks with ``halo`` (clipped at ends)."""
    return n + 2 * halo * (count - 1) if count > 1 else n


def choose_block_size(shape: Sequence[int], halo: Sequence[int], rescale: float,
                      anisotropy: float, nchan: int, budget: float,
                      min_block: int = 32) -> tuple[int, int, int]:
    """Core block size (Z, Y, X) that reads the fewest voxels in all (halos are read, and
    segmented, twice) while one block stays within ``budget`` bytes.

    Blocks are as equal as multiples of 16 allow along each axis (1024 in three: 352+352+320),
    so the largest block, an interior one, is the one checked against the budget."""
    best, best_cost = None, None
    counts = [range(1, max(1, math.ceil(n / min_block)) + 1) for n in shape]
    for cz in counts[0]:
        for cy in counts[1]:
            for cx in counts[2]:
                # multiples of 16 (when cut), so output_chunks finds a good divisor
                cores = [n if c == 1 else 16 * math.ceil(n / c / 16)
                         for n, c in zip(shape, (cz, cy, cx))]
                if any(b * (c - 1) >= n for b, c, n in zip(cores, (cz, cy, cx), shape)):
                    continue  # rounding up left the last block empty
                ext = [min(n, b + (2 if c > 2 else c - 1) * h)
                       for n, b, c, h in zip(shape, cores, (cz, cy, cx), halo)]
                if _block_bytes(ext, rescale, anisotropy, nchan) > budget:
                    continue
                cost = math.prod(_axis_ext_total(n, c, h)
                                 for n, c, h in zip(shape, (cz, cy, cx), halo))
                key = (cost, cz * cy * cx)
                if best_cost is None or key < best_cost:
                    best, best_cost = tuple(cores), key
                break  # more blocks along X only read more
    if best is None:  # not even the smallest blocks fit: the caller reports it
        return tuple(min(n, min_block) for n in shape)
    return best


def _run_tasks(fn: Callable, items: list, scheduler: Optional[str], n_workers: int,
               memory_limit: Optional[int], threads: Optional[int],
               progress: Optional[Callable[[int, int], None]],
               cancel: Optional[CancelToken] = None) -> None:
    """Run ``fn(item)`` for every item as dask tasks; raises the first task error, or
    :class:`Cancelled` soon after ``cancel`` is set (on a cluster, the pending tasks are
    cancelled and the running ones finish on their own)."""
    import dask

    if not items:
        return
    total = len(items)
    tasks = [dask.delayed(fn, pure=False)(item) for item in items]
    if scheduler or n_workers > 1:
        from distributed import Client, LocalCluster, wait

        cluster = None
        if scheduler:
            client = Client(scheduler)
        else:
            per_worker = int(memory_limit / n_workers) if memory_limit else "auto"
            cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                   memory_limit=per_worker, dashboard_address=None)
            client = Client(cluster)
        try:
            pending = set(client.compute(tasks))
            done = 0
            while pending:
                if cancel is not None and cancel.cancelled:
                    client.cancel(list(pending))
                    raise Cancelled()
                try:
                    finished, pending = wait(pending, timeout=0.25,
                                             return_when="FIRST_COMPLETED")
                except TimeoutError:  # none finished yet: look at the cancel token again
                    continue
                for fut in finished:
                    fut.result()
                    done += 1
                    if progress is not None:
                        progress(done, total)
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    else:
        from dask.callbacks import Callback

        class _Progress(Callback):
            def __init__(self):
                super().__init__()
                self.done = 0

            def _posttask(self, key, result, dsk, state, worker_id):
                self.done += 1
                if progress is not None and self.done <= total:
                    progress(self.done, total)

        with _Progress():
            dask.compute(*tasks, scheduler="threads", num_workers=1)


def segment_blockwise(
    source: Union[str, Path, np.ndarray, LazyVolume, Any],
    out_zarr: Union[str, Path],
    model=None,
    *,
    block_size: Optional[Union[int, Sequence[int]]] = BLOCK_SIZE,
    overlap: Optional[Union[int, Sequence[int]]] = None,
    dask_scheduler: Optional[str] = None,
    n_workers: int = 1,
    memory_limit: Optional[Union[int, str]] = None,
    z_axis: Optional[int] = None,
    channel_axis: Optional[int] = None,
    diameter: Optional[float] = None,
    anisotropy: Optional[float] = None,
    flow3D_smooth=0,
    min_size: int = 15,
    cellprob_threshold: float = 0.0,
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
    keep_blocks: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
    cancel: Optional[CancelToken] = None,
) -> BlockwiseResult:
    """Segment a volume block by block and write the merged labels to ``out_zarr``.

    ``source``: a tiff or zarr path (read lazily), a :class:`LazyVolume`, or an in-memory
    array / Volume. ``block_size``: core block edge in voxels (one number or Z, Y, X); 0 or
    None chooses it (:func:`choose_block_size`): the blocks that read the fewest voxels while
    each stays within 4 GB, or within ``memory_limit`` / ``n_workers`` if that is less.
    ``overlap``: voxels each block reads beyond its core on every side (default: one cell
    diameter, so neighbouring blocks overlap by two; in Z divided by the anisotropy).
    ``dask_scheduler``: address of a dask.distributed scheduler ("tcp://host:8786"); the
    workers must see ``out_zarr``'s folder and the input. ``n_workers`` > 1 without a scheduler
    starts a local cluster of that many processes sharing ``memory_limit`` (bytes or "8GB").
    ``progress(done, total)`` is called per finished block; ``cancel`` stops the run within
    the running block (:class:`Cancelled`), before anything is written beside the scratch
    folder, whose finished blocks a rerun resumes from.
    Other parameters are :func:`cp3d.core.pipeline.segment`'s (2.5D mode only).
    """
    from .io import check_writable, many_channels_hint
    from .pipeline import _load

    t0 = time.perf_counter()
    if tile_norm:
        raise InputError("tile_norm is not available blockwise (normalization is global)")
    if isinstance(source, LazyVolume):
        src = source
    elif isinstance(source, (str, Path)):
        src = open_lazy(source, z_axis=z_axis, channel_axis=channel_axis)
    else:
        src = lazy_from_array(source)
    path = src.path
    shape = src.shape_zyx
    if shape[0] == 1:
        raise InputError("2D image (a single plane) given to 3D segmentation"
                         + many_channels_hint(src), path)
    if anisotropy is None:
        anisotropy = src.anisotropy or 1.0
    if not anisotropy > 0:
        raise InputError(f"anisotropy must be positive, got {anisotropy}", path)
    if diameter is not None and diameter < 0:
        raise InputError(f"diameter must be positive, got {diameter}", path)
    if isinstance(memory_limit, str):
        from dask.utils import parse_bytes

        memory_limit = parse_bytes(memory_limit)
    n_workers = max(1, int(n_workers or 1))

    loaded = _load(model, use_gpu)
    if not diameter:
        diameter = estimate_diameter_lazily(src, loaded, chan=chan, chan2=chan2,
                                            all_channels=all_channels, invert=invert,
                                            sharpen_radius=sharpen_radius, cancel=cancel)
    check_cancel(cancel)
    rescale = float(loaded.diam_mean) / float(diameter)
    if niter is None or niter == 0:
        niter = int(round(200 * max(1.0, 1.0 / rescale)))
    if overlap is None:
        halo = (int(math.ceil(diameter / anisotropy)), int(math.ceil(diameter)),
                int(math.ceil(diameter)))
    else:
        halo = _as3(overlap)
    margin = tuple(max(2, min(h, int(math.ceil(d / 2))))
                   for h, d in zip(halo, (diameter / anisotropy, diameter, diameter)))
    margin = tuple(min(m, h) if h > 0 else 0 for m, h in zip(margin, halo))

    # memory: the block size, and how many blocks may run at once
    if memory_limit is None and not dask_scheduler:
        try:
            import psutil

            memory_limit = int(0.8 * psutil.virtual_memory().available)
        except Exception:
            memory_limit = None
    if not block_size:
        budget = BLOCK_MEMORY
        if memory_limit and not dask_scheduler:
            budget = min(budget, memory_limit / n_workers)
        bs = choose_block_size(shape, halo, rescale, anisotropy, loaded.nchan, budget)
    else:
        bs = _as3(block_size)
    blocks = block_grid(shape, bs, halo)
    grid = tuple(len(range(0, n, b)) for n, b in zip(shape, bs))
    ext_largest = max((tuple(e1 - e0 for e0, e1 in b.ext) for b in blocks), key=math.prod)
    need = _block_bytes(ext_largest, rescale, anisotropy, loaded.nchan)
    if memory_limit and not dask_scheduler:
        if need > memory_limit:
            raise InputError(
                f"one block of {'x'.join(map(str, ext_largest))} voxels needs about "
                f"{need / 1e9:.1f} GB but the memory limit is {memory_limit / 1e9:.1f} GB; "
                "use a smaller --block_size", path)
        fit = max(1, int(memory_limit // need))
        if fit < n_workers:
            log.warning("memory limit %.1f GB fits %d block(s) at once: using %d worker(s)",
                        memory_limit / 1e9, fit, fit)
            n_workers = fit

    out_zarr = Path(out_zarr)
    check_writable(out_zarr.parent)
    scratch = out_zarr.with_name(out_zarr.name.removesuffix(".zarr") + SCRATCH_SUFFIX)
    percentiles = global_percentiles(src, loaded.nchan, chan, chan2, all_channels,
                                     sharpen_radius)
    params = dict(
        model=str(loaded.path or loaded.name), diameter=float(diameter),
        anisotropy=float(anisotropy), do_3D=True, flow3D_smooth=flow3D_smooth,
        min_size=min_size, cellprob_threshold=cellprob_threshold, niter=niter, chan=chan,
        chan2=chan2, all_channels=all_channels, invert=invert, sharpen_radius=sharpen_radius,
        tile_norm=0, augment=augment, batch_size=batch_size, block_size=list(bs),
        overlap=list(halo),
    )
    fingerprint = dict(params, shape=list(shape), input=_input_id(src), percentiles=percentiles,
                       margin=list(margin))
    _prepare_scratch(scratch, fingerprint, shape, bs)
    times = {"prepare": time.perf_counter() - t0}

    if dask_scheduler or n_workers > 1:
        model_for_tasks = loaded if loaded.path is None else str(loaded.path)
        threads = None if dask_scheduler else max(1, (os.cpu_count() or 1) // n_workers)
    else:
        model_for_tasks, threads = loaded, None
    job = Job(src=src, scratch=str(scratch), model=model_for_tasks, percentiles=percentiles,
              rescale=rescale, anisotropy=float(anisotropy), niter=niter, margin=margin,
              params=params, shape=tuple(shape), grid=grid, threads=threads, use_gpu=use_gpu)
    pending = [b for b in blocks if not _marker(scratch, b).exists()]
    log.info("%s: %d blocks of %s (+%s halo), %d to do", src.name, len(blocks),
             "x".join(map(str, bs)), "x".join(map(str, halo)), len(pending))
    t1 = time.perf_counter()
    _run_tasks(_BlockTask(job, cancel), pending, dask_scheduler, n_workers, memory_limit,
               threads, progress, cancel)
    check_cancel(cancel)
    times["blocks"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    luts, n_final = merge_labels(blocks, scratch, grid, min_size)
    dtype = np.uint16 if n_final < 65535 else np.uint32
    tmp = out_zarr.with_name(f".{out_zarr.name}.{uuid.uuid4().hex[:8]}.part")
    import zarr

    out = zarr.open_array(str(tmp), mode="w", shape=shape, chunks=output_chunks(bs, shape),
                          dtype=dtype, fill_value=0)
    out.attrs["n_masks"] = int(n_final)  # a viewer knows the count without reading the labels
    try:
        _run_tasks(_FinalTask(str(scratch), str(tmp)), list(zip(blocks, luts)), dask_scheduler,
                   1 if not dask_scheduler else n_workers, None, None, None)
        _replace_dir(tmp, out_zarr)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    times["merge"] = time.perf_counter() - t2
    if not keep_blocks:
        shutil.rmtree(scratch, ignore_errors=True)
    times["total"] = time.perf_counter() - t0
    log.info("%s: %d masks blockwise in %.1f s", src.name, n_final, times["total"])
    return BlockwiseResult(zarr_path=out_zarr, n_masks=n_final, shape=tuple(shape),
                           n_blocks=len(blocks), n_computed=len(pending),
                           diameter=float(diameter), anisotropy=float(anisotropy),
                           params=params, seconds=times)


class _BlockTask:
    """Picklable ``run_block`` bound to a job (dask sends it to workers once per task).

    The cancel token only reaches blocks run in this process; it is not pickled (workers of a
    cluster are stopped by cancelling their futures instead)."""

    def __init__(self, job: Job, cancel: Optional[CancelToken] = None):
        self.job, self.cancel = job, cancel

    def __getstate__(self):
        return {"job": self.job, "cancel": None}

    def __call__(self, block: Block) -> int:
        return run_block(block, self.job, self.cancel)


class _FinalTask:
    def __init__(self, scratch: str, target: str):
        self.scratch, self.target = scratch, target

    def __call__(self, item) -> None:
        block, lut = item
        _write_final_block(block, lut, self.scratch, self.target)


def _input_id(src: LazyVolume) -> str:
    """Identity of the input for the restart check: path, size and mtime (or a content hash
    for an in-memory array)."""
    if src.kind == "array":
        return hashlib.sha1(np.ascontiguousarray(src.array).view(np.uint8).ravel()).hexdigest()
    st = Path(src.path).stat()
    return f"{Path(src.path).resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _prepare_scratch(scratch: Path, fingerprint: dict, shape, bs) -> None:
    """Reuse the scratch folder of an interrupted run with the same input and settings;
    otherwise start it afresh."""
    import zarr

    meta = scratch / "run.json"
    text = json.dumps(fingerprint, sort_keys=True, default=str)
    if scratch.exists():
        try:
            same = meta.read_text() == text
        except OSError:
            same = False
        if same:
            done = len(list((scratch / "done").glob("*.npz")))
            log.info("resuming %s: %d block(s) already done", scratch, done)
            return
        log.warning("%s holds blocks of another input or settings: starting afresh", scratch)
        shutil.rmtree(scratch)
    (scratch / "done").mkdir(parents=True)
    zarr.open_array(str(scratch / "blocks.zarr"), mode="w", shape=tuple(shape),
                    chunks=tuple(min(b, n) for b, n in zip(bs, shape)), dtype=np.uint32,
                    fill_value=0)
    tmp = scratch / ".run.json.part"
    tmp.write_text(text)
    os.replace(tmp, meta)


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename a finished folder over ``final`` (an older result is moved aside first)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def add_blockwise_args(parser: argparse.ArgumentParser) -> None:
    """The CLI flags of blockwise segmentation."""
    g = parser.add_argument_group("blockwise (volumes larger than memory)")
    g.add_argument("--blockwise", action="store_true",
                   help="segment in overlapping blocks read lazily from disk (dask), merging "
                        "cells across block faces; chosen automatically when the volume would "
                        "not fit in memory")
    g.add_argument("--block_size", type=int, default=BLOCK_SIZE,
                   help="edge of a block in voxels (each block also reads about one cell "
                        "diameter around it); default 0: the largest blocks that stay within "
                        "4 GB each (or --memory_limit / --n_workers), which wastes the least "
                        "time on the overlaps")
    g.add_argument("--out_zarr", type=Path, default=None,
                   help="blockwise output: zarr folder for the labels (default: "
                        "NAME_cp_masks.zarr in --savedir or beside the image; with --dir, a "
                        "folder that receives one NAME_cp_masks.zarr per image); finished "
                        "blocks are kept in a NAME..._blockwise/ folder beside it until the "
                        "end, so a rerun after a crash resumes")
    g.add_argument("--dask_scheduler", default=None,
                   help="address of a running dask.distributed scheduler (tcp://host:8786) to "
                        "send blocks to; default: run them on this machine")
    g.add_argument("--n_workers", type=int, default=1,
                   help="blocks segmented at once on this machine (> 1 starts a local dask "
                        "cluster of that many processes)")
    g.add_argument("--memory_limit", default=None,
                   help="memory for blockwise work on this machine, e.g. 8GB (default: 80%% "
                        "of the free memory); fewer blocks run at once to stay under it")


def would_fit_in_memory(path: Union[str, Path], anisotropy: Optional[float] = None,
                        z_axis=None, channel_axis=None, rescale: float = 1.0) -> bool:
    """Whether the in-memory pipeline would accept this file (its memory check), judged from
    the file's header alone. ``rescale`` (diam_mean / diameter, when the diameter is known)
    enlarges the network grid as in :func:`cp3d.core.pipeline.segment`."""
    from .io import Volume
    from .pipeline import _check_memory

    try:
        src = open_lazy(path, z_axis=z_axis, channel_axis=channel_axis)
    except InputError:
        return True  # let the normal reader report the problem
    z, y, x = src.shape_zyx
    stub = Volume(data=np.broadcast_to(np.zeros((), np.uint8), (z, src.nchan, y, x)),
                  voxel_size=src.voxel_size)
    aniso = anisotropy or src.anisotropy or 1.0
    stored = int(np.prod(src.stored_shape)) * np.dtype(src.dtype).itemsize
    try:
        _check_memory(stub, aniso, src.path, rescale)
        import psutil

        if stored > 0.5 * psutil.virtual_memory().available:
            return False
    except InputError:
        return False
    except Exception:
        return True
    return True


def run_file_blockwise(path: Union[str, Path], args, model, params: dict,
                       bar=None) -> list[Path]:
    """Segment one file blockwise from the CLI's arguments (``params`` as for
    :func:`~cp3d.core.pipeline.segment`); returns the paths written: the labels zarr, and
    NAME_cp_masks.tif when the labels fit in memory. ``bar``: a tqdm bar to advance and close."""
    path = Path(path)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.set_description_str(f"{path.name} [block {done}/{total}]")
            bar.n = int(100 * done / total)
            bar.refresh()

    try:
        written = _run_file(path, args, model, params, progress)
    finally:
        if bar is not None:
            bar.close()
    return written


def _run_file(path: Path, args, model, params: dict, progress) -> list[Path]:
    from .io import imwrite, masks_tif_path, masks_zarr_path

    savedir = getattr(args, "savedir", None) or None  # None: beside the image
    out = getattr(args, "out_zarr", None)
    if out is None:
        out = masks_zarr_path(path, savedir)
    elif getattr(args, "dir", None) is not None:
        out = masks_zarr_path(path, out)  # one zarr per image of a folder
    if not params.get("do_3D", True):
        raise InputError("blockwise segmentation runs the 2.5D mode only "
                         "(no --stitch_threshold)", path)
    keys = ("diameter", "anisotropy", "flow3D_smooth", "min_size", "cellprob_threshold",
            "niter", "chan", "chan2", "all_channels", "invert", "sharpen_radius", "tile_norm",
            "augment", "batch_size")
    result = segment_blockwise(
        path, out, model, block_size=args.block_size, dask_scheduler=args.dask_scheduler,
        n_workers=args.n_workers, memory_limit=args.memory_limit, z_axis=args.z_axis,
        channel_axis=args.channel_axis, use_gpu=getattr(args, "use_gpu", False),
        progress=progress, **{k: params[k] for k in keys if k in params})
    written = [result.zarr_path]
    if not getattr(args, "no_tif", False) and _labels_fit(result):
        src = open_lazy(path, z_axis=args.z_axis, channel_axis=args.channel_axis)
        written.append(imwrite(masks_tif_path(path, savedir), result.load(),
                               voxel_size=src.voxel_size))
    elif not getattr(args, "no_tif", False):
        log.info("%s: labels too large for one tiff in memory; they are in %s", path.name, out)
    return written


def _labels_fit(result: BlockwiseResult) -> bool:
    nbytes = float(np.prod(result.shape)) * (2 if result.n_masks < 65535 else 4)
    try:
        import psutil

        return nbytes * 3 < psutil.virtual_memory().available
    except Exception:
        return nbytes < 2e9
