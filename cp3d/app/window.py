"""Main window: wires the state, the views, the panels and the segmentation worker."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import types
from pathlib import Path

import numpy as np
from PySide6.QtCore import QObject, QSettings, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QMainWindow,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from . import render

from .backend import Backend  # noqa: E402
from .dialogs import AxesDialog  # noqa: E402
from .lazy import PlaneReader, is_lazy, lazy_labels, lazy_volume  # noqa: E402
from .logpanel import LogPanel, detach_panel, setup_logging  # noqa: E402
from .panels import DisplayPanel, SegmentationPanel  # noqa: E402
from .slice_view import SliceView  # noqa: E402
from .state import AppState, auto_contrast, data_range  # noqa: E402
from .worker import (  # noqa: E402
    STAGES_2D,
    STAGES_3D,
    STAGES_BLOCKWISE,
    STAGES_CROPS,
    STAGES_DIAMETER,
    BlockwiseWorker,
    CropsWorker,
    DiameterWorker,
    SegmentWorker,
    call_in_thread,
    overall_fraction,
    start_worker,
)

log = logging.getLogger("cp3d.app")

TIFF_SUFFIXES = (".tif", ".tiff")
MAX_RECENT = 10
READ_ONLY_MSG = ("Blockwise masks are read from NAME_cp_masks.zarr on disk: editing (delete, "
                 "merge) is off for them")
_STUCK_THREADS: list = []


def _fmt_time(seconds: float) -> str:
    seconds = int(round(max(seconds, 0)))
    m, s = divmod(seconds, 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _ModelListBridge(QObject):
    listed = Signal(object, str)  # list of ModelInfo, error message


class _PlanesBridge(QObject):
    ready = Signal()  # emitted from the PlaneReader thread; received in the GUI thread


class MainWindow(QMainWindow):
    """cp3d main window. ``backend`` gives access to cp3d.core (tests inject fakes)."""

    def __init__(self, backend: Backend | None = None, settings: QSettings | None = None,
                 log_file: Path | None = None, enable_3d: bool = True):
        super().__init__()
        self.backend = backend or Backend()
        self.settings = settings if settings is not None else QSettings("cp3d", "cp3d")
        self.state = AppState()
        self._planes_bridge = _PlanesBridge(self)
        self._planes_bridge.ready.connect(self._redraw)
        self._planes = PlaneReader(self._planes_bridge.ready.emit)
        self.queue: list[Path] = []
        self.worker: SegmentWorker | None = None
        self.loader = None  # background file read in progress
        self._done_tasks: list = []
        self.thread = None
        self.last_result = None  # Result of the last run on the current image (flows for saving)
        self.restored_seg: dict | None = None  # NAME_seg.npy contents restored on open
        self.last_saved: list[Path] = []
        self.axes_dialog: AxesDialog | None = None
        self.file_axes: tuple = (None, None)  # z_axis, channel_axis the open file was read with
        self.error_box: QMessageBox | None = None
        self.errors: list[str] = []  # every error shown, for tests and the log
        self._clims: dict[int, tuple[float, float]] = {}
        self._run_t0 = 0.0
        self._run_fraction = 0.0
        self._run_stage = ""
        self._run_weights = STAGES_3D
        self._run_what = "Segmentation"
        self._blockwise_next = None  # (model, params) to run blockwise when the worker is done
        self._closing = False
        self.layout_mode = "all"
        self.labeling = None  # labeling mode window, when open

        self.setWindowTitle("cp3d")
        self.setAcceptDrops(True)
        self.resize(1400, 900)
        self._build_views(enable_3d)
        self._build_docks()
        self._build_statusbar()
        self._build_actions()
        self.log_path = setup_logging(self.log_panel, log_file)
        self._connect_state()
        saved_model = self.seg_panel.restore(self.settings)
        self._saved_model = saved_model
        self._update_actions()
        self._show_empty()
        self._models_bridge = _ModelListBridge()
        self._models_bridge.listed.connect(self._models_listed)
        QTimer.singleShot(0, self.refresh_models)

    # =====================================================================================
    # construction
    # =====================================================================================
    def _build_views(self, enable_3d: bool) -> None:
        self.xy = SliceView("XY")
        self.xz = SliceView("XZ")
        self.yz = SliceView("YZ")
        self.xy.placeholder = ("Drop TIFF files here (or File > Open)\n\n"
                               "Each file is segmented with the settings on the left and the "
                               "masks are saved next to it.")
        self.views = {"xy": self.xy, "xz": self.xz, "yz": self.yz}
        for name, v in self.views.items():
            v.clicked.connect(lambda r, c, add, n=name: self._view_clicked(n, r, c, add))
            v.dragged.connect(lambda r, c, n=name: self._view_dragged(n, r, c))
            v.scrolled.connect(lambda s, n=name: self._view_scrolled(n, s))

        self.view3d = None
        self.view3d_error = ""
        if enable_3d and QApplication.platformName() in ("offscreen", "minimal"):
            enable_3d = False
            self.view3d_error = "3D view needs OpenGL (not available on this display)"
        if enable_3d:
            try:
                from .view3d import View3D

                self.view3d = View3D()
                self.view3d.on_pick = self._view3d_picked
                w3 = self.view3d.widget
                w3.setMinimumSize(120, 80)
            except Exception as e:  # no OpenGL: the 2D views still work
                self.view3d_error = f"3D view unavailable: {e}"
                self.view3d = None
        if self.view3d is None:
            w3 = QLabel(self.view3d_error or "3D view off")
            w3.setAlignment(Qt.AlignCenter)
            w3.setStyleSheet("background: #18181c; color: gray")
        self.w3d = w3

        grid = QGridLayout()
        grid.setSpacing(3)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.xy, 0, 0)
        grid.addWidget(self.yz, 0, 1)
        grid.addWidget(self.xz, 1, 0)
        grid.addWidget(self.w3d, 1, 1)
        self.grid = grid

        self.z_slider = QSlider(Qt.Horizontal)
        self.z_slider.setToolTip("Z plane shown in the XY view (mouse wheel over a view also "
                                 "moves through planes; Ctrl+wheel zooms)")
        self.z_slider.valueChanged.connect(lambda z: self.state.set_position(z=z))
        self.z_label = QLabel("Z")
        self.z_label.setMinimumWidth(70)
        self.pos_label = QLabel("")
        self.pos_label.setStyleSheet("color: gray")
        zrow = QHBoxLayout()
        ztitle = QLabel("Z")
        self._z_row = (ztitle, self.z_slider, self.z_label)
        zrow.addWidget(ztitle)
        zrow.addWidget(self.z_slider, 1)
        zrow.addWidget(self.z_label)
        zrow.addWidget(self.pos_label)

        central = QWidget()
        lay = QVBoxLayout(central)
        lay.setContentsMargins(4, 4, 4, 2)
        lay.addLayout(grid, 1)
        lay.addLayout(zrow)
        self.setCentralWidget(central)

    def _build_docks(self) -> None:
        self.seg_panel = SegmentationPanel()
        self.seg_panel.run_requested.connect(self.run_segmentation)
        self.seg_panel.load_model_requested.connect(self.load_model_file)
        self.seg_panel.estimate_requested.connect(self.estimate_diameter)
        self.seg_panel.anisotropy.valueChanged.connect(
            lambda v: self.state.set_display(anisotropy=float(v)))
        self.display_panel = DisplayPanel()
        self.display_panel.changed.connect(self._display_changed)
        self.display_panel.auto_contrast_requested.connect(self._auto_contrast)

        self.selection_label = QLabel(
            "Click a mask to select it. Ctrl+click adds to the selection.")
        self.selection_label.setWordWrap(True)
        self.delete_button = QPushButton("Delete (Del)")
        self.merge_button = QPushButton("Merge (M)")
        self.undo_button = QPushButton("Undo")
        self.redo_button = QPushButton("Redo")
        edit_row = QHBoxLayout()
        for b in (self.delete_button, self.merge_button, self.undo_button, self.redo_button):
            edit_row.addWidget(b)
        self.delete_button.clicked.connect(self.delete_selected)
        self.merge_button.clicked.connect(self.merge_selected)
        self.undo_button.clicked.connect(self.undo)
        self.redo_button.clicked.connect(self.redo)
        edit_box = QGroupBox("Masks")
        eb = QVBoxLayout(edit_box)
        eb.addWidget(self.selection_label)
        eb.addLayout(edit_row)

        side = QWidget()
        sl = QVBoxLayout(side)
        sl.addWidget(self.seg_panel)
        sl.addWidget(self.display_panel)
        sl.addWidget(edit_box)
        sl.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(side)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.side_dock = QDockWidget("Settings", self)
        self.side_dock.setObjectName("settings_dock")
        self.side_dock.setWidget(scroll)
        self.side_dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable)
        side.setMinimumWidth(side.sizeHint().width())
        scroll.setMinimumWidth(side.sizeHint().width() + 16)
        self.addDockWidget(Qt.LeftDockWidgetArea, self.side_dock)
        # the settings column runs the full height; the log sits under the views only
        self.setCorner(Qt.BottomLeftCorner, Qt.LeftDockWidgetArea)

        self.log_panel = LogPanel()
        self.log_dock = QDockWidget("Log", self)
        self.log_dock.setObjectName("log_dock")
        self.log_dock.setWidget(self.log_panel)
        self.addDockWidget(Qt.BottomDockWidgetArea, self.log_dock)
        self.resizeDocks([self.log_dock], [110], Qt.Vertical)

    def _build_statusbar(self) -> None:
        sb = self.statusBar()
        self.stage_label = QLabel("")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(True)
        self.progress.setMaximumWidth(260)
        self.time_label = QLabel("")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setToolTip("Stop the running segmentation (nothing is saved)")
        self.cancel_button.clicked.connect(self.cancel_run)
        sb.addPermanentWidget(self.stage_label)
        sb.addPermanentWidget(self.progress)
        sb.addPermanentWidget(self.time_label)
        sb.addPermanentWidget(self.cancel_button)
        self._timer = QTimer(self)
        self._timer.setInterval(250)
        self._timer.timeout.connect(self._update_time)
        self._set_running_ui(False)

    def _action(self, text, slot, shortcut=None, tip=None) -> QAction:
        a = QAction(text, self)
        a.triggered.connect(slot)
        if shortcut is not None:
            if isinstance(shortcut, (list, tuple)):
                a.setShortcuts([QKeySequence(s) for s in shortcut])
            else:
                a.setShortcut(QKeySequence(shortcut))
        if tip:
            a.setStatusTip(tip)
            a.setToolTip(tip)
        self.addAction(a)  # shortcuts work even with the menu bar hidden
        return a

    def _build_actions(self) -> None:
        self.act_open = self._action("&Open...", self.open_dialog, QKeySequence.Open,
                                     "Open one or more TIFF images")
        self.act_axes = self._action(
            "Reopen with other &axes...", self.reopen_with_axes,
            tip="Open the current file again, saying which axis is Z and which is channel")
        self.act_save = self._action("&Save masks", self.save, QKeySequence.Save,
                                     "Write NAME_seg.npy and NAME_cp_masks.tif next to the image")
        self.act_next = self._action("Open &next queued file", self.open_next, "Ctrl+N")
        self.act_quit = self._action("&Quit", self.close, QKeySequence.Quit)
        self.act_run = self._action("&Run segmentation", self.run_segmentation, "Ctrl+R")
        self.act_cancel = self._action("&Cancel", self.cancel_run, "Esc")
        self.act_undo = self._action("&Undo", self.undo, QKeySequence.Undo)
        self.act_redo = self._action("&Redo", self.redo, ["Ctrl+Shift+Z", "Ctrl+Y"])
        self.act_delete = self._action("&Delete selected mask", self.delete_selected,
                                       [QKeySequence.Delete, "Backspace"])
        self.act_merge = self._action("&Merge selected masks", self.merge_selected, "M")
        self.act_reset3d = self._action("Reset 3D view", self.reset_3d_view)
        self.act_layout_all = self._action("All views", lambda: self.set_layout("all"), "F2",
                                           "XY, orthoviews and 3D")
        self.act_layout_xy = self._action("XY view only", lambda: self.set_layout("xy"), "F3")
        self.act_layout_3d = self._action("3D view only", lambda: self.set_layout("3d"), "F4")
        self.act_show_log = self.log_dock.toggleViewAction()
        self.act_show_settings = self.side_dock.toggleViewAction()
        self.act_page_up = self._action("Next Z plane", lambda: self._step_z(1), "PgUp")
        self.act_page_down = self._action("Previous Z plane", lambda: self._step_z(-1), "PgDown")

        mb = self.menuBar()
        m = mb.addMenu("&File")
        m.addAction(self.act_open)
        self.recent_menu = m.addMenu("Open &recent")
        m.addAction(self.act_next)
        m.addAction(self.act_axes)
        m.addSeparator()
        m.addAction(self.act_save)
        m.addSeparator()
        m.addAction(self.act_quit)
        m = mb.addMenu("&Edit")
        for a in (self.act_undo, self.act_redo, self.act_delete, self.act_merge):
            m.addAction(a)
        m = mb.addMenu("&Segmentation")
        m.addAction(self.act_run)
        m.addAction(self.act_cancel)
        m.addSeparator()
        self.act_label = self._action("&Label training crops...", self.open_labeling, None,
                                      "Correct or draw masks on 2D crops (cp3d-cli make-train) "
                                      "and train a model on them")
        self.act_crops = self._action("&Make training crops from this volume...",
                                      self.make_training_crops, None,
                                      "Random 2D crops in XY, YZ and XZ (cp3d-cli make-train) "
                                      "with the current masks, to correct and train on")
        m.addAction(self.act_crops)
        m.addAction(self.act_label)
        m = mb.addMenu("&View")
        for a in (self.act_layout_all, self.act_layout_xy, self.act_layout_3d):
            m.addAction(a)
        m.addSeparator()
        for a in (self.act_reset3d, self.act_show_settings, self.act_show_log):
            m.addAction(a)
        m = mb.addMenu("&Help")
        m.addAction(self._action("Log file location", self._show_log_location))
        m.addAction(self._action("About cp3d", self._about))
        self._rebuild_recent()

    def _connect_state(self) -> None:
        ev = self.state.events
        ev.connect("image", self._on_image)
        ev.connect("masks", self._on_masks)
        ev.connect("position", self._on_position)
        ev.connect("selection", self._on_selection)
        ev.connect("display", self._on_display)

    # =====================================================================================
    # errors and prompts
    # =====================================================================================
    def show_error(self, message: str, title: str = "cp3d") -> None:
        """Log, show in the status line and in a non-blocking message box."""
        log.error(message)
        self.errors.append(message)
        self.statusBar().showMessage(message, 15000)
        if self.error_box is not None:
            self.error_box.close()
        box = QMessageBox(QMessageBox.Warning, title, message, QMessageBox.Ok, self)
        box.setModal(False)
        box.show()
        self.error_box = box

    def ask_unsaved(self) -> str:
        """'save', 'discard' or 'cancel' (tests replace this method)."""
        name = self.state.path.name if self.state.path else "the image"
        r = QMessageBox.question(
            self, "Unsaved mask edits",
            f"The masks of {name} have unsaved edits. Save them first?",
            QMessageBox.Save | QMessageBox.Discard | QMessageBox.Cancel, QMessageBox.Save)
        return {QMessageBox.Save: "save", QMessageBox.Discard: "discard"}.get(r, "cancel")

    def confirm_discard(self) -> bool:
        """True when it is fine to replace the current masks (saved, discarded or clean)."""
        if not self.state.dirty or self.state.masks is None:
            return True
        answer = self.ask_unsaved()
        if answer == "save":
            return self.save()
        return answer == "discard"

    # =====================================================================================
    # opening files
    # =====================================================================================
    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasUrls() and any(u.isLocalFile() for u in event.mimeData().urls()):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event) -> None:
        self.dragEnterEvent(event)

    def dropEvent(self, event) -> None:
        paths = [Path(u.toLocalFile()) for u in event.mimeData().urls() if u.isLocalFile()]
        event.acceptProposedAction()
        # Let the drop finish before loading (the drag source waits for us).
        QTimer.singleShot(0, lambda: self.open_paths(paths))

    def open_dialog(self) -> None:
        start = (str(self.state.path.parent) if self.state.path
                 else str(self.settings.value("last_dir", "")))
        files, _ = QFileDialog.getOpenFileNames(
            self, "Open images", start, "TIFF images (*.tif *.tiff);;All files (*)")
        if files:
            self.open_paths([Path(f) for f in files])

    def open_paths(self, paths) -> None:
        """Queue files; load the first now unless a run is in progress."""
        files: list[Path] = []
        for p in map(Path, paths):
            if p.is_dir():
                files += sorted(q for q in p.iterdir() if q.suffix.lower() in TIFF_SUFFIXES
                                and not q.name.endswith("_cp_masks.tif"))
            elif p.name.endswith("_seg.npy"):
                files.append(p)  # resolved to its image in load_path
            else:
                files.append(p)
        if not files:
            return
        self.queue.extend(files)
        if len(files) > 1 or self.is_busy:
            log.info("queued %d file(s); %d waiting", len(files), len(self.queue))
        if not self.is_busy:
            self.open_next()
        self._update_actions()

    def open_next(self) -> None:
        if self.is_busy or not self.queue:
            return
        if not self.confirm_discard():
            return
        path = self.queue.pop(0)
        self.load_path(path)

    def load_path(self, path, z_axis=None, channel_axis=None) -> bool:
        """Read an image in a background thread, then show it (restoring NAME_seg.npy masks)
        and maybe start a run. Returns False when nothing was started."""
        path = Path(path)
        if path.name.endswith("_seg.npy"):
            stem = path.name[: -len("_seg.npy")]
            candidates = [path.with_name(stem + s) for s in (".tif", ".tiff", ".TIF", ".TIFF")]
            found = [c for c in candidates if c.exists()]
            if not found:
                self.show_error(f"{path}: no image {stem}.tif next to this _seg.npy file")
                self._after_file_done()
                return False
            path = found[0]
        self.statusBar().showMessage(f"Opening {path.name}...")
        QApplication.setOverrideCursor(Qt.WaitCursor)
        t0 = time.perf_counter()
        blockwise = self.seg_panel.blockwise.isChecked()
        self.loader = call_in_thread(
            lambda: self._read(path, z_axis, channel_axis, blockwise),
            on_result=lambda r: self._loaded(path, r, time.perf_counter() - t0,
                                             (z_axis, channel_axis)),
            on_error=lambda e: self._load_failed(path, e),
            on_finished=self._loader_finished,
        )
        return True

    def _read(self, path: Path, z_axis, channel_axis, blockwise: bool = False):
        """Worker thread: the volume, and masks from an existing NAME_seg.npy if they fit.
        A volume too large for memory (or any, with ``blockwise``) is opened lazily."""
        if blockwise or not self._fits_in_memory(path, z_axis, channel_axis):
            return self._read_lazy(path, z_axis, channel_axis)
        volume = self.backend.read_volume(path, z_axis=z_axis, channel_axis=channel_axis)
        masks, seg_dict, note = None, None, ""
        try:
            seg = self.backend.seg_npy_path(path)
            if seg.exists():
                d = self.backend.load_seg_npy(seg)
                m = np.asarray(d["masks"])
                if m.ndim == 2:
                    m = m[None]
                if m.shape != (volume.data.shape[0],) + tuple(volume.data.shape[2:]):
                    note = f"{seg}: masks shaped {m.shape} do not match the image; ignored"
                else:
                    masks, seg_dict = m, d
                    note = f"restored {int(m.max()) if m.size else 0} masks from {seg}"
        except Exception as e:
            note = f"could not restore masks: {self._message(e)}"
        return volume, masks, seg_dict, note

    def _fits_in_memory(self, path: Path, z_axis, channel_axis) -> bool:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            return True
        try:
            return self.backend.would_fit_in_memory(path, None, z_axis, channel_axis)
        except Exception as e:  # let the normal reader report problems with the file
            log.debug("memory check of %s failed: %s", path, e)
            return True

    def _read_lazy(self, path: Path, z_axis, channel_axis):
        """Worker thread: a lazy view of the image (header only), and the labels of an
        earlier blockwise run (NAME_cp_masks.zarr) opened lazily if present."""
        volume = lazy_volume(self.backend.open_lazy(path, z_axis=z_axis,
                                                    channel_axis=channel_axis))
        masks, note = None, ""
        zpath = self.backend.masks_zarr_path(path)
        if zpath.exists():
            try:
                masks = lazy_labels(zpath)
                if masks.shape != volume.data.shape[:1] + volume.data.shape[2:]:
                    note, masks = f"{zpath}: labels do not match the image; ignored", None
                else:
                    note = f"showing the blockwise labels of {zpath}"
            except Exception as e:
                note = f"could not open {zpath}: {self._message(e)}"
        # The contrast and the 3D view need a subsample of the whole file: read it here, not
        # in the GUI thread (1 s for a 1 GB tiff, 2.4 s for its labels' zarr).
        for c in range(volume.data.shape[1]):
            volume.data[:, c].preview()
        if masks is not None:
            masks.preview()
        return volume, masks, None, note

    def _loader_finished(self) -> None:
        if self.loader is not None and not self.loader.thread.wait(10_000):
            _STUCK_THREADS.append(self.loader)
        # We are inside a slot of the task's relay object: keep the task alive until the
        # next load instead of freeing its QObjects during their own event.
        self._done_tasks = [self.loader]
        self.loader = None
        QApplication.restoreOverrideCursor()
        self.statusBar().clearMessage()
        self._update_actions()

    def _load_failed(self, path: Path, e: BaseException) -> None:
        if isinstance(e, self.backend.ambiguous_axes_error()):
            log.info("%s", e)
            shape = getattr(e, "shape", None) or ()
            suggested = getattr(e, "suggested", None) or (None, None)
            QTimer.singleShot(0, lambda: self._ask_axes(path, shape, suggested))
            return
        self.show_error(self._message(e, f"{path}: cannot open: "))
        QTimer.singleShot(0, self._after_file_done)

    def _loaded(self, path: Path, r, seconds: float, axes=(None, None)) -> None:
        volume, masks, seg_dict, note = r
        self.file_axes = axes
        if note:
            (log.info if masks is not None else log.warning)(note)
        try:
            self.last_result = None
            self.restored_seg = seg_dict
            self.state.set_volume(volume, masks)
        except Exception as e:
            self.show_error(self._message(e, f"{path}: cannot show: "))
            QTimer.singleShot(0, self._after_file_done)
            return
        z, c, y, x = volume.data.shape
        vs = getattr(volume, "voxel_size", None)
        vs_txt = "(" + ", ".join(f"{v:.3g}" for v in vs) + ") µm" if vs else "unknown"
        log.info("opened %s: Z=%d C=%d Y=%d X=%d %s, voxel (z, y, x) %s (%.2f s)%s", path, z, c,
                 y, x, volume.data.dtype, vs_txt, seconds,
                 " lazily (blockwise)" if is_lazy(volume) else "")
        hint = "" if is_lazy(volume) else self.backend.axes_hint(volume)
        if hint:  # a stack saved as channels: say so before the user waits for 2D masks
            msg = f"{path.name}: a single plane, segmented in 2D{hint}"
            log.warning(msg)
            self.statusBar().showMessage(msg, 20000)
        self._add_recent(path)
        self.settings.setValue("last_dir", str(path.parent))
        if self.seg_panel.autorun.isChecked() and masks is None:
            QTimer.singleShot(0, self.run_segmentation)
        else:
            if masks is not None and self.seg_panel.autorun.isChecked():
                log.info("existing segmentation restored: not re-running (press Run to redo)")
            QTimer.singleShot(0, self._after_file_done)

    def reopen_with_axes(self) -> None:
        """Ask which axes are Z and channel, pre-filled with those in use, and read the file
        again with them: for a stack its metadata calls channels (or the reverse)."""
        path = self.state.path
        if path is None or self.is_busy or not self.confirm_discard():
            return
        try:
            shape, axes = self.backend.stored_layout(path, *self.file_axes)
        except Exception as e:
            self.show_error(self._message(e, f"{path}: cannot reopen: "))
            return
        self._ask_axes(path, shape, axes, reopen=True)

    def _ask_axes(self, path: Path, shape, suggested, reopen: bool = False) -> None:
        """The axes dialog; OK reads ``path`` with the chosen axes. Cancel on a file being
        opened moves on to the next one; on a reopen it keeps the image shown."""
        dlg = AxesDialog(path, shape, suggested, self, reopen=reopen)
        self.axes_dialog = dlg

        def accepted():
            z, c = dlg.axes()
            self.axes_dialog = None
            QTimer.singleShot(0, lambda: self.load_path(path, z_axis=z, channel_axis=c))

        def rejected():
            self.axes_dialog = None
            if not reopen:
                log.info("%s: not opened (axes not given)", path)
                self._after_file_done()

        dlg.accepted.connect(accepted)
        dlg.rejected.connect(rejected)
        dlg.open()

    def _after_file_done(self) -> None:
        """Move on to the next queued file when running automatically."""
        if self.queue and self.seg_panel.autorun.isChecked() and not self.is_busy:
            QTimer.singleShot(0, self.open_next)
        self._update_actions()

    # ---- recent files ------------------------------------------------------------------
    def recent_files(self) -> list[str]:
        v = self.settings.value("recent", [])
        if isinstance(v, str):
            v = [v]
        return [str(p) for p in (v or [])]

    def _add_recent(self, path: Path) -> None:
        p = str(Path(path).resolve())
        items = [p] + [r for r in self.recent_files() if r != p]
        self.settings.setValue("recent", items[:MAX_RECENT])
        self._rebuild_recent()

    def _rebuild_recent(self) -> None:
        self.recent_menu.clear()
        items = self.recent_files()
        for p in items:
            a = self.recent_menu.addAction(p)
            a.triggered.connect(lambda checked=False, p=p: self.open_paths([p]))
        self.recent_menu.setEnabled(bool(items))

    # =====================================================================================
    # segmentation
    # =====================================================================================
    @property
    def is_running(self) -> bool:
        """A segmentation is in progress."""
        return self.worker is not None

    @property
    def is_busy(self) -> bool:
        """A segmentation or a file read is in progress (new files wait in the queue)."""
        return self.worker is not None or self.loader is not None

    def _ready_for_a_run(self) -> bool:
        """Nothing running and an image open (else say so in the status bar)."""
        if self.is_busy:
            return False
        if self.state.image is None:
            self.statusBar().showMessage("Open an image first (drop a TIFF on the window)", 5000)
            return False
        return True

    def run_segmentation(self) -> None:
        if not self._ready_for_a_run():
            return
        if not self.confirm_discard():
            return
        params = self.seg_panel.params(is_2d=self.state.is_2d)
        model = self.seg_panel.model_name() or self._saved_model
        if self._use_blockwise():
            self._run_blockwise(model, params)
            return
        self._run_weights = STAGES_3D if params["do_3D"] else STAGES_2D
        shown = {k: v for k, v in params.items()}
        log.info("segmenting %s with model %s: %s",
                 self.state.path.name if self.state.path else "image",
                 model or "default", ", ".join(f"{k}={v}" for k, v in shown.items()))
        worker = SegmentWorker(self.backend, self.state.volume, model, params, save=True)
        self._start(worker, self._on_succeeded, "Segmentation")

    def _use_blockwise(self) -> bool:
        st = self.state
        return st.path is not None and not st.is_2d and (
            is_lazy(st.volume) or self.seg_panel.blockwise.isChecked())

    def _run_blockwise(self, model, params: dict) -> None:
        """Blockwise run in the worker thread: labels go to NAME_cp_masks.zarr beside the
        image; the progress bar counts blocks."""
        if not params.get("do_3D", True):
            log.warning("blockwise segmentation runs the 3D (2.5D) mode only")
        params["block_size"] = self.seg_panel.block_size.value()
        out = self.backend.masks_zarr_path(self.state.path)
        self._run_weights = STAGES_BLOCKWISE
        log.info("segmenting %s blockwise (blocks of %s) with model %s into %s",
                 self.state.path.name, params["block_size"] or "auto", model or "default",
                 out.name)
        worker = BlockwiseWorker(self.backend, self.state.volume, model, params, out)
        self._start(worker, self._on_blockwise_succeeded, "Blockwise segmentation")

    def _on_blockwise_succeeded(self, run, paths, seconds: float) -> None:
        result, masks = run  # the worker opened the labels and read their 3D preview
        if self._run_volume is not self.state.volume:
            return
        try:
            self.state.set_masks(masks, dirty=False)
        except Exception as e:
            self.show_error(self._message(e, f"{result.zarr_path}: cannot show: "))
            return
        self.last_result = None
        self.last_saved = [Path(p) for p in paths]
        msg = (f"{result.n_masks} masks in {seconds:.1f} s ({result.n_blocks} blocks); saved "
               f"{Path(result.zarr_path).name}")
        log.info("%s: %s", self.state.path.name, msg)
        self.statusBar().showMessage(msg, 10000)

    def _start(self, worker, on_succeeded, what: str) -> None:
        """Run a CoreWorker in its thread with the status-bar progress, time left and Cancel."""
        q = Qt.QueuedConnection  # slots run in the GUI thread
        worker.progress.connect(self._on_progress, q)
        worker.succeeded.connect(on_succeeded, q)
        # bound methods of this window (not lambdas), so Qt queues them to the GUI thread
        worker.failed.connect(self._on_failed, q)
        worker.too_large.connect(self._on_too_large, q)
        worker.cancelled.connect(self._on_cancelled, q)
        self._blockwise_next = None
        self._run_what = what
        worker.done.connect(self._on_worker_done, q)
        self.worker = worker
        self._run_volume = self.state.volume
        self._run_t0 = time.perf_counter()
        self._run_fraction = 0.0
        self._run_stage = "starting"
        self._set_running_ui(True)
        self.thread = start_worker(worker)

    def estimate_diameter(self) -> None:
        """Estimate the cell diameter in the worker thread and fill the diameter box."""
        if not self._ready_for_a_run():
            return
        if is_lazy(self.state.volume):
            self.statusBar().showMessage("A volume opened blockwise gets its diameter "
                                         "estimated by the run itself (leave diameter on auto)",
                                         8000)
            return
        params = self.seg_panel.params(is_2d=self.state.is_2d)
        model = self.seg_panel.model_name() or self._saved_model
        self._run_weights = STAGES_DIAMETER
        log.info("estimating the cell diameter of %s with model %s",
                 self.state.path.name if self.state.path else "image", model or "default")
        worker = DiameterWorker(self.backend, self.state.volume, model, params)
        self._start(worker, self._on_diameter, "Diameter estimation")

    def _on_diameter(self, diameter, paths, seconds: float) -> None:
        if self._run_volume is not self.state.volume:
            return
        d = float(diameter)
        if not np.isfinite(d) or d <= 0:
            self.show_error(f"Diameter estimation gave no usable value ({d}); set it by hand.")
            return
        self.seg_panel.diameter.setValue(d)
        msg = f"estimated cell diameter: {d:.1f} pixels ({seconds:.1f} s)"
        log.info("%s", msg)
        self.statusBar().showMessage(msg, 10000)

    def cancel_run(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.stage_label.setText("cancelling...")
            self.cancel_button.setEnabled(False)
            dropped = len(self.queue)
            self.queue.clear()
            if dropped:
                log.info("cancel: %d queued file(s) dropped from the queue", dropped)

    def _on_progress(self, stage: str, fraction: float) -> None:
        f = overall_fraction(stage, fraction, self._run_weights)
        if f is None and self._run_weights is STAGES_DIAMETER and stage != "model":
            f = overall_fraction("size", fraction, STAGES_DIAMETER)  # any core stage name
        if f is not None:
            self._run_fraction = max(self._run_fraction, f)
        self._run_stage = stage
        self.stage_label.setText(f"{stage}  {int(round(fraction * 100))}%")
        self.progress.setValue(int(self._run_fraction * 1000))
        self._update_time()

    def _update_time(self) -> None:
        if self.worker is None:
            return
        el = time.perf_counter() - self._run_t0
        f = self._run_fraction
        txt = f"{_fmt_time(el)} elapsed"
        if f > 0.03:
            txt += f", ~{_fmt_time(el * (1 - f) / f)} left"
        self.time_label.setText(txt)

    def _on_succeeded(self, result, paths, seconds: float) -> None:
        if self._run_volume is not self.state.volume:
            return
        masks = np.asarray(result.masks)
        self.last_result = result
        self.last_saved = [Path(p) for p in paths]
        self.state.set_masks(masks, dirty=False)
        n = len(np.unique(masks)) - (1 if (masks == 0).any() else 0)
        msg = f"{n} masks in {seconds:.1f} s"
        if paths:
            msg += "; saved " + ", ".join(Path(p).name for p in paths)
        log.info("%s: %s", self.state.path.name if self.state.path else "image", msg)
        self.statusBar().showMessage(msg, 10000)

    def _on_failed(self, message: str) -> None:
        self.show_error(message, f"{self._run_what} failed")

    def _on_too_large(self, message: str) -> None:
        """The in-memory run was refused once the objects' size was known (small objects
        enlarge the network grid): a 3D run of an image on disk goes on blockwise, as
        cp3d-cli does; anything else is reported."""
        worker, st = self.worker, self.state  # the worker is cleared only when it is done
        if (not isinstance(worker, SegmentWorker) or st.path is None or st.is_2d
                or not worker.params.get("do_3D", True) or self._run_volume is not st.volume):
            self._on_failed(message)
            return
        log.warning("%s: too large to segment in memory at its objects' size: segmenting it "
                    "blockwise", st.path.name)
        self._blockwise_next = (worker.model_name, dict(worker.params))

    def _on_cancelled(self) -> None:
        what = self._run_what
        log.info("%s cancelled; nothing was saved", what.lower())
        self.statusBar().showMessage(f"{what} cancelled; nothing was saved", 8000)

    def _on_worker_done(self) -> None:
        if self.thread is not None and not self.thread.wait(10_000):
            _STUCK_THREADS.append((self.thread, self.worker))  # never free a running thread
        # only now (thread finished) may Python free the worker and the thread
        self.worker = None
        self.thread = None
        self._set_running_ui(False)
        fallback, self._blockwise_next = self._blockwise_next, None
        if fallback is not None and not self._closing:
            self._run_blockwise(*fallback)
            return
        if not self._closing:
            self._after_file_done()

    def _set_running_ui(self, running: bool) -> None:
        self.progress.setVisible(running)
        self.cancel_button.setVisible(running)
        self.cancel_button.setEnabled(running)
        self.time_label.setVisible(running)
        self.stage_label.setVisible(running)
        if running:
            self.progress.setValue(0)
            self.stage_label.setText("starting")
            self.time_label.setText("")
            self._timer.start()
        else:
            self._timer.stop()
        if hasattr(self, "act_run"):
            self._update_actions()

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Process events until no run is in progress (tests, scripted use)."""
        t0 = time.perf_counter()
        while self.is_busy and time.perf_counter() - t0 < timeout:
            QApplication.processEvents()
            time.sleep(0.01)
        return not self.is_busy

    # ---- models ------------------------------------------------------------------------
    def refresh_models(self) -> None:
        """List models in a background thread (importing the model code may load torch)."""
        def work():
            try:
                infos = self.backend.list_models()
                err = ""
            except Exception as e:  # the app stays usable with a .pth file
                infos, err = [], self._message(e)
            try:
                self._models_bridge.listed.emit(infos, err)
            except RuntimeError:
                pass

        threading.Thread(target=work, name="cp3d-list-models", daemon=True).start()

    def _models_listed(self, infos, err: str) -> None:
        if err:
            log.warning("could not list models: %s", err)
        self.seg_panel.set_models(infos, current=self.seg_panel.model_name() or self._saved_model)
        if infos:
            log.info("models: %s", ", ".join(i.name for i in infos))

    def load_model_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model weights", "",
                                              "PyTorch weights (*.pth *.pt);;All files (*)")
        if path:
            self.seg_panel.add_model_path(path)
            self._saved_model = path
        else:
            self.seg_panel.restore_previous_model()

    # =====================================================================================
    # saving and editing
    # =====================================================================================
    def save(self) -> bool:
        if self.state.masks is None or self.state.volume is None:
            self.statusBar().showMessage("No masks to save", 5000)
            return False
        if self.state.masks_read_only:
            self.statusBar().showMessage(READ_ONLY_MSG, 8000)
            return True
        result = self._result_for_saving()
        try:
            paths = self.backend.save_results(self.state.volume, result)
        except Exception as e:
            self.show_error(self._message(e, "cannot save: "))
            return False
        self.state.dirty = False
        self.last_saved = [Path(p) for p in paths]
        log.info("saved %s", ", ".join(str(p) for p in paths))
        self.statusBar().showMessage("Saved " + ", ".join(Path(p).name for p in paths), 8000)
        self._update_actions()
        return True

    def _result_for_saving(self):
        """The current (maybe edited) masks with the flows of the run or file they came from,
        so the saved _seg.npy keeps its flows for Cellpose's GUI."""
        st = self.state
        r = self.last_result
        if (r is not None and getattr(r, "masks", None) is not None
                and np.shape(r.masks) == st.masks.shape):
            try:
                return dataclasses.replace(r, masks=st.masks)
            except TypeError:  # not a dataclass (fake results in tests)
                ns = types.SimpleNamespace(**vars(r))
                ns.masks = st.masks
                return ns
        seg = self.restored_seg or {}
        dP = cellprob = None
        flows = seg.get("flows") or []
        if len(flows) >= 5 and np.ndim(flows[4]) >= 3:
            f = np.asarray(flows[4], dtype=np.float32)
            if st.is_2d and f.shape[0] == 3:  # 2D file: (dY, dX, cellprob)
                dP = np.concatenate([np.zeros_like(f[:1]), f[:2]])[:, None]
                cellprob = f[2][None]
            elif f.shape[0] == 4 and f.shape[1:] == st.masks.shape:
                dP, cellprob = f[:3], f[3]
        params = dict(seg.get("cp3d_params") or {})
        diameter = seg.get("diameter") or self.seg_panel.diameter.value() or 0.0
        return types.SimpleNamespace(
            masks=st.masks, dP=dP, cellprob=cellprob, diameter=float(diameter),
            anisotropy=float(seg.get("anisotropy") or self.seg_panel.anisotropy.value()),
            params=params,
        )

    def delete_selected(self) -> None:
        if self.is_running or not self.state.selection:
            return
        if self.state.masks_read_only:
            self.statusBar().showMessage(READ_ONLY_MSG, 8000)
            return
        sel = list(self.state.selection)
        if self.state.delete_labels():
            log.info("deleted mask(s) %s", ", ".join(map(str, sel)))

    def merge_selected(self) -> None:
        if self.is_running:
            return
        if self.state.masks_read_only:
            self.statusBar().showMessage(READ_ONLY_MSG, 8000)
            return
        if len(self.state.selection) < 2:
            self.statusBar().showMessage(
                "Select two masks to merge: click one, Ctrl+click the other", 5000)
            return
        sel = list(self.state.selection)
        target = self.state.merge_labels()
        if target:
            log.info("merged masks %s into %d", ", ".join(map(str, sel)), target)

    def undo(self) -> None:
        if self.is_running:
            return
        d = self.state.undo_edit()
        if d:
            log.info("undo: %s", d)

    def redo(self) -> None:
        if self.is_running:
            return
        d = self.state.redo_edit()
        if d:
            log.info("redo: %s", d)

    # =====================================================================================
    # view updates (state -> widgets)
    # =====================================================================================
    def _show_empty(self) -> None:
        for v in self.views.values():
            v.set_image(None)
        self._set_grid_stretch()
        self.z_slider.setEnabled(False)
        self.z_label.setText("")

    def _on_image(self) -> None:
        st = self.state
        z, y, x = st.shape
        self.setWindowTitle(f"cp3d — {st.path.name if st.path else 'image'}")
        self._clims = {}
        self.display_panel.set_channels(st.n_channels, st.channel)
        self._set_contrast_controls(st.contrast)
        self.seg_panel.anisotropy.blockSignals(True)
        self.seg_panel.anisotropy.setValue(st.anisotropy)
        self.seg_panel.anisotropy.blockSignals(False)
        self.seg_panel.chan.setMaximum(st.n_channels)
        self.seg_panel.chan2.setMaximum(st.n_channels)
        self.z_slider.blockSignals(True)
        self.z_slider.setRange(0, z - 1)
        self.z_slider.setValue(st.position[0])
        self.z_slider.blockSignals(False)
        self.z_slider.setEnabled(z > 1)
        for wdg in self._z_row:
            wdg.setVisible(z > 1)
        self.seg_panel.set_2d(st.is_2d)
        self.xy.title = "XY" if not st.is_2d else "2D image"
        self._apply_layout()
        self._set_grid_stretch()
        if self.view3d is not None and not st.is_2d:
            self.view3d.set_image(st.channel_data(), st.contrast, st.anisotropy)
            self.view3d.set_masks(None)
        self._redraw()

    def set_layout(self, mode: str) -> None:
        """'all' (XY + orthoviews + 3D), 'xy' or '3d' alone, to look closer at one view."""
        self.layout_mode = mode
        self._apply_layout()

    def _apply_layout(self) -> None:
        mode = self.layout_mode
        is2d = self.state.is_2d
        if is2d and mode == "3d":
            mode = "xy"
        self.xy.setVisible(mode in ("all", "xy"))
        for w in (self.xz, self.yz):
            w.setVisible(mode == "all" and not is2d)
        self.w3d.setVisible(mode == "3d" or (mode == "all" and not is2d))
        self._set_grid_stretch()

    def _set_grid_stretch(self) -> None:
        """Size the orthoviews by physical extent so X and Y line up with the XY view. With no
        image, or fewer views shown, the shown ones share the grid evenly (with no stretch at
        all, the 3D canvas's size hint squeezes the XY view's welcome text)."""
        if self.state.shape is None or self.layout_mode != "all" or self.state.is_2d:
            for i in (0, 1):
                self.grid.setColumnStretch(
                    i, 1 if self._grid_cell_visible(0, i) or self._grid_cell_visible(1, i) else 0)
                self.grid.setRowStretch(
                    i, 1 if self._grid_cell_visible(i, 0) or self._grid_cell_visible(i, 1) else 0)
            return
        z, y, x = self.state.shape
        zz = z * self.state.anisotropy
        col_xy, col_z = x, min(max(zz, 0.5 * x), x)
        row_xy, row_z = y, min(max(zz, 0.5 * y), y)
        self.grid.setColumnStretch(0, int(100 * col_xy / max(col_xy, col_z)))
        self.grid.setColumnStretch(1, int(100 * col_z / max(col_xy, col_z)))
        self.grid.setRowStretch(0, int(100 * row_xy / max(row_xy, row_z)))
        self.grid.setRowStretch(1, int(100 * row_z / max(row_xy, row_z)))

    def _grid_cell_visible(self, row: int, col: int) -> bool:
        item = self.grid.itemAtPosition(row, col)
        return item is not None and not item.widget().isHidden()

    def _set_contrast_controls(self, clim) -> None:
        rng = data_range(self.state.channel_data())
        rng = (min(rng[0], clim[0]), max(rng[1], clim[1]))
        self.display_panel.set_contrast(rng, clim)

    def _on_masks(self) -> None:
        st = self.state
        if self.view3d is not None and not st.is_2d and st.image is not None:
            self.view3d.set_masks(st.masks if st.show_masks else None, st.selection,
                                  reshade=st.masks_change != "edit")
        self._redraw()
        self._update_selection_label()
        self._update_actions()

    def _on_position(self) -> None:
        z = self.state.position[0]
        if self.z_slider.value() != z:
            self.z_slider.blockSignals(True)
            self.z_slider.setValue(z)
            self.z_slider.blockSignals(False)
        self._redraw()

    def _on_selection(self) -> None:
        st = self.state
        if self.view3d is not None and st.masks is not None and not st.is_2d and st.show_masks:
            self.view3d.set_selection(st.selection)
        self._redraw()
        self._update_selection_label()
        self._update_actions()

    def _on_display(self) -> None:
        st = self.state
        if self.view3d is not None and st.image is not None and not st.is_2d:
            self.view3d.set_clim(st.contrast)
            if abs(self.view3d.anisotropy - st.anisotropy) > 1e-9:
                self.view3d.set_anisotropy(st.anisotropy)
                self._set_grid_stretch()
        self._redraw()

    def _display_changed(self) -> None:
        st = self.state
        if st.image is None:
            return
        p = self.display_panel
        ch = max(p.channel.currentIndex(), 0)
        if ch != st.channel:
            self._clims[st.channel] = st.contrast
            clim = self._clims.get(ch) or auto_contrast(st.channel_data(ch))
            st.channel = ch
            self._set_contrast_controls(clim)
            st.contrast = clim
            if self.view3d is not None and not st.is_2d:
                self.view3d.set_image(st.channel_data(), clim, st.anisotropy)
        show_masks = p.show_masks.isChecked()
        masks_toggled = show_masks != st.show_masks
        st.set_display(contrast=p.contrast(), opacity=p.opacity.value() / 100.0,
                       outlines=p.outlines.isChecked(), show_masks=show_masks)
        if self.view3d is not None and not st.is_2d:
            self.view3d.set_method("mip" if p.render3d.currentIndex() == 0 else "translucent")
            if masks_toggled:
                self.view3d.set_masks(st.masks if show_masks else None, st.selection)
            self.view3d.set_visible_layers(p.image3d.isChecked(),
                                           p.masks3d.isChecked() and show_masks)
        self._redraw()

    def _auto_contrast(self) -> None:
        if self.state.image is None:
            return
        clim = auto_contrast(self.state.channel_data())
        self._set_contrast_controls(clim)
        self._display_changed()

    def _redraw(self) -> None:
        st = self.state
        if st.image is None:
            self._show_empty()
            return
        pos = tuple(st.position)
        chan = st.channel_data()
        masks = st.masks if st.show_masks else None
        a = st.anisotropy
        aspects = {"xy": (1.0, 1.0), "xz": (a, 1.0), "yz": (1.0, a)}
        crosses = {"xy": (pos[1], pos[2]), "xz": (pos[0], pos[2]), "yz": (pos[1], pos[0])}
        names = ("xy",) if st.is_2d else ("xy", "xz", "yz")
        lo, hi = st.contrast
        # planes of volumes on disk are read by a background thread; until one is in
        # memory its view keeps its last picture (it redraws when the plane lands)
        image_planes = {name: self._planes.plane(chan, name, pos) for name in names}
        for name in names:
            lab = self._planes.plane(masks, name, pos) if masks is not None else None
            if image_planes[name] is None or (masks is not None and lab is None):
                continue
            gray = render.to_uint8(image_planes[name], lo, hi)
            rgb = render.compose(gray, lab, st.opacity, st.outlines, st.selection)
            v = self.views[name]
            v.cross = crosses[name] if not st.is_2d else None
            v.set_image(rgb, aspects[name])
        z, y, x = st.shape
        self.xy.subtitle = "" if st.is_2d else f"z = {pos[0]}"
        self.xz.subtitle = f"y = {pos[1]}"
        self.yz.subtitle = f"x = {pos[2]}"
        self.z_label.setText(f"{pos[0] + 1} / {z}")
        xy = image_planes["xy"]
        value = "..." if xy is None else f"{xy[pos[1], pos[2]]:.4g}"
        lab = st.label_at(*pos)
        self.pos_label.setText(f"(z, y, x) = {pos}   value {value}"
                               + (f"   mask {lab}" if lab else ""))

    def _update_selection_label(self) -> None:
        st = self.state
        if st.masks is None:
            self.selection_label.setText("No masks yet: run the segmentation.")
            return
        n = int(st.masks.max()) if st.masks.size else 0
        if st.masks_read_only:
            sel = f"Selected: {', '.join(map(str, st.selection))}. " if st.selection else ""
            self.selection_label.setText(
                f"{sel}{n} masks, blockwise (read from the zarr on disk): editing is off.")
            return
        if not st.selection:
            self.selection_label.setText(
                f"{n} masks (largest id). Click a mask to select it; Ctrl+click adds a second "
                "one to merge (M). Del deletes.")
        else:
            sizes = [int(np.count_nonzero(st.masks == s)) for s in st.selection[:4]]
            desc = ", ".join(f"{s} ({v} voxels)" for s, v in zip(st.selection, sizes))
            self.selection_label.setText(f"Selected: {desc}")

    def _update_actions(self) -> None:
        st = self.state
        running = self.is_busy
        has_masks = st.masks is not None
        editable = has_masks and not st.masks_read_only
        self.act_run.setEnabled(not running and st.image is not None)
        self.seg_panel.run_button.setEnabled(not running and st.image is not None)
        self.seg_panel.estimate_button.setEnabled(not running and st.image is not None)
        self.act_cancel.setEnabled(running)
        self.act_save.setEnabled(editable and not running)
        self.act_next.setEnabled(bool(self.queue) and not running)
        self.act_axes.setEnabled(st.path is not None and not running)
        for a, b, ok in (
            (self.act_undo, self.undo_button, st.undo.can_undo),
            (self.act_redo, self.redo_button, st.undo.can_redo),
            (self.act_delete, self.delete_button, bool(st.selection)),
            (self.act_merge, self.merge_button, len(st.selection) >= 2),
        ):
            a.setEnabled(ok and editable and not running)
            b.setEnabled(ok and editable and not running)
        title = self.windowTitle().rstrip(" *")
        self.setWindowTitle(title + (" *" if st.dirty else ""))

    # =====================================================================================
    # input (widgets -> state)
    # =====================================================================================
    def _view_clicked(self, view: str, row: int, col: int, add: bool) -> None:
        st = self.state
        if st.image is None:
            return
        voxel = render.plane_to_voxel(view, row, col, tuple(st.position))
        st.set_position(*voxel)
        if st.masks is not None and st.show_masks:
            st.select(st.label_at(*voxel), add=add)

    def make_training_crops(self, nimg_per_tif: int | None = None, crop_size: int | None = None,
                            then_label: bool = True) -> None:
        """Cut crops of the open volume into train/ beside it, in the worker thread, with the
        current masks (saved first, so the crops start from them), then open labeling mode."""
        if self.is_busy:
            return
        st = self.state
        if st.volume is None or st.path is None or st.is_2d:
            self.statusBar().showMessage("Open a 3D TIFF first (drop it on the window)", 5000)
            return
        if is_lazy(st.volume) or st.masks_read_only:
            self.statusBar().showMessage("Training crops are not available for volumes "
                                         "segmented blockwise", 8000)
            return
        if st.masks is not None and st.dirty and not self.save():
            return
        if nimg_per_tif is None or crop_size is None:
            asked = self._ask_crop_settings()
            if asked is None:
                return
            nimg_per_tif, crop_size = asked
        params = self.seg_panel.params(is_2d=False)
        params.update(nimg_per_tif=int(nimg_per_tif), crop_size=int(crop_size))
        self._run_weights = STAGES_CROPS
        self._crops_then_label = then_label
        log.info("making training crops of %s: %d per orientation, %d px", st.path.name,
                 nimg_per_tif, crop_size)
        worker = CropsWorker(self.backend, st.volume, None, params)
        self._start(worker, self._on_crops, "Making training crops")

    def _ask_crop_settings(self) -> tuple[int, int] | None:
        from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QSpinBox

        dlg = QDialog(self)
        dlg.setWindowTitle("Make training crops")
        form = QFormLayout(dlg)
        n = QSpinBox(dlg)
        n.setRange(1, 1000)
        n.setValue(10)
        n.setToolTip("nimg_per_tif: crops per orientation (XY, YZ, XZ)")
        size = QSpinBox(dlg)
        size.setRange(32, 4096)
        size.setValue(512)
        size.setToolTip("crop_size: side in pixels (smaller planes give smaller crops)")
        form.addRow("crops per orientation", n)
        form.addRow("crop size (px)", size)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel, parent=dlg)
        buttons.accepted.connect(dlg.accept)
        buttons.rejected.connect(dlg.reject)
        form.addRow(buttons)
        if dlg.exec() != QDialog.Accepted:
            return None
        return n.value(), size.value()

    def _on_crops(self, folder, paths, seconds: float) -> None:
        n = sum(1 for p in paths if not str(p).endswith("_masks.tif"))
        msg = f"{n} training crops written to {folder} ({seconds:.1f} s)"
        log.info("%s", msg)
        self.statusBar().showMessage(msg, 10000)
        if folder is not None and self._crops_then_label:
            self.open_labeling(str(folder))

    def open_labeling(self, folder=None):
        """Labeling mode (its own window) for a folder of training crops."""
        if not folder:
            start = str(self.state.path.parent / "train") if self.state.path else ""
            folder = QFileDialog.getExistingDirectory(self, "Folder of training crops", start)
            if not folder:
                return None
        from .labeling import LabelingWindow

        self.labeling = LabelingWindow(folder, self.backend, host=self)
        self.labeling.show()
        return self.labeling

    def _view3d_picked(self, voxel: tuple[int, int, int] | None, label: int, add: bool) -> None:
        """A click in the 3D view: move the cursor there and select the mask hit, as a
        click in a slice view does (a click beside the volume clears the selection)."""
        st = self.state
        if st.image is None or st.is_2d:
            return
        if voxel is not None:
            st.set_position(*voxel)
        if st.masks is not None and st.show_masks:
            st.select(label, add=add)

    def _view_dragged(self, view: str, row: int, col: int) -> None:
        if self.state.image is not None:
            self.state.set_position(
                *render.plane_to_voxel(view, row, col, tuple(self.state.position)))

    def _view_scrolled(self, view: str, steps: int) -> None:
        st = self.state
        if st.image is None:
            return
        axis = {"xy": 0, "xz": 1, "yz": 2}[view]
        pos = list(st.position)
        pos[axis] += steps
        st.set_position(*pos)

    def _step_z(self, steps: int) -> None:
        self._view_scrolled("xy", steps)

    def reset_3d_view(self) -> None:
        if self.view3d is not None and self.state.shape is not None:
            cam = self.view3d.view.camera
            cam.elevation, cam.azimuth = 25, -60
            self.view3d.set_anisotropy(self.state.anisotropy, reset_camera=True)

    # =====================================================================================
    # misc
    # =====================================================================================
    @staticmethod
    def _message(e: BaseException, prefix: str = "") -> str:
        """Core errors carry a complete message; anything else gets its type named."""
        try:
            from cp3d.core.errors import Cp3dError

            if isinstance(e, Cp3dError):
                return str(e)
        except ImportError:
            pass
        return f"{prefix}{type(e).__name__}: {e}"

    def _show_log_location(self) -> None:
        QMessageBox.information(self, "Log file", f"The log is written to\n{self.log_path}")

    def _about(self) -> None:
        from cp3d import __version__

        QMessageBox.about(self, "About cp3d",
                          f"<b>cp3d {__version__}</b><br>3D cell and nucleus segmentation "
                          "following the Cellpose 3 method (Stringer &amp; Pachitariu). "
                          "Please cite Cellpose when you publish results.")

    def closeEvent(self, event) -> None:
        if not self.confirm_discard():
            event.ignore()
            return
        self._closing = True
        self._planes.close()
        if self.labeling is not None:
            self.labeling.close()  # stops its prediction or training threads
        if self.worker is not None:
            self.worker.cancel()
            if self.thread is not None and not self.thread.wait(5000):
                # the core did not reach a cancel check in time: never destroy a running
                # QThread (that aborts the process); let it die with the process instead
                _STUCK_THREADS.append(self.thread)
        if self.loader is not None and not self.loader.thread.wait(10000):
            _STUCK_THREADS.append(self.loader)
        try:
            self.seg_panel.save(self.settings)
            self.settings.sync()
        except Exception:
            pass
        detach_panel(self.log_panel)
        event.accept()
