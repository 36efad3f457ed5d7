"""Training iterations per second on this machine, against a baseline run in the same process.

    python bench/train.py [--bsize 224] [--batch 8] [--steps 4] [--threads 2] [--gpu]

For each network (Cellpose's default nbase 2-32-64-128-256, and the smaller 2-16-32-64-128
the bundled model uses on CPU) one full training step (batch assembly from precomputed flows,
forward, Cellpose's loss, backward, AdamW) is timed two ways:

- baseline: float32, contiguous layout, and target flows recomputed on every augmented crop
  (what cp3d's first training engine did);
- cp3d: bfloat16 autocast + channels-last where the CPU has native bfloat16, flows computed
  once per plane and rotated with the crop.

Prints seconds per step, iterations/s, images/s and the speed-up ratio, plus the
iterations a 45-minute budget buys. Steps are interleaved (baseline, cp3d, baseline, ...) and
the median is reported, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from cp3d.core.flows import masks_to_flows
from cp3d.core.models import pick_device
from cp3d.core.net import CPnet
from cp3d.core.synth import random_nuclei_volume
from cp3d.core.samples import volume_slices
from cp3d.core.train import augment, bf16_supported, make_batch, train_step


def baseline_batch(samples, idx, rng, diam_mean, nchan, bsize):
    """Batch with flows recomputed from each augmented crop's masks (the old way)."""
    imgs = np.zeros((len(idx), nchan, bsize, bsize), np.float32)
    targets = np.zeros((len(idx), 3, bsize, bsize), np.float32)
    for b, i in enumerate(idx):
        img, m, _ = augment(samples[i], rng, diam_mean, nchan, bsize)
        imgs[b] = img
        targets[b, 0] = m > 0
        if m.max() > 0:
            targets[b, 1:] = masks_to_flows(m)
    return imgs, targets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bsize", type=int, default=224)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--nets", default="2,32,64,128,256;2,16,32,64,128")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.gpu)
    fast_ok = bf16_supported(device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, native bf16: {fast_ok}, "
          f"crop {args.bsize}, batch {args.batch}")
    img, lab, meta = random_nuclei_volume(3)
    samples = volume_slices(img, lab, meta["anisotropy"], n_per_axis=4, nchan=2)
    rng = np.random.default_rng(0)
    for spec in args.nets.split(";"):
        nbase = [int(v) for v in spec.split(",")]
        times = {"baseline": [], "cp3d": []}
        nets = {}
        for kind in times:
            torch.manual_seed(0)
            net = CPnet(nbase, 3, 3).to(device).train()
            if kind == "cp3d" and fast_ok and device.type == "cpu":
                net = net.to(memory_format=torch.channels_last)
            nets[kind] = (net, torch.optim.AdamW(net.parameters(), lr=1e-3))
        for k in range(args.steps + 1):  # the first step of each is warm-up
            for kind in times:
                net, opt = nets[kind]
                idx = rng.integers(len(samples), size=args.batch)
                t = time.perf_counter()
                if kind == "baseline":
                    imgs, targets = baseline_batch(samples, idx, rng, 30.0, 2, args.bsize)
                else:
                    imgs, targets = make_batch(samples, idx, rng, 30.0, 2, args.bsize)
                train_step(net, opt, imgs, targets, device, kind == "cp3d" and fast_ok)
                if k:
                    times[kind].append(time.perf_counter() - t)
        base, fast = np.median(times["baseline"]), np.median(times["cp3d"])
        print(f"nbase {nbase}:")
        for kind, s in (("baseline", base), ("cp3d", fast)):
            print(f"  {kind:9s} {s:6.2f} s/step  {1 / s:5.2f} it/s  {args.batch / s:6.1f} img/s  "
                  f"{int(45 * 60 / s):6d} it in 45 min")
        print(f"  speed-up {base / fast:.2f}x")


if __name__ == "__main__":
    main()
