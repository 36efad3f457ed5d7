"""Train dialog: fine-tune a model on the labeled crops in a worker thread, with a live loss
plot, progress, time left and Cancel; the validation AP@0.5 of the base and the new model on
held-out crops says whether training helped.

All training logic is cp3d.core.train.train_model; this module only gathers the settings,
holds crops out for validation and shows what the core reports.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from PySide6.QtCore import QPointF, QRectF, Qt, Signal, Slot
from PySide6.QtGui import QColor, QPainter, QPainterPath, QPen
from PySide6.QtWidgets import (
    QComboBox,
    QDialog,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .worker import CancellableWorker, start_worker

log = logging.getLogger("cp3d.app")

TRAIN_COLOR = QColor(90, 160, 255)
VAL_COLOR = QColor(255, 160, 60)
SCRATCH = "(new network from scratch)"
# A cell cut by a crop's edge can leave a labelled sliver of a few pixels, which no model is
# expected to find: truth objects under this fraction of the median one are left out of the AP.
SLIVER_FRACTION = 0.1
# AdamW learning rates: Cellpose's 0.005 suits a network trained from scratch; fine-tuning a
# trained one at that rate wrecks it in a few steps (validation loss x20 on the bundled model)
LR_SCRATCH, LR_FINETUNE = 0.005, 0.0005


def split_crops(paths: list[Path], fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """(train, validation): hold out about ``fraction`` of the crops (at least one when there
    are two or more, never all of them), picked with a fixed seed so runs compare."""
    paths = list(paths)
    if len(paths) < 2:
        return paths, []
    n_val = min(len(paths) - 1, max(1, int(round(fraction * len(paths)))))
    order = np.random.default_rng(seed).permutation(len(paths))
    val = {int(i) for i in order[:n_val]}
    return ([p for i, p in enumerate(paths) if i not in val],
            [p for i, p in enumerate(paths) if i in val])


def crop_pairs(paths: list[Path]) -> list:
    """TrainingPairs of crops and their saved labels (CROP_seg.npy), read by the core."""
    from cp3d.core.train_cli import read_pairs

    from .crops import seg_path

    return read_pairs([(p, seg_path(p)) for p in paths])


class LossPlot(QWidget):
    """Training and validation loss per epoch, drawn with QPainter (no plotting library)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.train: list[float] = []
        self.val: list[float | None] = []
        self.n_epochs = 1
        self.setMinimumSize(360, 200)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)

    def set_data(self, train, val, n_epochs: int) -> None:
        self.train, self.val, self.n_epochs = list(train), list(val), max(int(n_epochs), 1)
        self.update()

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing, True)
        p.fillRect(self.rect(), QColor(24, 24, 28))
        fm = p.fontMetrics()
        left, right, top, bottom = 8 + fm.horizontalAdvance("0.000"), 12, 26, 8 + 2 * fm.height()
        box = QRectF(left, top, max(self.width() - left - right, 10),
                     max(self.height() - top - bottom, 10))
        p.setPen(QPen(QColor(110, 110, 120), 1))
        p.drawRect(box)
        values = [v for v in self.train + self.val if v is not None and np.isfinite(v)]
        ymax = max(values) * 1.08 if values else 1.0
        ymax = ymax if ymax > 0 else 1.0
        p.setPen(QColor(200, 200, 205))
        for frac in (0.0, 0.5, 1.0):
            y = box.bottom() - frac * box.height()
            p.drawText(QPointF(4, y + fm.ascent() / 2), f"{ymax * frac:.3g}")
        p.drawText(QPointF(box.left(), box.bottom() + fm.height() + 2), "1")
        last = str(self.n_epochs)
        p.drawText(QPointF(box.right() - fm.horizontalAdvance(last),
                           box.bottom() + fm.height() + 2), last)
        mid = "epoch"
        p.drawText(QPointF(box.center().x() - fm.horizontalAdvance(mid) / 2,
                           box.bottom() + fm.height() + 2), mid)

        def xy(i, v):
            x = box.left() + (i / max(self.n_epochs - 1, 1)) * box.width()
            return QPointF(x, box.bottom() - v / ymax * box.height())

        for series, color in ((self.train, TRAIN_COLOR), (self.val, VAL_COLOR)):
            pts = [xy(i, v) for i, v in enumerate(series) if v is not None and np.isfinite(v)]
            if not pts:
                continue
            p.setPen(QPen(color, 2))
            if len(pts) == 1:
                p.setBrush(color)
                p.drawEllipse(pts[0], 3, 3)
                continue
            path = QPainterPath(pts[0])
            for q in pts[1:]:
                path.lineTo(q)
            p.setBrush(Qt.NoBrush)
            p.drawPath(path)
        # legend
        x = box.left()
        for name, color in (("training loss", TRAIN_COLOR), ("validation loss", VAL_COLOR)):
            p.setPen(QPen(color, 3))
            p.drawLine(QPointF(x, 13), QPointF(x + 18, 13))
            p.setPen(QColor(225, 225, 228))
            p.drawText(QPointF(x + 24, 13 + fm.ascent() / 2 - 1), name)
            x += 24 + fm.horizontalAdvance(name) + 20
        p.end()


