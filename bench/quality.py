"""AP of a model through the full 3D pipeline, on volumes it never saw, printed as a table.

    python bench/quality.py [--model cp3d_nuclei] [--n_synth 4] [--real ../shared/data/real]

Rows: fresh synthetic nuclei volumes (seeds >= 1000; training uses seeds below 1000), the
bundled sample volume, and, when the folder exists, the real mouse-embryo volume with its
ground truth (QCANet/BBBC050, MIT; voxel 1.75 x 0.8 x 0.8 um). Each is run with the true
diameter given ("given") and with the model's own default ("default").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cp3d.core.evaluate import THRESHOLDS, Score, format_table, score_masks
from cp3d.core.io import read_volume, volume_from_array
from cp3d.core.models import load_model
from cp3d.core.pipeline import segment
from cp3d.core.synth import random_nuclei_volume
from cp3d.core.train import median_diameter
from cp3d.resources import SAMPLE_DIR


def run(name, vol, gt, model, diameter, anisotropy) -> Score:
    t = time.perf_counter()
    result = segment(vol, model, diameter=diameter, anisotropy=anisotropy)
    return Score(name, score_masks(gt, result.masks, THRESHOLDS), int(gt.max()), result.n_masks,
                 time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--n_synth", type=int, default=4)
    ap.add_argument("--real", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/real")
    args = ap.parse_args()
    model = load_model(args.model)
    scores = []
    for seed in range(1000, 1000 + args.n_synth):
        img, gt, meta = random_nuclei_volume(seed)
        vol = volume_from_array(img)
        d = median_diameter(gt[gt.shape[0] // 2])
        scores.append(run(f"synth{seed} d={meta['diameter']:.0f} given", vol, gt, model,
                          meta["diameter"], meta["anisotropy"]))
        scores.append(run(f"synth{seed} default", vol, gt, model, None, meta["anisotropy"]))
    sample = read_volume(SAMPLE_DIR / "sample_nuclei.tif")
    sample_gt = read_volume(SAMPLE_DIR / "sample_nuclei_masks.tif").data[:, 0]
    scores.append(run("sample given d=20", sample, sample_gt, model, 20.0, None))
    scores.append(run("sample default", sample, sample_gt, model, None, None))
    embryo = args.real / "mouse_embryo_8cell_img.tif"
    if embryo.exists():
        vol = read_volume(embryo)
        gt = read_volume(args.real / "mouse_embryo_8cell_gt.tif").data[:, 0]
        scores.append(run("embryo given d=19", vol, gt, model, 19.0, 1.75 / 0.8))
        scores.append(run("embryo default", vol, gt, model, None, 1.75 / 0.8))
    print(f"model: {model.path}")
    print(format_table(scores, THRESHOLDS))


if __name__ == "__main__":
    main()
