"""Blockwise segmentation of volumes on disk: time per voxel and peak memory, against the
in-memory pipeline on the smallest size measured in the same run.

    python bench/blockwise.py    # the goal's ladder: 256^3 (also in memory), 512^3, 512x1024x1024
    python bench/blockwise.py --sizes 128,128,128 128,256,256 --block_size 128   # a quick look

Sizes are Z,Y,X. The default ladder takes about an hour on 2 CPU cores.

Volumes of synthetic nuclei (diameter about 30 px, so the bundled model runs at scale 1) are
written plane by plane to a tiff, never held whole in memory: one small tile of nuclei is
rendered and repeated with random flips. Each run happens in a fresh subprocess, so its peak
RSS (sampled every 50 ms by a thread, with the process's children) is its own. Prints seconds,
us/voxel, peak GB, the ratio of blockwise time/voxel to the in-memory baseline (goal <= 1.3)
and the number of masks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

TILE = (64, 128, 128)  # rendered once per run, repeated (flipped) to fill any size


def make_volume(path: Path, shape, seed: int = 0) -> None:
    """Write a (Z, Y, X) uint16 tiff of nuclei plane by plane."""
    import tifffile

    from cp3d.core import synth

    labels = synth.nuclei_labels(TILE, n_objects=400, radius_range=(12, 16), seed=seed,
                                 touching=0.9)
    tile = synth.render_nuclei(labels, seed=seed)
    rng = np.random.default_rng(seed)
    tz, ty, tx = TILE
    nz, ny, nx = shape
    flips = {}

    def tile_at(i, j, k):
        key = (i, j, k)
        if key not in flips:
            flips[key] = rng.integers(0, 2, 3).astype(bool)
        f = flips[key]
        return tile[::-1 if f[0] else 1, ::-1 if f[1] else 1, ::-1 if f[2] else 1]

    def planes():
        for z in range(nz):
            plane = np.empty((ny, nx), np.uint16)
            for j in range(0, ny, ty):
                for k in range(0, nx, tx):
                    t = tile_at(z // tz, j // ty, k // tx)[z % tz]
                    plane[j:j + ty, k:k + tx] = t[:min(ty, ny - j), :min(tx, nx - k)]
            yield plane

    tifffile.imwrite(path, planes(), shape=tuple(shape), dtype=np.uint16, imagej=True,
                     metadata={"axes": "ZYX"})


def _peak_rss_monitor():
    import psutil

    proc = psutil.Process()
    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                rss = proc.memory_info().rss + sum(
                    c.memory_info().rss for c in proc.children(recursive=True))
            except Exception:
                rss = 0
            peak[0] = max(peak[0], rss)
            stop.wait(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    return peak, stop


def child(mode: str, tif: str, out: str, block_size: int, n_workers: int) -> dict:
    """One measured run (in its own process)."""
    peak, stop = _peak_rss_monitor()
    from cp3d.core.models import load_model

    model = load_model("cp3d_nuclei")
    found = {}

    def work():
        if mode == "memory":
            from cp3d.core.io import read_volume
            from cp3d.core.pipeline import segment

            vol = read_volume(tif)
            found["n"] = segment(vol, model, diameter=30).n_masks
        else:
            from cp3d.core.blockwise import segment_blockwise

            res = segment_blockwise(tif, out, model, diameter=30, block_size=block_size,
                                    n_workers=n_workers)
            found["n"] = res.n_masks
            found["blocks"] = f"{res.n_blocks}x" + "x".join(map(str, res.params["block_size"]))

    # both run in a worker thread, as blocks do under dask's threaded scheduler: on a busy
    # machine torch runs up to 2x faster there than in the main thread (measured), which
    # would otherwise be counted as a blockwise gain
    t0 = time.perf_counter()
    t = threading.Thread(target=work)
    t.start()
    t.join()
    seconds = time.perf_counter() - t0
    n = found["n"]
    stop.set()
    return {"seconds": seconds, "peak_gb": peak[0] / 1e9, "masks": int(n),
            "blocks": found.get("blocks", "-")}


def run_child(*args) -> dict:
    cmd = [sys.executable, __file__, "--child", *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        mode, tif, out, bs, nw = sys.argv[2:7]
        print(json.dumps(child(mode, tif, out, int(bs), int(nw))))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["256,256,256", "512,512,512", "512,1024,1024"],
                   help="Z,Y,X sizes to run blockwise; the first is also run in memory as the "
                        "baseline")
    p.add_argument("--block_size", type=int, default=0,
                   help="block edge; default 0: chosen by cp3d from the memory (4 GB a block)")
    p.add_argument("--n_workers", type=int, default=1)
    p.add_argument("--dir", type=Path, default=None, help="where to write the volumes")
    args = p.parse_args()
    sizes = [tuple(int(v) for v in s.split(",")) for s in args.sizes]
    workdir = Path(args.dir or tempfile.mkdtemp(prefix="cp3d_bench_blockwise_"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"block {args.block_size}, {args.n_workers} worker(s), volumes in {workdir}")
    print(f"{'run':>24} {'seconds':>9} {'us/voxel':>9} {'peak GB':>8} {'ratio':>6} {'masks':>6}"
          f"  blocks")
    base = None
    for i, shape in enumerate(sizes):
        tif = workdir / ("vol_" + "x".join(map(str, shape)) + ".tif")
        if not tif.exists():
            make_volume(tif, shape)
        voxels = float(np.prod(shape))
        runs = [("memory", tif)] if i == 0 else []
        runs.append(("blockwise", tif))
        for mode, path in runs:
            r = run_child(mode, path, workdir / (path.stem + "_labels.zarr"), args.block_size,
                          args.n_workers)
            per = r["seconds"] / voxels * 1e6
            if mode == "memory":
                base = per
            name = f"{mode} {'x'.join(map(str, shape))}"
            print(f"{name:>24} {r['seconds']:9.1f} {per:9.3f} {r['peak_gb']:8.2f} "
                  f"{per / base:6.2f} {r['masks']:6d}  {r['blocks']}", flush=True)


if __name__ == "__main__":
    main()
