"""Build the real plant volumes of bench/quality.py (cells, and one of nuclei) from HDF5 files.

    python scripts/make_real_plant_cells.py SAMPLE_OVULE_H5 SAMPLE_PATCH_H5 OUT_DIR [NUCLEI_H5]

Both are confocal stacks of Arabidopsis tissue with a cell-membrane stain and a dense 3D
instance segmentation, published with the PlantSeg and pytorch-3dunet code (Wolny et al.,
eLife 2020), both MIT-licensed:

- ``plant_ovule``: kreshuklab/plant-seg, ``tests/resources/sample_ovule.h5`` (32 x 128 x 128,
  voxel 0.235 x 0.15 x 0.15 um, 50 cells of about 28 px). Held out: never trained on.
- ``plant_patch``: wolny/pytorch-3dunet, ``resources/sample_patch.h5`` (in that repository's
  history, 2019-2020; 64 x 200 x 200, no voxel size stored, cells look isotropic, 75 cells of
  about 40 px). Its labels have one plane (z = 31) numbered apart from the rest; each region
  there is given the label it overlaps most in the plane above, and label 1 (the dark outside
  corner) becomes background.
- ``plant_nuclei`` (optional): kreshuklab/plant-seg, ``tests/resources/data/train/1135_mini.h5``
  (GoNuclear's Arabidopsis ovule nuclei, Vijayan et al., Development 2024; 100 x 100 x 100,
  voxel 0.284 x 0.127 x 0.127 um, 54 nuclei of about 29 px, very noisy; a few dim nuclei are
  not labelled). For ``--kind nuclei``. It is also cut in two at x = 50: ``plant_nuclei_train``
  (x < 50, 21 nuclei or parts of them) to train on, and ``plant_nuclei_heldout`` (x >= 50, 42)
  to evaluate on.

h5py reads the files (``pip install h5py``; it is not one of cp3d's dependencies). The volumes
are for training and evaluation here only and never go into cp3d's commits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile

NUCLEI_SPLIT_X = 50  # plant_nuclei is cut here into a half to train on and a half held out


def relink_plane(labels: np.ndarray, z: int) -> np.ndarray:
    """``labels`` with each id of plane ``z`` replaced by the id it overlaps most in ``z - 1``."""
    out = labels.copy()
    above, here = labels[z - 1], labels[z]
    for i in np.unique(here):
        ids, counts = np.unique(above[here == i], return_counts=True)
        out[z][here == i] = ids[np.argmax(counts)]
    return out


def consecutive(labels: np.ndarray) -> np.ndarray:
    """Labels renumbered 1..n in order of first id, 0 kept as background."""
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros(int(labels.max()) + 1, np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1)
    return lut[labels]


def split_x(raw: np.ndarray, labels: np.ndarray, x: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image, labels) left of ``x`` and from ``x`` on, each half's labels renumbered 1..n: a part
    to train on and a part held out that share no voxel (an object cut by ``x`` leaves a piece
    in each)."""
    halves = (np.s_[..., :x], np.s_[..., x:])
    return [(np.ascontiguousarray(raw[h]), consecutive(labels[h])) for h in halves]


def write_pair(out: Path, name: str, raw: np.ndarray, labels: np.ndarray,
               voxel_um: tuple | None) -> None:
    # ZYX stated (ImageJ would take an unlabelled stack for channels), with the voxel size
    # where known, so cp3d reads the anisotropy from the file
    meta: dict = dict(metadata={"axes": "ZYX"})
    if voxel_um is not None:
        meta = dict(resolution=(1 / voxel_um[2], 1 / voxel_um[1]),
                    metadata={"axes": "ZYX", "spacing": voxel_um[0], "unit": "um"})
    tifffile.imwrite(out / f"{name}_img.tif", raw, imagej=True, **meta)
    tifffile.imwrite(out / f"{name}_gt.tif", labels.astype(np.uint16), imagej=True,
                     compression="zlib", **meta)
    print(f"{name}: {raw.shape}, {int(labels.max())} objects -> {out}")


def main() -> None:
    import h5py

    ovule_h5, patch_h5, out = map(Path, sys.argv[1:4])
    nuclei_h5 = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    out.mkdir(parents=True, exist_ok=True)
    with h5py.File(ovule_h5, "r") as f:
        voxel = tuple(float(v) for v in f["raw"].attrs["element_size_um"])
        write_pair(out, "plant_ovule", f["raw"][:], consecutive(f["label"][:]), voxel)
    with h5py.File(patch_h5, "r") as f:
        raw, labels = f["raw"][:], f["label"][:]
    labels = relink_plane(labels, 31)
    labels[labels == 1] = 0
    write_pair(out, "plant_patch", raw, consecutive(labels), None)
    if nuclei_h5 is not None:
        with h5py.File(nuclei_h5, "r") as f:
            voxel = tuple(float(v) for v in f["raw"].attrs["element_size_um"])
            raw, labels = f["raw"][:], f["label"][:]
        write_pair(out, "plant_nuclei", raw, consecutive(labels), voxel)
        for name, (raw_half, labels_half) in zip(("plant_nuclei_train", "plant_nuclei_heldout"),
                                                  split_x(raw, labels, NUCLEI_SPLIT_X)):
            write_pair(out, name, raw_half, labels_half, voxel)


if __name__ == "__main__":
    main()
