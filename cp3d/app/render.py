"""Numpy-only rendering helpers: label colours, plane extraction and overlay compositing.

No Qt here, so that what the 2D views show can be tested as arrays.
"""

from __future__ import annotations

import colorsys

import numpy as np

N_COLORS = 4096  # size of the colour table; label ids are hashed into it
HIGHLIGHT = np.array([255, 255, 255], dtype=np.uint8)


def _make_palette(n: int = N_COLORS, seed: int = 7) -> np.ndarray:
    """Bright, saturated colours with well-spread hues (golden-ratio walk), fixed by seed."""
    rng = np.random.default_rng(seed)
    hue = (np.arange(n) * 0.6180339887498949 + rng.random()) % 1.0
    sat = 0.65 + 0.35 * rng.random(n)
    val = 0.85 + 0.15 * rng.random(n)
    rgb = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, sat, val)])
    return (rgb * 255).round().astype(np.uint8)


PALETTE = _make_palette()


def color_index(labels: np.ndarray) -> np.ndarray:
    """Stable palette index for each label id (same id -> same colour, in every view/run)."""
    lab = np.asarray(labels).astype(np.uint64, copy=False)
    h = (lab * np.uint64(2654435761)) & np.uint64(0xFFFFFFFF)
    return ((h >> np.uint64(8)) % np.uint64(N_COLORS)).astype(np.intp)


def label_colors(labels: np.ndarray) -> np.ndarray:
    """RGB uint8 colour of each label id (background 0 gets black)."""
    lab = np.asarray(labels)
    rgb = PALETTE[color_index(lab)]
    rgb[lab == 0] = 0
    return rgb


def plane_index(view: str, pos: tuple[int, int, int]) -> tuple:
    """The index of :func:`plane`'s plane in a (Z, Y, X) array (before any transpose)."""
    z, y, x = pos
    if view == "xy":
        return (z,)
    if view == "xz":
        return (slice(None), y)
    if view == "yz":
        return (slice(None), slice(None), x)
    raise ValueError(view)


def orient(plane2d: np.ndarray, view: str) -> np.ndarray:
    """The plane ``vol[plane_index(view, pos)]`` as drawn (YZ is shown transposed)."""
    return plane2d.T if view == "yz" else plane2d


def plane(vol: np.ndarray, view: str, pos: tuple[int, int, int]) -> np.ndarray:
    """2D plane of a (Z, Y, X) array at cursor pos (z, y, x).

    Orientation matches the orthoview layout: "xy" -> (Y, X); "xz" -> (Z, X), drawn under
    the XY view so X lines up; "yz" -> (Y, Z), drawn right of the XY view so Y lines up.
    """
    return orient(vol[plane_index(view, pos)], view)


def plane_to_voxel(view: str, row: int, col: int,
                   pos: tuple[int, int, int]) -> tuple[int, int, int]:
    """Voxel (z, y, x) under pixel (row, col) of a plane drawn by :func:`plane`."""
    z, y, x = pos
    if view == "xy":
        return (z, row, col)
    if view == "xz":
        return (row, y, col)
    if view == "yz":
        return (col, row, x)
    raise ValueError(view)


def to_uint8(img: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear contrast stretch of lo..hi onto 0..255."""
    scale = 255.0 / max(hi - lo, 1e-12)
    out = (np.asarray(img, dtype=np.float32) - lo) * scale
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def outline_mask(labels: np.ndarray) -> np.ndarray:
    """Pixels of a label that touch a different label (4-neighbourhood): the mask outlines."""
    lab = np.asarray(labels)
    edge = np.zeros(lab.shape, dtype=bool)
    dy = lab[1:, :] != lab[:-1, :]
    dx = lab[:, 1:] != lab[:, :-1]
    edge[1:, :] |= dy
    edge[:-1, :] |= dy
    edge[:, 1:] |= dx
    edge[:, :-1] |= dx
    return edge & (lab != 0)


def compose(
    gray: np.ndarray,
    labels: np.ndarray | None = None,
    opacity: float = 0.45,
    outlines: bool = True,
    selected: list[int] | tuple[int, ...] = (),
) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey image with coloured masks, outlines, selection highlighted.

    Selected labels are drawn more opaque with a white outline, so the selection stands
    out in every view whatever the opacity setting.
    """
    rgb = np.repeat(np.asarray(gray, dtype=np.uint8)[..., None], 3, axis=2)
    if labels is None:
        return rgb
    lab = np.asarray(labels)
    fg = lab != 0
    if not fg.any():
        return rgb
    colors = label_colors(lab).astype(np.float32)
    out = rgb.astype(np.float32)
    alpha = np.where(fg, np.float32(opacity), np.float32(0))
    sel = np.isin(lab, np.asarray(selected, dtype=lab.dtype)) if len(selected) else None
    if sel is not None:
        alpha[sel] = max(opacity, 0.7)
    out += (colors - out) * alpha[..., None]
    if outlines or sel is not None:
        edge = outline_mask(lab)
        if outlines:
            out[edge] = colors[edge]
        if sel is not None:
            out[edge & sel] = HIGHLIGHT
    return out.round().astype(np.uint8)


def downsample_for_3d(vol: np.ndarray, max_voxels: int = 12_000_000,
                      max_side: int = 512) -> tuple[np.ndarray, tuple[int, int, int]]:
    """Strided (nearest) subsample so a 3D texture stays small; returns (array, steps)."""
    shape = vol.shape
    steps = [1, 1, 1]
    while True:
        n = np.prod([-(-s // st) for s, st in zip(shape, steps)])
        sides = [-(-s // st) for s, st in zip(shape, steps)]
        if n <= max_voxels and max(sides) <= max_side:
            break
        i = int(np.argmax(sides))
        steps[i] += 1
    sub = vol[:: steps[0], :: steps[1], :: steps[2]]
    return np.ascontiguousarray(sub), tuple(steps)
