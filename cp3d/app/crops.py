"""Plain-Python model of the labeling mode: a folder of 2D training crops and the editable
labels of one crop (no Qt, so edits, undo and saving are testable without a display).

A crop is ``CROP.tif`` (2D, optionally with channels). Labels are read, in this order, from
``CROP_seg.npy`` (the user's labels, Cellpose's format), ``CROP_masks.tif`` or
``CROP_cp_masks.tif`` (a model's prediction), else start empty. Every edit is saved back to
``CROP_seg.npy`` atomically by :mod:`cp3d.core.io`, so nothing is lost on a crash.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .state import LabelEdit, UndoStack

MASK_SUFFIXES = ("_seg.npy", "_masks.tif", "_masks.tiff", "_cp_masks.tif", "_flows.tif")
IMAGE_SUFFIXES = (".tif", ".tiff")


def list_crops(folder: str | Path) -> list[Path]:
    """The crop images of a folder (sorted), leaving out mask and flow files."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(p.name.endswith(s) for s in MASK_SUFFIXES)
                  and not p.name.startswith("."))


def seg_path(crop: Path) -> Path:
    return crop.with_name(crop.stem + "_seg.npy")


def prediction_paths(crop: Path) -> list[Path]:
    return [crop.with_name(crop.stem + s) for s in ("_masks.tif", "_masks.tiff", "_cp_masks.tif")]


def read_crop(path: Path) -> np.ndarray:
    """A crop as (C, Y, X) float32 through cp3d.core.io (2D images only)."""
    from cp3d.core.errors import InputError
    from cp3d.core.io import read_volume

    vol = read_volume(path)
    if vol.data.shape[0] != 1:
        raise InputError(f"a training crop must be 2D, this one has {vol.data.shape[0]} planes",
                         path)
    return np.asarray(vol.data[0], dtype=np.float32)


def read_labels(crop: Path, shape: tuple[int, int]) -> tuple[np.ndarray | None, str]:
    """(labels, where they came from: "labels", "prediction" or "") for a crop."""
    import tifffile

    from cp3d.core.io import load_seg_npy

    seg = seg_path(crop)
    if seg.exists():
        m = np.squeeze(np.asarray(load_seg_npy(seg)["masks"]))
        if m.shape == tuple(shape):
            return m.astype(np.uint32), "labels"
    for p in prediction_paths(crop):
        if p.exists():
            m = np.squeeze(tifffile.imread(p))
            if m.shape == tuple(shape):
                return m.astype(np.uint32), "prediction"
    return None, ""


def count_labels(path: Path) -> int:
    """Masks in a crop's saved labels (0 when it has none): what training would use."""
    seg = seg_path(path)
    if not seg.exists():
        return 0
    try:
        from cp3d.core.io import load_seg_npy

        m = np.asarray(load_seg_npy(seg)["masks"])
    except Exception:
        return 0
    return int(len(np.unique(m)) - 1) if m.size else 0


def polygon_mask(points, shape: tuple[int, int]) -> np.ndarray:
    """Pixels whose centre lies inside a closed polygon of (row, col) points, pixel centres
    at integer coordinates (even-odd rule, scanline: one pass over the rows it spans)."""
    out = np.zeros(shape, bool)
    pts = np.asarray(points, float).reshape(-1, 2)
    if len(pts) < 3:
        return out
    r0, c0 = pts[:, 0], pts[:, 1]
    r1, c1 = np.roll(r0, -1), np.roll(c0, -1)
    top = max(int(np.ceil(r0.min())), 0)
    bottom = min(int(np.floor(r0.max())), shape[0] - 1)
    for row in range(top, bottom + 1):
        y = float(row)
        cross = (r0 <= y) != (r1 <= y)
        if not cross.any():
            continue
        xs = c0[cross] + (y - r0[cross]) * (c1[cross] - c0[cross]) / (r1[cross] - r0[cross])
        xs.sort()
        for a, b in zip(xs[0::2], xs[1::2]):
            lo = max(int(np.ceil(a)), 0)
            hi = min(int(np.floor(b)), shape[1] - 1)
            if hi >= lo:
                out[row, lo:hi + 1] = True
    return out


def stroke_mask(points, radius: float, shape: tuple[int, int]) -> np.ndarray:
    """Pixels a round brush of ``radius`` covers along a polyline of (row, col) points
    (computed in the stroke's bounding box only, so long strokes on big crops stay quick)."""
    out = np.zeros(shape, bool)
    pts = np.asarray(points, float).reshape(-1, 2)
    if len(pts) == 0:
        return out
    radius = max(float(radius), 0.5)
    dense = [pts[0]]
    for a, b in zip(pts[:-1], pts[1:]):  # fill gaps so fast strokes stay continuous
        n = int(np.ceil(np.linalg.norm(b - a) / max(radius * 0.5, 0.5)))
        dense += [a + (b - a) * t for t in np.linspace(0, 1, n + 1)[1:]]
    dense = np.asarray(dense)
    lo = np.maximum(np.floor(dense.min(axis=0) - radius), 0).astype(int)
    hi = np.minimum(np.ceil(dense.max(axis=0) + radius) + 1, shape).astype(int)
    if (hi <= lo).any():
        return out
    rr, cc = np.ogrid[lo[0]:hi[0], lo[1]:hi[1]]
    box = out[lo[0]:hi[0], lo[1]:hi[1]]
    for r, c in dense:
        box |= (rr - r) ** 2 + (cc - c) ** 2 <= radius ** 2
    return out


