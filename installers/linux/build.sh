#!/usr/bin/env bash
# Build cp3d for Linux from a clean checkout: a fresh venv, torch (CPU), cp3d[build],
# PyInstaller -> dist/cp3d/ (onedir: cp3d + cp3d-cli), then the .deb -> dist/cp3d_<ver>_<arch>.deb.
#
#   bash installers/linux/build.sh
#
# Environment (all optional):
#   PYTHON            interpreter for the venv (default python3.11, else python3)
#   CP3D_BUILD_VENV   where the build venv goes (default build/venv; recreated unless
#                     CP3D_REUSE_VENV=1 and it already has pyinstaller)
#   CP3D_TORCH        torch requirement (default torch==2.13.0)
#   CP3D_TORCH_INDEX  index for torch, e.g. https://download.pytorch.org/whl/cpu on CI runners,
#                     where PyPI's default Linux torch is a multi-GB CUDA build
#   CP3D_ALLOW_CUDA   1 to accept a CUDA build of torch in the bundle (default: refuse)
#   CP3D_NICE         nice level for the heavy steps (default 10)
#   CP3D_SKIP_DEB     1 to stop after the bundle
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${CP3D_BUILD_VENV:-$ROOT/build/venv}
TORCH=${CP3D_TORCH:-torch==2.13.0}
NICE=(nice -n "${CP3D_NICE:-10}")
mkdir -p build dist
TIMES=build/linux-build-times.txt
: >"$TIMES"
t_all=$(date +%s.%N)
step() { echo; echo "=== $* ==="; }
lap() { awk -v a="$2" -v b="$(date +%s.%N)" -v n="$1" 'BEGIN { printf "%-10s %6.1f s\n", n, b - a }' | tee -a "$TIMES"; }

step "venv ($VENV, $("$PY" --version))"
t=$(date +%s.%N)
if [[ "${CP3D_REUSE_VENV:-0}" == 1 && -x "$VENV/bin/pyinstaller" ]]; then
    echo "reusing $VENV"
else
    rm -rf "$VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip wheel
    # torch first, pinned: a later unpinned 'torch>=2.1' from cp3d's metadata is then satisfied.
    if [[ -n "${CP3D_TORCH_INDEX:-}" ]]; then
        "${NICE[@]}" "$VENV/bin/pip" install -q --index-url "$CP3D_TORCH_INDEX" "$TORCH"
    else
        "${NICE[@]}" "$VENV/bin/pip" install -q "$TORCH"
    fi
    "${NICE[@]}" "$VENV/bin/pip" install -q ".[build]"
fi
"$VENV/bin/python" - <<'PY'
import os, sys, torch
cuda = torch.version.cuda
print(f"torch {torch.__version__}, CUDA {cuda or 'none (CPU build)'}")
if cuda and os.environ.get("CP3D_ALLOW_CUDA") != "1":
    sys.exit("refusing to bundle a CUDA build of torch (GBs); install the CPU build "
             "(CP3D_TORCH_INDEX=https://download.pytorch.org/whl/cpu) or set CP3D_ALLOW_CUDA=1")
PY
lap venv "$t"

step "icons"
if [[ ! -f cp3d/resources/icons/cp3d_256.png ]]; then
    "$VENV/bin/python" installers/make_icons.py
else
    echo "committed icons present"
fi

step "pyinstaller"
t=$(date +%s.%N)
rm -rf dist/cp3d build/pyinstaller
"${NICE[@]}" "$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath dist --workpath build/pyinstaller build_app.spec
lap bundle "$t"
echo "bundle: $(du -sh dist/cp3d | cut -f1) in dist/cp3d"

if [[ "${CP3D_SKIP_DEB:-0}" != 1 ]]; then
    step "deb"
    t=$(date +%s.%N)
    "${NICE[@]}" bash installers/linux/make_deb.sh dist/cp3d
    lap deb "$t"
fi
lap total "$t_all"
echo; echo "timings (also in $TIMES):"; cat "$TIMES"
