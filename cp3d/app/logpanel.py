"""Log panel (dock) and log file: every message of the "cp3d" loggers goes to both."""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

from PySide6.QtCore import QObject, Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QPlainTextEdit

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class _Bridge(QObject):
    message = Signal(str)


class QtLogHandler(logging.Handler):
    """Thread-safe: records from worker threads reach the widget through a queued signal."""

    def __init__(self) -> None:
        super().__init__()
        self.bridge = _Bridge()
        self.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if record.levelno >= logging.WARNING:
                msg = f"{record.levelname}: {msg}"
            self.bridge.message.emit(msg)
        except RuntimeError:  # widget gone while the app closes
            pass


class LogPanel(QPlainTextEdit):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.setReadOnly(True)
        self.setMaximumBlockCount(5000)
        f = QFont("monospace")
        f.setStyleHint(QFont.Monospace)
        f.setPointSize(max(8, f.pointSize() - 1))
        self.setFont(f)
        self.handler = QtLogHandler()
        self.handler.setLevel(logging.INFO)
        self.handler.bridge.message.connect(self.appendPlainText)


def log_file_path() -> Path:
    from platformdirs import user_log_dir

    return Path(user_log_dir("cp3d", appauthor=False)) / "cp3d.log"


def setup_logging(panel: LogPanel | None = None, log_file: Path | None = None) -> Path | None:
    """Attach the panel and a rotating log file to the "cp3d" logger; returns the file path.

    One log file per process: the one already open is kept unless ``log_file`` names
    another (tests give each window its own)."""
    logger = logging.getLogger("cp3d")
    logger.setLevel(logging.DEBUG)
    if panel is not None and panel.handler not in logger.handlers:
        logger.addHandler(panel.handler)
    path = log_file if log_file is not None else log_file_path()
    for h in [h for h in logger.handlers if isinstance(h, logging.handlers.RotatingFileHandler)]:
        if log_file is None or Path(h.baseFilename) == Path(path).resolve():
            return Path(h.baseFilename)
        logger.removeHandler(h)
        h.close()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=2,
                                                  encoding="utf-8")
        fh.setFormatter(logging.Formatter(FORMAT))
        fh.setLevel(logging.DEBUG)
        logger.addHandler(fh)
    except OSError as e:
        logger.warning("cannot write the log file %s: %s", path, e)
        return None
    return path


def detach_panel(panel: LogPanel) -> None:
    logging.getLogger("cp3d").removeHandler(panel.handler)
