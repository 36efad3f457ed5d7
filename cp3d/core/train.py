"""Training and fine-tuning a CPnet on image/mask pairs, as Cellpose trains.

The network only ever sees 2D images: 2D training images, or the YX, ZY and ZX planes of 3D
volumes (:mod:`cp3d.core.samples` cuts them and computes their target flows). Each step draws a
batch; each plane is rescaled so its objects have the network's ``diam_mean`` (times a random
factor in [0.75, 1.25]), rotated, flipped and cropped to ``bsize`` with one affine map applied
to image, masks and flows (the flow vectors are rotated with it), and its intensity is jittered.
The loss is Cellpose's: MSE between the predicted flows and 5 x the unit flows, halved, plus
binary cross-entropy of the cell-probability logit against the foreground.

On CPUs with native bfloat16 (recent x86) the forward/backward pass runs under bfloat16
autocast in channels-last layout, about twice as fast as float32 (``bench/train.py``); the
weights and the optimizer stay float32. On a GPU, ``workers`` processes build the batches ahead
(:class:`BatchSource`); each batch's augmentation has its own random stream, so the batches are
the same with or without them.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from .cancel import CancelToken, ProgressFn, check_cancel, report
from .errors import Cancelled, TrainingError
from .net import CPnet
from .samples import (MIN_DIAMETER, Sample, TrainingPair, check_training_data, pair_samples,
                      split_validation)

log = logging.getLogger("cp3d")

BSIZE = 224
DEFAULT_NBASE = [2, 32, 64, 128, 256]

LearningRate = Union[float, Sequence[float], Callable[[int], float]]
EpochFn = Callable[[int, float, Optional[float]], None]


@dataclass
class TrainResult:
    model_path: Optional[Path]
    epochs_done: int
    train_losses: list = field(default_factory=list)
    test_losses: list = field(default_factory=list)
    seconds: float = 0.0
    n_train: int = 0
    n_test: int = 0
    diam_labels: float = 0.0
    metrics: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- augmentation


def augment(sample: Sample, rng: np.random.Generator, diam_mean: float, nchan: int,
            bsize: int = BSIZE, scale_range: float = 0.5, jitter: bool = True
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random rescale (objects to ``diam_mean`` x [1 - s/2, 1 + s/2]), rotation, flip and crop.

    Returns image (nchan, bsize, bsize), masks (bsize, bsize) and unit flows (2, bsize, bsize):
    one affine map resamples all three (masks nearest-neighbour), and the flow vectors are
    rotated/flipped with the image."""
    ly, lx = sample.masks.shape
    scale = diam_mean / max(sample.diameter, MIN_DIAMETER)
    scale *= (1.0 - scale_range / 2) + scale_range * rng.random()
    theta = rng.random() * 2 * math.pi
    flip = rng.random() > 0.5
    c, s = math.cos(theta), math.sin(theta)
    M = np.array([[c, -s], [s, c]])  # output direction -> input direction (y, x)
    if flip:
        M = M @ np.array([[1.0, 0.0], [0.0, -1.0]])
    A = M / scale  # output pixel o samples input point A @ o + offset
    half = bsize / 2 / scale  # half the crop, in input pixels
    cy = rng.uniform(min(half, ly / 2), max(ly - half, ly / 2))
    cx = rng.uniform(min(half, lx / 2), max(lx - half, lx / 2))
    offset = np.array([cy, cx]) - A @ np.array([(bsize - 1) / 2, (bsize - 1) / 2])
    shape = (bsize, bsize)
    img = np.zeros((nchan, bsize, bsize), np.float32)
    for k in range(min(nchan, sample.image.shape[0])):
        img[k] = ndimage.affine_transform(sample.image[k], A, offset, shape, order=1)
    masks = ndimage.affine_transform(sample.masks, A, offset, shape, order=0)
    fy = ndimage.affine_transform(sample.flows[0], A, offset, shape, order=1)
    fx = ndimage.affine_transform(sample.flows[1], A, offset, shape, order=1)
    # a vector v in input coordinates is M.T @ v in output coordinates (M orthogonal)
    flows = np.stack([M[0, 0] * fy + M[1, 0] * fx, M[0, 1] * fy + M[1, 1] * fx])
    flows[:, masks == 0] = 0.0
    if jitter:  # gain and offset per channel, so the network does not rely on exact levels
        for k in range(nchan):
            if img[k].any():
                img[k] = img[k] * rng.uniform(0.75, 1.25) + rng.uniform(-0.1, 0.1)
    return img, masks, flows.astype(np.float32)


