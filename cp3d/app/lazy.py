"""Array-like views of volumes on disk that read only what the app shows.

For volumes larger than memory (blockwise segmentation): the slice views index one plane
(``a[z]``, ``a[:, y, :]``, ``a[:, :, x]``), the 3D view asks for a strided subsample
(``a[::sz, ::sy, ::sx]``), and nothing else is read. No Qt here.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from .render import orient, plane, plane_index

PREVIEW_MAX_VOXELS = 128 ** 3  # 3D view and contrast sample of a lazy volume


def preview_steps(shape: tuple, max_voxels: int = PREVIEW_MAX_VOXELS) -> tuple[int, int, int]:
    """Smallest integer strides (z, y, x) that bring ``shape`` under ``max_voxels``."""
    steps = [1, 1, 1]
    while np.prod([-(-n // s) for n, s in zip(shape, steps)]) > max_voxels:
        sides = [-(-n // s) for n, s in zip(shape, steps)]
        steps[int(np.argmax(sides))] += 1
    return tuple(steps)


class LazyArray3D:
    """A (Z, Y, X) array read on demand through ``read(zs, ys, xs)`` (unit-step slices).

    Indexing takes ints and slices (any step); strided reads go plane by plane, so memory
    stays at one plane plus the result. The last few reads are cached, since every redraw
    asks for the same three planes."""

    lazy = True

    def __init__(self, read: Callable[[slice, slice, slice], np.ndarray], shape: tuple,
                 dtype, n_labels: Optional[int] = None,
                 read_strided: Optional[Callable[[slice, slice, slice], np.ndarray]] = None):
        self._read = read
        # A store that reads stepped slices itself (zarr) does it chunk by chunk: plane by
        # plane, every plane would decompress its chunks' full depth again (38 s, not 2.4 s,
        # for the preview of 512x1024x1024 labels in 64^3 chunks).
        self._read_strided = read_strided
        self._previews: dict = {}
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self.n_labels = n_labels  # labels: the largest id, known from the run
        self._cache: dict = {}
        self._cache_lock = threading.Lock()  # the PlaneReader thread fills the cache too

    ndim = 3

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @staticmethod
    def _normalize(key) -> tuple[tuple, tuple]:
        if not isinstance(key, tuple):
            key = (key,)
        key = key + (slice(None),) * (3 - len(key))
        cache_key = tuple((k.start, k.stop, k.step) if isinstance(k, slice) else int(k)
                          for k in key)
        return key, cache_key

    def cached(self, key) -> Optional[np.ndarray]:
        """What ``self[key]`` would return if it is already in memory, else None."""
        with self._cache_lock:
            return self._cache.get(self._normalize(key)[1])

    def __getitem__(self, key) -> np.ndarray:
        key, cache_key = self._normalize(key)
        with self._cache_lock:
            if cache_key in self._cache:
                return self._cache[cache_key]
        out = self._get(key)
        if np.ndim(out) == 0:
            return out  # single voxels (the status line) would only push planes out
        with self._cache_lock:
            if len(self._cache) >= 6:
                self._cache.pop(next(iter(self._cache)))
            self._cache[cache_key] = out
        return out

    def _get(self, key) -> np.ndarray:
        unit, strides, drop = [], [], []
        for axis, (k, n) in enumerate(zip(key, self.shape)):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 1:
                    raise IndexError("negative steps are not supported")
                unit.append(slice(start, max(start, stop)))
                strides.append(step)
            else:
                i = int(k) + (n if int(k) < 0 else 0)
                if not 0 <= i < n:
                    raise IndexError(f"index {k} out of range for axis {axis} of size {n}")
                unit.append(slice(i, i + 1))
                strides.append(1)
                drop.append(axis)
        zs, ys, xs = unit
        if strides == [1, 1, 1]:
            out = np.asarray(self._read(zs, ys, xs))
        elif self._read_strided is not None:
            out = np.asarray(self._read_strided(*(slice(u.start, u.stop, st)
                                                  for u, st in zip(unit, strides))))
        else:
            planes = [np.asarray(self._read(slice(z, z + 1), ys, xs))[0, ::strides[1], ::strides[2]]
                      for z in range(zs.start, zs.stop, strides[0])]
            out = np.stack(planes) if planes else np.zeros((0, 0, 0), self.dtype)
        if len(drop) == 3:
            return out.reshape(())[()]  # one voxel: a numpy scalar
        return out.reshape([s for a, s in enumerate(out.shape) if a not in drop]) if drop \
            else out

    def preview(self, max_voxels: int = PREVIEW_MAX_VOXELS) -> np.ndarray:
        """A strided subsample of at most ``max_voxels`` (contrast, 3D view), kept once read:
        it touches the whole file, so the loader thread reads it before the GUI asks."""
        with self._cache_lock:
            hit = self._previews.get(max_voxels)
        if hit is None:
            s = preview_steps(self.shape, max_voxels)
            hit = self._get((slice(None, None, s[0]), slice(None, None, s[1]),
                             slice(None, None, s[2])))
            with self._cache_lock:
                self._previews[max_voxels] = hit
        return hit

    def max(self) -> int:
        """Largest label id: the run's count when known, else the preview's maximum."""
        if self.n_labels is not None:
            return int(self.n_labels)
        p = self.preview()
        return int(p.max()) if p.size else 0


class LazyImage:
    """(Z, C, Y, X) view of a :class:`cp3d.core.blockwise.LazyVolume`; ``image[:, c]`` gives
    the lazy (Z, Y, X) channel the views read from."""

    lazy = True
    ndim = 4

    def __init__(self, source: Any):
        self.source = source
        z, y, x = source.shape_zyx
        self.shape = (z, source.nchan, y, x)
        self.dtype = np.dtype(source.dtype)
        self._channels: dict[int, LazyArray3D] = {}
        self._read_lock = threading.Lock()  # one file handle: one read at a time

    def __getitem__(self, key):
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None)
                and isinstance(key[1], (int, np.integer))):
            c = int(key[1])
            if c not in self._channels:
                def read(zs, ys, xs, c=c):
                    with self._read_lock:
                        return self.source.read(zs, ys, xs)[:, c]

                self._channels[c] = LazyArray3D(read, (self.shape[0],) + self.shape[2:],
                                                self.dtype)
            return self._channels[c]
        raise IndexError("a lazy image is indexed by channel only: image[:, c]")


class PlaneReader:
    """Reads planes of lazy arrays on one background thread, so the GUI thread never waits
    for the disk (an XZ plane of a large tiff touches every page of the file).

    :meth:`plane` answers at once: the plane when it is in memory, else None after queueing
    its read; ``on_ready()`` is called from the reading thread when a queued plane lands in
    the array's cache (the window then redraws)."""

    def __init__(self, on_ready: Callable[[], None]):
        self._on_ready = on_ready
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cp3d-planes")
        self._queued: set = set()
        self._wanted: dict = {}  # (array, view) -> the plane the view shows next
        self._lock = threading.Lock()

    def plane(self, arr, view: str, pos: tuple[int, int, int]) -> Optional[np.ndarray]:
        """``render.plane(arr, view, pos)`` if it needs no disk read, else None (queued)."""
        if not is_lazy(arr):
            return None if arr is None else plane(arr, view, pos)
        key = plane_index(view, pos)
        hit = arr.cached(key)
        if hit is not None:
            return orient(hit, view)
        ident = (id(arr), LazyArray3D._normalize(key)[1])
        with self._lock:
            # scrolling asks for many planes: only the newest one of each view is still read
            self._wanted[(id(arr), view)] = ident
            if ident in self._queued:
                return None
            self._queued.add(ident)
        self._pool.submit(self._read, arr, view, key, ident)
        return None

    def _read(self, arr, view: str, key, ident) -> None:
        try:
            with self._lock:
                if self._wanted.get((id(arr), view)) != ident:
                    return  # the cursor has moved on
            arr[key]
        except Exception as e:  # the view keeps its last plane; no redraw, so no retry loop
            import logging

            logging.getLogger("cp3d").warning("could not read a plane from disk: %s", e)
            return
        finally:
            with self._lock:
                self._queued.discard(ident)
        try:
            self._on_ready()
        except RuntimeError:  # the window is gone
            pass

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class LazyVolumeView:
    """What the app keeps as ``state.volume`` for a volume read lazily."""

    data: LazyImage
    path: Optional[Path]
    voxel_size: Optional[tuple]
    source: Any  # the core LazyVolume, given to segment_blockwise
    lazy: bool = True

    @property
    def anisotropy(self) -> Optional[float]:
        return self.source.anisotropy


def is_lazy(obj) -> bool:
    return bool(getattr(obj, "lazy", False))


def lazy_volume(source) -> LazyVolumeView:
    """Wrap a core LazyVolume for AppState.set_volume."""
    return LazyVolumeView(data=LazyImage(source), path=source.path,
                          voxel_size=source.voxel_size, source=source)


def lazy_labels(zarr_path, n_labels: Optional[int] = None) -> LazyArray3D:
    """The labels of a blockwise run, opened lazily from their zarr."""
    import zarr

    arr = zarr.open_array(str(zarr_path), mode="r")
    if arr.ndim != 3:
        raise ValueError(f"{zarr_path}: labels have {arr.ndim} dimensions, expected 3")
    if n_labels is None and "n_masks" in arr.attrs:  # written by the blockwise run
        n_labels = int(arr.attrs["n_masks"])

    def read(zs, ys, xs):
        return arr[zs, ys, xs]

    return LazyArray3D(read, arr.shape, arr.dtype, n_labels, read_strided=read)
