"""Training on CPU with a tiny network: the loss falls, the model loads back and segments,
augmented flows stay right, resume continues exactly, bad input is refused by name, and
``cp3d-cli train`` trains from a folder into the user models folder."""

import json

import numpy as np
import pytest
import tifffile
import torch

from cp3d.core.cancel import CancelToken
from cp3d.core.errors import Cancelled, TrainingError
from cp3d.core.flows import masks_to_flows
from cp3d.core.models import load_model, save_model
from cp3d.core.net import CPnet
from cp3d.core.pipeline import segment
from cp3d.core.synth import nuclei_labels, render_nuclei
from cp3d.core.samples import (TrainingPair, make_sample, median_diameter, split_validation,
                               volume_slices)
from cp3d.core.train import BatchSource, augment, learning_rates, train, train_model
from cp3d.core.train_cli import train_main

TINY = [2, 8, 16, 32]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def volume():
    labels = nuclei_labels((24, 64, 64), 40, (5.0, 7.0), seed=7)
    image = render_nuclei(labels, seed=7, snr=10)
    return image, labels


@pytest.fixture(scope="module")
def samples(volume):
    image, labels = volume
    return volume_slices(image, labels, 1.0, n_per_axis=4, seed=0, source="synth7", nchan=2)


def _net():
    torch.manual_seed(0)
    return CPnet(TINY, 3, 3, diam_mean=30.0)


KW = dict(learning_rate=0.01, batch_size=4, nimg_per_epoch=8, bsize=64)


def test_volume_slices_cover_three_orientations_with_z_resampled(volume):
    image, labels = volume
    s = volume_slices(image[::2], labels[::2], anisotropy=2.0, n_per_axis=3, nchan=2,
                      source="v")
    kinds = {x.source.split(":")[1][0] for x in s}
    assert kinds == {"Z", "Y", "X"}
    zy = next(x for x in s if ":Y=" in x.source)
    assert zy.image.shape == (2, 24, 64)  # 12 planes at anisotropy 2 -> 24 rows, like XY
    assert zy.flows.shape == (2, 24, 64) and np.all(zy.image[1] == 0)  # no 2nd channel given
    for x in s:  # the stored flows are the plane's own unit flows
        np.testing.assert_allclose(x.flows, masks_to_flows(x.masks), atol=1e-6)


def test_augmented_flows_match_flows_of_augmented_masks(samples):
    rng = np.random.default_rng(3)
    cosines = []
    for i in range(12):
        img, m, f = augment(samples[i % len(samples)], rng, 30.0, 2, 96)
        assert img.shape == (2, 96, 96) and m.shape == (96, 96) and f.shape == (2, 96, 96)
        g = masks_to_flows(m)
        cut = np.unique(np.concatenate([m[0], m[-1], m[:, 0], m[:, -1]]))
        fg = (m > 0) & ~np.isin(m, cut)  # objects cut by the crop have another centre
        dot = (f * g).sum(0)[fg] / (np.linalg.norm(f, axis=0)[fg] * np.linalg.norm(g, axis=0)[fg]
                                    + 1e-6)
        cosines.append(np.median(dot) if fg.any() else 1.0)
        assert not f[:, m == 0].any()
    # rotated/flipped precomputed flows point where flows of the rotated masks point
    assert min(cosines) > 0.95 and sum(c < 1.0 for c in cosines) >= 8


