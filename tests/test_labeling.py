"""Labeling mode and train dialog (pytest-qt; run under Xvfb through pytest-xvfb).

Crops are cut from the bundled sample volume; training uses a tiny random-init CPnet so a
run takes seconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tifffile

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")

from PySide6.QtCore import QEvent, QPointF, QSettings, Qt  # noqa: E402
from PySide6.QtGui import QMouseEvent  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

from cp3d.app import crops  # noqa: E402
from cp3d.app.backend import Backend  # noqa: E402
from cp3d.app.labeling import LabelingWindow  # noqa: E402
from cp3d.app.train_dialog import TrainDialog, TrainWorker, split_crops  # noqa: E402

pytestmark = pytest.mark.gui


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sample():
    from cp3d.resources import SAMPLE_DIR

    img = tifffile.imread(SAMPLE_DIR / "sample_nuclei.tif")
    gt = tifffile.imread(SAMPLE_DIR / "sample_nuclei_masks.tif")
    return img, gt


def make_crops(folder: Path, sample, n=4, size=96, with_masks=(), labeled=()) -> list[Path]:
    """n YX crops of the sample; ``with_masks``: indices that get CROP_masks.tif (a
    "prediction": the ground truth); ``labeled``: indices whose labels are saved."""
    img, gt = sample
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        z = 8 + 7 * k
        y0, x0 = (k * 11) % 32, (k * 17) % 32
        p = folder / f"sample_yx_z{z:04d}_crop{k}.tif"
        tifffile.imwrite(p, img[z, y0:y0 + size, x0:x0 + size], photometric="minisblack")
        m = gt[z, y0:y0 + size, x0:x0 + size]
        if k in with_masks:
            tifffile.imwrite(folder / f"{p.stem}_masks.tif", m, photometric="minisblack")
        if k in labeled:
            crops.save_labels(p, m)
        paths.append(p)
    return paths


@pytest.fixture
def models_dir(tmp_path, monkeypatch):
    """User models folder holding a tiny random-init base network."""
    import torch

    from cp3d.core.models import save_model
    from cp3d.core.net import CPnet

    torch.set_num_threads(1)
    folder = tmp_path / "models"
    folder.mkdir()
    torch.manual_seed(0)
    save_model(CPnet([2, 8, 16, 32], nout=3, sz=3, diam_mean=16.0), folder / "tinybase.pth")
    monkeypatch.setenv("CP3D_USER_MODELS", str(folder))
    return folder


def show_active(qtbot, w, size=(900, 760)) -> None:
    """Show and activate a window: keyboard shortcuts only reach the active window."""
    w.resize(*size)
    with qtbot.waitExposed(w):
        w.show()
    with qtbot.waitActive(w):
        w.activateWindow()


def labeling_window(qtbot, folder, host=None, backend=None) -> LabelingWindow:
    w = LabelingWindow(folder, backend or Backend(), host=host)
    qtbot.addWidget(w)
    show_active(qtbot, w)
    return w


def host_window(qtbot, tmp_path, model_name: str):
    """The main window (no 3D view) with ``model_name`` chosen in its model box."""
    from cp3d.app.window import MainWindow

    host = MainWindow(backend=Backend(), settings=QSettings(str(tmp_path / "s.ini"),
                                                            QSettings.IniFormat),
                      log_file=tmp_path / "cp3d.log", enable_3d=False)
    qtbot.addWidget(host)
    qtbot.waitUntil(lambda: host.seg_panel.model.findData(model_name) >= 0, timeout=20_000)
    host.seg_panel.model.setCurrentIndex(host.seg_panel.model.findData(model_name))
    return host


def mouse(widget, kind, pos: QPointF, button=Qt.LeftButton, buttons=Qt.LeftButton,
          modifiers=Qt.NoModifier) -> None:
    types = {"press": QEvent.MouseButtonPress, "move": QEvent.MouseMove,
             "release": QEvent.MouseButtonRelease}
    glob = QPointF(widget.mapToGlobal(pos.toPoint()))
    ev = QMouseEvent(types[kind], pos, glob, button if kind != "move" else Qt.NoButton,
                     buttons if kind != "release" else Qt.NoButton, modifiers)
    QApplication.sendEvent(widget, ev)


def drag(canvas, pixels) -> None:
    """Press at the first (row, col) pixel, move through the others, release at the last."""
    pts = [canvas.pixel_to_widget(r + 0.5, c + 0.5) for r, c in pixels]
    mouse(canvas, "press", pts[0])
    for p in pts[1:]:
        mouse(canvas, "move", p)
    mouse(canvas, "release", pts[-1])


def click(canvas, row, col, ctrl=False) -> None:
    p = canvas.pixel_to_widget(row + 0.5, col + 0.5)
    mods = Qt.ControlModifier if ctrl else Qt.NoModifier
    mouse(canvas, "press", p, modifiers=mods)
    mouse(canvas, "release", p, modifiers=mods)


def saved_masks(path: Path) -> np.ndarray:
    return np.asarray(np.load(crops.seg_path(path), allow_pickle=True).item()["masks"])


# --------------------------------------------------------------------------- model


def test_polygon_and_brush_geometry():
    m = crops.polygon_mask([(2, 2), (2, 7), (7, 7), (7, 2)], (10, 10))
    assert m[2:7, 2:8].all() and m.sum() == 30
    tri = crops.polygon_mask([(0, 0), (0, 9), (9, 0)], (10, 10))
    assert tri[1, 1] and not tri[8, 8]
    s = crops.stroke_mask([(5, 1), (5, 8)], 1.5, (10, 10))
    assert s[5].all() and not s[0].any()
    assert not crops.stroke_mask([(-9, -9)], 1.5, (10, 10)).any()


def test_crop_labels_edits_and_undo(tmp_path):
    changes = []
    doc = crops.CropLabels(np.zeros((20, 20), np.uint32), on_change=lambda: changes.append(1))
    a = doc.add_polygon([(2, 2), (2, 9), (9, 9), (9, 2)])
    b = doc.add_polygon([(5, 5), (5, 15), (15, 15), (15, 5)])  # overlaps a: only free pixels
    assert (a, b) == (1, 2) and doc.n_masks == 2
    assert (doc.labels[2:9, 2:10] == 1).all()
    doc.paint([(18, 18)], 1.0, b)
    doc.merge([a, b])
    assert doc.n_masks == 1
    doc.delete([1])
    assert doc.n_masks == 0
    for _ in range(4):
        doc.undo_edit()
    assert doc.n_masks == 1 and doc.undo_edit() and doc.n_masks == 0
    assert doc.redo_edit() and doc.n_masks == 1 and len(changes) == 11
    crop = tmp_path / "c.tif"
    tifffile.imwrite(crop, np.zeros((20, 20), np.uint16))
    crops.save_labels(crop, doc.labels)
    labels, source = crops.read_labels(crop, (20, 20))
    assert source == "labels" and (labels == doc.labels).all()
    assert crops.count_labels(crop) == 1


# --------------------------------------------------------------------------- GUI


def test_draw_undo_redo_autosave_and_tools(qtbot, tmp_path, sample):
    paths = make_crops(tmp_path / "train", sample, n=3, with_masks=(1,))
    w = labeling_window(qtbot, tmp_path / "train")
    assert w.path == paths[0] and w.doc.n_masks == 0 and w.source == ""
    assert not w.act_train.isEnabled()  # nothing labeled yet
    assert "labeled crops: 0 / 3" in w.counter.text()
    canvas = w.canvas
    qtbot.keyClick(canvas, Qt.Key_D)
    assert canvas.tool == "draw"
    # a freehand outline around (20..40, 30..60) becomes one filled mask on release
    outline = [(20, 30), (20, 45), (20, 60), (30, 60), (40, 60), (40, 45), (40, 30), (30, 30)]
    drag(canvas, outline)
    labels = w.doc.labels
    assert w.doc.n_masks == 1
    inside = labels[22:38, 32:58]
    assert (inside == inside[0, 0]).all() and inside[0, 0] > 0
    assert labels[10, 10] == 0 and labels[45, 45] == 0
    area = int((labels > 0).sum())
    assert 18 * 28 <= area <= 22 * 32
    # saved at once, atomically (no temporary file left), and counted
    seg = crops.seg_path(paths[0])
    assert seg.exists() and (saved_masks(paths[0]) == labels).all()
    assert not [p for p in seg.parent.iterdir() if p.name.endswith(".part")]
    assert "labeled crops: 1 / 3" in w.counter.text() and w.act_train.isEnabled()
    # undo removes it (and the file follows), redo brings it back
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.ControlModifier)
    assert w.doc.n_masks == 0 and saved_masks(paths[0]).max() == 0
    assert "labeled crops: 0 / 3" in w.counter.text()
    qtbot.keyClick(canvas, Qt.Key_Z, Qt.ControlModifier | Qt.ShiftModifier)
    assert w.doc.n_masks == 1 and saved_masks(paths[0]).max() == 1

    # brush: a new mask elsewhere; starting inside a mask extends that mask
    qtbot.keyClick(canvas, Qt.Key_B)
    w.brush.setValue(3)
    drag(canvas, [(70, 20), (70, 40)])
    assert w.doc.n_masks == 2 and w.doc.labels[70, 30] == 2
    drag(canvas, [(30, 45), (30, 75)])
    assert w.doc.labels[30, 72] == 1 and w.doc.n_masks == 2
    # erase
    qtbot.keyClick(canvas, Qt.Key_E)
    drag(canvas, [(60, 30), (80, 30)])
    assert w.doc.labels[70, 30] == 0 and w.doc.labels[70, 20] == 2
    # select two, merge, delete
    qtbot.keyClick(canvas, Qt.Key_S)
    click(canvas, 30, 45)
    click(canvas, 70, 20, ctrl=True)
    assert sorted(w.selection) == [1, 2]
    qtbot.keyClick(canvas, Qt.Key_M)
    assert w.doc.n_masks == 1
    qtbot.keyClick(canvas, Qt.Key_Delete)
    assert w.doc.n_masks == 0 and saved_masks(paths[0]).max() == 0
    # zoom at the cursor keeps working with the mapping
    canvas.zoom_at(2.0, QPointF(100, 100))
    r, c = canvas.widget_to_pixel(canvas.pixel_to_widget(10, 20))
    assert abs(r - 10) < 1e-6 and abs(c - 20) < 1e-6

    # the next crop starts from its prediction (CROP_masks.tif), not saved until accepted
    qtbot.keyClick(canvas, Qt.Key_N)
    assert w.path == paths[1] and w.source == "prediction" and w.doc.n_masks > 5
    assert not crops.seg_path(paths[1]).exists()
    qtbot.keyClick(canvas, Qt.Key_Return)
    assert crops.seg_path(paths[1]).exists() and w.n_labeled == 1
    # help overlay
    qtbot.keyClick(canvas, Qt.Key_F1)
    assert "undo" in canvas.help_text
    qtbot.keyClick(canvas, Qt.Key_F1)
    assert canvas.help_text == ""
    assert w.errors == []


def test_predict_on_demand_with_the_current_model(qtbot, tmp_path, sample, monkeypatch):
    make_crops(tmp_path / "train", sample, n=1)
    monkeypatch.setenv("CP3D_USER_MODELS", str(tmp_path / "none"))
    host = host_window(qtbot, tmp_path, "cp3d_nuclei")
    w = host.open_labeling(tmp_path / "train")
    qtbot.addWidget(w)
    assert w.doc.n_masks == 0
    w.predict()
    assert w.busy and not w.act_next.isEnabled()
    qtbot.waitUntil(lambda: not w.busy, timeout=60_000)
    assert w.errors == [] and w.source == "prediction"
    # the bundled model finds the nuclei of the crop; nothing is saved before the user agrees
    assert w.doc.n_masks >= 5 and not crops.seg_path(w.path).exists()
    w.undo()  # the prediction is one undoable step
    assert w.doc.n_masks == 0
    host.state.dirty = False
    host.close()


def test_train_refused_without_labeled_masks(qtbot, tmp_path, sample, models_dir):
    paths = make_crops(tmp_path / "train", sample, n=2)
    w = labeling_window(qtbot, tmp_path / "train")
    assert not w.act_train.isEnabled() and "Label at least one" in w.act_train.toolTip()
    d = TrainDialog([], Backend())
    qtbot.addWidget(d)
    assert not d.train_button.isEnabled() and "No labeled crops" in d.problem.text()
    crops.save_labels(paths[0], np.zeros((96, 96), np.uint32))  # saved, but no mask
    d2 = TrainDialog([paths[0]], Backend())
    qtbot.addWidget(d2)
    assert not d2.train_button.isEnabled() and "no masks" in d2.problem.text()
    d2.start()
    assert not d2.running


def test_split_keeps_crops_for_training():
    assert split_crops([Path("a")]) == ([Path("a")], [])
    tr, va = split_crops([Path(str(i)) for i in range(10)])
    assert len(va) == 2 and len(tr) == 8 and not set(tr) & set(va)


def test_cancel_stops_training_cleanly(qtbot, tmp_path, sample, models_dir):
    paths = make_crops(tmp_path / "train", sample, n=3, labeled=(0, 1, 2))
    d = TrainDialog(paths, Backend())
    qtbot.addWidget(d)
    d.show()
    d.base.setCurrentIndex(d.base.findData("tinybase"))
    d.name.setText("never_saved")
    d.epochs.setValue(2000)
    assert d.train_button.isEnabled()
    qtbot.mouseClick(d.train_button, Qt.LeftButton)
    assert d.running and not d.train_button.isEnabled() and d.cancel_button.isEnabled()
    qtbot.waitUntil(lambda: len(d.train_losses) >= 1, timeout=120_000)
    qtbot.mouseClick(d.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not d.running, timeout=30_000)
    assert "cancelled" in d.stage.text() and d.errors == [] and d.result is None
    assert sorted(p.name for p in models_dir.iterdir()) == ["tinybase.pth"]
    assert d.train_button.isEnabled() and d.close_button.isEnabled()


def test_train_selects_model_and_screenshots(qtbot, tmp_path, sample, models_dir):
    """A short real training run from the labeling window, fine-tuning the bundled model:
    loss plot, AP before/after, the new model selected in the main window; screenshots."""
    from cp3d.app.main import dark_palette

    dark_palette(QApplication.instance())
    folder = tmp_path / "train"
    make_crops(folder, sample, n=5, with_masks=(0, 1, 2, 3, 4), labeled=(0, 1, 2, 3))
    host = host_window(qtbot, tmp_path, "tinybase")
    host.seg_panel.diameter.setValue(16.0)
    w = host.open_labeling(folder)
    qtbot.addWidget(w)
    show_active(qtbot, w, (1000, 760))
    assert w.n_labeled == 4 and "masks: " in w.counter.text()
    # the user is editing crop 0 (draws one more mask) when pressing Train: saved first
    w.set_tool("select")
    w.canvas.zoom_at(1.0)
    w.open_train_dialog()
    d = w.train_dialog
    qtbot.addWidget(d)
    assert d.base.currentData() == "tinybase"  # the main window's model
    assert len(d.train_crops) == 3 and len(d.val_crops) == 1
    d.base.setCurrentIndex(d.base.findData("cp3d_nuclei"))
    assert d.lr.value() == 0.0005  # fine-tuning rate; from scratch it is Cellpose's 0.005
    d.base.setCurrentIndex(d.base.findData(None))
    assert d.lr.value() == 0.005
    d.base.setCurrentIndex(d.base.findData("cp3d_nuclei"))
    d.name.setText("nuclei_tuned")
    d.epochs.setValue(8)
    d.start()
    qtbot.waitUntil(lambda: not d.running, timeout=300_000)
    assert d.errors == [], d.errors
    assert (models_dir / "nuclei_tuned.pth").exists()
    assert len(d.train_losses) == 8 and all(v is not None for v in d.val_losses)
    assert set(d.ap) == {"base", "new"} and "→" in d.ap_label.text()
    assert d.ap["base"] > 0.5  # the bundled model already segments these nuclei
    assert host.seg_panel.model_name() == "nuclei_tuned"
    assert not d.resegment_button.isEnabled()  # no volume open in the main window

    out = Path(os.environ.get("CP3D_SCREENSHOT_DIR") or tmp_path / "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    w.go(1)
    w.set_tool("brush")
    qtbot.wait(100)
    img = w.grab().toImage()
    img.save(str(out / "labeling.png"))
    w.toggle_help()
    w.grab().toImage().save(str(out / "labeling_help.png"))
    w.toggle_help()
    d.grab().toImage().save(str(out / "train_dialog.png"))
    # not blank: the crop shows coloured masks, the plot shows both curves
    a = np.asarray(w.canvas.grab().toImage().convertToFormat(img.Format.Format_RGB888)
                   .constBits()).reshape(w.canvas.height(), -1)[:, :w.canvas.width() * 3]
    a = a.reshape(w.canvas.height(), w.canvas.width(), 3).astype(int)
    assert ((a.max(axis=2) - a.min(axis=2)) > 60).mean() > 0.05
    plot = d.plot.grab().toImage().convertToFormat(img.Format.Format_RGB888)
    pw, ph = plot.width(), plot.height()
    b = np.asarray(plot.constBits()).reshape(ph, -1)[:, :pw * 3].reshape(ph, pw, 3).astype(int)
    blue = (b[..., 2] > 200) & (b[..., 0] < 140)
    orange = (b[..., 0] > 200) & (b[..., 1] > 120) & (b[..., 2] < 100)
    assert blue.sum() > 50 and orange.sum() > 50
    w.close()
    host.state.dirty = False
    host.close()


def test_validation_ap_leaves_out_slivers_cut_by_the_crop_edge(tmp_path):
    """A held-out crop with two cells and a 3-pixel sliver at its edge: a model finding both
    cells but not the sliver scores 1.0, not 2/3; a false mask still costs."""
    from types import SimpleNamespace

    gt = np.zeros((1, 40, 40), np.uint16)
    gt[0, 5:17, 5:17] = 1
    gt[0, 20:32, 20:32] = 2
    gt[0, 0, 37:40] = 3  # the sliver
    found = np.where(gt == 3, 0, gt)

    class Fake(Backend):
        pred = found

        def segment(self, volume, model, cancel=None, **params):
            return SimpleNamespace(masks=self.pred)

    backend = Fake()
    worker = TrainWorker(backend, [], [], None, tmp_path / "m.pth", {})
    pair = SimpleNamespace(image=np.ones((1, 1, 40, 40), np.float32), masks=gt, source="c.tif")
    assert worker._ap(None, [pair], {}) == 1.0
    backend.pred = found.copy()
    backend.pred[0, 34:39, 2:7] = 4  # a mask where there is no cell
    assert worker._ap(None, [pair], {}) == pytest.approx(2 / 3)
