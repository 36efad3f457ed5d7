"""The app's only door into cp3d.core, imported lazily.

Lazy because cp3d.core.pipeline/models pull in torch (seconds to import), which must not
delay the window. Tests replace single methods (e.g. ``segment``) with fakes.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any


class Backend:
    """Thin wrapper over cp3d.core with a model cache; every method may run in a worker thread."""

    def __init__(self) -> None:
        self._model_cache: dict[tuple[str, bool], Any] = {}
        self._lock = threading.Lock()

    # ---- io ----------------------------------------------------------------------------
    def read_volume(self, path, z_axis=None, channel_axis=None):
        from cp3d.core.io import read_volume

        return read_volume(path, z_axis=z_axis, channel_axis=channel_axis)

    def axes_hint(self, volume) -> str:
        """'; its N channels may be Z planes...' for a plane with many channels, else ''."""
        from cp3d.core.io import many_channels_hint

        return many_channels_hint(volume, "use File > Reopen with other axes and make the "
                                          "channel axis the Z axis")

    def stored_layout(self, path, z_axis=None, channel_axis=None):
        """(shape as stored, (z_axis, channel_axis) it is read with) from the file's header;
        for a file whose axes cannot be told, the core's suggestion."""
        from cp3d.core.blockwise import open_lazy
        from cp3d.core.io import AmbiguousAxesError

        try:
            lazy = open_lazy(path, z_axis=z_axis, channel_axis=channel_axis)
        except AmbiguousAxesError as e:
            return e.shape, tuple(e.suggested or (None, None))
        return tuple(lazy.stored_shape), (lazy.z_axis, lazy.channel_axis)

    def ambiguous_axes_error(self) -> type[BaseException]:
        """The exception class read_volume raises when it needs the user to name the axes."""
        try:
            from cp3d.core.io import AmbiguousAxesError

            return AmbiguousAxesError
        except ImportError:  # older core: nothing is ambiguous
            class _Never(Exception):
                pass

            return _Never

    def save_results(self, volume, result, savedir=None) -> list[Path]:
        from cp3d.core.io import save_results

        return list(save_results(volume, result, savedir=savedir, save_tif=True, save_npy=True))

    def seg_npy_path(self, image_path) -> Path:
        from cp3d.core.io import seg_npy_path

        return Path(seg_npy_path(image_path))

    def masks_zarr_path(self, image_path) -> Path:
        """Where blockwise labels go: NAME_cp_masks.zarr beside the image."""
        from cp3d.core.io import masks_zarr_path

        return Path(masks_zarr_path(image_path))

    def load_seg_npy(self, path) -> dict:
        from cp3d.core.io import load_seg_npy

        return load_seg_npy(path)

    # ---- models ------------------------------------------------------------------------
    def list_models(self) -> list:
        from cp3d.core.models import list_models

        return list(list_models())

    def load_model(self, name_or_path: str | None, use_gpu: bool = False):
        """Load once per (model, device) and reuse: loading costs more than a small run."""
        key = (str(name_or_path), bool(use_gpu))
        with self._lock:
            if key not in self._model_cache:
                from cp3d.core import models

                device = None
                if hasattr(models, "pick_device"):
                    device = models.pick_device(use_gpu)
                try:
                    model = models.load_model(name_or_path, device=device)
                except TypeError:
                    model = models.load_model(name_or_path)
                self._model_cache.clear()  # keep one model in memory
                self._model_cache[key] = model
            return self._model_cache[key]

    # ---- segmentation ------------------------------------------------------------------
    def segment(self, volume, model, **params):
        from cp3d.core.pipeline import segment

        return segment(volume, model, **params)

    # ---- volumes larger than memory ------------------------------------------------------
    def would_fit_in_memory(self, path, anisotropy=None, z_axis=None, channel_axis=None) -> bool:
        """False when the in-memory pipeline would refuse this file: open it blockwise."""
        from cp3d.core.blockwise import would_fit_in_memory

        return bool(would_fit_in_memory(path, anisotropy, z_axis, channel_axis))

    def open_lazy(self, path, z_axis=None, channel_axis=None):
        """A cp3d.core.blockwise.LazyVolume: header only, planes read on demand."""
        from cp3d.core.blockwise import open_lazy

        return open_lazy(path, z_axis=z_axis, channel_axis=channel_axis)

    def segment_blockwise(self, source, out_zarr, model, **params):
        """cp3d.core.blockwise.segment_blockwise (params: block_size, progress, ...)."""
        from cp3d.core.blockwise import segment_blockwise

        return segment_blockwise(source, out_zarr, model, **params)

    def estimate_diameter(self, volume, model, **params) -> float:
        """Cell diameter in XY pixels (cp3d.core.size; params: chan, chan2, invert, ...)."""
        from cp3d.core.size import estimate_diameter

        return float(estimate_diameter(volume, model, **params))

    def make_train_file(self, path, **params) -> list[Path]:
        from cp3d.core.make_train import make_train_file

        return make_train_file(path, **params)

    def cancelled_error(self) -> type[BaseException]:
        from cp3d.core.errors import Cancelled

        return Cancelled

    def user_error(self) -> type[BaseException]:
        from cp3d.core.errors import Cp3dError

        return Cp3dError

    def too_large_error(self) -> type[BaseException]:
        from cp3d.core.errors import TooLargeError

        return TooLargeError
