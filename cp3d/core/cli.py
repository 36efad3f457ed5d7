"""``cp3d-cli``: segment a tiff or a folder of tiffs from the command line.

Flags carry Cellpose's names. A batch goes on past a file that fails, reports it in the
summary, and exits with status 1 if any file failed (2 for a usage error).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import Cp3dError, TooLargeError

log = logging.getLogger("cp3d")

SUBCOMMANDS = {
    "models": "list the bundled and user models",
    "train": "train or fine-tune a model on image/mask pairs",
    "make-train": "random 2D crops (YX, ZY, ZX) of z-stacks, with their masks, to train on",
    "eval": "average precision of a model on volumes with ground-truth masks",
}


def _smooth(text: str):
    """``--flow3D_smooth 2`` or ``--flow3D_smooth 2,1,1`` (Z, Y, X)."""
    parts = [float(p) for p in text.replace(" ", "").split(",") if p]
    if len(parts) not in (1, 3) or any(p < 0 for p in parts):
        raise argparse.ArgumentTypeError("give one number or three (Z,Y,X), each >= 0")
    return parts[0] if len(parts) == 1 else parts


def add_input_args(p: argparse.ArgumentParser) -> None:
    """Flags that say which images to read and how (shared by segmentation and make-train)."""
    g = p.add_argument_group("input")
    g.add_argument("--image_path", type=Path, help="one image (tiff) to process")
    g.add_argument("--dir", type=Path, help="folder of tiffs to process (all of them)")
    g.add_argument("--look_one_level_down", action="store_true",
                   help="also process tiffs in the subfolders of --dir")
    g.add_argument("--img_filter", default="",
                   help="only images whose name (before the suffix) ends with this text")
    g.add_argument("--z_axis", type=int, default=None,
                   help="axis index of Z (planes) in the stored array; default from metadata/shape")
    g.add_argument("--channel_axis", type=int, default=None,
                   help="axis index of channels in the stored array; default from metadata/shape")
    g.add_argument("--chan", type=int, default=0,
                   help="channel to segment: 0 = grayscale (mean of channels), 1.. = that channel")
    g.add_argument("--chan2", type=int, default=0,
                   help="optional nuclear channel: 0 = none, 1.. = that channel")
    g.add_argument("--invert", action="store_true", help="invert intensities (dark cells)")
    g.add_argument("--all_channels", action="store_true",
                   help="give every channel to the network (models trained that way)")
    g.add_argument("--anisotropy", type=float, default=None,
                   help="Z step / XY pixel size; default from the file's voxel size, else 1")
    g.add_argument("--sharpen_radius", type=float, default=0.0,
                   help="subtract a Gaussian surround of this radius (px) before normalizing")
    g.add_argument("--tile_norm", "--tile_norm_blocksize", dest="tile_norm", type=int, default=0,
                   help="normalize in XY blocks of this many pixels (0 = whole volume)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cp3d-cli",
        description="3D cell and nucleus segmentation (Cellpose method). Writes NAME_cp_masks.tif "
                    "and a Cellpose-compatible NAME_seg.npy beside each image. Other commands: "
                    + "; ".join(f"'cp3d-cli {k}' ({v})" for k, v in SUBCOMMANDS.items()) + ".",
    )
    add_input_args(p)
    g = p.add_argument_group("segmentation")
    g.add_argument("--pretrained_model", default=None,
                   help="bundled or user model name, or a .pth file (Cellpose 2/3 models load); "
                        "default: the bundled model")
    g.add_argument("--do_3D", action="store_true",
                   help="2.5D segmentation: predict on YX, ZY and ZX planes, dynamics in 3D "
                        "(the default, unless --stitch_threshold is given; without this flag a "
                        "single-plane image is segmented in 2D, with it refused)")
    g.add_argument("--stitch_threshold", type=float, default=0.0,
                   help="> 0: segment each XY plane in 2D and link planes whose masks overlap "
                        "with IoU >= this")
    g.add_argument("--diameter", type=float, default=0.0,
                   help="typical object diameter in XY pixels (0 = estimate it from the image)")
    g.add_argument("--flow3D_smooth", type=_smooth, default=0.0,
                   help="Gaussian std applied to the 3D flows before dynamics: one number or "
                        "Z,Y,X (0 = off)")
    g.add_argument("--min_size", type=int, default=15,
                   help="remove masks smaller than this many voxels (-1 = keep all)")
    g.add_argument("--cellprob_threshold", type=float, default=0.0,
                   help="voxels whose cell probability logit is above this are followed "
                        "(lower = more/larger masks)")
    g.add_argument("--flow_threshold", type=float, default=0.4,
                   help="2D planes only (stitch mode): maximum flow error of a mask; "
                        "not used in 3D")
    g.add_argument("--niter", type=int, default=0,
                   help="dynamics steps (0 = 200, scaled with diameter as Cellpose does)")
    g.add_argument("--augment", action="store_true",
                   help="average the network over flipped copies of each plane "
                        "(4x the network time)")
    g.add_argument("--use_gpu", action="store_true", help="run the network on CUDA or Apple MPS")
    g.add_argument("--batch_size", type=int, default=8, help="tiles per network pass")
    o = p.add_argument_group("output")
    o.add_argument("--savedir", type=Path, default=None,
                   help="folder for results (default: beside each image)")
    o.add_argument("--save_tif", action="store_true",
                   help="write NAME_cp_masks.tif (on by default; see --no_tif)")
    o.add_argument("--no_tif", action="store_true", help="do not write NAME_cp_masks.tif")
    o.add_argument("--no_npy", action="store_true", help="do not write NAME_seg.npy")
    o.add_argument("--verbose", action="store_true", help="log every step")
    from .blockwise import add_blockwise_args

    add_blockwise_args(p)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "models":
        return _models_main(argv[1:])
    if argv and argv[0] == "eval":
        return _eval_main(argv[1:])
    if argv and argv[0] == "train":
        from .train_cli import train_main

        return train_main(argv[1:])
    if argv and argv[0] == "make-train":
        from .make_train import make_train_main

        return make_train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if (args.image_path is None) == (args.dir is None):
        parser.error("give exactly one of --image_path or --dir")
    if args.stitch_threshold > 0 and args.do_3D:
        parser.error("--do_3D and --stitch_threshold are two different modes; choose one")
    if args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    try:
        return _segment_main(args)
    except Cp3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no half-written files were left", file=sys.stderr)
        return 130


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)


def _segment_main(args) -> int:
    from tqdm import tqdm

    from .io import check_writable, list_images, read_volume, save_results
    from .models import load_model, pick_device
    from . import blockwise
    from .pipeline import many_channels_hint, segment

    if args.image_path is not None:
        files = [args.image_path]
    else:
        files = list_images(args.dir, args.look_one_level_down, args.img_filter)
        if not files:
            print(f"error: {args.dir}: no tiff images found", file=sys.stderr)
            return 1
    if args.savedir is not None:
        check_writable(args.savedir)
    model = load_model(args.pretrained_model, device=pick_device(args.use_gpu))

    params = dict(
        diameter=args.diameter or None, anisotropy=args.anisotropy,
        do_3D=args.stitch_threshold <= 0, stitch_threshold=args.stitch_threshold,
        flow3D_smooth=args.flow3D_smooth, min_size=args.min_size,
        cellprob_threshold=args.cellprob_threshold, flow_threshold=args.flow_threshold,
        niter=args.niter or None, chan=args.chan, chan2=args.chan2,
        all_channels=args.all_channels, invert=args.invert,
        sharpen_radius=args.sharpen_radius, tile_norm=args.tile_norm, augment=args.augment,
        batch_size=args.batch_size,
    )
    # a given diameter enlarges the network grid by diam_mean / diameter (estimated: unknown
    # until the image is read, and segment() refuses with TooLargeError if it does not fit)
    rescale = float(model.diam_mean) / args.diameter if args.diameter else 1.0
    failures: list[tuple[Path, str]] = []
    done = 0
    t0 = time.perf_counter()
    for path in files:
        # A live bar on a terminal; in a log file or a pipe (disable=None) its redraws would
        # be hundreds of lines per file, so there a file gets one line when it is done.
        bar = tqdm(total=100, desc=path.name, unit="%", leave=True, file=sys.stderr,
                   disable=None,
                   bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")
        stages = ["normalize", "prediction YX", "prediction ZX", "prediction ZY", "dynamics"]

        def progress(stage, fraction, bar=bar):
            k = stages.index(stage) if stage in stages else len(stages) - 1
            bar.set_description_str(f"{path.name} [{stage}]")
            bar.n = int(100 * (k + fraction) / len(stages))
            bar.refresh()

        def run_blockwise(why: str = "", path=path, bar=bar) -> None:
            if why:
                log.warning("%s: %s: segmenting it blockwise", path.name, why)
            written = blockwise.run_file_blockwise(path, args, model, params, bar=bar)
            log.info("wrote %s", ", ".join(str(w) for w in written))
            if bar.disable:
                print(f"{path}: segmented blockwise: {written[0]}", file=sys.stderr)

        try:
            if args.blockwise or not blockwise.would_fit_in_memory(
                    path, args.anisotropy, args.z_axis, args.channel_axis, rescale):
                run_blockwise("" if args.blockwise else "too large to segment in memory")
                done += 1
                continue
            vol = read_volume(path, z_axis=args.z_axis, channel_axis=args.channel_axis)
            run = dict(params)
            if vol.is_2d and not args.do_3D:  # asked for 3D, a 2D image is refused by segment
                run["do_3D"] = False
                log.warning("%s: a single plane: segmenting it in 2D%s", path.name,
                            many_channels_hint(vol))
            try:
                result = segment(vol, model, progress=progress, **run)
            except TooLargeError:
                if not run["do_3D"]:
                    raise
                # the estimated diameter made the network grid too large: blockwise fits
                vol = None  # free the image before the blocks are read
                run_blockwise("its objects are small enough that it does not fit in memory")
                done += 1
                continue
            written = save_results(vol, result, savedir=args.savedir,
                                   save_tif=not args.no_tif, save_npy=not args.no_npy)
            bar.n = 100
            bar.set_description_str(f"{path.name}: {result.n_masks} masks")
            bar.close()
            log.info("wrote %s", ", ".join(str(w) for w in written))
            if bar.disable:
                print(f"{path}: {result.n_masks} masks, diameter {result.diameter:.1f} px, "
                      f"{result.seconds['total']:.1f} s", file=sys.stderr)
            done += 1
        except Cp3dError as err:
            bar.close()
            failures.append((path, str(err)))
            print(f"error: {err}", file=sys.stderr)
        except MemoryError:
            bar.close()
            failures.append((path, f"{path}: ran out of memory"))
            print(f"error: {path}: ran out of memory", file=sys.stderr)
    seconds = time.perf_counter() - t0
    print(f"cp3d: segmented {done} of {len(files)} file(s) in {seconds:.1f} s", file=sys.stderr)
    if failures:
        print(f"cp3d: {len(failures)} file(s) failed:", file=sys.stderr)
        for _, message in failures:
            print(f"  {message}", file=sys.stderr)
        return 1
    return 0


def _eval_main(argv: Sequence[str]) -> int:
    from .evaluate import THRESHOLDS, evaluate, find_pairs, format_table
    from .models import load_model, pick_device

    p = argparse.ArgumentParser(prog="cp3d-cli eval", description=SUBCOMMANDS["eval"])
    p.add_argument("--dir", type=Path, required=True,
                   help="folder of NAME.tif images with NAME_masks.tif ground truth")
    p.add_argument("--mask_filter", default="_masks", help="suffix of the ground-truth files")
    p.add_argument("--img_filter", default="")
    p.add_argument("--look_one_level_down", action="store_true")
    p.add_argument("--pretrained_model", default=None)
    p.add_argument("--diameter", type=float, default=0.0)
    p.add_argument("--anisotropy", type=float, default=None)
    p.add_argument("--flow3D_smooth", type=_smooth, default=0.0)
    p.add_argument("--min_size", type=int, default=15)
    p.add_argument("--cellprob_threshold", type=float, default=0.0)
    p.add_argument("--chan", type=int, default=0)
    p.add_argument("--chan2", type=int, default=0)
    p.add_argument("--use_gpu", action="store_true")
    p.add_argument("--ignore_small", type=float, default=0.0, metavar="F",
                   help="leave out ground-truth objects under F x the median object's volume, "
                        "such as cells cut by a crop's faces, and the masks mostly inside them "
                        "(e.g. 0.1; default 0: score every object)")
    args = p.parse_args(argv)
    _setup_logging(False)
    try:
        pairs = find_pairs(args.dir, args.mask_filter, args.img_filter, args.look_one_level_down)
        model = load_model(args.pretrained_model, device=pick_device(args.use_gpu))
        scores = evaluate(pairs, model, ignore_small=args.ignore_small,
                          diameter=args.diameter or None,
                          anisotropy=args.anisotropy, flow3D_smooth=args.flow3D_smooth,
                          min_size=args.min_size, cellprob_threshold=args.cellprob_threshold,
                          chan=args.chan, chan2=args.chan2)
    except Cp3dError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(format_table(scores, THRESHOLDS))
    return 0


def _models_main(argv: Sequence[str]) -> int:
    from .models import list_models, user_models_dir

    p = argparse.ArgumentParser(prog="cp3d-cli models", description=SUBCOMMANDS["models"])
    p.parse_args(argv)
    models = list_models()
    for info in models:
        kind = "bundled" if info.bundled else "user"
        print(f"{info.name:30s} {kind:8s} {info.path}")
    if not models:
        print("no models found")
    print(f"(user models folder: {user_models_dir()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