class TrainWorker(CancellableWorker):
    """Base AP, training, new AP, in a QThread. Signals are queued to the GUI thread."""

    epoch = Signal(int, float, object)  # epoch, train loss, validation loss or None
    evaluated = Signal(str, float)  # "base" / "new", mean AP@0.5 on the held-out crops
    succeeded = Signal(object)  # TrainResult

    def __init__(self, backend, train_crops, val_crops, base, save_path: Path, settings: dict):
        super().__init__()
        self.backend = backend
        self.train_crops, self.val_crops = list(train_crops), list(val_crops)
        self.base, self.save_path, self.settings = base, Path(save_path), dict(settings)

    def _ap(self, model, pairs, params) -> float:
        """Mean AP@0.5 of ``model`` segmenting each held-out crop in 2D, slivers left out."""
        from cp3d.core.io import Volume
        from cp3d.core.metrics import average_precision, ignore_small_truth

        aps = []
        for p in pairs:
            self.token.check()
            vol = Volume(data=np.asarray(p.image), path=Path(p.source))
            r = self.backend.segment(vol, model, cancel=self.token, **params)
            pred = np.asarray(r.masks).reshape(np.shape(p.masks))
            gt, pred = ignore_small_truth(p.masks, pred, SLIVER_FRACTION)
            aps.append(float(average_precision(gt, pred, thresholds=(0.5,))[0][0]))
        return float(np.mean(aps)) if aps else float("nan")

    @Slot()
    def run(self) -> None:
        from cp3d.core.errors import Cancelled, Cp3dError

        ckpt_dir = Path(tempfile.mkdtemp(prefix="cp3d-train-"))
        try:
            s = self.settings
            use_gpu = bool(s.get("use_gpu", False))
            seg = dict(s.get("segment") or {}, do_3D=False, stitch_threshold=0.0,
                       use_gpu=use_gpu)
            self.progress.emit("reading crops", 0.0)
            train_pairs = crop_pairs(self.train_crops)
            val_pairs = crop_pairs(self.val_crops) if self.val_crops else []
            self.token.check()
            if val_pairs and self.base is not None:
                self.progress.emit("validating the base model", 0.0)
                base_model = self.backend.load_model(self.base, use_gpu)
                self.evaluated.emit("base", self._ap(base_model, val_pairs, seg))
            from cp3d.core.models import pick_device
            from cp3d.core.train import train_model

            result = train_model(
                train_pairs, val_pairs or None, save_path=self.save_path,
                pretrained_model=self.base, n_epochs=int(s["n_epochs"]),
                learning_rate=float(s["learning_rate"]), min_train_masks=1,
                evaluate_ap=False, device=pick_device(use_gpu),
                nimg_per_epoch=max(8, len(train_pairs)),
                checkpoint_path=ckpt_dir / "train.ckpt",
                on_epoch=lambda e, tr, te: self.epoch.emit(int(e), float(tr), te),
                progress=self._progress, cancel=self.token,
                metadata={"trained_with": "cp3d labeling mode",
                          "crops": [str(p) for p in self.train_crops]})
            if val_pairs and result.model_path is not None:
                self.progress.emit("validating the new model", 0.0)
                try:
                    from cp3d.core.models import load_model

                    new = load_model(result.model_path, device=pick_device(use_gpu))
                    self.evaluated.emit("new", self._ap(new, val_pairs, seg))
                except Cancelled:
                    pass  # the model is saved; only its score is skipped
            self.succeeded.emit(result)
        except Cancelled:
            self.cancelled.emit()
        except Cp3dError as e:
            self.failed.emit(str(e))
        except MemoryError:
            self.failed.emit("Out of memory: use fewer or smaller crops, or the GPU.")
        except Exception as e:  # a bug: report it, never crash the window
            log.error("unexpected error during training:\n%s", traceback.format_exc())
            self.failed.emit(f"Unexpected error during training: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
            self.done.emit()


def _fmt(seconds: float) -> str:
    m, s = divmod(int(round(max(seconds, 0))), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class TrainDialog(QDialog):
    """Settings, live loss plot and before/after AP for training on labeled crops.

    ``host`` (the main window, optional) supplies the model list, segmentation settings and
    GPU choice, and gets the new model selected (and can re-segment its volume with it)."""

    def __init__(self, crops: list[Path], backend, host=None, parent=None):
        super().__init__(parent)
        self.setWindowTitle("Train a model on the labeled crops")
        self.setModal(False)
        self.crops = list(crops)
        self.backend = backend
        self.host = host
        self.worker: TrainWorker | None = None
        self.thread = None
        self.result = None
        self.ap: dict[str, float] = {}
        self.errors: list[str] = []
        self.train_losses: list[float] = []
        self.val_losses: list = []
        self._t0 = 0.0
        self.train_crops, self.val_crops = split_crops(self.crops)

        self.base = QComboBox()
        self.base.setToolTip("Model to start from (fine-tuning keeps what it knows)")
        for name in self._model_names():
            self.base.addItem(name, name)
        self.base.addItem(SCRATCH, None)
        current = self._host_model()
        if current and self.base.findData(current) >= 0:
            self.base.setCurrentIndex(self.base.findData(current))
        self.name = QLineEdit()
        self.name.setToolTip("File name of the new model in your models folder")
        self.name.setText(self._default_name())
        self.epochs = QSpinBox(minimum=1, maximum=10_000)
        self.epochs.setValue(100)
        self.epochs.setToolTip("n_epochs: passes over the crops (Cellpose's GUI uses 100)")
        self.lr = QDoubleSpinBox(decimals=5, minimum=0.00001, maximum=1.0, singleStep=0.0005)
        self.lr.setToolTip("learning_rate (AdamW, with warm-up and decay over the epochs). "
                           f"Default {LR_FINETUNE} to fine-tune a model, {LR_SCRATCH} from scratch")
        self.lr.setValue(LR_FINETUNE if self.base.currentData() else LR_SCRATCH)
        self.base.currentIndexChanged.connect(self._base_changed)
        n_masks = sum(self._count(p) for p in self.crops)
        self.crops_label = QLabel(
            f"{len(self.crops)} labeled crops ({n_masks} masks): {len(self.train_crops)} for "
            f"training, {len(self.val_crops)} held out for validation"
            + ("" if self.val_crops else " (label 2 or more crops to validate)"))
        self.crops_label.setWordWrap(True)
        self.problem = QLabel("")
        self.problem.setStyleSheet("color: #e06060")
        self.problem.setWordWrap(True)

        form = QFormLayout()
        form.addRow("base model", self.base)
        form.addRow("new model name", self.name)
        form.addRow("epochs", self.epochs)
        form.addRow("learning rate", self.lr)
        form.addRow("crops", self.crops_label)

        self.plot = LossPlot()
        self.plot.set_data([], [], self.epochs.value())
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.stage = QLabel("")
        self.time_label = QLabel("")
        self.ap_label = QLabel("Validation AP@0.5 (held-out crops): base –, new –")
        self.train_button = QPushButton("Train")
        self.train_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.resegment_button = QPushButton("Re-segment current volume with the new model")
        self.resegment_button.setEnabled(False)
        self.close_button = QPushButton("Close")
        self.train_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.resegment_button.clicked.connect(self.resegment)
        self.close_button.clicked.connect(self.close)
        self.name.textChanged.connect(self._validate)

        status = QHBoxLayout()
        status.addWidget(self.stage, 1)
        status.addWidget(self.time_label)
        buttons = QHBoxLayout()
        for b in (self.train_button, self.cancel_button, self.resegment_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.close_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.problem)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.progress)
        lay.addLayout(status)
        lay.addWidget(self.ap_label)
        lay.addLayout(buttons)
        self.resize(640, 620)
        self._validate()

    # ---- settings ----------------------------------------------------------------------
    def _base_changed(self, *_) -> None:
        """Suggest the learning rate that suits fine-tuning or training from scratch."""
        if self.lr.value() in (0.0, LR_SCRATCH, LR_FINETUNE):  # keep a rate the user typed
            self.lr.setValue(LR_FINETUNE if self.base.currentData() else LR_SCRATCH)

    def _model_names(self) -> list[str]:
        try:
            return [m.name for m in self.backend.list_models()]
        except Exception as e:
            log.warning("could not list models: %s", e)
            return []

    def _host_model(self) -> str | None:
        panel = getattr(self.host, "seg_panel", None)
        return panel.model_name() if panel is not None else None

    def _default_name(self) -> str:
        base = self.base.currentData() or "cp3d"
        return f"{Path(str(base)).stem}_tuned_{time.strftime('%Y%m%d_%H%M')}"

    @staticmethod
    def _count(p: Path) -> int:
        from .crops import count_labels

        return count_labels(p)

    def save_path(self) -> Path:
        from cp3d.core.models import user_models_dir

        return user_models_dir() / f"{self.name.text().strip()}.pth"

    def _validate(self, *_) -> str:
        """Why training cannot start now ("" when it can); disables Train and says so."""
        name = self.name.text().strip()
        msg = ""
        if not self.crops:
            msg = "No labeled crops: draw or correct the masks of at least one crop first."
        elif not any(self._count(p) > 0 for p in self.crops):
            msg = "The labeled crops hold no masks: training needs masks to learn from."
        elif not name or not re.fullmatch(r"[\w.\-]+", name):
            msg = "Name the new model (letters, digits, _ . - only)."
        elif self.save_path().exists():
            done = self.result is not None and Path(self.result.model_path) == self.save_path()
            msg = (f"Saved as {name}. Rename to train another." if done else
                   f"A model named {name} exists already: choose another name.")
        self.problem.setText(msg)
        ok = msg.startswith("Saved as")
        self.problem.setStyleSheet("color: #70c070" if ok else "color: #e06060")
        self.train_button.setEnabled(not msg and self.worker is None)
        return msg

    # ---- running -----------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.worker is not None

    def start(self) -> None:
        if self.running or self._validate():
            return
        settings = dict(n_epochs=self.epochs.value(), learning_rate=self.lr.value(),
                        use_gpu=self._host_gpu(), segment=self._host_params())
        self.train_losses, self.val_losses, self.ap, self.result = [], [], {}, None
        self.plot.set_data([], [], self.epochs.value())
        self._update_ap()
        w = TrainWorker(self.backend, self.train_crops, self.val_crops, self.base.currentData(),
                        self.save_path(), settings)
        q = Qt.QueuedConnection
        w.progress.connect(self._on_progress, q)
        w.epoch.connect(self._on_epoch, q)
        w.evaluated.connect(self._on_evaluated, q)
        w.succeeded.connect(self._on_succeeded, q)
        w.failed.connect(self._on_failed, q)
        w.cancelled.connect(self._on_cancelled, q)
        w.done.connect(self._on_done, q)
        self.worker = w
        self._t0 = time.perf_counter()
        self._set_running(True)
        log.info("training %s from %s on %d crops (%d held out), %d epochs, lr %g",
                 self.save_path().name, self.base.currentText(), len(self.train_crops),
                 len(self.val_crops), self.epochs.value(), self.lr.value())
        self.thread = start_worker(w)

    def _host_gpu(self) -> bool:
        panel = getattr(self.host, "seg_panel", None)
        return bool(panel.use_gpu.isChecked()) if panel is not None else False

    def _host_params(self) -> dict:
        panel = getattr(self.host, "seg_panel", None)
        if panel is None:
            return {}
        p = panel.params(is_2d=True)
        return {k: v for k, v in p.items() if k not in ("anisotropy", "use_gpu", "do_3D")}

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
            self.stage.setText("cancelling...")
            self.cancel_button.setEnabled(False)

    def _set_running(self, running: bool) -> None:
        for w in (self.base, self.name, self.epochs, self.lr):
            w.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        self.close_button.setEnabled(not running)
        if running:
            self.resegment_button.setEnabled(False)
            self.progress.setValue(0)
            self.stage.setText("starting")
            self.time_label.setText("")
        self._validate()

    def _on_progress(self, stage: str, fraction: float) -> None:
        self.stage.setText(f"{stage}  {int(round(fraction * 100))}%")
        if stage == "training":
            self.progress.setValue(int(fraction * 1000))
            el = time.perf_counter() - self._t0
            txt = f"{_fmt(el)} elapsed"
            if fraction > 0.02:
                txt += f", ~{_fmt(el * (1 - fraction) / fraction)} left"
            self.time_label.setText(txt)

    def _on_epoch(self, epoch: int, train_loss: float, val_loss) -> None:
        self.train_losses.append(train_loss)
        self.val_losses.append(val_loss)
        self.plot.set_data(self.train_losses, self.val_losses, self.epochs.value())

    def _on_evaluated(self, which: str, ap: float) -> None:
        self.ap[which] = ap
        self._update_ap()

    def _update_ap(self) -> None:
        def f(k):
            v = self.ap.get(k)
            return "–" if v is None or not np.isfinite(v) else f"{v:.2f}"

        if not self.val_crops:
            self.ap_label.setText("Validation AP@0.5: no held-out crops (label 2 or more)")
        else:
            self.ap_label.setText(f"Validation AP@0.5 on {len(self.val_crops)} held-out crop(s): "
                                  f"base {f('base')}  →  new {f('new')}")
            self.ap_label.setToolTip(
                "Mean AP at IoU 0.5 over the held-out crops, segmented in 2D. Labelled "
                f"objects under {SLIVER_FRACTION:g} x the median one (cells cut by a crop's "
                "edge) and the masks inside them are left out.")

    def _on_succeeded(self, result) -> None:
        self.result = result
        path = Path(result.model_path)
        self.progress.setValue(1000)
        self.stage.setText(f"saved {path.name} ({result.epochs_done} epochs, "
                           f"{_fmt(result.seconds)})")
        log.info("trained model saved: %s", path)
        self._select_in_host(path)
        self.resegment_button.setEnabled(self._host_can_segment())

    def _select_in_host(self, path: Path) -> None:
        panel = getattr(self.host, "seg_panel", None)
        if panel is None:
            return
        try:
            panel.set_models(self.backend.list_models(), current=path.stem)
        except Exception as e:  # the list is refreshed at the next start anyway
            log.warning("could not refresh the model list: %s", e)
            panel.add_model_path(str(path))
        self.host._saved_model = path.stem

    def _host_can_segment(self) -> bool:
        st = getattr(self.host, "state", None)
        return st is not None and st.image is not None

    def resegment(self) -> None:
        """Run the main window's segmentation with the new (selected) model."""
        if self.host is not None and self._host_can_segment() and not self.host.is_busy:
            self.host.run_segmentation()
            self.host.raise_()

    def _on_failed(self, message: str) -> None:
        self.errors.append(message)
        log.error("training failed: %s", message)
        self.stage.setText("failed")
        self.problem.setText(message)

    def _on_cancelled(self) -> None:
        log.info("training cancelled; no model was saved")
        self.stage.setText("cancelled; no model was saved")

    def _on_done(self) -> None:
        if self.thread is not None:
            self.thread.wait(10_000)
        self.worker = self.thread = None
        self._set_running(False)

    def closeEvent(self, event) -> None:
        if self.worker is not None:  # closing the dialog stops training
            self.worker.cancel()
            if self.thread is not None:
                self.thread.wait(30_000)
        event.accept()
