"""Train the bundled nuclei model on the project's synthetic volumes (CPU-sized recipe).

    python scripts/train_bundled.py --minutes 60 [--out cp3d/resources/models/cp3d_nuclei.pth]

Without a GPU this uses a smaller network (nbase 2-16-32-64-128) and 160-px crops; the weights
are written as float16 every few epochs so an interrupted run still leaves a usable model.
Volumes come from seeds 0..n_volumes-1; evaluation uses seeds >= 1000, never trained on.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from cp3d.core.models import save_model
from cp3d.core.net import CPnet
from cp3d.core.synth import random_nuclei_volume
from cp3d.core.train import train, volume_slices


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("cp3d/resources/models/cp3d_nuclei.pth"))
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--n_volumes", type=int, default=48)
    ap.add_argument("--nbase", type=int, nargs="+", default=[2, 16, 32, 64, 128])
    ap.add_argument("--bsize", type=int, default=160)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--epochs", type=int, default=300)
    ap.add_argument("--nimg_per_epoch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    t0 = time.time()
    samples = []
    for seed in range(args.n_volumes):
        img, lab, meta = random_nuclei_volume(seed)
        samples += volume_slices(img, lab, meta["anisotropy"], n_per_axis=5, seed=seed,
                                 source=f"synth{seed}")
    test = []
    for seed in range(2000, 2004):
        img, lab, meta = random_nuclei_volume(seed)
        test += volume_slices(img, lab, meta["anisotropy"], n_per_axis=2, seed=seed)
    print(f"{len(samples)} training slices, {len(test)} held-out, {time.time() - t0:.0f} s",
          flush=True)

    net = CPnet(args.nbase, 3, 3, diam_mean=30.0)
    deadline = t0 + 60 * args.minutes
    best = {"loss": np.inf}

    def on_epoch(epoch, train_loss, test_loss):
        print(f"epoch {epoch:4d} train {train_loss:.4f} test {test_loss:.4f} "
              f"{(time.time() - t0) / 60:.1f} min", flush=True)
        if epoch % 5 == 4 and test_loss < best["loss"]:
            best["loss"] = test_loss
            save_model(net, args.out, half=True, metadata=dict(
                recipe="scripts/train_bundled.py", epoch=epoch + 1, test_loss=test_loss,
                nbase=args.nbase, bsize=args.bsize, data="synthetic nuclei (cp3d.core.synth), "
                f"seeds 0-{args.n_volumes - 1}", diam_mean=30.0,
                diam_labels=float(net.diam_labels.item())))
            net.train()
        if time.time() > deadline:
            raise KeyboardInterrupt

    try:
        train(net, samples, test, n_epochs=args.epochs, learning_rate=args.lr,
              batch_size=8, nimg_per_epoch=args.nimg_per_epoch, bsize=args.bsize,
              checkpoint_path=Path("/tmp/cp3d_bundled.ckpt"), on_epoch=on_epoch)
    except KeyboardInterrupt:
        print("time budget reached", flush=True)
    print(json.dumps({"best_test_loss": best["loss"], "minutes": (time.time() - t0) / 60}))


if __name__ == "__main__":
    main()
