"""Training and fine-tuning a CPnet on image/mask pairs, as Cellpose trains.

Samples are 2D: crops from 2D images, or slices of 3D volumes in YX, ZY and ZX (Z resampled by
the anisotropy so every slice looks like an XY plane). Each step draws a batch, rescales each
sample so its objects have the network's ``diam_mean`` (times a random factor), rotates, flips
and crops it to ``bsize``, jitters intensity, computes the target flows of the augmented masks,
and minimises Cellpose's loss: MSE between the predicted flows and 5 x the unit flows (halved)
plus binary cross-entropy of the cell probability against the foreground.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from scipy import ndimage

from .cancel import CancelToken, check_cancel
from .errors import TrainingError
from .flows import masks_to_flows
from .net import CPnet
from .normalize import normalize99

log = logging.getLogger("cp3d")

BSIZE = 224


@dataclass
class Sample:
    """One 2D training image (C, Y, X), normalized, with its label image (Y, X)."""

    image: np.ndarray
    masks: np.ndarray
    diameter: float
    source: str = ""


@dataclass
class TrainResult:
    model_path: Optional[Path]
    epochs_done: int
    train_losses: list = field(default_factory=list)
    test_losses: list = field(default_factory=list)
    seconds: float = 0.0


# --------------------------------------------------------------------------- data


def median_diameter(masks: np.ndarray) -> float:
    """Cellpose's object diameter: median of sqrt(area) over objects, as a disk's diameter."""
    counts = np.bincount(masks.ravel().astype(np.int64))[1:]
    counts = counts[counts > 0]
    if counts.size == 0:
        return 0.0
    return float(np.median(np.sqrt(counts)) / (math.sqrt(math.pi) / 2))


def make_sample(image: np.ndarray, masks: np.ndarray, source: str = "") -> Sample:
    """Normalize a (C, Y, X) or (Y, X) image and pair it with its masks, checking both."""
    image = np.asarray(image, np.float32)
    if image.ndim == 2:
        image = image[np.newaxis]
    masks = np.asarray(masks)
    if masks.shape != image.shape[1:]:
        raise TrainingError(f"image shape {image.shape[1:]} and mask shape {masks.shape} differ",
                            source or None)
    if masks.max() == 0:
        raise TrainingError("mask image is empty (no objects)", source or None)
    norm = np.stack([normalize99(c) for c in image])
    return Sample(norm, masks.astype(np.int32), median_diameter(masks), source)


def volume_slices(image: np.ndarray, masks: np.ndarray, anisotropy: float = 1.0,
                  n_per_axis: int = 8, seed: int = 0, source: str = "",
                  min_objects: int = 3) -> list[Sample]:
    """2D samples from a (C, Z, Y, X) volume and its (Z, Y, X) labels: planes in YX, ZY and
    ZX, with Z resampled by ``anisotropy`` so that every slice looks like an XY plane."""
    rng = np.random.default_rng(seed)
    if image.ndim == 3:
        image = image[np.newaxis]
    if anisotropy != 1.0:
        zoom = (anisotropy, 1.0, 1.0)
        image = np.stack([ndimage.zoom(c, zoom, order=1) for c in image.astype(np.float32)])
        masks = ndimage.zoom(masks, zoom, order=0)
    samples = []
    for axis in range(3):
        n = masks.shape[axis]
        picks = rng.choice(n, size=min(n_per_axis, n), replace=False)
        for i in sorted(picks):
            m = np.take(masks, i, axis=axis)
            if len(np.unique(m)) - 1 < min_objects:
                continue
            img = np.take(image, i, axis=axis + 1)
            samples.append(make_sample(img, m, f"{source}:{'ZYX'[axis]}={i}"))
    return samples


def check_training_data(samples: Sequence[Sample], min_train_masks: int = 1) -> None:
    if len(samples) == 0:
        raise TrainingError("no training images with masks were found")
    good = [s for s in samples if s.masks.max() >= min_train_masks]
    if not good:
        raise TrainingError(f"no training image has at least {min_train_masks} masks")
    nchan = {s.image.shape[0] for s in samples}
    if len(nchan) > 1:
        raise TrainingError(f"training images have different channel counts: {sorted(nchan)}")


def augment(sample: Sample, rng: np.random.Generator, diam_mean: float, nchan: int,
            bsize: int = BSIZE, scale_range: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Random rescale (objects to ``diam_mean`` x [1 - s/2, 1 + s/2]), rotation, flip and crop;
    intensity jitter. Returns image (nchan, bsize, bsize) and masks (bsize, bsize)."""
    img, masks = sample.image, sample.masks
    ly, lx = masks.shape
    scale = diam_mean / max(sample.diameter, 1.0) if sample.diameter > 0 else 1.0
    scale *= 1.0 + scale_range * (rng.random() - 0.5)
    theta = rng.random() * 2 * math.pi
    flip = rng.random() > 0.5
    # output pixel o maps to input pixel centre + R(o - out_centre) / scale
    c, s = math.cos(theta), math.sin(theta)
    A = np.array([[c, -s], [s, c]]) / scale
    if flip:
        A = A @ np.array([[1, 0], [0, -1]])
    # random crop position: centre the crop anywhere in the rescaled image
    half = bsize / 2 / scale
    cy = rng.uniform(min(half, ly / 2), max(ly - half, ly / 2))
    cx = rng.uniform(min(half, lx / 2), max(lx - half, lx / 2))
    offset = np.array([cy, cx]) - A @ np.array([bsize / 2, bsize / 2])
    out = np.zeros((nchan, bsize, bsize), np.float32)
    for k in range(min(nchan, img.shape[0])):
        out[k] = ndimage.affine_transform(img[k], A, offset, (bsize, bsize), order=1, mode="constant")
    m = ndimage.affine_transform(masks, A, offset, (bsize, bsize), order=0, mode="constant")
    # intensity jitter: gain and offset per channel, Cellpose-like
    for k in range(nchan):
        out[k] = out[k] * rng.uniform(0.75, 1.25) + rng.uniform(-0.1, 0.1)
    return out, m


