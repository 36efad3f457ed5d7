"""PyInstaller entry script of the windowed ``cp3d`` executable (see build_app.spec)."""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()  # worker processes re-run the executable on Windows/macOS
    from cp3d.app.main import main

    sys.exit(main())
