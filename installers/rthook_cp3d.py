"""PyInstaller runtime hook of the frozen cp3d (runs before any cp3d, numba or torch import).

Everything the frozen app may write goes to per-user folders, never into the install folder
(which is read-only for the user: /opt/cp3d, Program Files, /Applications).
"""

import os
import sys


def _cp3d_frozen_setup() -> None:
    try:
        import platformdirs

        cache = platformdirs.user_cache_dir("cp3d", appauthor=False)
    except Exception:  # never stop the app from starting over a cache folder
        cache = os.path.join(os.path.expanduser("~"), ".cache", "cp3d")
    # numba's cache=True would otherwise try __pycache__ beside the (absent) sources.
    os.environ.setdefault("NUMBA_CACHE_DIR", os.path.join(cache, "numba"))
    # Anything torch caches (hub, kernels) stays in the user's cache too; nothing is downloaded.
    os.environ.setdefault("TORCH_HOME", os.path.join(cache, "torch"))
    # A windowed executable has no console: give writes to stdout/stderr (tqdm, logging,
    # warnings) somewhere harmless instead of failing on None.
    for name in ("stdout", "stderr"):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, "w", encoding="utf-8"))


_cp3d_frozen_setup()
del _cp3d_frozen_setup
