"""End-to-end pipeline checks that need no trained weights.

``GradientNet`` stands in for a trained network: on any plane it answers "flow uphill along the
intensity gradient" and "cell where the image is bright". On a volume of blurred spheres, the
2.5D combination of its YX, ZX and ZY answers is a 3D flow field converging to each sphere's
centre, so the masks must match the spheres. A component sent to the wrong axis, a transposed
plane or a wrong resampling breaks that, so these tests check the inference plumbing for real.
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cp3d.core.cancel import CancelToken
from cp3d.core.errors import Cancelled, InputError
from cp3d.core.io import volume_from_array
from cp3d.core.metrics import average_precision
from cp3d.core.pipeline import segment


class GradientNet(torch.nn.Module):
    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = threshold

    def forward(self, x):
        img = x[:, :1]
        p = F.pad(img, (1, 1, 1, 1), mode="replicate")
        gy = (p[:, :, 2:, 1:-1] - p[:, :, :-2, 1:-1]) / 2
        gx = (p[:, :, 1:-1, 2:] - p[:, :, 1:-1, :-2]) / 2
        mag = torch.sqrt(gy**2 + gx**2) + 1e-6
        cellprob = 40 * (img - self.threshold)
        return torch.cat([5 * gy / mag, 5 * gx / mag, cellprob], dim=1), None


def spheres(shape=(40, 64, 64), radius=6.0, n=12, seed=0, z_step=1):
    """Blurred spheres (image) and their ground-truth labels, on an isotropic grid
    subsampled every ``z_step`` planes (an anisotropic acquisition)."""
    rng = np.random.default_rng(seed)
    centres = []
    for _ in range(100_000):
        if len(centres) == n:
            break
        c = rng.uniform([radius + 2] * 3, np.array(shape) - radius - 2)
        if all(np.linalg.norm(c - o) > 2.6 * radius for o in centres):
            centres.append(c)
    assert len(centres) == n, "volume too small for that many spheres"
    zz, yy, xx = np.indices(shape, dtype=np.float32)
    img = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.uint16)
    for k, c in enumerate(centres, 1):
        d2 = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2
        img += np.exp(-d2 / (2 * (radius / 2) ** 2))
        labels[d2 <= radius**2] = k
    img = (1000 * img + 100).astype(np.float32)
    return img[::z_step], labels[::z_step]


def model_for(img):
    """A stand-in model whose cell-probability threshold sits at each sphere's radius."""
    from cp3d.core.normalize import normalize99

    norm = normalize99(img)
    edge = (1000 * np.exp(-2.0) + 100 - np.percentile(img, 1)) / (
        np.percentile(img, 99) - np.percentile(img, 1))
    assert 0 < edge < norm.max()
    return SimpleNamespace(net=GradientNet(float(edge)), device=torch.device("cpu"), nchan=2,
                           diam_mean=30.0, diam_labels=30.0, name="gradient", path=None)


def test_2p5d_pipeline_recovers_spheres():
    img, gt = spheres()
    result = segment(volume_from_array(img), model_for(img), diameter=30.0, min_size=15)
    ap, *_ = average_precision(gt, result.masks, thresholds=(0.5, 0.75))
    assert result.masks.shape == gt.shape
    assert ap[0] >= 0.99 and ap[1] >= 0.9, ap
    assert result.dP.shape == (3, *gt.shape) and result.cellprob.shape == gt.shape


def test_anisotropic_volume_with_anisotropy_parameter():
    img, gt = spheres(shape=(48, 64, 64), z_step=2)
    result = segment(volume_from_array(img), model_for(img), diameter=30.0, anisotropy=2.0,
                     min_size=10)
    ap, *_ = average_precision(gt, result.masks, thresholds=(0.5,))
    assert ap[0] >= 0.95, ap


def test_rescale_by_diameter_keeps_masks():
    img, gt = spheres()
    # diameter 15 with diam_mean 30: the volume is upsampled 2x before the network
    result = segment(volume_from_array(img), model_for(img), diameter=15.0)
    ap, *_ = average_precision(gt, result.masks, thresholds=(0.5,))
    assert ap[0] >= 0.95, ap


def test_log_names_the_grid_the_network_runs_on(caplog):
    """Diameter 15 and anisotropy 2 on 24 x 64 x 64: the network sees 96 x 128 x 128 voxels,
    96 YX planes of 128 x 128 among them, and the log says so (tiny objects take long)."""
    import logging

    img, gt = spheres(shape=(48, 64, 64), z_step=2)
    model = model_for(img)
    yx_planes = []
    forward = model.net.forward

    def recording(x):
        if x.shape[-2:] == (128, 128):
            yx_planes.append(x.shape[0])
        return forward(x)

    model.net.forward = recording
    with caplog.at_level(logging.INFO, logger="cp3d"):
        segment(volume_from_array(img), model, diameter=15.0, anisotropy=2.0)
    assert "rescale 2.00: the network runs on 96 x 128 x 128 voxels" in caplog.text
    assert sum(yx_planes) == 96
    assert "network" in caplog.text.splitlines()[-1] and "dynamics" in caplog.text
    assert "enlarged" not in caplog.text  # rescale 2: no warning


def test_tiny_objects_are_warned_of_by_name(caplog):
    """Objects of 6 px (rescale 5): slow and off the bundled models' range; the user is told."""
    import logging

    img, _ = spheres(shape=(12, 24, 24), radius=2.0, n=1)
    with caplog.at_level(logging.WARNING, logger="cp3d"):
        segment(volume_from_array(img, path="tiny.tif"), model_for(img), diameter=6.0)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warning) == 1 and "tiny.tif" in warning[0].getMessage()
    assert "6.0 px are run 5.0x enlarged" in warning[0].getMessage()