class CropLabels:
    """The labels of one crop with undo/redo; ``on_change`` runs after every edit (the
    labeling window saves and redraws there)."""

    def __init__(self, labels: np.ndarray, on_change: Callable[[], None] | None = None):
        self.labels = np.ascontiguousarray(labels, dtype=np.uint32)
        self.undo = UndoStack(max_bytes=64 * 1024 * 1024)
        self.on_change = on_change
        self.edited = False

    @property
    def n_masks(self) -> int:
        return int(len(np.unique(self.labels)) - 1) if self.labels.any() else 0

    def next_label(self) -> int:
        return int(self.labels.max()) + 1

    def label_at(self, row: int, col: int) -> int:
        h, w = self.labels.shape
        if 0 <= row < h and 0 <= col < w:
            return int(self.labels[row, col])
        return 0

    def _apply(self, description: str, where: np.ndarray, value: int) -> bool:
        flat = self.labels.reshape(-1)
        index = np.flatnonzero(where.reshape(-1) & (flat != value))
        if index.size == 0:
            return False
        old = flat[index].copy()
        flat[index] = value
        self.undo.push(LabelEdit(description, index, old, np.full(index.shape, value, flat.dtype)))
        self._changed()
        return True

    def _changed(self) -> None:
        self.edited = True
        if self.on_change is not None:
            self.on_change()

    def add_polygon(self, points) -> int:
        """A new mask from a closed outline, over background pixels only (neighbours stay
        intact). Returns its label, 0 if the outline enclosed no free pixel."""
        area = polygon_mask(points, self.labels.shape) & (self.labels == 0)
        label = self.next_label()
        return label if self._apply(f"draw mask {label}", area, label) else 0

    def paint(self, points, radius: float, label: int) -> bool:
        """Brush stroke: label ``label`` (0 erases) under a round brush along the points."""
        area = stroke_mask(points, radius, self.labels.shape)
        what = "erase" if label == 0 else f"brush mask {label}"
        return self._apply(what, area, int(label))

    def delete(self, labels) -> bool:
        labels = [int(v) for v in labels if v]
        if not labels:
            return False
        return self._apply(f"delete {', '.join(map(str, labels))}", np.isin(self.labels, labels), 0)

    def merge(self, labels) -> int:
        labels = sorted({int(v) for v in labels if v})
        if len(labels) < 2:
            return 0
        self._apply(f"merge {', '.join(map(str, labels))}", np.isin(self.labels, labels[1:]),
                    labels[0])
        return labels[0]

    def replace(self, new: np.ndarray, description: str = "replace", notify: bool = True) -> bool:
        """All labels at once (a prediction), as one undoable edit. ``notify=False``: do not
        call ``on_change`` (a prediction is not the user's labels until accepted)."""
        flat = self.labels.reshape(-1)
        new_flat = np.asarray(new).reshape(-1).astype(flat.dtype)
        if new_flat.shape != flat.shape:
            raise ValueError(f"labels shaped {np.shape(new)} do not fit {self.labels.shape}")
        index = np.flatnonzero(flat != new_flat)
        if index.size == 0:
            return False
        old = flat[index].copy()
        flat[index] = new_flat[index]
        self.undo.push(LabelEdit(description, index, old, new_flat[index].copy()))
        if notify:
            self._changed()
        return True

    def undo_edit(self) -> str | None:
        if not self.undo.can_undo:
            return None
        e = self.undo.done.pop()
        self.labels.reshape(-1)[e.index] = e.old
        self.undo.undone.append(e)
        self._changed()
        return e.description

    def redo_edit(self) -> str | None:
        if not self.undo.can_redo:
            return None
        e = self.undo.undone.pop()
        self.labels.reshape(-1)[e.index] = e.new
        self.undo.done.append(e)
        self._changed()
        return e.description


def save_labels(crop: Path, labels: np.ndarray, diameter: float = 0.0) -> Path:
    """Write ``CROP_seg.npy`` (Cellpose's format, no flows) atomically; masks marked manual."""
    from cp3d.core.io import save_seg_npy

    labels = np.asarray(labels)
    n = int(labels.max()) if labels.size else 0
    return save_seg_npy(seg_path(crop), labels, None, None, crop, diameter,
                        extra={"ismanual": np.ones(n, bool), "cp3d_labeled": True})
