"""Labeling mode: correct or draw the masks of a folder of 2D training crops (made by
``cp3d-cli make-train``), then train on them (:mod:`cp3d.app.train_dialog`).

Thin Qt layer: files, labels and undo live in :mod:`cp3d.app.crops`, drawing in
:mod:`cp3d.app.label_canvas`; predictions run through the app's backend in a worker thread.
Every edit is written to ``CROP_seg.npy`` at once (atomically), so a crash loses nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PySide6.QtCore import Qt
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QToolBar,
)

from . import crops
from .label_canvas import LabelCanvas
from .state import auto_contrast
from .worker import SegmentWorker, start_worker

log = logging.getLogger("cp3d.app")

HELP = """Labeling shortcuts (F1 or ? hides this)
D   draw: outline a new mask, filled on release
B   brush: paint (starting inside a mask extends it)
E   erase brush
S   select: click a mask, Ctrl+click adds one
Del   delete the selected masks       M   merge them
Ctrl+Z / Ctrl+Shift+Z   undo / redo
[  ]   brush size
Wheel   zoom      right-drag   pan      0   fit
N / PgDn   next crop      P / PgUp   previous crop
Enter   accept the shown masks as this crop's labels
Ctrl+P   predict with the current model
Labels are saved after every edit (CROP_seg.npy)."""


class LabelingWindow(QMainWindow):
    """Labels a folder of crops. ``host`` (the main window, optional) provides the backend,
    the model and settings for predictions, and receives the model after training."""

    def __init__(self, folder: str | Path, backend=None, host=None):
        super().__init__(host)
        self.setWindowFlag(Qt.Window, True)
        self.folder = Path(folder)
        self.host = host
        self.backend = backend if backend is not None else getattr(host, "backend", None)
        if self.backend is None:
            from .backend import Backend

            self.backend = Backend()
        self.crops = crops.list_crops(self.folder)
        self.counts = {p: crops.count_labels(p) for p in self.crops}
        self.index = -1
        self.image: np.ndarray | None = None  # (C, Y, X) of the current crop
        self.doc: crops.CropLabels | None = None
        self.source = ""  # where the shown labels came from
        self.selection: list[int] = []
        self.errors: list[str] = []
        self.worker = None
        self.thread = None
        self.train_dialog = None
        self._stroke_label = 0

        self.setWindowTitle(f"cp3d — label training crops — {self.folder}")
        self.resize(1100, 820)
        self.canvas = LabelCanvas()
        self.canvas.stroke_finished.connect(self._stroke)
        self.canvas.clicked.connect(self._clicked)
        self.canvas.message = (f"No crops (.tif) in {self.folder}.\n\nMake some with\n"
                               "cp3d-cli make-train --image_path stack.tif")
        self.setCentralWidget(self.canvas)
        self._build_toolbar()
        self._build_statusbar()
        self.set_tool("draw")
        if self.crops:
            self.go(0)
        self._update()
        self.canvas.setFocus()

    # =====================================================================================
    # construction
    # =====================================================================================
    def _act(self, text, slot, keys=(), tip="", checkable=False) -> QAction:
        a = QAction(text, self)
        a.triggered.connect(slot)
        if keys:
            a.setShortcuts([QKeySequence(k) for k in keys])
        shown = ", ".join(QKeySequence(k).toString() for k in keys)
        a.setToolTip(f"{tip or text}" + (f" ({shown})" if shown else ""))
        a.setCheckable(checkable)
        self.addAction(a)
        return a

    def _build_toolbar(self) -> None:
        tb = QToolBar("Labeling")
        tb.setMovable(False)
        tb.setToolButtonStyle(Qt.ToolButtonTextOnly)
        self.addToolBar(Qt.TopToolBarArea, tb)
        self.act_prev = self._act("◀ Previous", lambda: self.go(self.index - 1),
                                  ["P", "PgUp"], "Previous crop")
        self.act_next = self._act("Next ▶", lambda: self.go(self.index + 1),
                                  ["N", "PgDown"], "Next crop")
        tb.addAction(self.act_prev)
        tb.addAction(self.act_next)
        tb.addSeparator()
        self.tool_actions = {}
        group = QActionGroup(self)
        for tool, key, tip in (("draw", "D", "Outline a new mask; it is filled on release"),
                               ("brush", "B", "Paint a mask (starting inside a mask extends it)"),
                               ("erase", "E", "Erase mask pixels"),
                               ("select", "S", "Click a mask to select it; Ctrl+click adds")):
            a = self._act(tool.capitalize(), lambda checked=False, t=tool: self.set_tool(t),
                          [key], tip, checkable=True)
            group.addAction(a)
            tb.addAction(a)
            self.tool_actions[tool] = a
        self.brush = QSpinBox(minimum=1, maximum=100)
        self.brush.setValue(4)
        self.brush.setPrefix("brush ")
        self.brush.setSuffix(" px")
        self.brush.setToolTip("Brush radius in pixels ([ and ] change it)")
        self.brush.valueChanged.connect(self._brush_changed)
        # keys (Ctrl+Z, Del, ...) belong to the canvas, not to the spin box's text
        self.brush.setFocusPolicy(Qt.ClickFocus)
        self.brush.editingFinished.connect(self.canvas.setFocus)
        tb.addWidget(self.brush)
        self._act("Smaller brush", lambda: self.brush.setValue(self.brush.value() - 1), ["["])
        self._act("Bigger brush", lambda: self.brush.setValue(self.brush.value() + 1), ["]"])
        tb.addSeparator()
        self.act_delete = self._act("Delete", self.delete_selected, ["Delete", "Backspace"],
                                    "Delete the selected masks")
        self.act_merge = self._act("Merge", self.merge_selected, ["M"], "Merge the selected masks")
        self.act_undo = self._act("Undo", self.undo, [QKeySequence.Undo])
        self.act_redo = self._act("Redo", self.redo, ["Ctrl+Shift+Z", "Ctrl+Y"])
        for a in (self.act_delete, self.act_merge, self.act_undo, self.act_redo):
            tb.addAction(a)
        tb.addSeparator()
        self.act_predict = self._act("Predict", self.predict, ["Ctrl+P"],
                                     "Segment this crop with the current model as a start "
                                     "(replaces the shown masks; undo brings them back)")
        self.act_accept = self._act("Accept", self.accept_labels, ["Return", "Enter"],
                                    "Save the shown masks as this crop's labels")
        self.act_train = self._act("Train...", self.open_train_dialog, [],
                                   "Train a model on the labeled crops")
        self.act_help = self._act("Help", self.toggle_help, ["F1", "?"], "Keyboard shortcuts")
        self._act("Fit", self.canvas.reset_view, ["0"], "Fit the crop to the window")
        for a in (self.act_predict, self.act_accept, self.act_train, self.act_help):
            tb.addAction(a)

    def _build_statusbar(self) -> None:
        sb = self.statusBar()
        self.crop_label = QLabel("")
        self.counter = QLabel("")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setMaximumWidth(180)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(self.cancel_prediction)
        sb.addWidget(self.crop_label, 1)
        sb.addPermanentWidget(self.progress)
        sb.addPermanentWidget(self.cancel_button)
        sb.addPermanentWidget(self.counter)
        self.progress.hide()
        self.cancel_button.hide()

    # =====================================================================================
    # crops
    # =====================================================================================
    @property
    def path(self) -> Path | None:
        return self.crops[self.index] if 0 <= self.index < len(self.crops) else None

    def go(self, index: int) -> None:
        """Show crop ``index`` (its saved labels, else its prediction, else nothing)."""
        if not self.crops or self.busy:
            return
        index = max(0, min(index, len(self.crops) - 1))
        if index == self.index:
            return
        path = self.crops[index]
        try:
            image = crops.read_crop(path)
            labels, source = crops.read_labels(path, image.shape[1:])
        except Exception as e:
            self.show_error(f"{path.name}: {e}")
            return
        self.index, self.image, self.source = index, image, source
        if labels is None:
            labels = np.zeros(image.shape[1:], np.uint32)
        self._set_doc(labels)
        lo, hi = auto_contrast(image[0])
        gray = np.clip((image[0] - lo) * (255.0 / max(hi - lo, 1e-12)), 0, 255).astype(np.uint8)
        self.canvas.set_crop(gray, self.doc.labels)
        self._update()

    def _set_doc(self, labels: np.ndarray) -> None:
        self.doc = crops.CropLabels(labels, on_change=self._edited)
        self.selection = []

    @property
    def n_labeled(self) -> int:
        return sum(1 for n in self.counts.values() if n > 0)

    @property
    def labeled_crops(self) -> list[Path]:
        """Crops whose saved labels hold at least one mask: what training uses."""
        return [p for p in self.crops if self.counts.get(p, 0) > 0]

    # =====================================================================================
    # editing
    # =====================================================================================
    def set_tool(self, tool: str) -> None:
        self.canvas.tool = tool
        self.tool_actions[tool].setChecked(True)
        self.canvas.setCursor(Qt.PointingHandCursor if tool == "select" else Qt.CrossCursor)
        self.canvas.setFocus()
        self.canvas.update()

    def _brush_changed(self, v: int) -> None:
        self.canvas.brush_radius = float(v)
        self.canvas.update()

    def _stroke(self, tool: str, points) -> None:
        if self.doc is None or self.busy:
            return
        if tool == "draw":
            label = self.doc.add_polygon(points)
            if not label:
                self.statusBar().showMessage("The outline enclosed no free pixel", 4000)
        elif tool == "brush":
            r, c = (int(round(v)) for v in points[0])
            label = self.doc.label_at(r, c) or self.doc.next_label()
            self.doc.paint(points, self.canvas.brush_radius, label)
        elif tool == "erase":
            self.doc.paint(points, self.canvas.brush_radius, 0)

    def _clicked(self, row: int, col: int, add: bool) -> None:
        if self.doc is None:
            return
        label = self.doc.label_at(row, col)
        if add:
            if label:
                sel = list(self.selection)
                sel.remove(label) if label in sel else sel.append(label)
                self.selection = sel
        else:
            self.selection = [label] if label else []
        self.canvas.set_labels(self.doc.labels, self.selection)
        self._update()

    def delete_selected(self) -> None:
        if self.doc is not None and self.selection and not self.busy:
            sel, self.selection = self.selection, []
            self.doc.delete(sel)

    def merge_selected(self) -> None:
        if self.doc is None or self.busy:
            return
        if len(self.selection) < 2:
            self.statusBar().showMessage("Select two masks to merge (S, click, Ctrl+click)", 4000)
            return
        target = self.doc.merge(self.selection)
        self.selection = [target]
        self.canvas.set_labels(self.doc.labels, self.selection)

    def undo(self) -> None:
        if self.doc is not None and not self.busy:
            self.doc.undo_edit()

    def redo(self) -> None:
        if self.doc is not None and not self.busy:
            self.doc.redo_edit()

    def _edited(self) -> None:
        """After every edit: drop vanished labels from the selection, save, redraw."""
        present = set(np.unique(self.doc.labels).tolist())
        self.selection = [s for s in self.selection if s in present]
        self.save_current()
        self.canvas.set_labels(self.doc.labels, self.selection)
        self._update()

    def accept_labels(self) -> None:
        """Save the shown masks unchanged (e.g. a good prediction) as the crop's labels."""
        if self.doc is not None and not self.busy:
            if self.save_current():
                self.statusBar().showMessage(f"{self.path.name}: labels saved", 3000)
            self._update()

    def save_current(self) -> bool:
        """Write CROP_seg.npy (and keep CROP_masks.tif in step, which ``cp3d-cli train``
        reads) atomically. Returns False (and shows why) when it could not be written."""
        path = self.path
        if path is None or self.doc is None:
            return False
        try:
            crops.save_labels(path, self.doc.labels)
        except Exception as e:
            self.show_error(f"{path.name}: labels not saved: {e}")
            return False
        self.counts[path] = self.doc.n_masks
        self.source = "labels"
        return True

    # =====================================================================================
    # prediction (worker thread)
    # =====================================================================================
    @property
    def busy(self) -> bool:
        return self.worker is not None

    def _model_and_params(self) -> tuple[str | None, dict]:
        panel = getattr(self.host, "seg_panel", None)
        if panel is None:
            return None, {"do_3D": False}
        params = panel.params(is_2d=True)
        return panel.model_name() or getattr(self.host, "_saved_model", None), params

    def predict(self) -> None:
        """Segment the current crop in 2D with the current model, as a starting point."""
        if self.image is None or self.busy:
            return
        from cp3d.core.io import Volume

        model, params = self._model_and_params()
        params.update(do_3D=False, stitch_threshold=0.0)
        vol = Volume(data=self.image[None], path=self.path)
        self.worker = SegmentWorker(self.backend, vol, model, params, save=False)
        self.worker.progress.connect(self._on_progress, Qt.QueuedConnection)
        self.worker.succeeded.connect(self._on_predicted, Qt.QueuedConnection)
        self.worker.failed.connect(self._on_failed, Qt.QueuedConnection)
        self.worker.done.connect(self._on_done, Qt.QueuedConnection)
        self._predict_index = self.index
        self.progress.setValue(0)
        self.progress.show()
        self.cancel_button.show()
        self.statusBar().showMessage(
            f"Predicting {self.path.name} with {model or 'the default model'}...")
        self.thread = start_worker(self.worker)
        self._update()

    def cancel_prediction(self) -> None:
        if self.worker is not None:
            self.worker.cancel()

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.progress.setValue(int(fraction * 1000))
        self.progress.setFormat(f"{stage} %p%")

    def _on_predicted(self, result, paths, seconds: float) -> None:
        if self._predict_index != self.index or self.doc is None:
            return
        masks = np.asarray(result.masks)
        masks = masks[0] if masks.ndim == 3 else masks
        # one undoable edit (Ctrl+Z brings the old labels back), not saved until accepted
        self.doc.replace(masks, "prediction", notify=False)
        self.source = "prediction"
        self.selection = []
        self.canvas.set_labels(self.doc.labels)
        n = int(len(np.unique(masks)) - 1)
        self.statusBar().showMessage(f"{n} masks predicted in {seconds:.1f} s: correct them, "
                                     "then Enter (or any edit) saves them", 8000)
        self._update()

    def _on_failed(self, message: str) -> None:
        self.show_error(f"Prediction failed: {message}")

    def _on_done(self) -> None:
        if self.thread is not None:
            self.thread.wait(10_000)
        self.worker = self.thread = None
        self.progress.hide()
        self.cancel_button.hide()
        self._update()

    # =====================================================================================
    # training
    # =====================================================================================
    def open_train_dialog(self) -> None:
        if not self.labeled_crops:
            QMessageBox.information(self, "Train", "Label at least one crop first: draw or "
                                    "correct its masks (every edit is saved).")
            return
        if self.doc is not None and self.doc.edited:
            self.save_current()  # the user's labels are on disk before training reads them
        from .train_dialog import TrainDialog

        self.train_dialog = TrainDialog(self.labeled_crops, self.backend, host=self.host,
                                        parent=self)
        self.train_dialog.show()

    # =====================================================================================
    # misc
    # =====================================================================================
    def toggle_help(self) -> None:
        self.canvas.help_text = "" if self.canvas.help_text else HELP
        self.canvas.update()

    def show_error(self, message: str) -> None:
        log.error("%s", message)
        self.errors.append(message)
        self.statusBar().showMessage(message, 10000)
        box = QMessageBox(QMessageBox.Warning, "cp3d labeling", message, QMessageBox.Ok, self)
        box.setModal(False)
        box.show()
        self._error_box = box

    def _update(self) -> None:
        """Counters, crop name and which actions apply now."""
        n = len(self.crops)
        masks_total = sum(self.counts.values())
        self.counter.setText(f"labeled crops: {self.n_labeled} / {n}   masks: {masks_total}")
        if self.path is not None and self.doc is not None:
            where = {"labels": "saved labels", "prediction": "model prediction (not saved yet)",
                     "": "no masks yet: draw them or Predict (Ctrl+P)"}[self.source]
            self.crop_label.setText(f"{self.index + 1}/{n}  {self.path.name}  —  "
                                    f"{self.doc.n_masks} masks, {where}")
        idle = not self.busy
        has = self.doc is not None
        self.act_prev.setEnabled(idle and self.index > 0)
        self.act_next.setEnabled(idle and 0 <= self.index < n - 1)
        self.act_undo.setEnabled(idle and has and self.doc.undo.can_undo)
        self.act_redo.setEnabled(idle and has and self.doc.undo.can_redo)
        self.act_delete.setEnabled(idle and bool(self.selection))
        self.act_merge.setEnabled(idle and len(self.selection) >= 2)
        self.act_predict.setEnabled(idle and has)
        self.act_accept.setEnabled(idle and has)
        self.act_train.setEnabled(idle and self.n_labeled > 0)
        self.act_train.setToolTip("Train a model on the labeled crops" if self.n_labeled else
                                  "Label at least one crop to train")

    def closeEvent(self, event) -> None:
        if self.worker is not None:
            self.worker.cancel()
            if self.thread is not None:
                self.thread.wait(10_000)
        if self.train_dialog is not None:
            self.train_dialog.close()
        event.accept()
