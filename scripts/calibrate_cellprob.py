"""Calibrate a trained model's cell-probability output on validation volumes, then save it.

    python scripts/calibrate_cellprob.py --model cp3d_nuclei --kind nuclei [--n_volumes 16]
                                         [--out PATH.pth]

Why: a small network trained on CPU is too shy on dim objects. Their cell probability stays
just below 0 at the rim, so the mask covers only the bright core: it misses IoU 0.5 and
counts twice, once as a miss and once as a false positive. Lowering ``cellprob_threshold``
fixes that, but users should not have to change Cellpose's default of 0. So the shift goes
into the model: the bias of the cell-probability logit is raised, which is the same as a lower
threshold (:func:`cp3d.core.models.shift_cellprob_threshold`). The weights stay a plain
Cellpose state dict.

The shift is chosen on validation volumes (seeds 900.., never trained on, and not the
evaluation seeds >= 1000 of bench/quality.py): each runs through the full 3D pipeline with
its true diameter. Then every threshold of the grid is applied to the same flows; of those
whose mean AP@0.5 is within ``TIE`` of the best, the one nearest 0 wins.

A gain here is not a reason to ship: lower thresholds grow every mask, so check AP@0.75 and the
real volumes with bench/quality.py first (the model card's recalibration section).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cp3d.core import dynamics
from cp3d.core.evaluate import score_masks, synthetic_case
from cp3d.core.models import load_model, read_metadata, save_model, shift_cellprob_threshold
from cp3d.core.pipeline import segment

VALIDATION_SEEDS_FROM = 900  # training: 0..95 and 500..595; held-out loss 2000..; evaluation 1000..
GRID = (0.5, 0.0, -0.25, -0.5, -0.75, -1.0, -1.25, -1.5, -2.0, -2.5, -3.0)
# 16 validation volumes leave a few thousandths of noise on the mean AP: of the thresholds
# within this of the best, the one nearest 0 (the smallest change to the model) is taken
TIE = 0.005


def validation_scores(model, kind: str, seeds, grid=GRID, log=print) -> np.ndarray:
    """AP@0.5 of each validation volume (rows) at each threshold of ``grid`` (columns)."""
    rows = []
    for seed in seeds:
        vol, gt, meta, kw = synthetic_case(seed, kind)
        result = segment(vol, model, diameter=meta["diameter"], anisotropy=meta["anisotropy"],
                         **kw)
        row = []
        for t in grid:
            masks = dynamics.masks_from_flows(result.dP, result.cellprob,
                                              niter=result.params["niter"],
                                              cellprob_threshold=t, min_size=15)
            row.append(score_masks(gt, masks, (0.5,))[0])
        rows.append(row)
        log(f"{kind}{seed} d={meta['diameter']:.0f}: "
            + " ".join(f"{t:+.1f}:{a:.3f}" for t, a in zip(grid, row)))
    return np.array(rows)


def best_threshold(scores: np.ndarray, grid=GRID) -> float:
    """The grid threshold nearest 0 whose mean AP is within ``TIE`` of the best."""
    mean = scores.mean(axis=0)
    ok = [t for t, m in zip(grid, mean) if m >= mean.max() - TIE]
    return float(min(ok, key=abs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--kind", choices=["nuclei", "cells"], required=True)
    ap.add_argument("--n_volumes", type=int, default=16)
    ap.add_argument("--out", type=Path, default=None, help="default: overwrite --model's file")
    args = ap.parse_args()
    model = load_model(args.model)
    seeds = range(VALIDATION_SEEDS_FROM, VALIDATION_SEEDS_FROM + args.n_volumes)
    scores = validation_scores(model, args.kind, seeds)
    mean = scores.mean(axis=0)
    t = best_threshold(scores)
    print("mean AP@0.5: " + " ".join(f"{g:+.1f}:{m:.3f}" for g, m in zip(GRID, mean)))
    print(f"chosen threshold {t:+.1f} (AP@0.5 {mean[GRID.index(0.0)]:.3f} -> "
          f"{mean[GRID.index(t)]:.3f})")
    meta = read_metadata(model.path)
    before = meta.get("cellprob_calibration", {}).get("bias_shift", 0.0)
    shift = shift_cellprob_threshold(model.net, t)
    meta["cellprob_calibration"] = dict(
        recipe="scripts/calibrate_cellprob.py", bias_shift=round(before + shift, 4),
        threshold_equivalent=t, seeds=f"{seeds.start}-{seeds.stop - 1}",
        mean_ap50={f"{g:+.1f}": round(float(m), 4) for g, m in zip(GRID, mean)})
    out = save_model(model.net, args.out or model.path, meta, half=True)
    print(f"saved {out}: cell-probability bias {shift:+.3f}")
    print(json.dumps(meta["cellprob_calibration"], indent=1))


if __name__ == "__main__":
    main()