@pytest.fixture(scope="module")
def trained(samples, tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("trained") / "tiny.pth"
    losses = []
    result = train(_net(), samples, samples[:3], save_path=path, n_epochs=6,
                   on_epoch=lambda e, tr, te: losses.append(tr), **KW)
    return result, losses


def test_short_training_lowers_loss_and_model_segments(trained, samples, volume):
    image, labels = volume
    result, losses = trained
    assert len(losses) == 6 and np.mean(losses[-2:]) < 0.85 * losses[0]
    assert result.test_losses[-1] is not None
    model = load_model(result.model_path)
    assert model.diam_labels == pytest.approx(np.mean([s.diameter for s in samples]), rel=1e-3)
    assert model.diam_mean == 30.0
    meta = json.loads(result.model_path.with_suffix(".pth.json").read_text())
    assert meta["epochs"] == 6 and len(meta["train_losses"]) == 6 and meta["nbase"] == TINY
    out = segment(image[:8], model, diameter=30.0)
    assert out.masks.shape == labels[:8].shape


def test_resume_continues_exactly_where_it_stopped(trained, samples, tmp_path):
    full, _ = trained
    calls = []

    def crash_after_epoch_1(epoch, tr, te):
        calls.append(epoch)
        if epoch == 1:
            raise KeyboardInterrupt  # the machine went down after epoch 1

    with pytest.raises(KeyboardInterrupt):
        train(_net(), samples, samples[:3], n_epochs=6, save_path=tmp_path / "b.pth",
              on_epoch=crash_after_epoch_1, **KW)
    assert (tmp_path / "b.pth.ckpt").exists() and not (tmp_path / "b.pth").exists()
    resumed = train(_net(), samples, samples[:3], n_epochs=6, save_path=tmp_path / "b.pth",
                    resume=True, on_epoch=lambda e, tr, te: calls.append(e), **KW)
    assert calls == [0, 1, 2, 3, 4, 5]
    assert resumed.epochs_done == 6 and len(resumed.train_losses) == 6
    # same data order, augmentation, weights and optimizer state as the uninterrupted run
    np.testing.assert_allclose(resumed.train_losses, full.train_losses, rtol=1e-3)


def test_batch_workers_build_the_same_batches(samples):
    """Batches built ahead in forked workers (for GPUs) are those built in the training
    process, in the same order, and a lone leftover plane is dropped (BatchNorm needs 2)."""
    order = np.random.default_rng(1).permutation(len(samples))[:9]
    with BatchSource(samples, 30.0, 2, 64, seed=3) as here, \
            BatchSource(samples, 30.0, 2, 64, seed=3, workers=2) as ahead:
        assert ahead.loader is not None
        for epoch in (0, 1):
            mine = list(here.batches(epoch, order, 4))
            theirs = list(ahead.batches(epoch, order, 4))
            assert [b for b, *_ in mine] == [b for b, *_ in theirs] == [0, 4]
            for (_, img, tgt), (_, img2, tgt2) in zip(mine, theirs):
                np.testing.assert_array_equal(img, img2)
                np.testing.assert_array_equal(tgt, tgt2)
        assert not np.array_equal(mine[0][1], list(here.batches(0, order, 4))[1][1])
    assert ahead.loader is None


def test_training_with_batch_workers_matches_training_without(trained, samples):
    full, _ = trained
    ahead = train(_net(), samples, samples[:3], n_epochs=6, workers=2, **KW)
    np.testing.assert_allclose(ahead.train_losses, full.train_losses, rtol=1e-4)
    # a run stopped mid-way (the time budget of scripts/train_bundled.py) ends its workers
    # and returns (a first multiprocessing.Pool version hung there, in the smoke run)
    token = CancelToken()
    with pytest.raises(Cancelled):
        train(_net(), samples, n_epochs=6, workers=2, cancel=token,
              on_epoch=lambda e, tr, te: token.cancel(), **KW)


def test_cancel_stops_between_batches_and_keeps_checkpoint(samples, tmp_path):
    token = CancelToken()

    def cancel_after_first(epoch, tr, te):
        token.cancel()

    with pytest.raises(Cancelled):
        train(_net(), samples, n_epochs=3, save_path=tmp_path / "c.pth", cancel=token,
              on_epoch=cancel_after_first, **KW)
    ck = torch.load(tmp_path / "c.pth.ckpt", weights_only=True)
    assert ck["epoch"] == 0 and len(ck["train_losses"]) == 1


def test_fine_tune_from_saved_model_with_validation_split(volume, tmp_path):
    image, labels = volume
    base = _net()
    base.diam_mean.data[:] = 17.0
    save_model(base, tmp_path / "base.pth")
    pairs = [TrainingPair(image[:12], labels[:12], 1.0, "top"),
             TrainingPair(image[12:20, :48, :48], labels[12:20, :48, :48], 1.0, "bottom")]
    result = train_model(pairs, save_path=tmp_path / "ft.pth", pretrained_model=tmp_path /
                         "base.pth", val_fraction=0.5, n_per_axis=3, min_train_masks=2,
                         n_epochs=2, **KW)
    meta = json.loads((tmp_path / "ft.pth.json").read_text())
    assert len(meta["train_images"]) == 1 and len(meta["test_images"]) == 1
    assert meta["diam_mean"] == 17.0  # the pretrained network's own size is kept
    assert len(meta["metrics"]["ap"]) == 1 and len(meta["metrics"]["mean_ap"]) == 3
    assert load_model(result.model_path).diam_mean == 17.0


def test_bad_training_input_is_refused_by_name(tmp_path):
    img = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    one = np.zeros((32, 32), np.uint16)
    one[5:15, 5:15] = 1
    with pytest.raises(TrainingError, match="differ"):
        make_sample(img, np.zeros((30, 32), np.uint16))
    with pytest.raises(TrainingError, match="img7.tif: .*differ"):
        volume_slices(np.zeros((4, 32, 32)), np.zeros((4, 30, 32), np.int32), source="img7.tif")
    with pytest.raises(TrainingError, match="empty"):
        make_sample(img, np.zeros((32, 32), np.uint16))
    with pytest.raises(TrainingError, match="no training images"):
        train(_net(), [], n_epochs=1)
    with pytest.raises(TrainingError, match="no training images"):
        train_model([], save_path=tmp_path / "x.pth")
    with pytest.raises(TrainingError, match="validation split needs at least 2 images"):
        split_validation([TrainingPair(img[None], one[None])], 0.2)
    with pytest.raises(TrainingError, match="at least 5 masks"):
        train_model([TrainingPair(img[None], one[None], source="sparse.tif")],
                    save_path=tmp_path / "x.pth", nbase=TINY, min_train_masks=5)
    with pytest.raises(TrainingError, match="no checkpoint"):
        train(_net(), [make_sample(img, one)], n_epochs=1, resume=True,
              checkpoint_path=tmp_path / "none.ckpt")
    with pytest.raises(TrainingError, match="channels"):
        train(_net(), [make_sample(np.stack([img] * 3), one)], n_epochs=1)


def test_learning_rate_schedule_is_cellposes():
    lr = learning_rates(0.1, 400)
    assert lr[0] == pytest.approx(0.01) and lr[9] == pytest.approx(0.1)
    assert np.all(lr[10:300] == 0.1)  # flat, then ten halvings over the last 100 epochs
    assert lr[300] == pytest.approx(0.05) and lr[-1] == pytest.approx(0.1 / 1024)
    assert learning_rates(0.1, 200)[150] == pytest.approx(0.05)  # last 50 for 100 < n <= 300
    assert np.all(learning_rates(0.1, 100)[10:] == 0.1)


def test_median_diameter_of_disks():
    yy, xx = np.mgrid[:100, :100]
    masks = np.zeros((100, 100), np.int32)
    masks[(yy - 30) ** 2 + (xx - 30) ** 2 <= 10**2] = 1
    masks[(yy - 70) ** 2 + (xx - 70) ** 2 <= 10**2] = 2
    assert median_diameter(masks) == pytest.approx(20, rel=0.05)


def test_cli_trains_from_folder_into_user_models(volume, tmp_path, monkeypatch, capsys):
    image, labels = volume
    data = tmp_path / "data"
    data.mkdir()
    for k, sl in enumerate((slice(0, 12), slice(12, 24))):
        tifffile.imwrite(data / f"vol{k}.tif", image[sl])
        tifffile.imwrite(data / f"vol{k}_masks.tif", labels[sl].astype(np.uint16))
    tifffile.imwrite(data / "lonely.tif", image[:4])  # no masks: skipped with a warning
    tifffile.imwrite(data / "blank.tif", image[:4])  # all its masks deleted: skipped too
    tifffile.imwrite(data / "blank_masks.tif", np.zeros((4, 64, 64), np.uint16))
    users = tmp_path / "user_models"
    monkeypatch.setenv("CP3D_USER_MODELS", str(users))
    save_model(_net(), tmp_path / "tiny.pth")
    argv = ["--dir", str(data), "--pretrained_model", str(tmp_path / "tiny.pth"),
            "--n_epochs", "2", "--batch_size", "4", "--bsize", "64", "--nimg_per_epoch", "8",
            "--learning_rate", "0.01", "--min_train_masks", "2", "--n_per_axis", "2",
            "--model_name_out", "mine", "--anisotropy", "1"]
    assert train_main(argv) == 0
    assert (users / "mine.pth").exists() and (users / "mine.pth.json").exists()
    assert load_model("mine").path == users / "mine.pth"  # found by name, as the GUI lists it
    out = capsys.readouterr()
    assert "saved" in out.out and "skipped" in out.err and "blank_masks.tif: no masks" in out.err
    assert train_main(argv[:-4] + ["--model_name_out", "mine", "--n_epochs", "3",
                                   "--resume"]) == 0
    assert json.loads((users / "mine.pth.json").read_text())["epochs"] == 3
    # errors are one line naming the problem, exit status 1
    (tmp_path / "empty").mkdir()
    assert train_main(["--dir", str(tmp_path / "empty")]) == 1
    assert "no images with masks" in capsys.readouterr().err
    tifffile.imwrite(data / "vol0_masks.tif", labels[:10].astype(np.uint16))
    assert train_main(argv) == 1
    assert "vol0_masks.tif: mask shape" in capsys.readouterr().err


def test_cli_reads_seg_npy_annotations(volume, tmp_path):
    from cp3d.core.train_cli import find_training_pairs, read_pairs

    image, labels = volume
    tifffile.imwrite(tmp_path / "a.tif", image[:6])
    np.save(tmp_path / "a_seg.npy", {"masks": labels[:6].astype(np.uint16)}, allow_pickle=True)
    tifffile.imwrite(tmp_path / "b.tif", image[:6])  # not annotated
    pairs = find_training_pairs(tmp_path, mask_filter="_seg.npy")
    assert [p[0].name for p in pairs] == ["a.tif"]
    (pair,) = read_pairs(pairs, anisotropy=2.0)
    assert pair.image.shape == (6, 1, 64, 64) and pair.anisotropy == 2.0
    np.testing.assert_array_equal(pair.masks, labels[:6])


def test_read_pairs_says_when_it_assumes_the_z_step(volume, tmp_path, capsys):
    """A volume without a voxel size is read at anisotropy 1, and the user is told so."""
    from cp3d.core.train_cli import read_pairs

    image, labels = volume
    tifffile.imwrite(tmp_path / "a.tif", image[:6])
    tifffile.imwrite(tmp_path / "a_masks.tif", labels[:6].astype(np.uint16))
    (pair,) = read_pairs([(tmp_path / "a.tif", tmp_path / "a_masks.tif")])
    assert pair.anisotropy == 1.0
    assert "a.tif: no voxel size" in capsys.readouterr().err
    (pair,) = read_pairs([(tmp_path / "a.tif", tmp_path / "a_masks.tif")], anisotropy=2.5)
    assert pair.anisotropy == 2.5 and capsys.readouterr().err == ""
    tifffile.imwrite(tmp_path / "b.tif", image[:6], imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"spacing": 1.5, "unit": "um", "axes": "ZYX"})
    (pair,) = read_pairs([(tmp_path / "b.tif", tmp_path / "a_masks.tif")])
    assert pair.anisotropy == pytest.approx(3.0) and capsys.readouterr().err == ""
