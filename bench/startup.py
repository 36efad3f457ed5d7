"""Time from process start to a visible main window of the cp3d app.

Runs ``python -m cp3d.app.main --startup-probe`` in a fresh subprocess several times; the
child prints a marker once the window is shown and painted, then quits. Reports the wall
time seen by the parent (interpreter start + imports + window), which is what a user waits.

    python bench/startup.py [--repeat 3]

Needs a display (or Xvfb: ``xvfb-run -a python bench/startup.py``). Target: < 3 s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def one_run(extra_env: dict | None = None) -> tuple[float, float, bool]:
    env = dict(os.environ, **(extra_env or {}))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "cp3d.app.main", "--startup-probe"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen = None
    inner = float("nan")
    visible = False
    for line in proc.stdout:
        if line.startswith("CP3D_WINDOW_SHOWN"):
            seen = time.perf_counter() - t0
            parts = line.split()
            inner = float(parts[1])
            visible = "visible=True" in line
    proc.wait(timeout=60)
    if seen is None:
        raise RuntimeError(f"the app did not report a window (rc={proc.returncode}):\n"
                           f"{proc.stderr.read()}")
    return seen, inner, visible


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    times = []
    for i in range(args.repeat):
        wall, inner, visible = one_run()
        times.append(wall)
        print(f"run {i + 1}: window visible={visible} after {wall:.2f} s "
              f"(in-process from main import: {inner:.2f} s)")
    # torch must not be imported before the window shows: check in a probe of its own
    out = subprocess.run([sys.executable, "-c",
                          "import sys, cp3d.app.main, cp3d.app.window; "
                          "print('torch' in sys.modules)"],
                         capture_output=True, text=True)
    print(f"median {statistics.median(times):.2f} s, best {min(times):.2f} s "
          f"(target < 3 s); torch imported at startup: {out.stdout.strip()}")
    return 0 if statistics.median(times) < 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
