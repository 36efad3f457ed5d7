"""Segmentation in a QThread: the window stays responsive and Cancel works mid-run."""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
import traceback

from PySide6.QtCore import QObject, Qt, QThread, Signal, Slot

from cp3d.core.cancel import CancelToken

log = logging.getLogger("cp3d.app")

# Expected stages and their share of the run time, for one overall progress fraction.
# "size": the diameter estimate segment() runs when diameter is 0 (auto).
STAGES_3D = {"model": 0.03, "size": 0.08, "normalize": 0.02, "prediction YX": 0.22,
             "prediction ZX": 0.22, "prediction ZY": 0.22, "dynamics": 0.27, "saving": 0.02}
STAGES_2D = {"model": 0.05, "size": 0.15, "normalize": 0.03, "prediction": 0.5,
             "dynamics": 0.38, "saving": 0.04}
STAGES_DIAMETER = {"model": 0.1, "size": 0.9}
STAGES_CROPS = {"crops": 1.0}
STAGES_BLOCKWISE = {"model": 0.02, "preparing": 0.08, "block": 0.85, "merging": 0.05}


def overall_fraction(stage: str, fraction: float, weights: dict[str, float]) -> float | None:
    """Map (stage, fraction within stage) to run fraction; None for an unknown stage."""
    key = next((k for k in weights if stage.lower().startswith(k.lower())), None)
    if key is None:
        return None
    keys = list(weights)
    before = sum(weights[k] for k in keys[: keys.index(key)])
    total = sum(weights.values())
    return min(1.0, (before + weights[key] * fraction) / total)


class CancellableWorker(QObject):
    """What every worker shares: progress, the end signals and a cancel token that core
    functions check (``_progress`` is the core's progress callback and checks it too).
    Subclasses add their own ``succeeded`` signal."""

    progress = Signal(str, float)  # stage, stage fraction
    failed = Signal(str)
    too_large = Signal(str)  # refused as too large for memory (blockwise can take it)
    cancelled = Signal()
    done = Signal()  # after success, failure or cancel

    def __init__(self):
        super().__init__()
        self.token = CancelToken()

    def cancel(self) -> None:
        """Thread-safe; the core raises Cancelled at its next check."""
        self.token.cancel()

    def _progress(self, stage: str, fraction: float) -> None:
        self.token.check()
        self.progress.emit(stage, float(fraction))


class CoreWorker(CancellableWorker):
    """A long cp3d.core call in its own QThread, with progress and Cancel.

    Subclasses implement ``work()`` returning (result, saved paths). Signals are queued to
    the GUI thread, so slots there may touch widgets.
    """

    succeeded = Signal(object, object, float)  # result, saved paths, seconds

    what = "the task"

    def __init__(self, backend, volume, model_name, params: dict):
        super().__init__()
        self.backend = backend
        self.volume = volume
        self.model_name = model_name
        self.params = dict(params)

    def _model(self):
        self.progress.emit("model", 0.0)
        model = self.backend.load_model(self.model_name, self.params.get("use_gpu", False))
        self.token.check()
        self.progress.emit("model", 1.0)
        return model

    def work(self) -> tuple[object, list]:
        raise NotImplementedError

    @Slot()
    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            Cancelled = self.backend.cancelled_error()
            UserError = self.backend.user_error()
            TooLarge = self.backend.too_large_error()
        except Exception as e:  # core missing entirely
            self.failed.emit(f"cp3d core is not available: {e}")
            self.done.emit()
            return
        try:
            result, paths = self.work()
            self.token.check()
            self.succeeded.emit(result, paths, time.perf_counter() - t0)
        except Cancelled:
            self.cancelled.emit()
        except TooLarge as e:
            self.too_large.emit(str(e))
        except UserError as e:
            self.failed.emit(str(e))
        except MemoryError:
            self.failed.emit("Out of memory: try a smaller volume, batch_size or turn off GPU.")
        except Exception as e:  # a bug: report it, never crash the window
            log.error("unexpected error during %s:\n%s", self.what, traceback.format_exc())
            self.failed.emit(f"Unexpected error during {self.what}: {type(e).__name__}: {e}")
        finally:
            self.done.emit()


class SegmentWorker(CoreWorker):
    """Loads the model, segments, saves next to the image (``save``)."""

    what = "segmentation"

    def __init__(self, backend, volume, model_name, params: dict, save: bool = True):
        super().__init__(backend, volume, model_name, params)
        self.save = save

    def work(self):
        model = self._model()
        result = self.backend.segment(
            self.volume, model, progress=self._progress, cancel=self.token, **self.params
        )
        self.token.check()
        paths = []
        if self.save:
            self.progress.emit("saving", 0.0)
            paths = self.backend.save_results(self.volume, result)
        return result, paths