def make_batch(samples, idx, rng, diam_mean, nchan, bsize=BSIZE):
    """Images (B, C, H, W) and targets (B, 3, H, W) = (foreground, flow Y, flow X)."""
    imgs = np.zeros((len(idx), nchan, bsize, bsize), np.float32)
    targets = np.zeros((len(idx), 3, bsize, bsize), np.float32)
    for b, i in enumerate(idx):
        img, m = augment(samples[i], rng, diam_mean, nchan, bsize)
        imgs[b] = img
        targets[b, 0] = m > 0
        if m.max() > 0:
            targets[b, 1:] = masks_to_flows(m)
    return imgs, targets


# --------------------------------------------------------------------------- loop


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cellpose's loss: MSE(flows, 5 x unit flows) / 2 + BCE(cellprob logit, foreground)."""
    flow_loss = torch.nn.functional.mse_loss(out[:, :2], 5.0 * target[:, 1:]) / 2.0
    prob_loss = torch.nn.functional.binary_cross_entropy_with_logits(out[:, 2], target[:, 0])
    return flow_loss + prob_loss


def learning_rates(lr: float, n_epochs: int) -> np.ndarray:
    """Linear warm-up over 10 epochs, flat, then halved every 10 epochs over the last 100
    (Cellpose's schedule, shortened proportionally for short runs)."""
    rates = np.full(n_epochs, lr, np.float64)
    warm = min(10, max(1, n_epochs // 10))
    rates[:warm] = np.linspace(lr / warm, lr, warm)
    tail = min(100, n_epochs // 4)
    if tail >= 10:
        for k, e in enumerate(range(n_epochs - tail, n_epochs)):
            rates[e] = lr * 0.5 ** ((k // (tail // 10)) + 1) if tail // 10 else lr
    return rates


def _save_checkpoint(path: Path, net, optimizer, epoch, train_losses, test_losses, rng) -> None:
    from .io import atomic_write

    state = {
        "state_dict": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "train_losses": train_losses,
        "test_losses": test_losses,
        "rng": rng.bit_generator.state,
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def train(
    net: CPnet,
    train_samples: Sequence[Sample],
    test_samples: Optional[Sequence[Sample]] = None,
    *,
    save_path: Optional[Path] = None,
    n_epochs: int = 100,
    learning_rate: float = 0.005,
    weight_decay: float = 1e-5,
    SGD: bool = False,
    batch_size: int = 8,
    nimg_per_epoch: Optional[int] = None,
    bsize: int = BSIZE,
    device: Optional[torch.device] = None,
    resume: bool = False,
    checkpoint_path: Optional[Path] = None,
    half_weights: bool = False,
    metadata: Optional[dict] = None,
    seed: int = 0,
    on_epoch: Optional[Callable[[int, float, Optional[float]], None]] = None,
    progress=None,
    cancel: Optional[CancelToken] = None,
) -> TrainResult:
    """Train ``net`` in place; save it to ``save_path`` (Cellpose keys) and a checkpoint every
    epoch to ``checkpoint_path`` (default ``save_path`` + ``.ckpt``), from which ``resume``
    continues. ``on_epoch(epoch, train_loss, test_loss)`` reports each epoch."""
    from .models import save_model

    check_training_data(train_samples)
    nchan = net.nchan
    if train_samples[0].image.shape[0] > nchan:
        raise TrainingError(f"images have {train_samples[0].image.shape[0]} channels but the "
                            f"network takes {nchan}")
    device = device or torch.device("cpu")
    net.to(device)
    diam_mean = float(net.diam_mean.item())
    net.diam_labels.data[:] = float(np.mean([s.diameter for s in train_samples]))
    if SGD:
        optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=0.9,
                                    weight_decay=weight_decay)
    else:
        optimizer = torch.optim.AdamW(net.parameters(), lr=learning_rate,
                                      weight_decay=weight_decay)
    rates = learning_rates(learning_rate, n_epochs)
    rng = np.random.default_rng(seed)
    start, train_losses, test_losses = 0, [], []
    if checkpoint_path is None and save_path is not None:
        checkpoint_path = Path(str(save_path) + ".ckpt")
    if resume:
        if checkpoint_path is None or not Path(checkpoint_path).exists():
            raise TrainingError("no checkpoint to resume from", checkpoint_path)
        ck = torch.load(checkpoint_path, map_location=device, weights_only=False)
        net.load_state_dict(ck["state_dict"])
        optimizer.load_state_dict(ck["optimizer"])
        start = int(ck["epoch"]) + 1
        train_losses, test_losses = list(ck["train_losses"]), list(ck["test_losses"])
        rng.bit_generator.state = ck["rng"]
        log.info("resuming from epoch %d", start)

    n_train = len(train_samples)
    per_epoch = nimg_per_epoch or n_train
    t0 = time.perf_counter()
    epoch = start - 1
    for epoch in range(start, n_epochs):
        for group in optimizer.param_groups:
            group["lr"] = rates[epoch]
        net.train()
        order = rng.permutation(np.resize(np.arange(n_train), per_epoch))
        epoch_loss, seen = 0.0, 0
        for b in range(0, per_epoch, batch_size):
            check_cancel(cancel)
            idx = order[b:b + batch_size]
            imgs, targets = make_batch(train_samples, idx, rng, diam_mean, nchan, bsize)
            x = torch.from_numpy(imgs).to(device)
            y = torch.from_numpy(targets).to(device)
            out = net(x)[0]
            loss = loss_fn(out, y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            epoch_loss += loss.item() * len(idx)
            seen += len(idx)
        train_losses.append(epoch_loss / max(seen, 1))
        test_loss = _evaluate_loss(net, test_samples, diam_mean, nchan, bsize, device, seed)
        test_losses.append(test_loss)
        if checkpoint_path is not None:
            _save_checkpoint(Path(checkpoint_path), net, optimizer, epoch, train_losses,
                             test_losses, rng)
        if on_epoch is not None:
            on_epoch(epoch, train_losses[-1], test_loss)
        if progress is not None:
            progress("training", (epoch + 1) / n_epochs)
    net.eval()
    result = TrainResult(None, epoch + 1, train_losses, test_losses, time.perf_counter() - t0)
    if save_path is not None:
        meta = dict(metadata or {})
        meta.update(epochs=epoch + 1, train_losses=train_losses, test_losses=test_losses,
                    n_train=n_train, learning_rate=learning_rate, weight_decay=weight_decay,
                    nbase=net.nbase, diam_mean=diam_mean, diam_labels=float(net.diam_labels.item()))
        result.model_path = save_model(net.cpu(), save_path, metadata=meta, half=half_weights)
        net.to(device)
    return result


def _evaluate_loss(net, samples, diam_mean, nchan, bsize, device, seed) -> Optional[float]:
    """Mean loss on held-out samples, with a fixed augmentation so epochs are comparable."""
    if not samples:
        return None
    rng = np.random.default_rng(seed + 1)
    net.eval()
    total = 0.0
    with torch.no_grad():
        for b in range(0, len(samples), 8):
            idx = list(range(b, min(b + 8, len(samples))))
            imgs, targets = make_batch(samples, idx, rng, diam_mean, nchan, bsize)
            out = net(torch.from_numpy(imgs).to(device))[0]
            total += loss_fn(out, torch.from_numpy(targets).to(device)).item() * len(idx)
    return total / len(samples)


def write_metadata(path: Path, meta: dict) -> None:
    Path(path).write_text(json.dumps(meta, indent=1, default=str))
