"""Side panels: segmentation settings (Cellpose parameter names) and display controls."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
)

LOAD_PTH = "Load .pth file..."

# name: (default, tooltip). Names and meanings follow Cellpose so its docs apply.
SEG_DEFAULTS = {
    "diameter": (0.0, "diameter: expected cell diameter in pixels (XY). 0 = auto: estimated "
                 "from the image when segmenting. Images are rescaled so cells match the "
                 "model's training size. 'estimate' measures it now and fills this box."),
    "anisotropy": (1.0, "anisotropy: Z step / XY pixel size. Filled from the file's metadata "
                   "when present. Z is rescaled by this before 3D prediction."),
    "do_3D": (True, "do_3D: predict flows on YX, ZY and ZX slices and run the dynamics in 3D "
              "(Cellpose 3D mode). Off: segment each Z plane in 2D and stitch."),
    "stitch_threshold": (0.25, "stitch_threshold: in 2D + stitch mode, masks in adjacent planes "
                         "with IoU above this are joined into one 3D cell."),
    "flow3D_smooth": (0.0, "flow3D_smooth: standard deviation (pixels) of a Gaussian smoothing "
                      "of the 3D flows before the dynamics; 0 = off. Helps noisy volumes."),
    "min_size": (15, "min_size: masks with fewer voxels are removed (-1 keeps all)."),
    "cellprob_threshold": (0.0, "cellprob_threshold: voxels with cell probability (logit) "
                           "above this are cell. Lower it (e.g. -0.75) to find dim cells; "
                           "every mask grows a little."),
    "niter": (0, "niter: number of gradient-dynamics iterations. 0 = auto (200, more when "
              "cells are larger than the model's training size). More helps long cells."),
    "chan": (0, "chan: channel to segment. 0 = grayscale (first channel), 1..N = that channel."),
    "chan2": (0, "chan2: optional nuclear channel. 0 = none, 1..N = that channel."),
    "batch_size": (8, "batch_size: tiles per network batch. Lower it if memory runs out."),
    "use_gpu": (False, "use_gpu: run the network on the GPU (CUDA/MPS) if one is available."),
    "augment": (False, "augment: average the network's predictions over flipped copies of "
                "each plane. Slightly better masks for four times the network time."),
}


class SegmentationPanel(QGroupBox):
    """Form with the Cellpose segmentation settings; ``params()`` gives segment() kwargs."""

    run_requested = Signal()
    load_model_requested = Signal()
    estimate_requested = Signal()

    def __init__(self, parent=None):
        super().__init__("Segmentation", parent)
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        self.model = QComboBox()
        self.model.setToolTip("pretrained_model: network weights. Bundled and user models, or "
                              "any Cellpose 3 / cp3d .pth file.")
        self.model.setMinimumContentsLength(12)
        self.model.addItem("(loading models...)", None)
        self.model.activated.connect(self._model_activated)
        form.addRow("model", self.model)

        self.diameter = QDoubleSpinBox(decimals=1, minimum=0.0, maximum=2000.0, singleStep=1.0)
        self.diameter.setSpecialValueText("auto")
        self.estimate_button = QPushButton("estimate")
        self.estimate_button.setToolTip("Estimate the cell diameter of the open image with the "
                                        "selected model (runs in the background; Esc cancels)")
        self.estimate_button.clicked.connect(self.estimate_requested)
        self.anisotropy = QDoubleSpinBox(decimals=2, minimum=0.05, maximum=100.0, singleStep=0.1)
        self.mode = QComboBox()
        self.mode.addItems(["3D (do_3D)", "2D + stitch"])
        self.stitch_threshold = QDoubleSpinBox(decimals=2, minimum=0.0, maximum=1.0,
                                               singleStep=0.05)
        self.flow3D_smooth = QDoubleSpinBox(decimals=1, minimum=0.0, maximum=20.0, singleStep=0.5)
        self.min_size = QSpinBox(minimum=-1, maximum=10_000_000)
        self.cellprob_threshold = QDoubleSpinBox(decimals=2, minimum=-8.0, maximum=8.0,
                                                 singleStep=0.25)
        self.niter = QSpinBox(minimum=0, maximum=10_000)
        self.niter.setSpecialValueText("auto")
        self.chan = QSpinBox(minimum=0, maximum=16)
        self.chan2 = QSpinBox(minimum=0, maximum=16)
        self.batch_size = QSpinBox(minimum=1, maximum=256)
        self.use_gpu = QCheckBox("use_gpu")
        self.augment = QCheckBox("augment")
        self.blockwise = QCheckBox("blockwise (large volumes)")
        self.blockwise.setToolTip(
            "Read the image lazily and segment it block by block into NAME_cp_masks.zarr "
            "beside it (cp3d.core.blockwise). Chosen automatically for files that would not "
            "fit in memory. Masks are shown but cannot be edited.")
        self.block_size = QSpinBox(minimum=0, maximum=4096)
        self.block_size.setSpecialValueText("auto")
        self.block_size.setValue(0)
        self.block_size.setToolTip("edge of a block in voxels (each block also reads about "
                                   "one cell diameter around it); auto: the largest blocks "
                                   "that stay within 4 GB each")
        self.autorun = QCheckBox("Run when a file is opened")
        self.autorun.setToolTip("Start segmentation as soon as an image is opened or dropped; "
                                "results are saved next to the image "
                                "(NAME_seg.npy, NAME_cp_masks.tif).")
        self.autorun.setChecked(True)

        rows = [
            ("diameter", self.diameter), ("anisotropy", self.anisotropy), ("mode", self.mode),
            ("stitch_threshold", self.stitch_threshold), ("flow3D_smooth", self.flow3D_smooth),
            ("min_size", self.min_size), ("cellprob_threshold", self.cellprob_threshold),
            ("niter", self.niter), ("chan", self.chan), ("chan2", self.chan2),
            ("batch_size", self.batch_size),
        ]
        for name, w in rows:
            key = "do_3D" if name == "mode" else name
            w.setToolTip(SEG_DEFAULTS[key][1])
            lab = QLabel(name)
            lab.setToolTip(SEG_DEFAULTS[key][1])
            if w is self.diameter:
                row = QHBoxLayout()
                row.addWidget(w, 1)
                row.addWidget(self.estimate_button)
                form.addRow(lab, row)
            else:
                form.addRow(lab, w)
        self.use_gpu.setToolTip(SEG_DEFAULTS["use_gpu"][1])
        form.addRow("", self.use_gpu)
        self.augment.setToolTip(SEG_DEFAULTS["augment"][1])
        form.addRow("", self.augment)
        form.addRow("", self.blockwise)
        form.addRow("block_size", self.block_size)
        form.addRow("", self.autorun)
        self.run_button = QPushButton("Run segmentation")
        self.run_button.setToolTip("Segment the open image with these settings (Ctrl+R)")
        self.run_button.clicked.connect(self.run_requested)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.run_button)
        self.mode.currentIndexChanged.connect(self._mode_changed)
        self.reset()

    def reset(self) -> None:
        d = {k: v[0] for k, v in SEG_DEFAULTS.items()}
        self.diameter.setValue(d["diameter"])
        self.anisotropy.setValue(d["anisotropy"])
        self.mode.setCurrentIndex(0 if d["do_3D"] else 1)
        self.stitch_threshold.setValue(d["stitch_threshold"])
        self.flow3D_smooth.setValue(d["flow3D_smooth"])
        self.min_size.setValue(d["min_size"])
        self.cellprob_threshold.setValue(d["cellprob_threshold"])
        self.niter.setValue(d["niter"])
        self.chan.setValue(d["chan"])
        self.chan2.setValue(d["chan2"])
        self.batch_size.setValue(d["batch_size"])
        self.use_gpu.setChecked(d["use_gpu"])
        self.augment.setChecked(d["augment"])
        self._mode_changed()

    def _mode_changed(self, *_):
        is_2d = getattr(self, "_is_2d", False)
        self.mode.setEnabled(not is_2d)
        self.anisotropy.setEnabled(not is_2d)
        self.stitch_threshold.setEnabled(self.mode.currentIndex() == 1 and not is_2d)
        self.flow3D_smooth.setEnabled(self.mode.currentIndex() == 0 and not is_2d)

    def set_2d(self, is_2d: bool) -> None:
        """A single plane is segmented in 2D whatever the mode: grey out the 3D settings."""
        self._is_2d = is_2d
        self.mode.setToolTip("A 2D image is segmented in 2D" if is_2d else SEG_DEFAULTS["do_3D"][1])
        self._mode_changed()

    # ---- models ------------------------------------------------------------------------
    def set_models(self, infos: list, current: str | None = None) -> None:
        """infos: objects with .name/.path/.bundled (cp3d.core.models.ModelInfo)."""
        keep = current or self.model_name()
        self.model.clear()
        for info in infos:
            tag = "" if getattr(info, "bundled", False) else "  (user)"
            self.model.addItem(f"{info.name}{tag}", str(info.name))
            self.model.setItemData(self.model.count() - 1, str(getattr(info, "path", "")),
                                   Qt.ToolTipRole)
        if keep and self.model.findData(keep) < 0 and keep.endswith(".pth"):
            self.add_model_path(keep)
        self.model.addItem(LOAD_PTH, LOAD_PTH)
        i = self.model.findData(keep) if keep else -1
        if i < 0:  # nothing chosen yet: the bundled default, not the first name in the list
            from cp3d.resources import DEFAULT_MODEL

            i = self.model.findData(DEFAULT_MODEL)
        self.model.setCurrentIndex(max(i, 0))
        self._previous_model = self.model.currentData()

    def add_model_path(self, path: str) -> None:
        i = self.model.findData(path)
        if i < 0:
            from pathlib import Path

            at = (max(0, self.model.count() - 1) if self.model.findData(LOAD_PTH) >= 0
                  else self.model.count())
            self.model.insertItem(at, Path(path).name, path)
            self.model.setItemData(at, path, Qt.ToolTipRole)
            i = at
        self.model.setCurrentIndex(i)
        self._previous_model = path

    def model_name(self) -> str | None:
        data = self.model.currentData()
        return None if data in (None, LOAD_PTH) else str(data)

    def _model_activated(self, index: int) -> None:
        if self.model.itemData(index) == LOAD_PTH:
            self.load_model_requested.emit()
        else:
            self._previous_model = self.model.itemData(index)

    def restore_previous_model(self) -> None:
        """After a cancelled "Load .pth" dialog: back to the model picked before."""
        prev = getattr(self, "_previous_model", None)
        i = self.model.findData(prev) if prev is not None else 0
        self.model.setCurrentIndex(max(i, 0))

    # ---- values ------------------------------------------------------------------------
    def params(self, is_2d: bool = False) -> dict:
        """Keyword arguments for cp3d.core.pipeline.segment (model passed separately)."""
        do_3d = self.mode.currentIndex() == 0 and not is_2d
        return dict(
            diameter=float(self.diameter.value()),  # 0 = auto: the core estimates it
            anisotropy=self.anisotropy.value(),
            do_3D=do_3d,
            stitch_threshold=0.0 if (do_3d or is_2d) else self.stitch_threshold.value(),
            flow3D_smooth=self.flow3D_smooth.value(),
            min_size=self.min_size.value(),
            cellprob_threshold=self.cellprob_threshold.value(),
            niter=self.niter.value() or None,
            chan=self.chan.value(),
            chan2=self.chan2.value(),
            batch_size=self.batch_size.value(),
            use_gpu=self.use_gpu.isChecked(),
            augment=self.augment.isChecked(),
        )

    def save(self, settings) -> None:
        settings.beginGroup("segmentation")
        p = self.params()
        p["do_3D"] = self.mode.currentIndex() == 0
        p["stitch_threshold"] = self.stitch_threshold.value()
        p["diameter"] = self.diameter.value()
        p["niter"] = self.niter.value()
        for k, v in p.items():
            if k != "anisotropy":  # comes from each file
                settings.setValue(k, v)
        settings.setValue("autorun", self.autorun.isChecked())
        settings.setValue("model", self.model_name() or "")
        settings.endGroup()

    def restore(self, settings) -> str | None:
        """Load saved values; returns the saved model name (models are listed later)."""
        settings.beginGroup("segmentation")
        try:
            def get(key, typ, default):
                v = settings.value(key, default)
                if typ is bool:
                    return v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes")
                try:
                    return typ(v)
                except (TypeError, ValueError):
                    return default

            d = {k: v[0] for k, v in SEG_DEFAULTS.items()}
            self.diameter.setValue(get("diameter", float, d["diameter"]))
            self.mode.setCurrentIndex(0 if get("do_3D", bool, d["do_3D"]) else 1)
            self.stitch_threshold.setValue(get("stitch_threshold", float, d["stitch_threshold"]))
            self.flow3D_smooth.setValue(get("flow3D_smooth", float, d["flow3D_smooth"]))
            self.min_size.setValue(get("min_size", int, d["min_size"]))
            self.cellprob_threshold.setValue(
                get("cellprob_threshold", float, d["cellprob_threshold"]))
            self.niter.setValue(get("niter", int, d["niter"]))
            self.chan.setValue(get("chan", int, d["chan"]))
            self.chan2.setValue(get("chan2", int, d["chan2"]))
            self.batch_size.setValue(get("batch_size", int, d["batch_size"]))
            self.use_gpu.setChecked(get("use_gpu", bool, d["use_gpu"]))
            self.augment.setChecked(get("augment", bool, d["augment"]))
            self.autorun.setChecked(get("autorun", bool, True))
            model = settings.value("model", "") or None
        finally:
            settings.endGroup()
        self._mode_changed()
        return model


class DisplayPanel(QGroupBox):
    """Channel, contrast, mask overlay and 3D rendering controls (display only)."""

    changed = Signal()
    auto_contrast_requested = Signal()

    SLIDER_STEPS = 1000

    def __init__(self, parent=None):
        super().__init__("Display", parent)
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        self.channel = QComboBox()
        self.channel.setToolTip("Channel shown in all views "
                                "(does not change what is segmented: see chan)")
        form.addRow("channel", self.channel)

        self.low = QSlider(Qt.Horizontal)
        self.high = QSlider(Qt.Horizontal)
        for s in (self.low, self.high):
            s.setRange(0, self.SLIDER_STEPS)
        self.low.setToolTip("Contrast: intensity shown as black")
        self.high.setToolTip("Contrast: intensity shown as white")
        self.contrast_label = QLabel("")
        self.contrast_label.setStyleSheet("color: gray")
        auto = QPushButton("Auto")
        auto.setToolTip("Contrast from the 0.5-99.8 percentiles of the channel")
        auto.clicked.connect(self.auto_contrast_requested)
        row = QHBoxLayout()
        row.addWidget(self.contrast_label, 1)
        row.addWidget(auto)
        form.addRow("black", self.low)
        form.addRow("white", self.high)
        form.addRow("", row)

        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(45)
        self.opacity.setToolTip("Opacity of the mask colours over the image")
        form.addRow("mask opacity", self.opacity)
        self.show_masks = QCheckBox("masks")
        self.show_masks.setChecked(True)
        self.show_masks.setToolTip("Show the masks in the 2D and 3D views")
        self.outlines = QCheckBox("outlines")
        self.outlines.setChecked(True)
        self.outlines.setToolTip("Draw mask outlines in the 2D views")
        row2 = QHBoxLayout()
        row2.addWidget(self.show_masks)
        row2.addWidget(self.outlines)
        form.addRow("show", row2)

        self.render3d = QComboBox()
        self.render3d.addItems(["MIP", "translucent"])
        self.render3d.setToolTip("3D rendering of the image: maximum intensity projection or "
                                 "front-to-back blending")
        self.image3d = QCheckBox("image")
        self.image3d.setChecked(True)
        self.masks3d = QCheckBox("masks")
        self.masks3d.setChecked(True)
        row3 = QHBoxLayout()
        row3.addWidget(self.render3d)
        row3.addWidget(self.image3d)
        row3.addWidget(self.masks3d)
        form.addRow("3D", row3)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        self._range = (0.0, 1.0)
        for w in (self.low, self.high, self.opacity):
            w.valueChanged.connect(self._emit)
        for w in (self.show_masks, self.outlines, self.image3d, self.masks3d):
            w.toggled.connect(self._emit)
        self.channel.currentIndexChanged.connect(self._emit)
        self.render3d.currentIndexChanged.connect(self._emit)
        self._block = False

    def _emit(self, *_):
        if not self._block:
            self._update_label()
            self.changed.emit()

    def set_channels(self, n: int, current: int = 0) -> None:
        self._block = True
        self.channel.clear()
        self.channel.addItems([f"channel {i}" for i in range(n)])
        self.channel.setCurrentIndex(min(current, max(n - 1, 0)))
        self.channel.setEnabled(n > 1)
        self._block = False

    def set_contrast(self, data_range: tuple[float, float], clim: tuple[float, float]) -> None:
        self._block = True
        self._range = data_range
        self.low.setValue(self._to_slider(clim[0]))
        self.high.setValue(self._to_slider(clim[1]))
        self._block = False
        self._update_label()

    def _to_slider(self, v: float) -> int:
        lo, hi = self._range
        return int(round((v - lo) / max(hi - lo, 1e-12) * self.SLIDER_STEPS))

    def _from_slider(self, s: int) -> float:
        lo, hi = self._range
        return lo + (hi - lo) * s / self.SLIDER_STEPS

    def contrast(self) -> tuple[float, float]:
        a, b = self._from_slider(self.low.value()), self._from_slider(self.high.value())
        if b <= a:
            b = a + (self._range[1] - self._range[0]) / self.SLIDER_STEPS
        return (a, b)

    def _update_label(self) -> None:
        a, b = self.contrast()
        fmt = (lambda v: f"{v:,.0f}") if max(abs(a), abs(b)) >= 1000 else (lambda v: f"{v:.4g}")
        self.contrast_label.setText(f"{fmt(a)} – {fmt(b)}")
