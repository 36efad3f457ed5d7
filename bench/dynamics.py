"""Seconds and peak memory of the 3D dynamics, against a baseline measured in the same run.

    python bench/dynamics.py [--shape 96 256 256] [--nuclei 1400]

The volume: touching synthetic nuclei, ideal flows (5 x unit flows) plus Gaussian noise, cell
probability +/-4 with noise. The baseline is the straightforward Cellpose way written here in
plain torch: every foreground voxel follows the flows for 200 steps with grid_sample
(no early stop), seeds from a 5x5x5 max-pool of the full end-point histogram. Each method runs
in its own process; its peak memory is the high-water RSS above the RSS at its start, with
the high-water mark reset (Linux) after the inputs are loaded.
The issue's reference: Cellpose 4.2 takes about 24 s and 1.2 GB here on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> int:
    """Reset the process's peak RSS (Linux: clear_refs 5) and return the current RSS."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status_kb("VmRSS") * 1024


def peak_rss() -> int:
    return _status_kb("VmHWM") * 1024


def baseline_masks(dP, cellprob, niter=200):
    """Cellpose-style dynamics in plain torch, for comparison only."""
    import torch
    import torch.nn.functional as F

    from cp3d.core.dynamics import fill_holes_and_remove_small_masks

    shape = cellprob.shape
    inds = np.nonzero(cellprob > 0)
    flow = torch.from_numpy(dP / 5.0).float()[None]  # (1, 3, Z, Y, X)
    size = torch.tensor([s - 1 for s in shape], dtype=torch.float32)
    pts = torch.from_numpy(np.stack(inds, 1).astype(np.float32))  # (n, 3) as z, y, x
    for _ in range(niter):
        grid = (pts / size * 2 - 1).flip(-1)[None, None, None]  # x, y, z order for grid_sample
        step = F.grid_sample(flow, grid, align_corners=True)[0, :, 0, 0].T  # (n, 3)
        pts = torch.minimum(torch.clamp(pts + step, min=0), size)
    ends = torch.round(pts).long().numpy()
    h = np.zeros(shape, np.float32)
    np.add.at(h, tuple(ends.T), 1)
    hmax = F.max_pool3d(torch.from_numpy(h)[None, None], 5, 1, 2)[0, 0].numpy()
    seeds = np.nonzero((h - hmax > -1e-6) & (h > 10))
    M = np.zeros(shape, np.int32)
    from scipy import ndimage

    grown = ndimage.label(h > 2, structure=np.ones((3, 3, 3)))[0]
    for k, s in enumerate(zip(*seeds), 1):
        lab = grown[s]
        if lab and not M[grown == lab].any():
            M[grown == lab] = k
    masks = np.zeros(shape, np.int32)
    masks[inds] = M[tuple(ends.T)]
    return fill_holes_and_remove_small_masks(masks, 15)


def run_one(method: str, data: Path) -> dict:
    from cp3d.core.dynamics import masks_from_flows
    from cp3d.core.metrics import average_precision

    d = np.load(data)
    dP, cellprob, gt = d["dP"], d["cellprob"], d["gt"]
    fn = masks_from_flows if method == "cp3d" else baseline_masks
    fn(dP[:, :16, :32, :32], cellprob[:16, :32, :32])  # compile / warm up
    before = reset_peak()
    t = time.perf_counter()
    masks = fn(dP, cellprob)
    seconds = time.perf_counter() - t
    extra = max(0, peak_rss() - before)
    ap, *_ = average_precision(gt, masks, (0.5, 0.9))
    return dict(method=method, seconds=seconds, extra_bytes=extra, ap50=float(ap[0]),
                ap90=float(ap[1]), n=int(masks.max()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 256, 256])
    ap.add_argument("--nuclei", type=int, default=1400)
    ap.add_argument("--run", choices=["cp3d", "baseline"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        print(json.dumps(run_one(args.run, args.data)))
        return

    from cp3d.core.flows import masks_to_flows
    from cp3d.core.synth import nuclei_labels

    shape = tuple(args.shape)
    gt = nuclei_labels(shape, args.nuclei, (5.0, 8.5), seed=0)
    rng = np.random.default_rng(0)
    dP = (5 * masks_to_flows(gt) + rng.normal(0, 1.0, (3, *shape))).astype(np.float32)
    cellprob = (np.where(gt > 0, 4.0, -4.0) + rng.normal(0, 1.0, shape)).astype(np.float32)
    voxels = int(np.prod(shape))
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "flows.npz"
        np.savez(data, dP=dP, cellprob=cellprob, gt=gt)
        results = {}
        for method in ("cp3d", "baseline"):
            out = subprocess.run([sys.executable, __file__, "--run", method, "--data", str(data)],
                                 capture_output=True, text=True, check=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"volume {shape}, {int(gt.max())} nuclei, {int((cellprob > 0).sum())} foreground voxels")
    for r in results.values():
        print(f"{r['method']:9s} {r['seconds']:7.2f} s  "
              f"peak extra {r['extra_bytes'] / 1e6:7.0f} MB "
              f"({r['extra_bytes'] / voxels:5.1f} B/voxel)  AP@0.5 {r['ap50']:.3f}  "
              f"AP@0.9 {r['ap90']:.3f}  masks {r['n']}")
    ours, base = results["cp3d"], results["baseline"]
    print(f"speed-up vs baseline: {base['seconds'] / ours['seconds']:.1f}x; "
          f"memory ratio: {ours['extra_bytes'] / max(base['extra_bytes'], 1):.2f}; "
          f"vs Cellpose 4.2's ~24 s: {24 / ours['seconds']:.1f}x")


if __name__ == "__main__":
    main()
