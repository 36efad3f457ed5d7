"""Seconds per megavoxel of 2.5D inference with the default network, against a baseline run in
the same process: the Cellpose 3.1 way of running it (every plane padded to at least 224 px and
cut into 224-px tiles with 10% overlap, 8 tiles per batch, plane by plane).

    python bench/inference.py [--shape 40 128 128] [--gpu]

Prints seconds, s/Mvoxel, peak memory per voxel, and the speed-up ratio.
"""

from __future__ import annotations

import argparse
import math
import time
import tracemalloc

import numpy as np
import torch

from cp3d.core import inference
from cp3d.core.models import pick_device
from cp3d.core.net import CPnet


def baseline_planes(net, planes, device, batch_size=8):
    """Cellpose 3.1's run_net on a stack of planes: pad to >= 224, tile, batch tiles."""
    n, c, h, w = planes.shape
    out = np.zeros((n, 3, h, w), np.float32)
    H, W = max(h, 224), max(w, 224)
    ys = inference._tile_starts(H, 224)
    xs = inference._tile_starts(W, 224)
    wt = np.outer(inference.taper(224), inference.taper(224))
    for i in range(n):
        plane = np.zeros((c, H, W), np.float32)
        plane[:, :h, :w] = planes[i]
        tiles = [(y, x) for y in ys for x in xs]
        acc = np.zeros((3, H, W), np.float32)
        wsum = np.zeros((H, W), np.float32)
        for b in range(0, len(tiles), batch_size):
            chunk = tiles[b:b + batch_size]
            batch = np.stack([plane[:, y:y + 224, x:x + 224] for y, x in chunk])
            y_out = inference.run_net(net, batch, device)
            for k, (y, x) in enumerate(chunk):
                acc[:, y:y + 224, x:x + 224] += y_out[k] * wt
                wsum[y:y + 224, x:x + 224] += wt
        out[i] = (acc / wsum)[:, :h, :w]
    return out


def baseline_3d(net, vol, device):
    yf = np.zeros((4, *vol.shape[1:]), np.float32)
    for name, view in inference.VIEWS.items():
        ax = view["slice_axis"]
        planes = np.moveaxis(vol, ax + 1, 0)
        out = baseline_planes(net, planes, device)
        f0, f1 = view["flow_to"]
        for comp, dest in ((0, f0), (1, f1), (2, 3)):
            yf[dest] += np.moveaxis(out[:, comp], 0, ax)
    return yf[:3], yf[3]


def timed(fn, *args):
    tracemalloc.start()
    t = time.perf_counter()
    result = fn(*args)
    seconds = time.perf_counter() - t
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return result, seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[40, 128, 128])
    ap.add_argument("--gpu", action="store_true")
    args = ap.parse_args()
    device = pick_device(args.gpu)
    torch.manual_seed(0)
    net = CPnet([2, 32, 64, 128, 256], 3, 3).to(device).eval()
    rng = np.random.default_rng(0)
    vol = rng.random((2, *args.shape)).astype(np.float32)
    mvox = math.prod(args.shape) / 1e6

    inference.predict_3d(net, vol[:, :4, :64, :64], device)  # warm-up
    (dp, cp), t_ours, peak_ours = timed(inference.predict_3d, net, vol, device)
    (dp_b, cp_b), t_base, peak_base = timed(baseline_3d, net, vol, device)
    diff = float(np.abs(cp - cp_b).mean() / (np.abs(cp_b).mean() + 1e-9))

    print(f"device: {device}, torch threads: {torch.get_num_threads()}, volume {tuple(args.shape)}")
    print(f"cp3d     : {t_ours:7.2f} s  {t_ours / mvox:7.2f} s/Mvoxel  "
          f"peak numpy {peak_ours / math.prod(args.shape):6.1f} B/voxel")
    print(f"baseline : {t_base:7.2f} s  {t_base / mvox:7.2f} s/Mvoxel  "
          f"peak numpy {peak_base / math.prod(args.shape):6.1f} B/voxel")
    print(f"speed-up vs baseline (Cellpose 3.1 tiling): {t_base / t_ours:.2f}x  "
          f"(mean relative difference of cellprob: {diff:.3f})")


if __name__ == "__main__":
    main()
