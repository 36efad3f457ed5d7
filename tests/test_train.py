"""Training on CPU: the loss falls, the model loads back and segments, resume continues."""

import numpy as np
import pytest
import torch

from cp3d.core.errors import TrainingError
from cp3d.core.models import load_model
from cp3d.core.net import CPnet
from cp3d.core.pipeline import segment
from cp3d.core.synth import nuclei_labels, render_nuclei
from cp3d.core.train import make_sample, median_diameter, train, volume_slices


@pytest.fixture(scope="module")
def samples():
    labels = nuclei_labels((24, 64, 64), 40, (5.0, 7.0), seed=7)
    image = render_nuclei(labels, seed=7, snr=10)
    return volume_slices(image, labels, 1.0, n_per_axis=4, seed=0, source="synth7"), image, labels


def _net():
    torch.manual_seed(0)
    return CPnet([2, 8, 16, 32], 3, 3, diam_mean=30.0)


def test_short_training_lowers_loss_and_model_segments(samples, tmp_path):
    train_set, image, labels = samples
    losses = []
    net = _net()
    result = train(net, train_set, train_set[:3], save_path=tmp_path / "tiny.pth", n_epochs=6,
                   learning_rate=0.01, batch_size=4, nimg_per_epoch=8, bsize=64,
                   on_epoch=lambda e, tr, te: losses.append(tr))
    assert len(losses) == 6 and np.mean(losses[-2:]) < losses[0]
    assert result.test_losses[-1] is not None
    model = load_model(result.model_path)
    assert model.diam_labels == pytest.approx(np.mean([s.diameter for s in train_set]), rel=1e-3)
    assert (tmp_path / "tiny.pth.json").exists()
    out = segment(image, model, diameter=30.0)
    assert out.masks.shape == labels.shape


def test_resume_continues_from_checkpoint(samples, tmp_path):
    train_set, _, _ = samples
    kw = dict(save_path=tmp_path / "m.pth", learning_rate=0.01, batch_size=4, nimg_per_epoch=4,
              bsize=64)
    calls = []

    def stop_after_two(epoch, tr, te):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # the user's machine went down after epoch 1

    with pytest.raises(KeyboardInterrupt):
        train(_net(), train_set, n_epochs=4, on_epoch=stop_after_two, **kw)
    assert (tmp_path / "m.pth.ckpt").exists()
    resumed = train(_net(), train_set, n_epochs=4, resume=True,
                    on_epoch=lambda e, tr, te: calls.append(e), **kw)
    assert calls == [0, 1, 2, 3]
    assert resumed.epochs_done == 4 and len(resumed.train_losses) == 4


def test_bad_training_input_is_refused():
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    with pytest.raises(TrainingError, match="differ"):
        make_sample(img, np.zeros((30, 32), np.uint16))
    with pytest.raises(TrainingError, match="empty"):
        make_sample(img, np.zeros((32, 32), np.uint16))
    with pytest.raises(TrainingError, match="no training images"):
        train(_net(), [], n_epochs=1)
    with pytest.raises(TrainingError, match="no checkpoint"):
        masks = np.zeros((32, 32), np.uint16)
        masks[5:15, 5:15] = 1
        train(_net(), [make_sample(img, masks)], n_epochs=1, resume=True)


def test_median_diameter_of_disks():
    yy, xx = np.mgrid[:100, :100]
    masks = np.zeros((100, 100), np.int32)
    masks[(yy - 30) ** 2 + (xx - 30) ** 2 <= 10**2] = 1
    masks[(yy - 70) ** 2 + (xx - 70) ** 2 <= 10**2] = 2
    assert median_diameter(masks) == pytest.approx(20, rel=0.05)