def make_batch(samples: Sequence[Sample], idx, rng, diam_mean, nchan, bsize=BSIZE,
               jitter: bool = True):
    """Images (B, C, H, W) and targets (B, 3, H, W) = (foreground, flow Y, flow X)."""
    imgs = np.zeros((len(idx), nchan, bsize, bsize), np.float32)
    targets = np.zeros((len(idx), 3, bsize, bsize), np.float32)
    for b, i in enumerate(idx):
        img, m, flows = augment(samples[i], rng, diam_mean, nchan, bsize, jitter=jitter)
        imgs[b] = img
        targets[b, 0] = m > 0
        targets[b, 1:] = flows
    return imgs, targets


def batch_rng(seed: int, epoch: int, start: int) -> np.random.Generator:
    """The random stream that augments one batch, named by the run's seed, the epoch and the
    batch's first position in it: a batch comes out the same whichever process builds it, and a
    resumed run augments as the uninterrupted one did."""
    return np.random.default_rng([seed, epoch, start])


class BatchSource:
    """Training batches in order, built here (``workers`` 0) or ahead by ``workers`` processes
    (torch's DataLoader, which also ends them cleanly when a run stops or one of them dies).
    On a GPU one process cannot build batches (augmentation, about 6 ms a 224-px plane on one
    core) as fast as the network consumes them. The workers are forked, so they share the
    planes without copying them; augmentation is numpy and scipy only, as a forked child must
    not run numba's parallel loops (numba stops one that does, once the parent has run them).
    Off Linux (no safe fork) the batches are built here. Use as a context manager, so that
    the workers end with the run."""

    def __init__(self, samples: Sequence[Sample], diam_mean: float, nchan: int, bsize: int,
                 seed: int = 0, workers: int = 0):
        self.dataset = _Batches(samples, seed, (diam_mean, nchan, bsize))
        self.plan = _Plan()
        self.loader = None
        if workers > 0 and sys.platform.startswith("linux"):
            self.loader = torch.utils.data.DataLoader(
                self.dataset, batch_size=None, sampler=self.plan, num_workers=workers,
                collate_fn=_as_is, persistent_workers=True, prefetch_factor=2,
                multiprocessing_context="fork")
        elif workers > 0:
            log.info("batch workers need Linux's fork(); building batches in this process")

    def batches(self, epoch: int, order: np.ndarray, batch_size: int):
        """(start, images, targets) for the batches of ``order``, in order."""
        starts = list(range(0, len(order), batch_size))
        if len(starts) > 1 and len(order) - starts[-1] < 2:
            starts.pop()  # BatchNorm needs 2+ samples: a lone leftover is dropped
        self.plan.keys = [(epoch, b, order[b:b + batch_size]) for b in starts]
        made = self.loader if self.loader is not None else map(self.dataset.__getitem__,
                                                                 self.plan.keys)
        for b, (imgs, targets) in zip(starts, made):
            yield b, imgs, targets

    def close(self) -> None:
        self.loader = None  # the DataLoader's iterator ends its workers when it goes

    def __enter__(self) -> "BatchSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Batches(torch.utils.data.Dataset):
    """Batch ``(epoch, start, indices)`` of the planes, augmented by :func:`batch_rng`."""

    def __init__(self, samples: Sequence[Sample], seed: int, args: tuple):
        self.samples, self.seed, self.args = samples, seed, args

    def __getitem__(self, key):
        epoch, start, idx = key
        return make_batch(self.samples, idx, batch_rng(self.seed, epoch, start), *self.args)