def test_memory_check_counts_the_grid_enlarged_for_small_objects(monkeypatch):
    """12 x 24 x 24 voxels fit in 5 MB at their own size (diameter 30, about 0.6 MB) but not
    enlarged 5x for 6 px objects (about 21 MB): refused with a message, before the network."""
    import psutil

    img, _ = spheres(shape=(12, 24, 24), radius=2.0, n=1)
    free = SimpleNamespace(available=5_000_000)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: free)
    vol = volume_from_array(img, path="tiny.tif")
    segment(vol, model_for(img), diameter=30.0)  # fits
    model = model_for(img)
    model.net.forward = lambda x: pytest.fail("the network ran on a volume that cannot fit")
    with pytest.raises(InputError, match=r"tiny\.tif.*at 5\.0x for its objects' size"):
        segment(vol, model, diameter=6.0)


def test_axis_orders_give_identical_masks():
    img, _ = spheres(shape=(28, 48, 48), radius=5.0, n=4)
    model = model_for(img)
    ref = segment(volume_from_array(img), model, diameter=30.0).masks
    yxz = np.transpose(img, (1, 2, 0))
    again = segment(volume_from_array(yxz, z_axis=2), model, diameter=30.0).masks
    np.testing.assert_array_equal(ref, again)


def test_stitch_mode_links_planes():
    img, gt = spheres()
    result = segment(volume_from_array(img), model_for(img), diameter=30.0, do_3D=False,
                     stitch_threshold=0.25, min_size=5)
    ap, *_ = average_precision(gt, result.masks, thresholds=(0.5,))
    assert ap[0] >= 0.9, ap


def test_progress_reports_every_stage_and_cancel_stops():
    img, _ = spheres(shape=(28, 48, 48), radius=5.0, n=4)
    model = model_for(img)
    stages = []
    segment(volume_from_array(img), model, progress=lambda s, f: stages.append(s))
    for stage in ("size", "normalize", "prediction YX", "prediction ZX", "prediction ZY",
                  "dynamics"):
        assert stage in stages
    token = CancelToken()

    def cancel_in_prediction(stage, fraction):
        if stage.startswith("prediction ZX"):
            token.cancel()

    with pytest.raises(Cancelled):
        segment(volume_from_array(img), model, progress=cancel_in_prediction, cancel=token)


def test_2d_given_to_3d_is_refused():
    img, _ = spheres(shape=(28, 48, 48), radius=5.0, n=3)
    with pytest.raises(InputError, match="2D image"):
        segment(volume_from_array(img[12]), model_for(img))


def test_default_diameter_is_estimated_from_the_image():
    """No diameter given: the estimate is the spheres' median slice diameter (the stand-in
    network is scale-free, so this checks the plumbing; tests/test_size.py uses a real model)."""
    from cp3d.core.size import estimate_diameter, mask_diameters, pick_planes

    img, gt = spheres()
    model = model_for(img)
    true = float(np.median(mask_diameters(gt[pick_planes(gt.shape[0], 6)])))
    estimate = estimate_diameter(img, model)
    assert estimate == pytest.approx(true, rel=0.2)
    result = segment(volume_from_array(img), model, min_size=15)
    assert result.params["diameter_estimated"] and result.diameter == pytest.approx(estimate)
    ap, *_ = average_precision(gt, result.masks, thresholds=(0.5,))
    assert ap[0] >= 0.8, ap


def test_augment_averages_flipped_predictions_with_flows_negated():
    """A flip-equivariant network gives the same answer with and without ``augment``; a
    constant flow (not equivariant) averages out, since each flipped axis negates it."""
    from cp3d.core.inference import run_net

    img, gt = spheres(shape=(32, 48, 48), radius=5.0, n=5)
    model = model_for(img)
    plain = segment(volume_from_array(img), model, diameter=30.0)
    augmented = segment(volume_from_array(img), model, diameter=30.0, augment=True)
    np.testing.assert_allclose(augmented.dP, plain.dP, atol=1e-4)
    np.testing.assert_allclose(augmented.cellprob, plain.cellprob, atol=1e-3)
    ap, *_ = average_precision(gt, augmented.masks, thresholds=(0.5,))
    assert ap[0] >= 0.99 and augmented.params["augment"] is True

    class Constant(torch.nn.Module):
        def forward(self, x):
            n, _, h, w = x.shape
            out = torch.ones(n, 3, h, w)
            out[:, 0, : h // 2] = 3.0  # not symmetric in H either
            return out, None

    batch = np.zeros((2, 2, 16, 20), np.float32)
    out = run_net(Constant(), batch, torch.device("cpu"), augment=True)
    # flow0: (+f(y) + f(y) - f(H-1-y) - f(H-1-y)) / 4 per row pair; flow1: 0; cellprob: 1
    f = np.where(np.arange(16) < 8, 3.0, 1.0)
    np.testing.assert_allclose(out[:, 0], np.broadcast_to(((f - f[::-1]) / 2)[:, None],
                                                          (2, 16, 20)), atol=1e-6)
    np.testing.assert_allclose(out[:, 1], 0.0, atol=1e-6)
    np.testing.assert_allclose(out[:, 2], 1.0, atol=1e-6)
