"""Build the real embryo evaluation volumes of bench/quality.py from a QCANet checkout.

    python scripts/make_real_embryos.py PATH/TO/QCANet OUT_DIR

QCANet (github.com/funalab/QCANet, MIT; images by the Yamagata Lab, Kindai University;
Tokuoka et al. 2020, BBBC050) ships two mouse embryos (8- and 16-cell stage, H2B-mRFP1,
voxel 1.75 x 0.8 x 0.8 um) with a manual nucleus mask (images_nsn) and one manual marker per
nucleus (images_ndn). The instance ground truth is the connected components of the mask that
hold exactly one marker. The files are for evaluation only and never go into cp3d's commits.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import tifffile
from scipy import ndimage as ndi

VOXEL_UM = (1.75, 0.8, 0.8)  # Z, Y, X


def instance_labels(mask: np.ndarray, markers: np.ndarray) -> np.ndarray:
    """Label the components of ``mask`` that contain exactly one marker component, 1..n."""
    components, _ = ndi.label(mask > 0)
    marks, _ = ndi.label(markers > 0)
    out = np.zeros(mask.shape, np.uint16)
    k = 0
    for i, sl in enumerate(ndi.find_objects(components), 1):
        inside = components[sl] == i
        if len(np.unique(marks[sl][inside & (marks[sl] > 0)])) == 1:
            k += 1
            out[sl][inside] = k
    return out


def main() -> None:
    root, out = Path(sys.argv[1]) / "example_datasets", Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for stage in (8, 16):
        name = f"{stage}_cell_stage.tif"
        gt = instance_labels(tifffile.imread(root / "images_nsn" / name),
                             tifffile.imread(root / "images_ndn" / name))
        # ImageJ voxel size, so that cp3d (and Cellpose users' tools) read the anisotropy
        # from the file as from a microscope's
        voxel = dict(imagej=True, resolution=(1 / VOXEL_UM[2], 1 / VOXEL_UM[1]),
                     metadata={"axes": "ZYX", "spacing": VOXEL_UM[0], "unit": "um"})
        raw = tifffile.imread(root / "images_raw" / name)
        tifffile.imwrite(out / f"mouse_embryo_{stage}cell_img.tif", raw.reshape(gt.shape),
                         **voxel)
        tifffile.imwrite(out / f"mouse_embryo_{stage}cell_gt.tif", gt, **voxel)
        print(f"{stage}-cell stage: {gt.max()} nuclei -> {out}")


if __name__ == "__main__":
    main()
