"""Entry point of the ``cp3d`` desktop app (gui-script in pyproject).

Imports stay light here (Qt + numpy); torch is only imported when a model is listed or
loaded, in a background thread, so the window appears quickly.
"""

from __future__ import annotations

import argparse
import sys
import time

_T0 = time.perf_counter()


def dark_palette(app) -> None:
    """Fusion with a dark palette: microscopy images read better on a dark surround."""
    from PySide6.QtGui import QColor, QPalette

    app.setStyle("Fusion")
    p = QPalette()
    base, window, text = QColor(30, 31, 36), QColor(43, 45, 51), QColor(225, 225, 228)
    p.setColor(QPalette.Window, window)
    p.setColor(QPalette.WindowText, text)
    p.setColor(QPalette.Base, base)
    p.setColor(QPalette.AlternateBase, window)
    p.setColor(QPalette.ToolTipBase, QColor(250, 250, 235))
    p.setColor(QPalette.ToolTipText, QColor(20, 20, 20))
    p.setColor(QPalette.Text, text)
    p.setColor(QPalette.Button, window)
    p.setColor(QPalette.ButtonText, text)
    p.setColor(QPalette.BrightText, QColor(255, 90, 90))
    p.setColor(QPalette.Highlight, QColor(64, 128, 200))
    p.setColor(QPalette.HighlightedText, QColor(255, 255, 255))
    p.setColor(QPalette.Link, QColor(100, 160, 230))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        p.setColor(QPalette.Disabled, role, QColor(120, 120, 125))
    app.setPalette(p)


def _set_icon(app) -> None:
    from PySide6.QtGui import QIcon

    from cp3d.resources import ICONS_DIR

    icon = ICONS_DIR / "cp3d.png"
    if icon.is_file():
        app.setWindowIcon(QIcon(str(icon)))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="cp3d",
                                 description="cp3d: 3D cell segmentation (desktop app)")
    ap.add_argument("files", nargs="*", help="TIFF images to open (and segment, if auto-run is on)")
    ap.add_argument("--no-3d", action="store_true", help="turn off the OpenGL 3D view")
    ap.add_argument("--startup-probe", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("cp3d")
    app.setOrganizationName("cp3d")
    app.setDesktopFileName("cp3d")  # the taskbar finds cp3d.desktop's icon (Linux/Wayland)
    _set_icon(app)
    dark_palette(app)

    from .window import MainWindow

    win = MainWindow(enable_3d=not args.no_3d)
    win.show()
    if args.startup_probe:
        # Report once the window has been painted, then quit (bench/startup.py).
        def probe():
            app.processEvents()
            print(f"CP3D_WINDOW_SHOWN {time.perf_counter() - _T0:.3f} visible={win.isVisible()}",
                  flush=True)
            win.state.dirty = False
            win.close()
            app.quit()

        QTimer.singleShot(0, probe)
    elif args.files:
        QTimer.singleShot(0, lambda: win.open_paths(args.files))
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
