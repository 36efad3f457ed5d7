#!/usr/bin/env bash
# Wrap the PyInstaller bundle (dist/cp3d, from build.sh) as an AppImage, on a CI runner:
#
#   APPIMAGETOOL=/path/to/appimagetool bash installers/linux/appimage.sh [dist/cp3d]
#     -> dist/cp3d-<version>-<arch>.AppImage
#
# appimagetool is not packaged for Debian 12 and is not fetched here; the release workflow
# downloads it first (.github/workflows/release.yml). It runs without FUSE through
# APPIMAGE_EXTRACT_AND_RUN=1. The AppImage starts the app; `cp3d-<ver>.AppImage cli ARGS...`
# (or a link to it named cp3d-cli) runs cp3d-cli.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUNDLE=${1:-dist/cp3d}
TOOL=${APPIMAGETOOL:-$(command -v appimagetool || true)}
[[ -x "$BUNDLE/cp3d" ]] || { echo "no bundle at $BUNDLE (run installers/linux/build.sh)" >&2; exit 1; }
[[ -n "$TOOL" && -x "$TOOL" ]] || { echo "appimagetool not found (set APPIMAGETOOL)" >&2; exit 1; }
VERSION=$(awk -F'"' '/^version *=/ { print $2; exit }' pyproject.toml)
ARCH=$(uname -m)
APPDIR=build/cp3d.AppDir
ICONS=cp3d/resources/icons

rm -rf "$APPDIR"
mkdir -p "$APPDIR/usr/share/applications"
cp -a "$BUNDLE" "$APPDIR/cp3d"
for s in 16 32 48 64 128 256 512; do
    install -D -m 644 "$ICONS/cp3d_$s.png" "$APPDIR/usr/share/icons/hicolor/${s}x${s}/apps/cp3d.png"
done
cp "$ICONS/cp3d_256.png" "$APPDIR/cp3d.png"
ln -s cp3d.png "$APPDIR/.DirIcon"

cat >"$APPDIR/cp3d.desktop" <<DESKTOP
[Desktop Entry]
Type=Application
Name=cp3d
GenericName=3D cell segmentation
Comment=Segment cells and nuclei in 3D microscopy volumes (Cellpose method)
Exec=cp3d %F
Icon=cp3d
Terminal=false
Categories=Science;Biology;ImageProcessing;
MimeType=image/tiff;
X-AppImage-Version=$VERSION
DESKTOP
cp "$APPDIR/cp3d.desktop" "$APPDIR/usr/share/applications/cp3d.desktop"

cat >"$APPDIR/AppRun" <<'APPRUN'
#!/bin/sh
# AppImage entry: the app, or cp3d-cli when called as "... cli ARGS" or through a link named cp3d-cli.
HERE=$(dirname "$(readlink -f "$0")")
case "$(basename "${ARGV0:-$0}")" in
    *cp3d-cli*) exec "$HERE/cp3d/cp3d-cli" "$@" ;;
esac
if [ "${1:-}" = "cli" ]; then shift; exec "$HERE/cp3d/cp3d-cli" "$@"; fi
exec "$HERE/cp3d/cp3d" "$@"
APPRUN
chmod 755 "$APPDIR/AppRun"

OUT=dist/cp3d-$VERSION-$ARCH.AppImage
rm -f "$OUT"
ARCH=$ARCH APPIMAGE_EXTRACT_AND_RUN=1 "$TOOL" --no-appstream "$APPDIR" "$OUT"
rm -rf "$APPDIR"
APPIMAGE_EXTRACT_AND_RUN=1 "$OUT" cli --help >/dev/null  # the AppImage starts
echo "AppImage: $OUT ($(du -h "$OUT" | cut -f1))"
