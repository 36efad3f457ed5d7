"""Draw cp3d's app icon with numpy alone and write it in every format the installers use.

    python installers/make_icons.py          # rewrites cp3d/resources/icons/

Outputs (committed): cp3d_<N>.png for N in SIZES, cp3d.png (256 px), cp3d.ico (PNG-compressed
entries, Windows Vista and later) and cp3d.icns (PNG entries, macOS 10.7 and later). No Qt, no
Pillow, no macOS tools: the PNG, ICO and ICNS containers are written by hand below, so the same
bytes come out on every OS.

The picture: a dark rounded tile with three overlapping nuclei in label colours, each with a
darker rim and a lighter core, the back one smaller and dimmer (a hint of depth), and a thin
light ring around the front nucleus (a selected mask).
"""

from __future__ import annotations

import struct
import sys
import zlib
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "cp3d" / "resources" / "icons"
SIZES = (16, 32, 48, 64, 128, 256, 512)
ICO_SIZES = (16, 24, 32, 48, 64, 128, 256)
# ICNS element types holding PNG data, by pixel size.
ICNS_TYPES = (
    (b"icp4", 16), (b"icp5", 32), (b"icp6", 64), (b"ic07", 128), (b"ic08", 256),
    (b"ic09", 512), (b"ic11", 32), (b"ic12", 64), (b"ic13", 256), (b"ic14", 512),
)


def _over(dst: np.ndarray, rgb, alpha: np.ndarray) -> None:
    """Composite a colour (an RGB triple or an (H, W, 3) array) with coverage alpha over dst."""
    a = alpha[..., None]
    dst[..., :3] = dst[..., :3] * (1 - a) + np.asarray(rgb, np.float32) * a
    dst[..., 3:] = dst[..., 3:] * (1 - a) + a


def _smooth(sd: np.ndarray, px: float) -> np.ndarray:
    """Coverage of the inside (sd < 0) of a signed distance, anti-aliased over one pixel."""
    return np.clip(0.5 - sd / px, 0.0, 1.0).astype(np.float32)


def render(size: int) -> np.ndarray:
    """The icon as (size, size, 4) uint8 RGBA, drawn at 4x (2x above 128 px) and averaged down."""
    ss = 4 if size <= 128 else 2
    n = size * ss
    px = 1.0 / n  # one drawing pixel in unit coordinates
    y, x = (np.mgrid[0:n, 0:n].astype(np.float32) + 0.5) / n
    img = np.zeros((n, n, 4), np.float32)  # straight RGB with coverage in A, composited "over"

    # Tile: rounded square with a vertical gradient.
    m, r = 0.04, 0.2
    qx = np.abs(x - 0.5) - (0.5 - m - r)
    qy = np.abs(y - 0.5) - (0.5 - m - r)
    sd = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0) - r
    top, bottom = np.array([0.17, 0.22, 0.31]), np.array([0.07, 0.09, 0.13])
    t = ((y - m) / (1 - 2 * m)).clip(0, 1)[..., None]
    _over(img, top * (1 - t) + bottom * t, _smooth(sd, px))

    # Nuclei, back to front: centre, radii, rotation, colour, brightness.
    nuclei = (
        ((0.64, 0.34), (0.21, 0.16), 0.5, (0.83, 0.33, 0.55), 0.7),
        ((0.33, 0.42), (0.22, 0.18), -0.4, (0.96, 0.64, 0.24), 0.9),
        ((0.52, 0.64), (0.25, 0.20), 0.25, (0.24, 0.80, 0.71), 1.0),
    )
    front = None
    for (cx, cy), (ra, rb), rot, colour, light in nuclei:
        c, s = np.cos(rot), np.sin(rot)
        u = ((x - cx) * c + (y - cy) * s) / ra
        v = (-(x - cx) * s + (y - cy) * c) / rb
        rho = np.sqrt(u * u + v * v)
        sd = (rho - 1.0) * min(ra, rb)  # near-exact distance close to the edge
        colour = np.asarray(colour) * light
        rim = colour * 0.55
        # Core lighter towards the upper left, rim darker: a lit, rounded body.
        shade = (1.15 - 0.35 * rho.clip(0, 1) - 0.15 * (u + v) / 2).clip(0.6, 1.25)[..., None]
        body = np.clip(colour * shade, 0, 1)
        _over(img, rim, _smooth(sd, px))
        _over(img, body, _smooth(sd + 0.022, px))
        front = sd
    # Selection ring around the front nucleus.
    ring = np.abs(front - 0.028) - 0.009
    _over(img, (0.95, 0.96, 0.98), _smooth(ring, px) * 0.9)

    # Average ss x ss blocks with premultiplied alpha, then back to straight RGBA.
    pre = img.copy()
    pre[..., :3] *= pre[..., 3:]
    pre = pre.reshape(size, ss, size, ss, 4).mean(axis=(1, 3))
    a = pre[..., 3:]
    rgb = np.where(a > 0, pre[..., :3] / np.maximum(a, 1e-6), 0)
    out = np.concatenate([rgb, a], axis=-1)
    return (out * 255 + 0.5).clip(0, 255).astype(np.uint8)


def png_bytes(rgba: np.ndarray) -> bytes:
    """A minimal, deterministic RGBA PNG (filter 0 on every row, zlib level 9)."""
    h, w, _ = rgba.shape
    raw = b"".join(b"\x00" + rgba[row].tobytes() for row in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def ico_bytes(pngs: dict[int, bytes]) -> bytes:
    """A Windows .ico whose entries are PNG images (accepted since Windows Vista)."""
    sizes = sorted(pngs)
    header = struct.pack("<HHH", 0, 1, len(sizes))
    offset = len(header) + 16 * len(sizes)
    entries, blobs = b"", b""
    for s in sizes:
        data = pngs[s]
        dim = 0 if s >= 256 else s  # 0 means 256
        entries += struct.pack("<BBBBHHII", dim, dim, 0, 0, 1, 32, len(data), offset)
        blobs += data
        offset += len(data)
    return header + entries + blobs


def icns_bytes(pngs: dict[int, bytes]) -> bytes:
    """A macOS .icns made of PNG elements (accepted since macOS 10.7)."""
    body = b"".join(kind + struct.pack(">I", len(pngs[s]) + 8) + pngs[s] for kind, s in ICNS_TYPES)
    return b"icns" + struct.pack(">I", len(body) + 8) + body


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    sizes = sorted(set(SIZES) | set(ICO_SIZES) | {s for _, s in ICNS_TYPES})
    pngs = {s: png_bytes(render(s)) for s in sizes}
    written = []
    for s in SIZES:
        (OUT / f"cp3d_{s}.png").write_bytes(pngs[s])
        written.append(f"cp3d_{s}.png")
    (OUT / "cp3d.png").write_bytes(pngs[256])
    (OUT / "cp3d.ico").write_bytes(ico_bytes({s: pngs[s] for s in ICO_SIZES}))
    (OUT / "cp3d.icns").write_bytes(icns_bytes(pngs))
    written += ["cp3d.png", "cp3d.ico", "cp3d.icns"]
    total = sum((OUT / f).stat().st_size for f in written)
    print(f"wrote {len(written)} files to {OUT} ({total / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
