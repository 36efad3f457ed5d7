#!/usr/bin/env bash
# Package the PyInstaller onedir bundle as a .deb:
#   /opt/cp3d/            the bundle (cp3d, cp3d-cli, _internal/)
#   /usr/bin/cp3d, /usr/bin/cp3d-cli   links into /opt/cp3d
#   /usr/share/applications/cp3d.desktop, hicolor icons, /usr/share/doc/cp3d/copyright
#
#   bash installers/linux/make_deb.sh [dist/cp3d]     -> dist/cp3d_<version>_<arch>.deb
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
BUNDLE=${1:-dist/cp3d}
[[ -x "$BUNDLE/cp3d" && -x "$BUNDLE/cp3d-cli" ]] || { echo "no bundle at $BUNDLE (run build.sh)" >&2; exit 1; }

VERSION=$(awk -F'"' '/^version *=/ { print $2; exit }' pyproject.toml)
ARCH=$(dpkg --print-architecture)
GLIBC=$(ldd --version 2>&1 | awk 'NR == 1 { print $NF }')  # awk reads all: no SIGPIPE
MAINTAINER=${CP3D_MAINTAINER:-"cp3d developers <noreply@cp3d.invalid>"}  # set for a release
NAME=cp3d_${VERSION}_${ARCH}
STAGE=build/deb/$NAME
ICONS=cp3d/resources/icons

rm -rf "$STAGE"
mkdir -p "$STAGE/DEBIAN" "$STAGE/opt" "$STAGE/usr/bin" "$STAGE/usr/share/applications" \
         "$STAGE/usr/share/doc/cp3d"
cp -a "$BUNDLE" "$STAGE/opt/cp3d"
ln -s /opt/cp3d/cp3d "$STAGE/usr/bin/cp3d"
ln -s /opt/cp3d/cp3d-cli "$STAGE/usr/bin/cp3d-cli"

for s in 16 32 48 64 128 256 512; do
    if [[ -f "$ICONS/cp3d_$s.png" ]]; then
        install -D -m 644 "$ICONS/cp3d_$s.png" "$STAGE/usr/share/icons/hicolor/${s}x${s}/apps/cp3d.png"
    fi
done

cat >"$STAGE/usr/share/applications/cp3d.desktop" <<DESKTOP
[Desktop Entry]
Type=Application
Name=cp3d
GenericName=3D cell segmentation
Comment=Segment cells and nuclei in 3D microscopy volumes (Cellpose method)
Exec=cp3d %F
TryExec=cp3d
Icon=cp3d
Terminal=false
Categories=Science;Biology;ImageProcessing;
MimeType=image/tiff;
Keywords=microscopy;segmentation;cellpose;nuclei;tiff;
StartupWMClass=cp3d
DESKTOP

cat >"$STAGE/usr/share/doc/cp3d/copyright" <<COPYRIGHT
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: cp3d
Comment: /opt/cp3d bundles Python and cp3d's dependencies (PyTorch, NumPy, SciPy, numba,
 llvmlite, Qt/PySide6, vispy, tifffile, imagecodecs and others) under their own licenses;
 their license files are inside /opt/cp3d/_internal where the packages ship them.

Files: *
Copyright: cp3d developers
License: BSD-3-Clause
COPYRIGHT

# Plain permissions whatever the umask; owner root comes from fakeroot/--root-owner-group.
chmod -R u=rwX,go=rX "$STAGE"
INSTALLED_KB=$(du -sk --exclude=DEBIAN "$STAGE" | cut -f1)

cat >"$STAGE/DEBIAN/control" <<CONTROL
Package: cp3d
Version: $VERSION
Architecture: $ARCH
Maintainer: $MAINTAINER
Installed-Size: $INSTALLED_KB
Depends: libc6 (>= $GLIBC), libgl1, libegl1, libxkbcommon-x11-0, libxcb-cursor0, libxcb-icccm4, libxcb-keysyms1, libfontconfig1
Recommends: libgl1-mesa-dri
Section: science
Priority: optional
Description: 3D cell and nucleus segmentation for microscopy volumes
 cp3d segments cells and nuclei in 3D microscopy volumes (TIFF) with the
 Cellpose method: a desktop app (cp3d) with 2D, orthogonal and 3D views, and a
 command-line tool (cp3d-cli). It runs on the CPU with a bundled model, loads
 Cellpose 2/3 models and writes _seg.npy files the Cellpose GUI opens.
CONTROL
chmod 644 "$STAGE/DEBIAN/control"

OUT=dist/$NAME.deb
rm -f "$OUT"
if command -v fakeroot >/dev/null; then
    fakeroot dpkg-deb -Zzstd --build "$STAGE" "$OUT"
else
    dpkg-deb --root-owner-group -Zzstd --build "$STAGE" "$OUT"
fi
rm -rf "$STAGE"
echo "deb: $OUT ($(du -h "$OUT" | cut -f1), installs $((INSTALLED_KB / 1024)) MiB)"
