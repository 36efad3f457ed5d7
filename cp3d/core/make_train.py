"""``cp3d-cli make-train``: random 2D crops of z-stacks, to annotate and train on.

Why: the network only ever sees 2D planes (YX, and ZY / ZX with Z resampled by the anisotropy),
so a 3D model is fine-tuned on 2D images. Annotating whole volumes is slow; a few random crops
in all three orientations cover what the network meets at inference. When the volume already
has masks (a cp3d or Cellpose prediction, or ground truth) the matching mask crops are written
too, so the user corrects a prediction instead of drawing from nothing.

Crops go to ``train/`` beside the image (or under ``--dir``) as ``NAME_{yx|zy|zx}_{axis}{i}_
crop{k}.tif``: the source file, the orientation (rows, columns of the crop), the index of the
plane in the original volume along the axis the plane is cut across (z for YX, x for ZY, y for
ZX) and the crop's number within its file (0 .. 3 x nimg_per_tif - 1), e.g.
``embryo_zy_x0041_crop13.tif``. Masks are ``CROPNAME_masks.tif``, which ``cp3d-cli train
--dir .../train`` (``--mask_filter _masks``, the default) reads as they are. Crops hold the
network's input channels: one (``--chan``), or two with ``--chan2`` (train those with
``--chan 1 --chan2 2``), or all of them with ``--all_channels``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import Cp3dError, InputError

log = logging.getLogger("cp3d")

ORIENTATIONS = ("yx", "zy", "zx")
# the axis of a (Z, Y, X) volume each orientation is cut across, and its letter in names
_CUT_AXIS = {"yx": 0, "zy": 2, "zx": 1}
# mask files looked for beside an image, first found wins: ground truth, then a Cellpose/cp3d
# _seg.npy (which the GUIs save after hand edits), then cp3d's plain prediction
MASK_SUFFIXES = ("_masks.tif", "_masks.tiff", "_seg.npy", "_cp_masks.tif", "_cp_masks.tiff")
OUT_FOLDER = "train"


@dataclass
class Crop:
    """One 2D crop: ``image`` (C, H, W) float32, ``masks`` (H, W) labels 1..N or None.

    ``plane`` is the index, in the original volume, along the axis the plane is cut across;
    ``y0``/``x0`` the crop's corner in the (Z-resampled) plane; ``index`` its number in the file.
    """

    image: np.ndarray
    masks: Optional[np.ndarray]
    orientation: str
    plane: int
    y0: int
    x0: int
    index: int

    def name(self, stem: str) -> str:
        """``STEM_zy_x0041_crop3``: where the crop came from, readable in a file list."""
        letter = "zyx"[_CUT_AXIS[self.orientation]]
        return f"{stem}_{self.orientation}_{letter}{self.plane:04d}_crop{self.index}"


# --------------------------------------------------------------------------- arrays


def resample_rows(plane: np.ndarray, n_out: int, order: int = 1) -> np.ndarray:
    """Resample axis -2 (Z rows of a ZY/ZX plane) to ``n_out`` rows, pixel centres aligned.

    The same grid as inference's Z upsampling (``resize_volume``: linear, align_corners=False),
    so crops look like the planes the network sees. ``order`` 0 (labels): the nearest row.
    """
    n_in = plane.shape[-2]
    if n_out == n_in:
        return plane
    src = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    if order == 0:
        idx = np.clip(np.floor(src + 0.5), 0, n_in - 1).astype(np.intp)
        return np.take(plane, idx, axis=-2)
    src = np.clip(src, 0, n_in - 1)
    i0 = np.floor(src).astype(np.intp)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = (src - i0).astype(np.float32)[:, None]
    a = np.take(plane, i0, axis=-2).astype(np.float32, copy=False)
    b = np.take(plane, i1, axis=-2).astype(np.float32, copy=False)
    return a * (1 - w) + b * w


def relabel(masks: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..N in the order of their old values (0 stays background); uint16 or
    uint32."""
    uniq, inv = np.unique(masks, return_inverse=True)
    if uniq[0] != 0:
        inv = inv + 1
    n = int(inv.max()) if inv.size else 0
    return inv.reshape(masks.shape).astype(np.uint16 if n < 2**16 else np.uint32)