class BlockwiseWorker(CoreWorker):
    """Segments a volume larger than memory block by block into NAME_cp_masks.zarr beside
    it (cp3d.core.blockwise); the result is the core's BlockwiseResult.

    Cancel stops the running block within a network batch or a dynamics step, before the
    merge, so no zarr is written and the finished blocks stay in the scratch folder for a
    rerun to resume from."""

    what = "blockwise segmentation"
    KEYS = ("diameter", "anisotropy", "flow3D_smooth", "min_size", "cellprob_threshold",
            "niter", "chan", "chan2", "all_channels", "invert", "sharpen_radius", "tile_norm",
            "augment", "batch_size", "use_gpu", "block_size")

    def __init__(self, backend, volume, model_name, params: dict, out_zarr: Path):
        super().__init__(backend, volume, model_name, params)
        self.out_zarr = Path(out_zarr)

    def _blocks(self, done: int, total: int) -> None:
        self.token.check()
        self.progress.emit(f"block {done}/{total}", done / max(total, 1))
        if done >= total:
            self.progress.emit("merging", 0.0)

    def work(self):
        model = self._model()
        self.progress.emit("preparing", 0.0)
        kw = {k: v for k, v in self.params.items() if k in self.KEYS}
        if not kw.get("diameter"):
            kw["diameter"] = None  # 0 = auto: the core estimates it
        source = getattr(self.volume, "source", self.volume)
        if getattr(source, "kind", "array") != "array":
            # its own file handle: the GUI thread keeps reading planes from the shown one
            source = dataclasses.replace(source, array=None)
        result = self.backend.segment_blockwise(source, self.out_zarr, model,
                                                progress=self._blocks, cancel=self.token, **kw)
        # the labels are written: a Cancel pressed during the merge comes too late to undo it
        self.token = CancelToken()
        from .lazy import lazy_labels

        masks = lazy_labels(result.zarr_path, int(result.n_masks))
        masks.preview()  # the 3D view's subsample of the whole zarr: read here, not in the GUI
        return (result, masks), [Path(result.zarr_path)]


class DiameterWorker(CoreWorker):
    """Estimates the cell diameter (XY pixels) of a volume; the result is a float."""

    what = "diameter estimation"
    KEYS = ("chan", "chan2", "all_channels", "invert", "use_gpu")

    def work(self):
        model = self._model()
        kw = {k: v for k, v in self.params.items() if k in self.KEYS}
        d = self.backend.estimate_diameter(self.volume, model, progress=self._progress,
                                           cancel=self.token, **kw)
        return float(d), []


class CropsWorker(CoreWorker):
    """Cuts training crops of the volume's file (``cp3d-cli make-train``); the result is the
    crops folder."""

    what = "making training crops"
    KEYS = ("chan", "chan2", "all_channels", "invert", "anisotropy", "sharpen_radius",
            "tile_norm", "nimg_per_tif", "crop_size")

    def work(self):
        self.progress.emit("crops", 0.0)
        kw = {k: v for k, v in self.params.items() if k in self.KEYS and v is not None}
        paths = self.backend.make_train_file(self.volume.path, **kw)
        self.token.check()
        self.progress.emit("crops", 1.0)
        folder = Path(paths[0]).parent if paths else None
        return folder, paths


def start_worker(worker: QObject, parent=None) -> QThread:
    """Move worker to a new thread and start it; the thread quits when the worker is done.

    Python owns both objects (no deleteLater: that would delete them a second time). The
    caller keeps references until ``thread.wait()`` has returned, then drops them.
    """
    thread = QThread(parent)
    thread.setObjectName("cp3d-segment")
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    # Direct: quit() is thread-safe, and the GUI thread may be blocked in thread.wait().
    worker.done.connect(thread.quit, Qt.DirectConnection)
    thread.start()
    return thread


class FunctionWorker(QObject):
    """Runs one function in a QThread; its result or exception comes back as a signal."""

    result = Signal(object)
    error = Signal(object)
    done = Signal()

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    @Slot()
    def run(self) -> None:
        try:
            self.result.emit(self.fn())
        except Exception as e:  # delivered to the GUI thread, which decides what to show
            log.debug("background task failed:\n%s", traceback.format_exc())
            self.error.emit(e)
        finally:
            self.done.emit()


class _Relay(QObject):
    """Lives in the GUI thread, so signals from the worker thread reach these slots queued
    (a bare Python callable as receiver could run in the worker thread).

    The outcome is held until the task's ``done`` arrives and is then delivered with it, in one
    slot: on_result (or on_error), then on_finished. A callback that schedules the next step
    with a timer (the window starts a run once a file is read) thus always finds the task
    finished; delivered apart, the timer could fire before ``done`` and see the task busy."""

    def __init__(self, on_result, on_error, on_finished):
        super().__init__()
        self._cb = (on_result, on_error, on_finished)
        self._outcome = None  # (callback, argument) once the task has returned or raised

    @Slot(object)
    def result(self, value) -> None:
        self._outcome = (self._cb[0], value)

    @Slot(object)
    def error(self, exc) -> None:
        self._outcome = (self._cb[1], exc)

    @Slot()
    def finished(self) -> None:
        outcome, self._outcome = self._outcome, None
        try:
            if outcome is not None:
                outcome[0](outcome[1])
        finally:
            if self._cb[2] is not None:
                self._cb[2]()


class Task:
    """Keeps the worker, its thread and the relay referenced until they finish."""

    def __init__(self, worker: FunctionWorker, thread: QThread, relay: _Relay):
        self.worker, self.thread, self.relay = worker, thread, relay


def call_in_thread(fn, on_result, on_error, on_finished=None, parent=None) -> Task:
    """Run fn() off the GUI thread (call this from the GUI thread); the callbacks run in
    the GUI thread."""
    worker = FunctionWorker(fn)
    relay = _Relay(on_result, on_error, on_finished)
    worker.result.connect(relay.result, Qt.QueuedConnection)
    worker.error.connect(relay.error, Qt.QueuedConnection)
    worker.done.connect(relay.finished, Qt.QueuedConnection)
    thread = start_worker(worker, parent)
    thread.setObjectName("cp3d-task")
    return Task(worker, thread, relay)
