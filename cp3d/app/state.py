"""Plain-Python model behind the GUI: volume, masks, cursor, selection and undo stack.

Kept free of Qt so that edits (delete, merge, undo) are testable without a display and
so that views only *read* it and redraw when told (napari style: thin Qt layer on top).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .lazy import is_lazy


class Events:
    """Minimal observer hub: ``connect(name, fn)`` then ``emit(name)`` calls every fn."""

    def __init__(self) -> None:
        self._handlers: dict[str, list[Callable[[], None]]] = {}

    def connect(self, name: str, fn: Callable[[], None]) -> None:
        self._handlers.setdefault(name, []).append(fn)

    def emit(self, name: str) -> None:
        for fn in list(self._handlers.get(name, [])):
            fn()


@dataclass
class LabelEdit:
    """One undoable change: the flat voxel indices touched and their labels before/after."""

    description: str
    index: np.ndarray
    old: np.ndarray
    new: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.index.nbytes + self.old.nbytes + self.new.nbytes


@dataclass
class UndoStack:
    """Edits as sparse label diffs, so undo costs memory only for the voxels changed."""

    done: list[LabelEdit] = field(default_factory=list)
    undone: list[LabelEdit] = field(default_factory=list)
    max_bytes: int = 512 * 1024 * 1024

    def push(self, edit: LabelEdit) -> None:
        self.done.append(edit)
        self.undone.clear()
        while len(self.done) > 1 and sum(e.nbytes for e in self.done) > self.max_bytes:
            self.done.pop(0)

    def clear(self) -> None:
        self.done.clear()
        self.undone.clear()

    @property
    def can_undo(self) -> bool:
        return bool(self.done)

    @property
    def can_redo(self) -> bool:
        return bool(self.undone)


class AppState:
    """Everything the views show. Views subscribe to ``events``:

    - "image": a new volume was loaded (shape may have changed)
    - "masks": label volume replaced or edited
    - "position": the cursor (z, y, x) moved
    - "selection": selected label ids changed
    - "display": channel, contrast, opacity, outlines or anisotropy changed
    """

    def __init__(self) -> None:
        self.events = Events()
        self.volume = None  # cp3d.core.io.Volume or any object with .data/.path/.voxel_size
        self.image: np.ndarray | None = None  # (Z, C, Y, X)
        self.path: Path | None = None
        self.masks: np.ndarray | None = None  # (Z, Y, X) integer labels, 0 = background
        self.position = [0, 0, 0]  # z, y, x
        self.selection: list[int] = []
        self.undo = UndoStack()
        self.dirty = False  # masks differ from what is on disk
        self.masks_change = "replace"  # last "masks" event: "replace" (new masks) or "edit"
        self.channel = 0
        self.contrast = (0.0, 1.0)
        self.opacity = 0.45
        self.outlines = True
        self.show_masks = True
        self.anisotropy = 1.0  # z step / xy step, for display aspect

    # ---- loading -------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(Z, Y, X) of the loaded image."""
        if self.image is None:
            return None
        z, _, y, x = self.image.shape
        return (z, y, x)

    @property
    def is_2d(self) -> bool:
        return self.image is not None and self.image.shape[0] == 1

    @property
    def n_channels(self) -> int:
        return 0 if self.image is None else self.image.shape[1]

    def set_volume(self, volume, masks: np.ndarray | None = None) -> None:
        """Show a new volume; optional masks (e.g. restored from NAME_seg.npy)."""
        data = volume.data if is_lazy(volume.data) else np.asarray(volume.data)
        if data.ndim != 4:
            raise ValueError(f"expected image shaped (Z, C, Y, X), got {data.shape}")
        self.volume = volume
        self.image = data
        self.path = Path(volume.path) if getattr(volume, "path", None) is not None else None
        z, _, y, x = data.shape
        self.position = [z // 2, y // 2, x // 2]
        self.channel = min(self.channel, data.shape[1] - 1)
        aniso = getattr(volume, "anisotropy", None)
        self.anisotropy = float(aniso) if aniso else 1.0
        self.contrast = auto_contrast(self.channel_data())
        self.selection = []
        self.undo.clear()
        self.masks = None
        self.dirty = False
        self.events.emit("image")
        self._set_masks(masks)

    def channel_data(self, channel: int | None = None) -> np.ndarray:
        """(Z, Y, X) view of one channel."""
        assert self.image is not None
        c = self.channel if channel is None else channel
        return self.image[:, c]

    def set_masks(self, masks: np.ndarray | None, dirty: bool = False) -> None:
        """Replace the label volume (new segmentation): clears selection and undo history."""
        self.selection = []
        self.undo.clear()
        self._set_masks(masks)
        self.dirty = dirty
        self.events.emit("selection")

    @property
    def masks_read_only(self) -> bool:
        """Labels read lazily from a zarr (blockwise result): shown, not edited."""
        return is_lazy(self.masks)

    def _set_masks(self, masks: np.ndarray | None) -> None:
        if is_lazy(masks):
            if self.shape is not None and masks.shape != self.shape:
                raise ValueError(f"masks shaped {masks.shape} do not match image {self.shape}")
        elif masks is not None:
            masks = np.asarray(masks)
            if self.is_2d and masks.ndim == 2:
                masks = masks[None]
            if self.shape is not None and masks.shape != self.shape:
                raise ValueError(f"masks shaped {masks.shape} do not match image {self.shape}")
            if not np.issubdtype(masks.dtype, np.integer):
                masks = masks.astype(np.uint32)
            masks = np.ascontiguousarray(masks)
        self.masks = masks
        self.masks_change = "replace"
        self.events.emit("masks")

    # ---- cursor, selection, display -----------------------------------------------------
    def set_position(self, z: int | None = None, y: int | None = None,
                     x: int | None = None) -> None:
        if self.shape is None:
            return
        new = list(self.position)
        for i, v in enumerate((z, y, x)):
            if v is not None:
                new[i] = int(np.clip(v, 0, self.shape[i] - 1))
        if new != self.position:
            self.position = new
            self.events.emit("position")

    def label_at(self, z: int, y: int, x: int) -> int:
        if self.masks is None:
            return 0
        return int(self.masks[z, y, x])

    def select(self, label: int, add: bool = False) -> None:
        """Click semantics: plain click selects one label (0 clears); add toggles it."""
        if add:
            if label == 0:
                return
            sel = list(self.selection)
            if label in sel:
                sel.remove(label)
            else:
                sel.append(label)
        else:
            sel = [label] if label else []
        if sel != self.selection:
            self.selection = sel
            self.events.emit("selection")

    def set_display(self, **kw) -> None:
        """Change any of channel, contrast, opacity, outlines, show_masks, anisotropy."""
        changed = False
        for k, v in kw.items():
            if k not in ("channel", "contrast", "opacity", "outlines", "show_masks", "anisotropy"):
                raise AttributeError(k)
            if getattr(self, k) != v:
                setattr(self, k, v)
                changed = True
        if changed:
            self.events.emit("display")

    # ---- edits -------------------------------------------------------------------------
    def _apply(self, description: str, index: np.ndarray, new_value: int) -> bool:
        assert self.masks is not None
        if index.size == 0:
            return False
        flat = self.masks.reshape(-1)
        old = flat[index].copy()
        new = np.full(index.shape, new_value, dtype=self.masks.dtype)
        flat[index] = new
        self.undo.push(LabelEdit(description, index, old, new))
        self.dirty = True
        self.masks_change = "edit"
        self.events.emit("masks")
        return True

    def delete_labels(self, labels: list[int] | None = None) -> bool:
        """Set the given (default: selected) labels to background. Returns True if changed."""
        labels = [int(v) for v in (self.selection if labels is None else labels) if v]
        if self.masks is None or not labels or self.masks_read_only:
            return False
        index = np.flatnonzero(np.isin(self.masks.reshape(-1), labels))
        name = ", ".join(str(v) for v in labels)
        done = self._apply(f"delete {name}", index, 0)
        self.selection = []
        self.events.emit("selection")
        return done

    def merge_labels(self, labels: list[int] | None = None) -> int:
        """Relabel the given (default: selected) labels to the smallest id. Returns that id."""
        labels = sorted({int(v) for v in (self.selection if labels is None else labels) if v})
        if self.masks is None or len(labels) < 2 or self.masks_read_only:
            return 0
        target, others = labels[0], labels[1:]
        index = np.flatnonzero(np.isin(self.masks.reshape(-1), others))
        self._apply(f"merge {', '.join(map(str, labels))}", index, target)
        self.selection = [target]
        self.events.emit("selection")
        return target

    def undo_edit(self) -> str | None:
        if self.masks is None or not self.undo.can_undo:
            return None
        edit = self.undo.done.pop()
        self.masks.reshape(-1)[edit.index] = edit.old
        self.undo.undone.append(edit)
        self.dirty = True
        self.masks_change = "edit"
        self.events.emit("masks")
        return edit.description

    def redo_edit(self) -> str | None:
        if self.masks is None or not self.undo.can_redo:
            return None
        edit = self.undo.undone.pop()
        self.masks.reshape(-1)[edit.index] = edit.new
        self.undo.done.append(edit)
        self.dirty = True
        self.masks_change = "edit"
        self.events.emit("masks")
        return edit.description


def auto_contrast(data: np.ndarray, lower: float = 0.5, upper: float = 99.8) -> tuple[float, float]:
    """Percentile contrast on a subsample, so it is instant even for large volumes."""
    if is_lazy(data):
        data = data.preview()
    flat = np.asarray(data).reshape(-1)
    step = max(1, flat.size // 2_000_000)
    sample = flat[::step].astype(np.float32, copy=False)
    if sample.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(sample, [lower, upper])
    if not np.isfinite(lo) or not np.isfinite(hi):
        lo, hi = 0.0, 1.0
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def data_range(data: np.ndarray) -> tuple[float, float]:
    """Min/max on a subsample (slider range for contrast)."""
    if is_lazy(data):
        data = data.preview()
    flat = np.asarray(data).reshape(-1)
    step = max(1, flat.size // 4_000_000)
    sample = flat[::step]
    lo, hi = float(np.min(sample)), float(np.max(sample))
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi
