#!/usr/bin/env bash
# Build cp3d for macOS from a clean checkout: a fresh venv, torch, cp3d[build], PyInstaller ->
# dist/cp3d.app (cp3d windowed + cp3d-cli in Contents/MacOS), a smoke run of the frozen
# cp3d-cli, then a drag-to-Applications disk image -> dist/cp3d-<version>-macos-<arch>.dmg.
#
#   bash installers/macos/build.sh
#
# Runs on macOS only (PyInstaller does not cross-compile; hdiutil and codesign are macOS tools).
# Environment: PYTHON (default python3.11), CP3D_BUILD_VENV (default build/venv-macos),
# CP3D_TORCH (default torch==2.13.0; PyPI's macOS wheels are CPU/MPS builds),
# CP3D_CODESIGN_ID (a "Developer ID Application: ..." identity; default: ad-hoc signature,
# which runs locally but is quarantined by Gatekeeper when downloaded: notarize for release).
set -euo pipefail
[[ "$(uname)" == Darwin ]] || { echo "build the macOS app on macOS" >&2; exit 1; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
VENV=${CP3D_BUILD_VENV:-$ROOT/build/venv-macos}
TORCH=${CP3D_TORCH:-torch==2.13.0}
VERSION=$(awk -F'"' '/^version *=/ { print $2; exit }' pyproject.toml)
ARCH=$(uname -m)
SECONDS=0

echo "=== venv $VENV ($("$PY" --version))"
rm -rf "$VENV"
"$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip wheel
"$VENV/bin/pip" install -q "$TORCH"
"$VENV/bin/pip" install -q ".[build]"
t_venv=$SECONDS

echo "=== icons"
ICONS=cp3d/resources/icons
[[ -f $ICONS/cp3d.icns ]] || "$VENV/bin/python" installers/make_icons.py
# The committed .icns (PNG elements, written by make_icons.py) is used as is; iconutil can
# rebuild it from the PNGs when CP3D_ICONUTIL=1 (checks the PNGs the same way Xcode would).
if [[ "${CP3D_ICONUTIL:-0}" == 1 ]]; then
    set_dir=build/cp3d.iconset
    rm -rf "$set_dir" && mkdir -p "$set_dir"
    for s in 16 32 128 256 512; do
        cp "$ICONS/cp3d_$s.png" "$set_dir/icon_${s}x${s}.png"
    done
    for s in 16 32 128 256; do
        cp "$ICONS/cp3d_$((s * 2)).png" "$set_dir/icon_${s}x${s}@2x.png" 2>/dev/null || true
    done
    iconutil -c icns "$set_dir" -o "$ICONS/cp3d.icns"
fi

echo "=== pyinstaller"
rm -rf dist/cp3d dist/cp3d.app
"$VENV/bin/pyinstaller" --noconfirm --clean --log-level WARN \
    --distpath dist --workpath build/pyinstaller build_app.spec
APP=dist/cp3d.app
[[ -x $APP/Contents/MacOS/cp3d && -x $APP/Contents/MacOS/cp3d-cli ]] || { echo "no $APP" >&2; exit 1; }
# PyInstaller signs each binary ad hoc; seal the whole bundle (needed on Apple silicon).
codesign --force --deep --sign "${CP3D_CODESIGN_ID:--}" \
    ${CP3D_CODESIGN_ID:+--options runtime --timestamp} "$APP"
codesign --verify --deep --strict "$APP"
t_bundle=$((SECONDS - t_venv))
echo "app: $APP ($(du -sh "$APP" | cut -f1))"

echo "=== smoke: frozen cp3d-cli"
CLI=$APP/Contents/MacOS/cp3d-cli
start=$(python3 -c 'import time; print(time.time())')
"$CLI" --help >/dev/null
python3 -c "import time; print(f'cp3d-cli --help: {time.time() - $start:.2f} s')"
"$CLI" models | grep cp3d_nuclei
WORK=$(mktemp -d)
cp cp3d/resources/sample/sample_nuclei.tif "$WORK/"
"$CLI" --image_path "$WORK/sample_nuclei.tif"
"$VENV/bin/python" - "$WORK/sample_nuclei_cp_masks.tif" cp3d/resources/sample/sample_nuclei_masks.tif <<'PY'
import sys, numpy as np, tifffile
m, t = (tifffile.imread(p) for p in sys.argv[1:3])
n, nt = len(np.unique(m[m > 0])), len(np.unique(t[t > 0]))
print(f"masks: frozen {n}, ground truth {nt}")
sys.exit(0 if abs(n - nt) <= 0.2 * nt else 1)
PY
rm -rf "$WORK"

echo "=== dmg"
STAGE=build/dmg
rm -rf "$STAGE" && mkdir -p "$STAGE"
ditto "$APP" "$STAGE/cp3d.app"
ln -s /Applications "$STAGE/Applications"
DMG=dist/cp3d-$VERSION-macos-$ARCH.dmg
rm -f "$DMG"
hdiutil create -volname "cp3d $VERSION" -srcfolder "$STAGE" -fs HFS+ -format UDZO \
    -imagekey zlib-level=9 -ov "$DMG"
rm -rf "$STAGE"
if [[ -n "${CP3D_CODESIGN_ID:-}" ]]; then codesign --sign "$CP3D_CODESIGN_ID" --timestamp "$DMG"; fi
echo "dmg: $DMG ($(du -h "$DMG" | cut -f1))"
echo "times: venv ${t_venv} s, bundle ${t_bundle} s, total ${SECONDS} s"
