"""``cp3d-cli train``: train or fine-tune a model on a folder of image/mask pairs.

Flags follow Cellpose's training flags (``--dir``, ``--test_dir``, ``--mask_filter``,
``--pretrained_model``, ``--n_epochs``, ``--learning_rate``...). Images may be 2D or 3D; 3D
volumes are cut into YX, ZY and ZX planes (Z resampled by the anisotropy). The model is written
to the per-user models folder (``cp3d-cli models`` lists it; the GUI offers it) unless
``--savedir`` says otherwise, with a JSON sidecar holding the data, losses and test AP.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .errors import Cancelled, Cp3dError, InputError, TrainingError

log = logging.getLogger("cp3d")

LR_SCRATCH = 0.005  # Cellpose's default
# measured on the bundled model, 3 sample crops: at 0.005 the held-out loss went from 0.67 to
# 14.6 in one epoch (AP 0.70 -> 0.00); at 0.0005 it stays level
LR_FINE_TUNE = 0.0005


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cp3d-cli train",
        description="Train or fine-tune a network on images with masks (NAME.tif + "
                    "NAME_masks.tif). 3D volumes are used through their YX, ZY and ZX planes.")
    d = p.add_argument_group("data")
    d.add_argument("--dir", type=Path, required=True, help="folder with training images and masks")
    d.add_argument("--test_dir", type=Path, default=None,
                   help="folder with test images and masks (held-out loss and AP)")
    d.add_argument("--mask_filter", default="_masks",
                   help="masks are NAME{mask_filter}.tif, or NAME_seg.npy with '_seg.npy' "
                        "(default: %(default)s)")
    d.add_argument("--img_filter", default="",
                   help="only images whose name (before the suffix) ends with this text")
    d.add_argument("--look_one_level_down", action="store_true",
                   help="also use images in the subfolders of --dir")
    d.add_argument("--z_axis", type=int, default=None, help="axis index of Z in stored arrays")
    d.add_argument("--channel_axis", type=int, default=None,
                   help="axis index of channels in stored arrays")
    d.add_argument("--chan", type=int, default=0,
                   help="channel to segment: 0 = grayscale (mean of channels), 1.. = that channel")
    d.add_argument("--chan2", type=int, default=0,
                   help="optional nuclear channel: 0 = none, 1.. = that channel")
    d.add_argument("--anisotropy", type=float, default=None,
                   help="Z step / XY pixel size of the volumes; default from each file's "
                        "voxel size, else 1")
    d.add_argument("--min_train_masks", type=int, default=5,
                   help="planes with fewer masks are not trained on (default: %(default)s)")
    d.add_argument("--n_per_axis", type=int, default=16,
                   help="planes taken per axis (YX, ZY, ZX) from each 3D volume, evenly "
                        "spaced; 0 = all (default: %(default)s)")
    d.add_argument("--val_fraction", type=float, default=0.0,
                   help="without --test_dir: hold out this share of the images for testing")
    m = p.add_argument_group("model")
    m.add_argument("--pretrained_model", default="cp3d_nuclei",
                   help="model to fine-tune (bundled/user name or .pth file); 'scratch' or "
                        "'None' = a new network (default: %(default)s)")
    m.add_argument("--nbase", type=int, nargs="+", default=None,
                   help="layer widths of a new network, with the input channels first "
                        "(default 2 32 64 128 256, Cellpose's)")
    m.add_argument("--model_name_out", default=None,
                   help="name of the trained model (default cp3d_DIRNAME_TIME)")
    m.add_argument("--savedir", type=Path, default=None,
                   help="folder for the model (default: the user models folder)")
    t = p.add_argument_group("training")
    t.add_argument("--n_epochs", type=int, default=500, help="default: %(default)s")
    t.add_argument("--learning_rate", type=float, default=None,
                   help=f"default: {LR_SCRATCH} for a new network, {LR_FINE_TUNE} when "
                        "fine-tuning (larger rates wreck a trained network in a few steps)")
    t.add_argument("--weight_decay", type=float, default=1e-5, help="default: %(default)s")
    t.add_argument("--SGD", type=int, default=0,
                   help="1 = SGD with momentum 0.9 instead of AdamW (default: %(default)s)")
    t.add_argument("--batch_size", type=int, default=8, help="default: %(default)s")
    t.add_argument("--nimg_per_epoch", type=int, default=None,
                   help="training planes per epoch (default: all)")
    t.add_argument("--bsize", type=int, default=224, help="crop size (default: %(default)s)")
    t.add_argument("--save_every", type=int, default=100,
                   help="also write the model every this many epochs (default: %(default)s)")
    t.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of --model_name_out from its checkpoint")
    t.add_argument("--use_gpu", action="store_true", help="train on CUDA or Apple MPS")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--verbose", action="store_true", help="log every step")
    return p


def find_training_pairs(folder: Path, mask_filter: str = "_masks", img_filter: str = "",
                        look_one_level_down: bool = False) -> list[tuple[Path, Path]]:
    """(image, masks) files: NAME.tif with NAME{mask_filter}.tif (or NAME_seg.npy) beside it."""
    from .io import TIFF_SUFFIXES, list_images

    if not Path(folder).is_dir():
        raise TrainingError("folder not found", folder)
    pairs, missing = [], []
    for img in list_images(folder, look_one_level_down, img_filter):
        if mask_filter and img.stem.endswith(mask_filter):
            continue
        if mask_filter.endswith(".npy"):
            candidates = [img.with_name(img.stem + mask_filter)]
        else:
            candidates = [img.with_name(img.stem + mask_filter + s) for s in TIFF_SUFFIXES]
        found = next((c for c in candidates if c.exists()), None)
        if found is None:
            missing.append(img.name)
        else:
            pairs.append((img, found))
    if not pairs:
        raise TrainingError(f"no images with masks (NAME{mask_filter}"
                            f"{'' if mask_filter.endswith('.npy') else '.tif'}) found", folder)
    if missing:
        log.warning("%d image(s) without masks are not used: %s", len(missing),
                    ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))
    return pairs


def read_pairs(pairs, z_axis=None, channel_axis=None, anisotropy=None):
    """Read each (image, masks) pair into a :class:`~cp3d.core.samples.TrainingPair`."""
    import numpy as np

    from .io import load_seg_npy, read_volume
    from .samples import TrainingPair

    out = []
    for img_path, mask_path in pairs:
        vol = read_volume(img_path, z_axis=z_axis, channel_axis=channel_axis)
        if mask_path.suffix == ".npy":
            masks = np.asarray(load_seg_npy(mask_path)["masks"])
        else:
            masks = read_volume(mask_path, labels=True).data[:, 0]
        if masks.ndim == 2:
            masks = masks[np.newaxis]
        if masks.shape != vol.shape_zyx:
            raise TrainingError(f"mask shape {masks.shape} (Z, Y, X) differs from the image's "
                                f"{vol.shape_zyx}", mask_path)
        if masks.dtype.kind == "f":
            if not np.all(masks == np.round(masks)):
                raise TrainingError("masks are not integer labels", mask_path)
        if masks.min() < 0:
            raise TrainingError("masks have negative labels", mask_path)
        if masks.max() == 0:  # e.g. a crop whose masks were all deleted: nothing to learn
            log.warning("%s: no masks, not used", mask_path)
            print(f"skipped {mask_path}: no masks", file=sys.stderr)
            continue
        a = anisotropy if anisotropy else vol.anisotropy
        if not a:
            a = 1.0
            if masks.shape[0] > 1:  # a volume: the ZY / ZX planes depend on the Z step
                print(f"note: {img_path}: no voxel size in the file; Z steps taken as equal to "
                      "the pixel size (give --anisotropy if they are not)", file=sys.stderr)
        out.append(TrainingPair(vol.data, masks.astype(np.int32), float(a), str(img_path)))
    return out


def train_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``cp3d-cli train``; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.batch_size < 1 or args.n_epochs < 1:
        parser.error("--batch_size and --n_epochs must be at least 1")
    if args.resume and not args.model_name_out:
        parser.error("--resume needs --model_name_out (the model whose run to continue)")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val_fraction must be in [0, 1)")
    try:
        return _run(args)
    except Cancelled:
        print("interrupted: the checkpoint of the last finished epoch was kept (use --resume)",
              file=sys.stderr)
        return 130
    except (Cp3dError, InputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: the checkpoint of the last finished epoch was kept (use --resume)",
              file=sys.stderr)
        return 130


def _run(args) -> int:
    from .io import check_writable
    from .models import pick_device, user_models_dir
    from .train import train_model

    train_files = find_training_pairs(args.dir, args.mask_filter, args.img_filter,
                                      args.look_one_level_down)
    test_files = (find_training_pairs(args.test_dir, args.mask_filter, args.img_filter)
                  if args.test_dir else [])
    savedir = args.savedir or user_models_dir()
    savedir.mkdir(parents=True, exist_ok=True)
    check_writable(savedir)
    name = args.model_name_out or f"cp3d_{Path(args.dir).resolve().name}_{int(time.time())}"
    save_path = savedir / (name if name.endswith((".pth", ".pt")) else f"{name}.pth")
    device = pick_device(args.use_gpu)
    print(f"{len(train_files)} training image(s), {len(test_files)} test image(s); "
          f"model -> {save_path}", flush=True)
    train_pairs = read_pairs(train_files, args.z_axis, args.channel_axis, args.anisotropy)
    test_pairs = read_pairs(test_files, args.z_axis, args.channel_axis, args.anisotropy)
    pretrained = None if str(args.pretrained_model).lower() in ("none", "scratch", "") \
        else args.pretrained_model
    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = LR_FINE_TUNE if pretrained else LR_SCRATCH
    t0 = time.time()

    def on_epoch(epoch, train_loss, test_loss):
        if epoch % 10 == 0 or epoch == args.n_epochs - 1 or args.verbose:
            test = "" if test_loss is None else f", test loss {test_loss:.4f}"
            print(f"epoch {epoch}: train loss {train_loss:.4f}{test}, "
                  f"{time.time() - t0:.0f} s", flush=True)

    result = train_model(
        train_pairs, test_pairs, save_path=save_path, pretrained_model=pretrained,
        nbase=args.nbase, val_fraction=args.val_fraction, chan=args.chan, chan2=args.chan2,
        n_per_axis=args.n_per_axis or None, min_train_masks=args.min_train_masks,
        device=device, seed=args.seed, n_epochs=args.n_epochs,
        learning_rate=learning_rate, weight_decay=args.weight_decay, SGD=bool(args.SGD),
        batch_size=args.batch_size, nimg_per_epoch=args.nimg_per_epoch, bsize=args.bsize,
        save_every=args.save_every, resume=args.resume, on_epoch=on_epoch,
        test_every=1 if test_pairs or args.val_fraction else 10,
        metadata=dict(command="cp3d-cli train", dir=str(args.dir),
                      test_dir=str(args.test_dir) if args.test_dir else None))
    print(f"saved {result.model_path} ({result.epochs_done} epochs, {result.n_train} training "
          f"planes, diam_labels {result.diam_labels:.1f}, {result.seconds:.0f} s)")
    if result.metrics.get("mean_ap"):
        ap = result.metrics["mean_ap"]
        print("test AP@0.5/0.75/0.9: " + " / ".join(f"{a:.3f}" for a in ap))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
