"""Save a screenshot of the whole X screen ($DISPLAY) and fail if it is blank.

    python grab_screen.py OUT.png

Run with a Python that has PySide6 (the build venv), under the same Xvfb as the app. Prints the
share of non-black pixels and the number of distinct colours; exits 1 when the screen is
(nearly) empty: Xvfb's root window is black where no window is drawn.
"""

import os
import sys

import numpy as np

os.environ["QT_QPA_PLATFORM"] = "xcb"
from PySide6.QtGui import QGuiApplication, QImage  # noqa: E402

MIN_LIT = float(os.environ.get("CP3D_MIN_LIT", "0.2"))
MIN_COLOURS = int(os.environ.get("CP3D_MIN_COLOURS", "64"))


def main() -> int:
    out = sys.argv[1]
    app = QGuiApplication(sys.argv[:1])
    img = app.primaryScreen().grabWindow(0).toImage().convertToFormat(QImage.Format_RGB32)
    img.save(out)
    h, w = img.height(), img.width()
    arr = np.frombuffer(img.constBits(), np.uint8, count=img.sizeInBytes())
    arr = arr.reshape(h, img.bytesPerLine() // 4, 4)[:, :w, :3]
    lit = float((arr.max(axis=2) > 8).mean())
    colours = len(np.unique(arr.reshape(-1, 3) @ np.array([1, 256, 65536])))
    print(f"screenshot {w}x{h}: {lit:.0%} non-black, {colours} colours, "
          f"std {arr.std():.1f} -> {out}")
    if lit < MIN_LIT or colours < MIN_COLOURS:
        print(f"blank screenshot (need >= {MIN_LIT:.0%} non-black and >= {MIN_COLOURS} colours)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