def _pick_planes(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` plane indices out of ``n``, all distinct while ``k <= n`` (repeats beyond)."""
    reps = -(-k // n)
    return np.concatenate([rng.permutation(n) for _ in range(reps)])[:k]


def random_crops(volume: np.ndarray, masks: Optional[np.ndarray], anisotropy: float = 1.0,
                 nimg_per_tif: int = 10, crop_size: int = 512,
                 rng: Optional[np.random.Generator] = None) -> list[Crop]:
    """``nimg_per_tif`` random crops in each of the YX, ZY and ZX orientations.

    ``volume`` (C, Z, Y, X) or (Z, Y, X), already normalized; ``masks`` (Z, Y, X) or None. ZY
    and ZX planes have Z resampled to ``round(Z * anisotropy)`` rows (masks nearest-neighbour)
    so that their objects have the proportions of XY ones. A crop is ``crop_size`` square, or
    the plane's size where the plane is smaller. A volume with one plane gives YX crops only.
    Mask crops are relabelled 1..N.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    vol = np.asarray(volume)
    if vol.ndim == 3:
        vol = vol[np.newaxis]
    if vol.ndim != 4:
        raise ValueError(f"volume must be (C, Z, Y, X) or (Z, Y, X), got shape {vol.shape}")
    if masks is not None and np.shape(masks) != vol.shape[1:]:
        raise ValueError(f"masks {np.shape(masks)} and volume {vol.shape[1:]} (Z, Y, X) differ")
    if not anisotropy > 0 or nimg_per_tif < 1 or crop_size < 1:
        raise ValueError("anisotropy, nimg_per_tif and crop_size must be positive")
    lz = vol.shape[1]
    n_rows_z = max(1, int(round(lz * anisotropy)))
    crops: list[Crop] = []
    for orientation in ORIENTATIONS if lz > 1 else ("yx",):
        axis = _CUT_AXIS[orientation]
        for plane in _pick_planes(vol.shape[axis + 1], nimg_per_tif, rng):
            img = np.take(vol, plane, axis=axis + 1)  # (C, rows, cols)
            m = None if masks is None else np.take(masks, plane, axis=axis)
            if orientation != "yx":
                img = resample_rows(img, n_rows_z, order=1)
                m = None if m is None else resample_rows(m, n_rows_z, order=0)
            rows, cols = img.shape[1:]
            h, w = min(crop_size, rows), min(crop_size, cols)
            y0 = int(rng.integers(0, rows - h + 1))
            x0 = int(rng.integers(0, cols - w + 1))
            box = (slice(y0, y0 + h), slice(x0, x0 + w))
            crops.append(Crop(
                image=np.ascontiguousarray(img[(slice(None),) + box], dtype=np.float32),
                masks=None if m is None else relabel(m[box]),
                orientation=orientation, plane=int(plane), y0=y0, x0=x0, index=len(crops)))
    return crops


# --------------------------------------------------------------------------- files


def find_masks(image_path: str | Path) -> Optional[Path]:
    """The masks beside an image (``NAME_masks.tif``, ``NAME_seg.npy``, ``NAME_cp_masks.tif``,
    first found), or None."""
    image_path = Path(image_path)
    for suffix in MASK_SUFFIXES:
        candidate = image_path.with_name(image_path.stem + suffix)
        if candidate.is_file():
            return candidate
    return None


def read_masks(path: str | Path, shape_zyx: Sequence[int]) -> np.ndarray:
    """Labels (Z, Y, X) from a mask tiff or ``_seg.npy``, checked against the image's shape."""
    import tifffile

    from .io import load_seg_npy

    path = Path(path)
    if path.suffix == ".npy":
        masks = np.asarray(load_seg_npy(path)["masks"])
    else:
        try:
            masks = tifffile.imread(path)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise InputError(f"not a readable mask TIFF file ({first})", path) from None
    masks = np.asarray(masks)
    shape_zyx = tuple(int(s) for s in shape_zyx)
    if masks.shape != shape_zyx:
        squeezed = masks.reshape([s for s in masks.shape if s > 1] or [1])
        if squeezed.shape == tuple(s for s in shape_zyx if s > 1):
            masks = squeezed.reshape(shape_zyx)
        else:
            raise InputError(f"mask shape {masks.shape} differs from the image's {shape_zyx} "
                             "(Z, Y, X)", path)
    if masks.dtype.kind not in "uif" or (masks.dtype.kind == "f"
                                          and not np.all(masks == np.round(masks))):
        raise InputError(f"masks are not integer labels (type {masks.dtype})", path)
    if masks.min() < 0:
        raise InputError("masks have negative labels", path)
    return masks.astype(np.int64 if masks.max() >= 2**31 else np.int32)


def make_train_file(
    path: str | Path,
    outdir: Optional[str | Path] = None,
    *,
    name: Optional[str] = None,
    z_axis: Optional[int] = None,
    channel_axis: Optional[int] = None,
    chan: int = 0,
    chan2: int = 0,
    all_channels: bool = False,
    invert: bool = False,
    anisotropy: Optional[float] = None,
    sharpen_radius: float = 0.0,
    tile_norm: int = 0,
    nimg_per_tif: int = 10,
    crop_size: int = 512,
    seed: int = 0,
) -> list[Path]:
    """Write the crops of one image (and of its masks, when it has some) into ``outdir``.

    ``outdir`` defaults to ``train/`` beside the image; ``name`` (default the file's stem)
    starts every crop's name. The image is normalized as inference normalizes it (channels
    picked with ``chan``/``chan2``/``all_channels``, 1st-99th percentile over the whole volume,
    ``sharpen_radius``, ``tile_norm``, ``invert``). Crops are float32: the normalized values
    are the network's input as they are (fractions, negative after sharpening), which uint16
    would round and clip; Cellpose's GUI and ``cp3d-cli train`` read float32 tiffs. Randomness
    depends only on ``seed`` and the file's name, so a batch's other files change nothing.
    Mask crops with no object are not written (training refuses empty masks). Every file is
    written atomically. Returns the paths written; raises :class:`InputError` naming the file.
    """
    from .io import check_writable, imwrite, read_volume
    from .normalize import normalize_volume
    from .pipeline import select_channels

    path = Path(path)
    outdir = Path(outdir) if outdir is not None else path.parent / OUT_FOLDER
    vol = read_volume(path, z_axis=z_axis, channel_axis=channel_axis)
    mask_path = find_masks(path)
    masks = read_masks(mask_path, vol.shape_zyx) if mask_path is not None else None
    a = float(anisotropy) if anisotropy else (vol.anisotropy or 1.0)
    if not a > 0:
        raise InputError(f"anisotropy must be positive, got {a}", path)
    nchan = vol.nchan if all_channels else (2 if chan2 > 0 else 1)
    x = select_channels(vol.data, nchan, chan, chan2, all_channels, path)
    x = normalize_volume(x, invert=invert, sharpen_radius=sharpen_radius, tile_norm=tile_norm)
    rng = np.random.default_rng([int(seed), zlib.crc32(path.name.encode())])
    crops = random_crops(x, masks, a, nimg_per_tif, crop_size, rng)
    check_writable(outdir)
    stem = name or path.stem
    written: list[Path] = []
    for crop in crops:
        base = outdir / crop.name(stem)
        img = crop.image[0] if crop.image.shape[0] == 1 else crop.image
        written.append(imwrite(base.with_name(base.name + ".tif"), img,
                               axes="YX" if img.ndim == 2 else "CYX"))
        if crop.masks is not None and crop.masks.any():
            written.append(imwrite(base.with_name(base.name + "_masks.tif"), crop.masks))
    n_masks = sum(1 for p in written if p.stem.endswith("_masks"))
    log.info("%s: %d crops, %d with masks%s", path.name, len(crops), n_masks,
             f" (from {mask_path.name})" if mask_path is not None else "")
    return written


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    from .cli import add_input_args

    p = argparse.ArgumentParser(
        prog="cp3d-cli make-train",
        description="Random 2D crops of z-stacks in YX, ZY and ZX (Z resampled by the "
                    "anisotropy), normalized, for annotation and training: written to train/ "
                    "beside the images (or under --dir) as NAME_zy_x0041_crop3.tif (source, "
                    "orientation, plane index, crop number). When an image has masks beside "
                    "it (NAME_masks.tif, NAME_seg.npy or NAME_cp_masks.tif) the matching "
                    "CROPNAME_masks.tif are written too. 'cp3d-cli train --dir .../train' "
                    "trains on the result.")
    add_input_args(p)
    g = p.add_argument_group("crops")
    g.add_argument("--nimg_per_tif", type=int, default=10,
                   help="crops per orientation (YX, ZY, ZX) and image (default: %(default)s)")
    g.add_argument("--crop_size", type=int, default=512,
                   help="side of the square crops in pixels; smaller planes give smaller "
                        "crops (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0,
                   help="random seed: the same seed gives the same crops (default: %(default)s)")
    g.add_argument("--verbose", action="store_true", help="log every step")
    return p


def _unique_names(files: Sequence[Path]) -> list[str]:
    """Stems, prefixed with their folder's name where two files share a stem."""
    stems = [f.stem for f in files]
    return [f"{f.parent.name}_{f.stem}" if stems.count(f.stem) > 1 else f.stem for f in files]


def make_train_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cp3d-cli make-train``; returns the exit status (1 if any file failed).

    A file that fails is reported in one line naming it and the problem; the others go on.
    """
    from .io import list_images

    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if (args.image_path is None) == (args.dir is None):
        parser.error("give exactly one of --image_path or --dir")
    if args.nimg_per_tif < 1 or args.crop_size < 1:
        parser.error("--nimg_per_tif and --crop_size must be at least 1")
    if args.anisotropy is not None and not args.anisotropy > 0:
        parser.error("--anisotropy must be positive")
    try:
        if args.image_path is not None:
            files = [args.image_path]
            outdir = args.image_path.parent / OUT_FOLDER
        else:
            outdir = args.dir / OUT_FOLDER
            files = [f for f in list_images(args.dir, args.look_one_level_down, args.img_filter)
                     if f.parent.resolve() != outdir.resolve()]  # never crop earlier crops
            if not files:
                raise InputError("no tiff images found", args.dir)
    except Cp3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    params = dict(z_axis=args.z_axis, channel_axis=args.channel_axis, chan=args.chan,
                  chan2=args.chan2, all_channels=args.all_channels, invert=args.invert,
                  anisotropy=args.anisotropy, sharpen_radius=args.sharpen_radius,
                  tile_norm=args.tile_norm, nimg_per_tif=args.nimg_per_tif,
                  crop_size=args.crop_size, seed=args.seed)
    failures: list[str] = []
    n_written = 0
    t0 = time.perf_counter()
    try:
        for path, name in zip(files, _unique_names(files)):
            try:
                written = make_train_file(path, outdir, name=name, **params)
            except Cp3dError as err:
                failures.append(str(err))
                print(f"error: {err}", file=sys.stderr)
                continue
            except MemoryError:
                failures.append(f"{path}: ran out of memory")
                print(f"error: {path}: ran out of memory", file=sys.stderr)
                continue
            n_img = sum(1 for p in written if not p.stem.endswith("_masks"))
            n_written += n_img
            print(f"{path.name}: {n_img} crops, {len(written) - n_img} with masks")
    except KeyboardInterrupt:
        print("interrupted: no half-written files were left", file=sys.stderr)
        return 130
    seconds = time.perf_counter() - t0
    print(f"cp3d make-train: {n_written} crops from {len(files) - len(failures)} of "
          f"{len(files)} file(s) in {outdir} ({seconds:.1f} s)", file=sys.stderr)
    if failures:
        print(f"cp3d make-train: {len(failures)} file(s) failed:", file=sys.stderr)
        for message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


__all__ = ["Crop", "random_crops", "resample_rows", "relabel", "find_masks", "read_masks",
           "make_train_file", "make_train_main", "build_parser"]
