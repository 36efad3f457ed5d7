"""Train the bundled nuclei model on the project's synthetic volumes (CPU-sized recipe).

    python scripts/train_bundled.py --minutes 75 [--init weights.pth] [--out PATH.pth]

Data: random nuclei volumes (cp3d.core.synth.random_nuclei_volume, seeds 0..n_volumes-1:
diameter 8-40 px, anisotropy 1-4, SNR 1.5-60, blur, background, density drawn at random), cut
into YX, ZY and ZX planes with Z resampled by the anisotropy; ``--n_small`` adds volumes of small
objects (seeds 500..), ``--n_dim`` small ones with many dim objects (seeds 700..; only their
rendering's dim fraction is changed), ``--n_sparse`` volumes of sparse nuclei (seeds 800..),
``--n_uneven`` sparse, large, unevenly bright, grainy nuclei as in early embryos (seeds 600..);
``--real IMAGE MASKS`` adds every plane of a real annotated volume (anisotropy from the file's
voxel size), ``--real_repeat`` times, so that a few real volumes weigh against many synthetic ones.
Held-out loss: seeds 2000-2005;
validation for scripts/calibrate_cellprob.py: seeds 900..
Evaluation (bench/quality.py) uses seeds >= 1000, never trained on: a set reaching 900 is
refused (:func:`check_seed_ranges`), and sets sharing seeds are named at the start.

Without a GPU the recipe is sized to the time budget: a smaller network (nbase 2-16-32-64-128,
Cellpose's is 2-32-64-128-256, about 4x the work per pixel) on 160-px crops, bfloat16 autocast
where the CPU has it. The learning rate follows the clock: flat, then halved ten times over the
last 30% of ``--minutes``. Weights go to ``--out`` as float16 (with a JSON sidecar) every few
epochs, so a stopped run still leaves a usable model; ``--resume`` continues from the checkpoint.
Each synthetic volume's planes are kept in ``--cache``: building a stage's 400 volumes takes
4-14 min of a CPU, so a later run on the same sets starts in seconds.

On a GPU machine (``--gpu``; scripts/gpu_train.sh) ``--workers N`` draws the volumes in N
processes and builds the training batches ahead in N more, so that the GPU is kept busy.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import multiprocessing
import os
import pickle
import time
from pathlib import Path

import numpy as np
import torch

import cp3d.core
from cp3d.core.cancel import CancelToken
from cp3d.core.errors import Cancelled
from cp3d.core.models import load_model, pick_device, save_model
from cp3d.core.net import CPnet, widen
from cp3d.core.synth import _loguniform, random_volume
from cp3d.core.samples import volume_slices
from cp3d.core.train import train

TEST_SEEDS = range(2000, 2006)
CPU_NBASE = [2, 16, 32, 64, 128]  # a quarter of Cellpose's work per pixel


SMALL_SEEDS_FROM = 500  # extra small-object volumes: seeds 500.., never used for evaluation
DIM_SEEDS_FROM = 700  # extra volumes with many dim objects: seeds 700..
SPARSE_SEEDS_FROM = 800  # extra volumes of sparse nuclei: seeds 800..899
UNEVEN_SEEDS_FROM = 600  # extra volumes of embryo-like nuclei: seeds 600..699
TINY_SEEDS_FROM = 400  # extra volumes of tiny sparse nuclei: seeds 400..499
# Cleared tissue under a light sheet (e.g. mesoSPIM brain nuclei): sparse nuclei of 3-8 px,
# below the main range (8-40 px) and often stretched in Z.
TINY_DIAMETERS = (3.5, 8.0)
TINY_RANGES = dict(fill=(0.01, 0.12))
# Early embryos and organoids (e.g. QCANet's mouse embryos): few large, grainy nuclei whose
# brightness differs 4x, some dim, under a long Z blur at low SNR. Each generator parameter is
# drawn log-uniformly in its range; diameter and anisotropy as below.
UNEVEN_RANGES = dict(fill=(0.02, 0.12), brightness_spread=(0.5, 0.9), dim_fraction=(0.15, 0.45),
                     texture=(0.6, 1.2), snr=(3.0, 20.0), z_blur=(2.5, 4.0))
UNEVEN_DIAMETERS = (14.0, 30.0)
UNEVEN_ANISOTROPIES = (1.5, 3.0)
VALIDATION_SEEDS_FROM = 900  # scripts/calibrate_cellprob.py: 900..999; evaluation: 1000..


def check_seed_ranges(sets: dict[str, range]) -> list[str]:
    """Refuse a training set that reaches the validation, evaluation or held-out seeds (a
    model scored on volumes it trained on would look better than it is); describe each pair of
    sets whose seeds overlap (allowed: a set drawn with other parameters gives other volumes,
    but alike ones: both draw from the same random stream)."""
    for name, seeds in sets.items():
        if seeds and max(seeds) >= VALIDATION_SEEDS_FROM:
            raise ValueError(f"the {name} set's seeds {seeds.start}-{seeds.stop - 1} reach the "
                             f"validation and evaluation seeds ({VALIDATION_SEEDS_FROM} up): "
                             "train on fewer volumes")
    overlaps = []
    named = [(name, seeds) for name, seeds in sets.items() if seeds]
    for i, (a, sa) in enumerate(named):
        for b, sb in named[i + 1:]:
            lo, hi = max(sa.start, sb.start), min(sa.stop, sb.stop)
            if lo < hi:
                overlaps.append(f"the {a} and {b} sets share seeds {lo}-{hi - 1}")
    return overlaps


def build_samples(seeds, n_per_axis, nchan, kind="nuclei", min_objects=3, diameters=None,
                  dim_fractions=None, fills=None, anisotropies=None, ranges=None, cache=None,
                  workers=0):
    """Training planes of the random volumes of ``seeds``. Cells: every other volume has a
    nuclear channel, given as the second input (chan=1, chan2=2); the others are grayscale.
    ``diameters`` (lo, hi): draw each volume's diameter log-uniformly there instead;
    ``dim_fractions`` (lo, hi): draw its fraction of dim objects uniformly there;
    ``fills`` (lo, hi): draw the fraction of the volume filled by nuclei log-uniformly there;
    ``anisotropies`` (lo, hi): draw the Z anisotropy uniformly there;
    ``ranges`` {name: (lo, hi)}: draw each named generator parameter log-uniformly there.
    ``cache``: a folder keeping each volume's planes (see :func:`_cached`);
    ``workers``: processes drawing volumes side by side (a GPU machine's cores)."""
    options = (n_per_axis, nchan, kind, min_objects, diameters, dim_fractions, fills,
               anisotropies, sorted((ranges or {}).items()))
    jobs = [(cache, seed, options) for seed in seeds]
    samples, meta = [], []
    for got, m in process_map(_cached_volume, jobs, workers):
        samples += got
        meta.append(m)
    return samples, meta


def process_map(fn, items, workers: int) -> list:
    """``[fn(item) for item in items]``, in order, over up to ``workers`` processes.

    Spawned, not forked: this process has run numba's parallel loops (GNU OpenMP), and numba
    stops a forked child that runs them again ("fork() called from a process already using GNU
    OpenMP, this is unsafe"). A spawned worker imports this script again by its name, so ``fn``
    must be one of its module-level functions."""
    if workers < 2 or len(items) < 2:
        return [fn(item) for item in items]
    with multiprocessing.get_context("spawn").Pool(min(workers, len(items))) as pool:
        return pool.map(fn, items, chunksize=1)


def _cached_volume(job):
    """One volume's planes and description, from the cache or drawn (a worker's job)."""
    cache, seed, options = job
    return _cached(cache, (seed, *options), lambda: _volume_samples(seed, *options))


def _volume_samples(seed, n_per_axis, nchan, kind, min_objects, diameters, dim_fractions, fills,
                    anisotropies, ranges):
    """One volume's training planes and its (seed, diameter, anisotropy, snr)."""
    two = kind == "cells" and seed % 2 == 0
    d = _loguniform(np.random.default_rng([seed, 7]), *diameters) if diameters else None
    overrides = {}
    if dim_fractions:
        overrides["dim_fraction"] = float(np.random.default_rng([seed, 8]).uniform(*dim_fractions))
    if fills:
        overrides["fill"] = _loguniform(np.random.default_rng([seed, 9]), *fills)
    a = float(np.random.default_rng([seed, 10]).uniform(*anisotropies)) if anisotropies else None
    for i, (name, (lo, hi)) in enumerate(ranges):
        overrides[name] = _loguniform(np.random.default_rng([seed, 11 + i]), lo, hi)
    img, lab, m = random_volume(seed, kind, diameter=d, anisotropy=a, nuclear_channel=two,
                                dtype=np.uint16, overrides=overrides)
    samples = volume_slices(img, lab, m["anisotropy"], n_per_axis=n_per_axis, seed=seed,
                            source=f"synth-{kind}{seed}", min_objects=min_objects, nchan=nchan,
                            chan=1 if two else 0, chan2=2 if two else 0)
    return samples, (seed, round(m["diameter"], 1), round(m["anisotropy"], 2), round(m["snr"], 1))


# A cached volume is valid while the code that draws and cuts it is unchanged (the training
# loop, in train.py, is not part of it; pipeline.select_channels, which only picks channels,
# is left out too, so that editing the pipeline keeps the cache).
SAMPLE_CODE = ("synth.py", "samples.py", "normalize.py", "flows.py")


@functools.lru_cache(maxsize=None)
def _code_digest() -> bytes:
    """Digest of the source of ``SAMPLE_CODE``, read once per run."""
    core = Path(cp3d.core.__file__).parent
    return hashlib.sha1(b"".join((core / name).read_bytes() for name in SAMPLE_CODE)).digest()


def _cached(cache, key: tuple, build):
    """``build()``, kept in ``cache`` under ``key`` and the source of ``SAMPLE_CODE``: building
    the 400 volumes of a stage takes 4-14 min of a CPU, loading them seconds. Written through a
    temporary file, so that runs side by side never read half a file."""
    if cache is None:
        return build()
    path = Path(cache) / f"{hashlib.sha1(_code_digest() + repr(key).encode()).hexdigest()}.pkl"
    if path.exists():
        return pickle.loads(path.read_bytes())
    value = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    os.replace(tmp, path)
    return value


def real_samples(pairs, nchan: int, repeat: int = 1) -> tuple[list, list[str]]:
    """Every YX, ZY and ZX plane holding an object of each real (image, masks) tiff pair, Z
    resampled by the anisotropy read from the image's metadata, each plane ``repeat`` times.
    Read and cut as ``cp3d-cli train`` does (its checks on the masks included). A pair given
    k times is read once and repeated k x ``repeat`` times: so one volume can weigh more than
    another (``--real A --real A --real B``)."""
    from cp3d.core.samples import pair_samples
    from cp3d.core.train_cli import read_pairs

    counts: dict[tuple[Path, Path], int] = {}
    for image, masks in pairs:
        key = (Path(image), Path(masks))
        counts[key] = counts.get(key, 0) + 1
    samples, names = [], []
    for key, times in counts.items():
        for pair in read_pairs([key]):  # none when the masks hold no object
            got = pair_samples([pair], nchan, n_per_axis=None, min_train_masks=1)
            samples += got * (repeat * times)
            names.append(f"{Path(pair.source).name} ({len(got)} planes x {repeat * times})")
    return samples, names


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("cp3d/resources/models/cp3d_nuclei.pth"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/cp3d_bundled"),
                    help="folder for the training checkpoint")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cp3d_samples"),
                    help="folder keeping each synthetic volume's training planes for later runs "
                         "(about 3 MB a volume)")
    ap.add_argument("--minutes", type=float, default=60)
    ap.add_argument("--kind", choices=["nuclei", "cells"], default="nuclei",
                    help="synthetic data: touching nuclei, or membrane/cyto-stained cells")
    ap.add_argument("--n_volumes", type=int, default=96)
    ap.add_argument("--n_per_axis", type=int, default=6)
    ap.add_argument("--n_small", type=int, default=0,
                    help="extra volumes (seeds 500..) of small objects, diameter in --small_range")
    ap.add_argument("--small_range", type=float, nargs=2, default=[8.0, 14.0])
    ap.add_argument("--n_dim", type=int, default=0,
                    help="extra volumes (seeds 700..) of small objects (--small_range) with many "
                         "dim ones (fraction in --dim_range), where the models miss most")
    ap.add_argument("--dim_range", type=float, nargs=2, default=[0.35, 0.5])
    ap.add_argument("--n_sparse", type=int, default=0,
                    help="extra volumes (seeds 800..) of sparse nuclei (fill in --fill_range; the "
                         "main volumes fill 0.2-0.6), as in embryos and cleared tissue")
    ap.add_argument("--n_uneven", type=int, default=0,
                    help="extra volumes (seeds 600..) of sparse, large, unevenly bright, grainy "
                         "nuclei, as in early embryos (UNEVEN_RANGES)")
    ap.add_argument("--n_tiny", type=int, default=0,
                    help="extra volumes (seeds 400..) of tiny (TINY_DIAMETERS), sparse nuclei, "
                         "as in cleared tissue")
    ap.add_argument("--real", nargs=2, action="append", default=[], metavar=("IMAGE", "MASKS"),
                    help="a real annotated volume (tiffs) to train on as well; repeatable, and a "
                         "volume given k times weighs k times")
    ap.add_argument("--real_repeat", type=int, default=1,
                    help="how many times each real plane is in the training set")
    ap.add_argument("--fill_range", type=float, nargs=2, default=[0.01, 0.15])
    ap.add_argument("--nbase", type=int, nargs="+", default=None,
                    help="network widths (default 2 16 32 64 128); with --init of a narrower "
                         "network, that network is widened to these (cp3d.core.net.widen), "
                         "keeping what it computes")
    ap.add_argument("--widen_noise", type=float, default=0.01,
                    help="noise added when widening (relative to each weight's std), so that "
                         "the copied channels can learn different things")
    ap.add_argument("--bsize", type=int, default=160)
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--nimg_per_epoch", type=int, default=64)
    ap.add_argument("--init", default=None, help="start from these weights (fine-tune)")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="train on the GPU (CUDA or MPS)")
    ap.add_argument("--workers", type=int, default=0,
                    help="processes drawing the volumes and building batches ahead; a GPU "
                         "needs several to be kept busy")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--save_every", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    args.work.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    nchan = (args.nbase or CPU_NBASE)[0]

    def add_set(seeds: range, what: str, detail: str = "", **options) -> None:
        """Append the planes of the volumes of ``seeds`` drawn with ``options``, and describe
        them in the sidecar's data as "+ n what (detail, seeds a-b)" (the main set, ``what``
        empty, is described apart)."""
        nonlocal data
        if not seeds:
            return
        got, got_vols = build_samples(seeds, args.n_per_axis, nchan, args.kind, cache=args.cache,
                                      workers=args.workers, **options)
        samples.extend(got)
        vols.extend(got_vols)
        if what:
            data += f" + {len(seeds)} {what} ({detail}seeds {seeds.start}-{seeds.stop - 1})"

    seed_sets = {"main": range(args.n_volumes),
                 "small": range(SMALL_SEEDS_FROM, SMALL_SEEDS_FROM + args.n_small),
                 "dim": range(DIM_SEEDS_FROM, DIM_SEEDS_FROM + args.n_dim),
                 "sparse": range(SPARSE_SEEDS_FROM, SPARSE_SEEDS_FROM + args.n_sparse),
                 "embryo-like": range(UNEVEN_SEEDS_FROM, UNEVEN_SEEDS_FROM + args.n_uneven),
                 "tiny": range(TINY_SEEDS_FROM, TINY_SEEDS_FROM + args.n_tiny)}
    try:
        overlaps = check_seed_ranges(seed_sets)
    except ValueError as err:
        ap.error(str(err))
    for overlap in overlaps:
        print(f"note: {overlap}", flush=True)
    samples, vols = [], []
    data = f"synthetic {args.kind} volumes (cp3d.core.synth.random_volume), seeds " \
           f"0-{args.n_volumes - 1}"
    add_set(seed_sets["main"], "")
    small = "{:g}-{:g} px, ".format(*args.small_range)
    add_set(seed_sets["small"], "small", small, diameters=args.small_range)
    add_set(seed_sets["dim"], "small with {:g}-{:g} of them dim".format(*args.dim_range),
            diameters=args.small_range, dim_fractions=args.dim_range)
    add_set(seed_sets["sparse"], "sparse", "fill {:g}-{:g}, ".format(*args.fill_range),
            min_objects=1, fills=args.fill_range)
    add_set(seed_sets["embryo-like"], "embryo-like", "sparse, large, unevenly bright; ",
            min_objects=1, diameters=UNEVEN_DIAMETERS, anisotropies=UNEVEN_ANISOTROPIES,
            ranges=UNEVEN_RANGES)
    add_set(seed_sets["tiny"], "tiny sparse", "{:g}-{:g} px, ".format(*TINY_DIAMETERS),
            min_objects=1, diameters=TINY_DIAMETERS, ranges=TINY_RANGES)
    if args.real:
        real, names = real_samples(args.real, nchan, args.real_repeat)
        samples += real
        data += " + real: " + ", ".join(names)
    data += f", {len(samples)} planes in YX/ZY/ZX"
    test, _ = build_samples(TEST_SEEDS, 2, nchan, args.kind, cache=args.cache,
                            workers=args.workers)
    print(f"{len(samples)} training planes from {len(vols)} volumes, {len(test)} held-out, "
          f"{time.time() - t0:.0f} s", flush=True)

    if args.init:
        net = load_model(args.init).net
        print(f"initialised from {args.init} (nbase {net.nbase})", flush=True)
        if args.nbase and net.nbase != args.nbase:
            net = widen(net, args.nbase, noise=args.widen_noise)
            print(f"widened to nbase {net.nbase} (noise {args.widen_noise:g})", flush=True)
    else:
        net = CPnet(args.nbase or CPU_NBASE, 3, 3, diam_mean=30.0)
    # what is left of --minutes for training; at least a second, so that a run whose data took
    # all its time still ends after one epoch instead of never (a negative budget)
    budget = max(1.0, 60 * args.minutes - (time.time() - t0))
    t_train = time.time()
    state_file = args.work / "clock.json"
    if args.resume and state_file.exists():  # keep the clock of the interrupted run
        t_train -= json.loads(state_file.read_text())["elapsed"]
    cancel = CancelToken()
    device = pick_device(args.gpu)
    print(f"training on {device}", flush=True)

    def fraction() -> float:
        return (time.time() - t_train) / budget

    def lr_at(epoch: int) -> float:
        f = fraction()
        warm = 1.0 if args.init else min(1.0, (epoch + 1) / 10)
        if f < 0.7:
            return args.lr * warm
        return args.lr * 0.5 ** min(10, math.ceil((f - 0.7) / 0.03))

    def save(epoch, train_loss, test_loss, final=False):
        save_model(net, args.out, half=True, metadata=dict(
            recipe="scripts/train_bundled.py", final=final, epochs=epoch + 1,
            iterations=(epoch + 1) * math.ceil(args.nimg_per_epoch / args.batch_size),
            batch_size=args.batch_size, device=device.type,
            train_loss=train_loss, test_loss=test_loss, nbase=net.nbase, bsize=args.bsize,
            lr=args.lr, init=args.init, minutes=round((time.time() - t0) / 60, 1),
            data=data,
            diam_mean=float(net.diam_mean.item()), diam_labels=float(net.diam_labels.item())))
        net.train()

    last_test = {"loss": None}  # held-out loss is measured every 5 epochs, saves fall between

    def on_epoch(epoch, train_loss, test_loss):
        lr = lr_at(epoch)
        if test_loss is not None:
            last_test["loss"] = test_loss
        print(f"epoch {epoch:4d} train {train_loss:.4f} test "
              f"{'-' if test_loss is None else f'{test_loss:.4f}'} lr {lr:.2e} "
              f"{(time.time() - t0) / 60:.1f} min", flush=True)
        state_file.write_text(json.dumps({"elapsed": time.time() - t_train}))
        done = fraction() >= 1.0
        if done or epoch % args.save_every == args.save_every - 1:
            save(epoch, train_loss, last_test["loss"], final=done)
        if done:
            cancel.cancel()

    try:
        train(net, samples, test, n_epochs=100000, learning_rate=lr_at,
              batch_size=args.batch_size, nimg_per_epoch=args.nimg_per_epoch, bsize=args.bsize,
              device=device, workers=args.workers, test_every=5,
              checkpoint_path=args.work / "bundled.ckpt", resume=args.resume,
              on_epoch=on_epoch, cancel=cancel)
    except Cancelled:
        print("time budget reached", flush=True)
    print(json.dumps({"minutes": round((time.time() - t0) / 60, 1), "out": str(args.out)}),
          flush=True)


if __name__ == "__main__":
    main()
