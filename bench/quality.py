"""AP of a model through the full 3D pipeline, on volumes it never saw, printed as a table.

    python bench/quality.py [--model cp3d_nuclei] [--kind nuclei|cells] [--n_synth 4]
                            [--real DIR] [--augment] [--flow3D_smooth S]
                            [--sparse] [--diameter_range LO HI] [--synthetic_only]
                            [--ignore_small F]

Rows: fresh synthetic volumes (seeds >= 1000; training uses seeds below 1000) of the chosen
kind (cells: every other one with a nuclear channel, given as chan2), and for nuclei the bundled
sample volume and, when `--real` holds them, the real mouse-embryo volumes with their ground
truth (QCANet/BBBC050, MIT; 8- and 16-cell stage; built by scripts/make_real_embryos.py); for
cells, the real Arabidopsis membrane volumes (PlantSeg and pytorch-3dunet, MIT), and for nuclei
also GoNuclear's Arabidopsis nuclei (PlantSeg's copy, MIT; these built by
scripts/make_real_plant_cells.py).
Each is run twice: with the diameter given ("given": the generator's object diameter, what a
user measures across an object in XY) and with no diameter, estimated from the image
("estimated"). The last rows are the means. With `--ignore_small F` a second table scores the
same masks without the ground-truth objects under F times the median object's volume (the
slivers of cells cut by a crop's faces) and the masks lying mostly inside them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from cp3d.core.evaluate import THRESHOLDS, Score, format_table, score_volume, synthetic_case
from cp3d.core.io import read_volume
from cp3d.core.models import load_model, pick_device
from cp3d.core.pipeline import segment
from cp3d.resources import SAMPLE_DIR


# Real volumes (files NAME_img.tif and NAME_gt.tif in --real) and the diameter a user would
# give. Embryos (QCANet, 8- and 16-cell stage): between the median largest XY section (16 and
# 17 px) and the equal-volume sphere (21 and 19 px). Plant volumes: the median over objects of
# the largest XY section's equivalent-disk diameter (over the nuclei inside the volume; every
# plant cell is cut by the volume's border, so over all cells). plant_nuclei_heldout is the half
# of plant_nuclei that training leaves out (scripts/make_real_plant_cells.py), at its diameter.
REAL_VOLUMES = {
    "nuclei": {"mouse_embryo_8cell": 19.0, "mouse_embryo_16cell": 18.0, "plant_nuclei": 29.0,
               "plant_nuclei_heldout": 29.0},
    "cells": {"plant_ovule": 32.0, "plant_patch": 48.0},
}
EMBRYO_ANISOTROPY = 1.75 / 0.8  # voxel 1.75 x 0.8 x 0.8 um
SEGMENT_OPTIONS: dict = {}  # options of every run (--augment, --flow3D_smooth)
IGNORE_SMALL = {"fraction": 0.0, "rows": []}  # --ignore_small, and the rows it scores


def run(name, vol, gt, model, diameter, anisotropy, **kw) -> Score:
    t = time.perf_counter()
    result = segment(vol, model, diameter=diameter, anisotropy=anisotropy, **SEGMENT_OPTIONS,
                     **kw)
    label = f"{name} d={result.diameter:.0f}"
    seconds = time.perf_counter() - t
    if IGNORE_SMALL["fraction"] > 0:
        IGNORE_SMALL["rows"].append(score_volume(label, gt, result.masks, seconds, THRESHOLDS,
                                                 IGNORE_SMALL["fraction"]))
    return score_volume(label, gt, result.masks, seconds, THRESHOLDS)


def mean_row(name: str, scores: list[Score]) -> Score:
    ap = np.mean([s.ap for s in scores], axis=0)
    return Score(name, ap, sum(s.n_true for s in scores), sum(s.n_pred for s in scores),
                 sum(s.seconds for s in scores))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--kind", choices=["nuclei", "cells"], default="nuclei")
    ap.add_argument("--n_synth", type=int, default=4)
    ap.add_argument("--first_seed", type=int, default=1000)
    ap.add_argument("--augment", action="store_true", help="segment with augment=True")
    ap.add_argument("--flow3D_smooth", type=float, default=0.0,
                    help="Gaussian std on the flows before dynamics in every run (default 0)")
    ap.add_argument("--sparse", action="store_true",
                    help="nuclei only: sparse volumes (fill drawn log-uniformly in 0.01-0.15 "
                         "instead of 0.2-0.6, as in embryos and cleared tissue)")
    ap.add_argument("--diameter_range", type=float, nargs=2, default=None,
                    help="draw each synthetic volume's object diameter log-uniformly in LO HI "
                         "(px) instead of 8-40, e.g. 3.5 8 for cleared-tissue nuclei")
    ap.add_argument("--synthetic_only", action="store_true",
                    help="skip the bundled sample and the real volumes")
    ap.add_argument("--real", type=Path,
                    default=Path(__file__).resolve().parents[2] / "shared/data/real")
    ap.add_argument("--gpu", action="store_true", help="run the network on the GPU")
    ap.add_argument("--ignore_small", type=float, default=0.0, metavar="F",
                    help="also score without ground-truth objects under F x the median "
                         "object's volume (cells cut by the crop), e.g. 0.1")
    args = ap.parse_args()
    IGNORE_SMALL["fraction"] = args.ignore_small
    model = load_model(args.model, device=pick_device(args.gpu))
    SEGMENT_OPTIONS.update(augment=args.augment, flow3D_smooth=args.flow3D_smooth)
    given, estimated = [], []
    for seed in range(args.first_seed, args.first_seed + args.n_synth):
        overrides = None
        if args.sparse:
            overrides = dict(fill=float(np.exp(np.random.default_rng([seed, 9]).uniform(
                np.log(0.01), np.log(0.15)))))
        diameter = None
        if args.diameter_range:
            lo, hi = np.log(args.diameter_range)
            diameter = float(np.exp(np.random.default_rng([seed, 7]).uniform(lo, hi)))
        vol, gt, meta, kw = synthetic_case(seed, args.kind, overrides, diameter)
        name = f"{args.kind}{seed}{' sparse' if args.sparse else ''}{' +nuc' if kw else ''}"
        given.append(run(f"{name} given", vol, gt, model, meta["diameter"],
                         meta["anisotropy"], **kw))
        estimated.append(run(f"{name} estimated", vol, gt, model, None, meta["anisotropy"],
                             **kw))
        for row in (given[-1], estimated[-1]):
            print(format_table([row], THRESHOLDS).splitlines()[-1], flush=True)
    rows = [s for pair in zip(given, estimated) for s in pair]
    if given:  # --n_synth 0 runs the sample and real volumes only
        rows += [mean_row(f"mean synthetic {args.kind}, given", given),
                 mean_row(f"mean synthetic {args.kind}, estimated", estimated)]
    if args.kind == "nuclei" and not args.synthetic_only:
        sample = read_volume(SAMPLE_DIR / "sample_nuclei.tif")
        sample_gt = read_volume(SAMPLE_DIR / "sample_nuclei_masks.tif").data[:, 0]
        rows.append(run("sample given", sample, sample_gt, model, 20.0, None))
        rows.append(run("sample estimated", sample, sample_gt, model, None, None))
    if not args.synthetic_only:
        for name, diameter in REAL_VOLUMES[args.kind].items():
            img = args.real / f"{name}_img.tif"
            if not img.exists():
                continue
            vol = read_volume(img)
            gt = read_volume(args.real / f"{name}_gt.tif").data[:, 0]
            # embryo files built before 197d1e4 lack the voxel size; the plant patch has none
            aniso = vol.anisotropy or (EMBRYO_ANISOTROPY if "embryo" in name else 1.0)
            rows.append(run(f"real {name} given", vol, gt, model, diameter, aniso))
            rows.append(run(f"real {name} estimated", vol, gt, model, None, aniso))
    print(f"model: {model.path}")
    print(format_table(rows, THRESHOLDS, mean=False))
    if IGNORE_SMALL["rows"]:
        print(f"\nwithout ground-truth objects under {args.ignore_small} x the median volume "
              "and the masks mostly inside them:")
        print(format_table(IGNORE_SMALL["rows"], THRESHOLDS, mean=False))


if __name__ == "__main__":
    main()