class _Plan(torch.utils.data.Sampler):
    """The keys of the current epoch's batches, set before each epoch is read."""

    def __init__(self):
        self.keys: list = []

    def __iter__(self):
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _as_is(batch):
    return batch


# --------------------------------------------------------------------------- loop


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cellpose's loss: MSE(flows, 5 x unit flows) / 2 + BCE(cellprob logit, foreground)."""
    out = out.float()
    flow_loss = torch.nn.functional.mse_loss(out[:, :2], 5.0 * target[:, 1:]) / 2.0
    prob_loss = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 2],
                                                                     (target[:, 0] > 0.5).float())
    return flow_loss + prob_loss


def learning_rates(lr: float, n_epochs: int) -> np.ndarray:
    """Cellpose's schedule: linear warm-up over 10 epochs, flat, then 10 halvings over the last
    100 epochs (n_epochs > 300) or the last 50 (n_epochs > 100). Short runs warm up over a
    tenth of the epochs; the first warm-up epoch already learns (Cellpose's is at 0)."""
    warm = min(10, max(1, n_epochs // 10))
    rates = np.full(n_epochs, lr, np.float64)
    rates[:warm] = lr * np.arange(1, warm + 1) / warm
    tail = 100 if n_epochs > 300 else 50 if n_epochs > 100 else 0
    if tail:
        step = tail // 10
        for k in range(10):
            rates[n_epochs - tail + k * step:n_epochs - tail + (k + 1) * step] = lr / 2 ** (k + 1)
    return rates


def _rate(learning_rate: LearningRate, rates: Optional[np.ndarray], epoch: int) -> float:
    if callable(learning_rate):
        return float(learning_rate(epoch))
    return float(rates[min(epoch, len(rates) - 1)])


def bf16_supported(device: torch.device) -> bool:
    """Whether bfloat16 autocast is a speed-up here (CUDA with bf16, or a CPU with native bf16)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except Exception:
            return False
    return False


def _save_checkpoint(path: Path, net, optimizer, epoch, train_losses, test_losses, rng,
                     config: dict) -> None:
    from .io import atomic_write

    state = {
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "train_losses": [float(x) for x in train_losses],
        "test_losses": [None if x is None else float(x) for x in test_losses],
        "rng": json.dumps(rng.bit_generator.state),  # plain text: loads with weights_only
        "torch_rng": torch.get_rng_state(),
        "config": json.dumps(config, default=str),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def checkpoint_path_for(save_path: Union[str, Path]) -> Path:
    return Path(str(save_path) + ".ckpt")


def train(
    net: CPnet,
    train_samples: Sequence[Sample],
    test_samples: Optional[Sequence[Sample]] = None,
    *,
    save_path: Optional[Union[str, Path]] = None,
    n_epochs: int = 100,
    learning_rate: LearningRate = 0.005,
    weight_decay: float = 1e-5,
    SGD: bool = False,
    momentum: float = 0.9,
    batch_size: int = 8,
    nimg_per_epoch: Optional[int] = None,
    bsize: int = BSIZE,
    scale_range: float = 0.5,
    device: Optional[torch.device] = None,
    amp: Optional[bool] = None,
    resume: bool = False,
    checkpoint_path: Optional[Union[str, Path]] = None,
    save_every: int = 0,
    test_every: int = 1,
    half_weights: bool = False,
    metadata: Optional[dict] = None,
    seed: int = 0,
    workers: int = 0,
    on_epoch: Optional[EpochFn] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> TrainResult:
    """Train ``net`` in place on 2D samples; return losses and where the model went.

    Writes a checkpoint (network, optimizer, epoch, losses, random state) after every epoch to
    ``checkpoint_path`` (default ``save_path`` + ``.ckpt``), from which ``resume=True`` continues
    to ``n_epochs``. The model (Cellpose's state-dict keys, ``diam_mean`` and ``diam_labels``)
    goes to ``save_path`` every ``save_every`` epochs and at the end, with a JSON sidecar.
    ``learning_rate``: a number (Cellpose's warm-up/decay schedule over ``n_epochs``), one value
    per epoch, or a function of the epoch. ``amp`` None: bfloat16 autocast where it is faster.
    ``workers``: processes building batches ahead (:class:`BatchSource`; for GPUs), with the
    same batches as without them.
    ``on_epoch(epoch, train_loss, test_loss)`` is called after each epoch (test_loss None on
    epochs without a test pass); ``cancel`` stops between batches with :class:`Cancelled`
    (the last checkpoint stays, so the run can be resumed).
    """
    from .models import save_model

    check_training_data(train_samples)
    nchan = net.nchan
    if train_samples[0].image.shape[0] > nchan:
        raise TrainingError(f"images have {train_samples[0].image.shape[0]} channels but the "
                            f"network takes {nchan}")
    if n_epochs < 1 or batch_size < 1:
        raise TrainingError(f"n_epochs and batch_size must be at least 1 (got {n_epochs}, "
                            f"{batch_size})")
    if bsize % net.divisor:
        raise TrainingError(f"crop size bsize={bsize} must be a multiple of {net.divisor}")
    device = device or torch.device("cpu")
    use_amp = bf16_supported(device) if amp is None else bool(amp)
    net.to(device)
    if use_amp and device.type == "cpu":
        net.to(memory_format=torch.channels_last)
    diam_mean = float(net.diam_mean.item())
    diam_labels = float(np.mean([s.diameter for s in train_samples]))
    net.diam_labels.data[:] = diam_labels
    if SGD:
        optimizer = torch.optim.SGD(net.parameters(), lr=0.0, momentum=momentum,
                                    weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=0.0, weight_decay=weight_decay)
    rates = None
    if not callable(learning_rate):
        rates = (learning_rates(float(learning_rate), n_epochs)
                 if np.ndim(learning_rate) == 0 else np.asarray(learning_rate, np.float64))
    rng = np.random.default_rng(seed)
    start, train_losses, test_losses = 0, [], []
    if checkpoint_path is None and save_path is not None:
        checkpoint_path = checkpoint_path_for(save_path)
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise TrainingError("no checkpoint to resume from", checkpoint_path)
        try:
            ck = torch.load(checkpoint_path, map_location=device, weights_only=True)
            net.load_state_dict(ck["state_dict"])
            optimizer.load_state_dict(ck["optimizer"])
        except Exception as err:
            raise TrainingError(f"checkpoint does not match this network or is damaged "
                                f"({str(err).splitlines()[0][:120]})", checkpoint_path) from None
        start = int(ck["epoch"]) + 1
        train_losses, test_losses = list(ck["train_losses"]), list(ck["test_losses"])
        rng.bit_generator.state = json.loads(ck["rng"])
        if "torch_rng" in ck:
            torch.set_rng_state(ck["torch_rng"].cpu())
        net.diam_labels.data[:] = diam_labels
        log.info("resuming from epoch %d", start)
    config = dict(n_epochs=n_epochs, batch_size=batch_size, bsize=bsize,
                  nimg_per_epoch=nimg_per_epoch, SGD=SGD, weight_decay=weight_decay,
                  learning_rate=learning_rate if np.ndim(learning_rate) == 0
                  and not callable(learning_rate) else "schedule")

    def save(epoch_count: int) -> Path:
        meta = dict(metadata or {})
        meta.update(epochs=epoch_count, train_losses=[round(x, 5) for x in train_losses],
                    test_losses=[None if x is None else round(x, 5) for x in test_losses],
                    n_train=n_train, n_test=len(test_samples or []),
                    learning_rate=config["learning_rate"], weight_decay=weight_decay,
                    SGD=SGD, batch_size=batch_size, bsize=bsize, nbase=net.nbase,
                    diam_mean=diam_mean, diam_labels=float(net.diam_labels.item()))
        return save_model(net, save_path, metadata=meta, half=half_weights)

    n_train = len(train_samples)
    per_epoch = nimg_per_epoch or n_train
    t0 = time.perf_counter()
    epoch = start - 1
    report(progress, "training", start / n_epochs)
    with BatchSource(train_samples, diam_mean, nchan, bsize, seed, workers) as source:
        for epoch in range(start, n_epochs):
            for group in optimizer.param_groups:
                group["lr"] = _rate(learning_rate, rates, epoch)
            net.train()
            order = rng.permutation(np.resize(rng.permutation(n_train), per_epoch))
            epoch_loss, seen = 0.0, 0
            for b, imgs, targets in source.batches(epoch, order, batch_size):
                check_cancel(cancel)
                loss = train_step(net, optimizer, imgs, targets, device, use_amp)
                epoch_loss += loss * len(imgs)
                seen += len(imgs)
                report(progress, "training", (epoch + (b + len(imgs)) / per_epoch) / n_epochs)
            train_losses.append(epoch_loss / max(seen, 1))
            test_loss = None
            if test_samples and (epoch % max(test_every, 1) == 0 or epoch == n_epochs - 1):
                test_loss = evaluate_loss(net, test_samples, diam_mean, nchan, bsize, device,
                                          seed, use_amp)
            test_losses.append(test_loss)
            if checkpoint_path is not None:
                _save_checkpoint(Path(checkpoint_path), net, optimizer, epoch, train_losses,
                                 test_losses, rng, config)
            if save_path is not None and save_every and (epoch + 1) % save_every == 0 \
                    and epoch != n_epochs - 1:
                save(epoch + 1)
            log.info("epoch %d: train loss %.4f%s, lr %.2g", epoch, train_losses[-1],
                     "" if test_loss is None else f", test loss {test_loss:.4f}",
                     optimizer.param_groups[0]["lr"])
            if on_epoch is not None:
                on_epoch(epoch, train_losses[-1], test_loss)
    net.eval()
    net.to(memory_format=torch.contiguous_format)
    result = TrainResult(None, epoch + 1, train_losses, test_losses, time.perf_counter() - t0,
                         n_train, len(test_samples or []), float(net.diam_labels.item()))
    if save_path is not None:
        result.model_path = save(epoch + 1)
    report(progress, "training", 1.0)
    return result


def train_step(net, optimizer, imgs: np.ndarray, targets: np.ndarray, device,
               use_amp: bool) -> float:
    """One optimisation step on a batch; ``use_amp``: bfloat16 autocast (channels-last on CPU).
    Returns the loss (reading it waits for the device, so timings include the whole step)."""
    x = torch.from_numpy(imgs).to(device)
    y = torch.from_numpy(targets).to(device)
    if use_amp and device.type == "cpu":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
        out = net(x)[0]
    loss = loss_fn(out, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.item())


def evaluate_loss(net, samples, diam_mean, nchan, bsize, device, seed=0,
                  use_amp: bool = False) -> Optional[float]:
    """Mean loss on held-out samples with a fixed augmentation, so epochs are comparable."""
    if not samples:
        return None
    rng = np.random.default_rng(seed + 1)
    net.eval()
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(samples), 8):
            idx = list(range(b, min(b + 8, len(samples))))
            imgs, targets = make_batch(samples, idx, rng, diam_mean, nchan, bsize, jitter=False)
            x = torch.from_numpy(imgs).to(device)
            if use_amp and device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                out = net(x)[0]
            total += loss_fn(out, torch.from_numpy(targets).to(device)).item() * len(idx)
    return total / len(samples)


# --------------------------------------------------------------------------- whole runs


def new_or_pretrained(pretrained_model=None, nbase: Optional[Sequence[int]] = None,
                      diam_mean: float = 30.0, device: Optional[torch.device] = None) -> CPnet:
    """A fresh CPnet (``nbase``, default Cellpose's) or the network of any loadable model."""
    from .models import load_model

    if pretrained_model not in (None, "", "None", "scratch"):
        model = pretrained_model if hasattr(pretrained_model, "net") else load_model(
            pretrained_model, device=device)
        return model.net
    return CPnet(list(nbase or DEFAULT_NBASE), 3, 3, diam_mean=diam_mean)


def train_model(
    train_pairs: Sequence[TrainingPair],
    test_pairs: Optional[Sequence[TrainingPair]] = None,
    *,
    save_path: Union[str, Path],
    pretrained_model=None,
    nbase: Optional[Sequence[int]] = None,
    val_fraction: float = 0.0,
    chan: int = 0,
    chan2: int = 0,
    n_per_axis: Optional[int] = 16,
    min_train_masks: int = 5,
    evaluate_ap: bool = True,
    device: Optional[torch.device] = None,
    seed: int = 0,
    metadata: Optional[dict] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    **train_kwargs,
) -> TrainResult:
    """Train (or fine-tune ``pretrained_model``) on image/mask pairs and save the model.

    ``val_fraction`` holds out that share of the training images when no ``test_pairs`` are
    given. With test images and ``evaluate_ap``, the saved model segments each test volume
    through the full pipeline and its AP@0.5/0.75/0.9 go to the JSON sidecar.
    """
    from .models import save_model

    if not train_pairs:
        raise TrainingError("no training images with masks were found")
    if test_pairs:
        val = list(test_pairs)
    else:
        train_pairs, val = split_validation(train_pairs, val_fraction, seed)
    net = new_or_pretrained(pretrained_model, nbase, device=device)
    report(progress, "preparing", 0.0)
    train_samples = pair_samples(train_pairs, net.nchan, n_per_axis, min_train_masks, chan,
                                 chan2, seed, cancel=cancel)
    test_samples = pair_samples(val, net.nchan, n_per_axis, 1, chan, chan2, seed + 1000,
                                what="test", cancel=cancel) if val else []
    report(progress, "preparing", 1.0)
    meta = dict(metadata or {})
    meta.update(
        pretrained_model=str(getattr(pretrained_model, "path", pretrained_model) or "scratch"),
        train_images=[p.source for p in train_pairs], test_images=[p.source for p in val],
        n_train_planes=len(train_samples), n_test_planes=len(test_samples),
        chan=chan, chan2=chan2, min_train_masks=min_train_masks)
    result = train(net, train_samples, test_samples, save_path=save_path, device=device,
                   seed=seed, metadata=meta, progress=progress, cancel=cancel, **train_kwargs)
    if val and evaluate_ap and result.model_path is not None:
        result.metrics = evaluate_pairs(result.model_path, val, chan=chan, chan2=chan2,
                                        device=device, cancel=cancel)
        meta = json.loads(Path(str(result.model_path) + ".json").read_text())
        meta["metrics"] = result.metrics
        save_model(net.cpu(), result.model_path, metadata=meta,
                   half=train_kwargs.get("half_weights", False))
    return result


def evaluate_pairs(model, pairs: Sequence[TrainingPair], chan: int = 0, chan2: int = 0,
                   device: Optional[torch.device] = None,
                   cancel: Optional[CancelToken] = None) -> dict:
    """AP@0.5/0.75/0.9 of ``model`` on each pair through the full pipeline, and their mean."""
    from .evaluate import THRESHOLDS, score_masks
    from .models import load_model
    from .pipeline import segment

    model = model if hasattr(model, "net") else load_model(model, device=device)
    per_image = {}
    for p in pairs:
        check_cancel(cancel)
        image = np.asarray(p.image)
        masks = np.asarray(p.masks)
        if masks.ndim == 2 or masks.shape[0] == 1:
            continue  # 2D images: the 3D pipeline does not apply
        if image.ndim == 3:
            image = image[:, np.newaxis]
        result = segment(image, model, anisotropy=p.anisotropy, chan=chan, chan2=chan2,
                         cancel=cancel)
        per_image[p.source or f"image{len(per_image)}"] = score_masks(masks, result.masks)
    out: dict = {"thresholds": list(THRESHOLDS), "ap": {k: list(v) for k, v in per_image.items()}}
    if per_image:
        out["mean_ap"] = np.mean(list(per_image.values()), axis=0).round(4).tolist()
    return out


__all__ = [
    "TrainResult", "augment", "make_batch", "loss_fn", "learning_rates",
    "train", "train_model", "evaluate_pairs", "new_or_pretrained", "checkpoint_path_for",
    "Cancelled",
]
