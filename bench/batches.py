"""Training batches per second built in the training process, against built ahead by workers.

    python bench/batches.py [--workers 4] [--bsize 224] [--batch 32] [--batches 24]

On a GPU the network's step takes a few milliseconds and building the batch (augmenting each
plane: rescale, rotate, flip, crop, flows rotated with it) becomes the limit; ``train(...,
workers=N)`` builds batches in N forked processes (cp3d.core.train.BatchSource). Both ways
build the same batches (the test suite checks it); this prints their rate and the ratio. The
ratio can only approach N where N cores are free.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from cp3d.core.synth import random_nuclei_volume
from cp3d.core.samples import volume_slices
from cp3d.core.train import BatchSource


def rate(source: BatchSource, order: np.ndarray, batch: int) -> float:
    """Batches per second over one pass of ``order`` (after one warm-up batch)."""
    it = source.batches(0, order, batch)
    next(it)
    t = time.perf_counter()
    n = sum(1 for _ in it)
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--bsize", type=int, default=224)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=24)
    args = ap.parse_args()
    img, lab, meta = random_nuclei_volume(3)
    samples = volume_slices(img, lab, meta["anisotropy"], n_per_axis=6, nchan=2)
    order = np.random.default_rng(0).integers(len(samples), size=args.batch * (args.batches + 1))
    print(f"{len(samples)} planes, crop {args.bsize}, batch {args.batch}, "
          f"{os.cpu_count()} cores")
    with BatchSource(samples, 30.0, 2, args.bsize) as here:
        base = rate(here, order, args.batch)
    with BatchSource(samples, 30.0, 2, args.bsize, workers=args.workers) as ahead:
        fast = rate(ahead, order, args.batch)
    for name, r in (("in process", base), (f"{args.workers} workers", fast)):
        print(f"  {name:12s} {r:6.2f} batches/s  {r * args.batch:7.1f} planes/s")
    print(f"  speed-up {fast / base:.2f}x")


if __name__ == "__main__":
    main()
