"""The app on volumes larger than memory: blockwise runs in the worker thread, lazy views.

Runs the real cp3d.core.blockwise with the tiny random-init model of test_app.py (seconds).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")
zarr = pytest.importorskip("zarr")

from PySide6.QtCore import Qt  # noqa: E402

from test_app import (  # noqa: E402,F401  (fixtures are used by name)
    blobs_volume, core, drop_files, have_real_core, make_window, tiny_model_dir, use_model,
    write_tiff,
)

from cp3d.app import render  # noqa: E402
from cp3d.app.lazy import LazyArray3D, LazyImage, preview_steps  # noqa: E402

pytestmark = [pytest.mark.gui,
              pytest.mark.skipif(not have_real_core(), reason="needs cp3d.core")]

SHAPE = (24, 64, 64)
CENTERS = ((6, 16, 16), (12, 40, 30), (18, 20, 46), (10, 48, 50))


def big_blobs(tmp_path, name="big.tif"):
    img, _ = blobs_volume(SHAPE, CENTERS, r=7.0)
    return write_tiff(tmp_path / f"{name}", img), img


def test_blockwise_checkbox_runs_blocks_and_shows_zarr(qtbot, tmp_path, core):
    backend, model = core
    path, img = big_blobs(tmp_path)
    w = make_window(qtbot, tmp_path, backend)
    use_model(qtbot, w, model)
    w.seg_panel.blockwise.setChecked(True)
    w.seg_panel.block_size.setValue(24)  # 1 x 3 x 3 blocks
    w.seg_panel.diameter.setValue(12.0)
    stages, bars = [], []
    drop_files(w, [path])
    qtbot.waitUntil(lambda: w.is_running, timeout=10_000)
    w.worker.progress.connect(lambda s, f: (stages.append(s), bars.append(w.progress.value())))
    qtbot.waitUntil(lambda: not w.is_busy and w.state.masks is not None, timeout=120_000)
    assert w.errors == []
    # the image was read lazily, never as a whole
    assert isinstance(w.state.image, LazyImage) and w.state.image.shape == (24, 1, 64, 64)
    # block progress, in order, and the bar followed it
    blocks = [s for s in stages if s.startswith("block ")]
    assert blocks and blocks[-1] == "block 9/9", stages
    assert bars == sorted(bars)
    # the zarr is beside the image, no scratch left, and the views read from it
    out = tmp_path / "big_cp_masks.zarr"
    assert out.exists() and not (tmp_path / "big_cp_masks_blockwise").exists()
    on_disk = np.asarray(zarr.open_array(str(out), mode="r")[...])
    assert zarr.open_array(str(out), mode="r").attrs["n_masks"] == int(on_disk.max())
    assert isinstance(w.state.masks, LazyArray3D) and w.state.masks_read_only
    z = int(np.argmax((on_disk > 0).sum(axis=(1, 2))))
    w.state.set_position(z=z)
    np.testing.assert_array_equal(w.state.masks[z], on_disk[z])
    np.testing.assert_array_equal(render.plane(w.state.masks, "xz", tuple(w.state.position)),
                                  on_disk[:, w.state.position[1], :])
    if on_disk[z].any():  # coloured mask pixels in the XY view (planes arrive from a thread)
        def coloured():
            shown = w.xy.image_array()
            return (shown[..., 0] != shown[..., 1]).any()

        qtbot.waitUntil(coloured, timeout=10_000)
    # the image plane shown is the file's plane
    np.testing.assert_array_equal(w.state.channel_data()[z], img[z])
    # editing is off, with a message saying why
    lab = int(on_disk.max())
    if lab:
        w.state.select(lab)
        w.delete_selected()
        assert "editing" in w.statusBar().currentMessage()
        assert not w.delete_button.isEnabled()
        assert int(w.state.label_at(*map(int, np.argwhere(on_disk == lab)[0]))) == lab


def test_cancel_blockwise_leaves_no_zarr_only_scratch(qtbot, tmp_path, core):
    backend, model = core
    path, _ = big_blobs(tmp_path, "slow.tif")
    w = make_window(qtbot, tmp_path, backend, autorun=False)
    use_model(qtbot, w, model)
    w.seg_panel.blockwise.setChecked(True)
    w.seg_panel.block_size.setValue(8)  # 3 x 8 x 8 = 192 blocks
    w.seg_panel.diameter.setValue(12.0)
    w.open_paths([path])
    qtbot.waitUntil(lambda: w.state.image is not None and not w.is_busy, timeout=10_000)
    w.seg_panel.run_button.click()
    qtbot.waitUntil(lambda: w.is_running and w._run_stage.startswith("block "), timeout=60_000)
    assert "block " in w.stage_label.text() and "/192" in w.stage_label.text()
    qtbot.mouseClick(w.cancel_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not w.is_running, timeout=30_000)
    assert w.errors == [] and w.state.masks is None
    assert not (tmp_path / "slow_cp_masks.zarr").exists()
    assert (tmp_path / "slow_cp_masks_blockwise").is_dir()  # restartable
    assert "cancelled" in w.log_panel.toPlainText()


def test_volume_too_large_for_memory_opens_lazily_and_runs_blockwise(qtbot, tmp_path, core,
                                                                      monkeypatch):
    backend, model = core
    monkeypatch.setattr(backend, "would_fit_in_memory", lambda *a, **k: False)
    path, img = big_blobs(tmp_path, "huge.tif")
    w = make_window(qtbot, tmp_path, backend, enable_3d=True)
    use_model(qtbot, w, model)
    w.seg_panel.block_size.setValue(32)
    w.seg_panel.diameter.setValue(12.0)
    assert not w.seg_panel.blockwise.isChecked()
    drop_files(w, [path])
    qtbot.waitUntil(lambda: not w.is_busy and w.state.masks is not None, timeout=120_000)
    assert w.errors == []
    assert isinstance(w.state.image, LazyImage)
    assert (tmp_path / "huge_cp_masks.zarr").exists()
    if w.view3d is not None:  # the 3D view holds a strided subsample only
        assert w.view3d._image_small.size <= 128 ** 3
    # reopening shows the saved zarr without running again
    w.state.set_masks(None)
    w.open_paths([path])
    qtbot.waitUntil(lambda: not w.is_busy and w.state.masks is not None, timeout=30_000)
    assert isinstance(w.state.masks, LazyArray3D)


def test_a_run_refused_at_its_objects_size_goes_on_blockwise(qtbot, tmp_path, core,
                                                            monkeypatch):
    """The volume fits in memory at its own size, but the in-memory run refuses it once the
    objects' size is known (small objects enlarge the network grid): the app segments it
    blockwise by itself, as cp3d-cli does, instead of stopping with an error."""
    from cp3d.core.errors import TooLargeError

    backend, model = core

    def refuse(volume, *a, **k):
        raise TooLargeError("needs about 9.9 GB of memory at 5.0x for its objects' size",
                            volume.path)

    monkeypatch.setattr(backend, "segment", refuse)
    path, img = big_blobs(tmp_path, "small_objects.tif")
    w = make_window(qtbot, tmp_path, backend)
    use_model(qtbot, w, model)
    w.seg_panel.block_size.setValue(32)
    w.seg_panel.diameter.setValue(12.0)
    drop_files(w, [path])
    qtbot.waitUntil(lambda: not w.is_busy and w.state.masks is not None, timeout=120_000)
    assert w.errors == []
    assert not isinstance(w.state.image, LazyImage)  # it was read whole: only the run refused
    out = tmp_path / "small_objects_cp_masks.zarr"
    assert out.exists()
    on_disk = np.asarray(zarr.open_array(str(out), mode="r")[...])
    assert on_disk.shape == SHAPE and on_disk.max() >= 1
    assert "segmenting it blockwise" in w.log_panel.toPlainText()


def test_planes_of_a_slow_disk_never_block_the_gui_thread(qtbot, tmp_path, core, monkeypatch):
    """Every read of the file takes 0.4 s: moving the cursor returns at once, the views keep
    their last picture meanwhile, and show the new planes when the reads land."""
    import time

    backend, _ = core
    monkeypatch.setattr(backend, "would_fit_in_memory", lambda *a, **k: False)
    path, img = big_blobs(tmp_path, "slow_disk.tif")
    w = make_window(qtbot, tmp_path, backend, autorun=False, enable_3d=False)
    w.open_paths([path])
    qtbot.waitUntil(lambda: w.state.image is not None and not w.is_busy, timeout=10_000)
    qtbot.waitUntil(lambda: all(v.image_array() is not None for v in (w.xy, w.xz, w.yz)),
                    timeout=10_000)
    source = w.state.image.source
    real_read = source.read

    def slow_read(zs, ys, xs):
        time.sleep(0.4)
        return real_read(zs, ys, xs)

    monkeypatch.setattr(source, "read", slow_read)
    lo, hi = w.state.contrast
    y = 40  # a row through a blob, not shown yet
    t0 = time.perf_counter()
    w.state.set_position(y=y)
    assert time.perf_counter() - t0 < 0.2
    expected = render.to_uint8(img[:, y, :], lo, hi)

    def xz_shows_row():
        shown = w.xz.image_array()
        return shown.shape[:2] == expected.shape and np.array_equal(shown[..., 0], expected)

    assert not xz_shows_row()
    qtbot.waitUntil(xz_shows_row, timeout=10_000)
    # scrolling through 12 planes: the planes passed over are not read, the last one shows
    # in about one read, not twelve
    t0 = time.perf_counter()
    for z in range(1, 13):
        w.state.set_position(z=z)
    expected_xy = render.to_uint8(img[12], lo, hi)
    qtbot.waitUntil(lambda: np.array_equal(w.xy.image_array()[..., 0], expected_xy),
                    timeout=10_000)
    assert time.perf_counter() - t0 < 2.5
    assert f"value {img[tuple(w.state.position)]:.4g}" in w.pos_label.text() \
        or "value ..." in w.pos_label.text()


def test_whole_file_reads_stay_off_the_gui_thread(qtbot, tmp_path, core, monkeypatch):
    """Reopening a large volume with the labels of an earlier blockwise run: the subsamples
    of the whole files (contrast, 3D view, mask count) are read by the loader thread; the GUI
    thread reads only planes."""
    import threading

    backend, _ = core
    monkeypatch.setattr(backend, "would_fit_in_memory", lambda *a, **k: False)
    path, img = big_blobs(tmp_path, "reopen.tif")
    labels = np.zeros(SHAPE, np.uint16)
    for k, (z, y, x) in enumerate(CENTERS):
        labels[z - 3:z + 3, y - 5:y + 5, x - 5:x + 5] = k + 1
    zarr.open_array(str(backend.masks_zarr_path(path)), mode="w", shape=SHAPE,
                    chunks=(8, 32, 32), dtype=np.uint16)[...] = labels  # no n_masks attribute
    in_gui = []
    real_get = LazyArray3D._get

    def get(self, key):  # a key of three slices reads a 3D box: the preview of a whole file
        box = all(isinstance(k, slice) for k in key)
        if box and threading.current_thread() is threading.main_thread():
            in_gui.append(key)
        return real_get(self, key)

    monkeypatch.setattr(LazyArray3D, "_get", get)
    w = make_window(qtbot, tmp_path, backend, autorun=False, enable_3d=True)
    w.open_paths([path])
    qtbot.waitUntil(lambda: w.state.masks is not None and not w.is_busy, timeout=10_000)
    assert w.errors == []
    assert "4 masks" in w.selection_label.text()
    if w.view3d is not None:
        assert w.view3d._masks_small is not None and w.view3d._masks_small.max() == 4
    lo, hi = w.state.contrast
    assert lo < hi <= img.max()
    assert in_gui == []


def test_lazy_array_indexing_matches_numpy():
    a = np.arange(5 * 7 * 9).reshape(5, 7, 9)
    reads = []

    def read(zs, ys, xs):
        reads.append((zs, ys, xs))
        return a[zs, ys, xs]

    lz = LazyArray3D(read, a.shape, a.dtype)
    for key in [(2,), (slice(None), 3, slice(None)), (slice(None), slice(None), 4),
                (slice(None, None, 2), slice(1, None, 3), slice(None, None, 4))]:
        np.testing.assert_array_equal(lz[key], a[key])
    assert lz[1, 2, 3] == a[1, 2, 3]
    assert preview_steps((1000, 1000, 1000)) == (8, 8, 8)
    assert lz.preview().shape == a.shape
