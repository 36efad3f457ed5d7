"""Write the bundled sample volume and its ground truth (deterministic; no real data involved).

    python scripts/make_sample.py [--out cp3d/resources/sample]

sample_nuclei.tif        40 x 128 x 128 uint16, ZYX, ImageJ hyperstack, voxel 1.0 x 0.5 x 0.5 µm
                         (Z planes twice as far apart as XY pixels: anisotropy 2.0), zlib
sample_nuclei_masks.tif  its instance labels (uint16, 0 = background), same shape and metadata
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import tifffile

from cp3d.core.synth import downsample_z, nuclei_labels, render, tidy_labels

SHAPE = (40, 128, 128)  # Z, Y, X of the written volume
VOXEL_UM = (1.0, 0.5, 0.5)  # z, y, x
ANISOTROPY = VOXEL_UM[0] / VOXEL_UM[1]
SEED = 5000  # never used for training volumes


def make_sample() -> tuple[np.ndarray, np.ndarray]:
    """(image uint16, masks uint16) of ~100 touching nuclei, diameter about 18-24 px in XY."""
    iso = (int(SHAPE[0] * ANISOTROPY),) + SHAPE[1:]
    labels = nuclei_labels(iso, n_objects=110, radius_range=(9.0, 12.0), seed=SEED,
                           touching=0.8, irregularity=0.08, axis_spread=0.15)
    img = render(labels, "nuclei", seed=SEED, anisotropy=ANISOTROPY, snr=12.0, blur=1.1,
                 z_blur=3.0, background=0.12, bg_variation=0.4, haze=0.05, attenuation=0.2,
                 dim_fraction=0.15, brightness_spread=0.3, texture=0.5, edge=1.0,
                 read_noise=3.0, level=1500.0, offset=100.0, dtype=np.uint16)
    masks = tidy_labels(downsample_z(labels, ANISOTROPY, order=0))
    return img, masks


def write_tif(path: Path, data: np.ndarray) -> None:
    z, y, x = VOXEL_UM
    tifffile.imwrite(path, data, imagej=True, photometric="minisblack", compression="zlib",
                     resolution=(1.0 / x, 1.0 / y),
                     metadata={"axes": "ZYX", "spacing": z, "unit": "um"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1]
                    / "cp3d" / "resources" / "sample")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    img, masks = make_sample()
    write_tif(args.out / "sample_nuclei.tif", img)
    write_tif(args.out / "sample_nuclei_masks.tif", masks)
    for name in ("sample_nuclei.tif", "sample_nuclei_masks.tif"):
        print(f"{args.out / name}: {(args.out / name).stat().st_size / 1e6:.2f} MB")
    print(f"{int(masks.max())} nuclei, shape {img.shape}, image {img.min()}..{img.max()}")


if __name__ == "__main__":
    main()
