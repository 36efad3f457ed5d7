"""PyInstaller entry script of the console ``cp3d-cli`` executable (see build_app.spec)."""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()  # worker processes re-run the executable on Windows/macOS
    from cp3d.core.cli import main

    sys.exit(main())
