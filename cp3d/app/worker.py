"""Segmentation in a QThread: the window stays responsive and Cancel works mid-run."""

from __future__ import annotations

import logging
import time
import traceback

from PySide6.QtCore import QObject, QThread, Signal, Slot

from cp3d.core.cancel import CancelToken

log = logging.getLogger("cp3d.app")

# Expected stages and their share of the run time, for one overall progress fraction.
STAGES_3D = {"model": 0.03, "prediction YX": 0.24, "prediction ZY": 0.24, "prediction ZX": 0.24, "dynamics": 0.25}
STAGES_2D = {"model": 0.05, "prediction": 0.6, "dynamics": 0.35}


def overall_fraction(stage: str, fraction: float, weights: dict[str, float]) -> float | None:
    """Map (stage, fraction within stage) to run fraction; None for an unknown stage."""
    key = next((k for k in weights if stage.lower().startswith(k.lower())), None)
    if key is None:
        return None
    keys = list(weights)
    before = sum(weights[k] for k in keys[: keys.index(key)])
    total = sum(weights.values())
    return min(1.0, (before + weights[key] * fraction) / total)


class SegmentWorker(QObject):
    """Loads the model, segments, saves next to the image. Lives in its own QThread.

    Signals are queued to the GUI thread, so slots there may touch widgets.
    """

    progress = Signal(str, float)  # stage, stage fraction
    succeeded = Signal(object, object, float)  # result, saved paths, seconds
    failed = Signal(str)
    cancelled = Signal()
    done = Signal()  # after any of the three above

    def __init__(self, backend, volume, model_name, params: dict, save: bool = True):
        super().__init__()
        self.backend = backend
        self.volume = volume
        self.model_name = model_name
        self.params = dict(params)
        self.save = save
        self.token = CancelToken()

    def cancel(self) -> None:
        """Thread-safe; the core raises Cancelled at its next check."""
        self.token.cancel()

    def _progress(self, stage: str, fraction: float) -> None:
        self.token.check()
        self.progress.emit(stage, float(fraction))

    @Slot()
    def run(self) -> None:
        t0 = time.perf_counter()
        try:
            Cancelled = self.backend.cancelled_error()
            UserError = self.backend.user_error()
        except Exception as e:  # core missing entirely
            self.failed.emit(f"cp3d core is not available: {e}")
            self.done.emit()
            return
        try:
            self.progress.emit("model", 0.0)
            model = self.backend.load_model(self.model_name, self.params.get("use_gpu", False))
            self.token.check()
            self.progress.emit("model", 1.0)
            result = self.backend.segment(
                self.volume, model, progress=self._progress, cancel=self.token, **self.params
            )
            self.token.check()
            paths = []
            if self.save:
                self.progress.emit("saving", 0.0)
                paths = self.backend.save_results(self.volume, result)
            self.succeeded.emit(result, paths, time.perf_counter() - t0)
        except Cancelled:
            self.cancelled.emit()
        except UserError as e:
            self.failed.emit(str(e))
        except MemoryError:
            self.failed.emit("Out of memory: try a smaller volume, batch_size or turn off GPU.")
        except Exception as e:  # a bug: report it, never crash the window
            log.error("unexpected error during segmentation:\n%s", traceback.format_exc())
            self.failed.emit(f"Unexpected error during segmentation: {type(e).__name__}: {e}")
        finally:
            self.done.emit()


def start_worker(worker: SegmentWorker, parent=None) -> QThread:
    """Move worker to a new thread, start it, and clean both up when it is done."""
    thread = QThread(parent)
    thread.setObjectName("cp3d-segment")
    worker.moveToThread(thread)
    thread.started.connect(worker.run)
    worker.done.connect(thread.quit)
    thread.finished.connect(worker.deleteLater)
    thread.finished.connect(thread.deleteLater)
    thread.start()
    return thread
