"""Finding, loading and saving models: round trips, Cellpose files, and the errors users see."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from cp3d.core import models
from cp3d.core.errors import ModelError
from cp3d.core.models import (Model, list_models, load_model, load_state_dict, pick_device,
                              read_metadata, save_model, user_models_dir)
from cp3d.core.net import CPnet

FIXTURES = Path(__file__).parent / "fixtures"
CELLPOSE_PTH = FIXTURES / "cpnet_random_state.pth"


@pytest.fixture
def dirs(tmp_path, monkeypatch):
    """Empty bundled and user model folders."""
    bundled, user = tmp_path / "bundled", tmp_path / "user"
    bundled.mkdir()
    monkeypatch.setattr(models, "bundled_models_dir", lambda: bundled)
    monkeypatch.setenv("CP3D_USER_MODELS", str(user))
    return bundled, user


def small_net(seed=0, nbase=(2, 8, 16, 32)) -> CPnet:
    torch.manual_seed(seed)
    net = CPnet(list(nbase), 3, 3, diam_mean=30.0)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 1.5)
        net.diam_labels.fill_(12.5)
    return net.eval()


def expect_error(target, *fragments):
    with pytest.raises(ModelError) as info:
        load_model(target)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


@pytest.mark.parametrize("half", [False, True])
def test_save_load_round_trip(tmp_path, half):
    net = small_net()
    path = save_model(net, tmp_path / "m.pth", metadata={"epochs": 3, "nbase": net.nbase},
                      half=half)
    back = load_model(path)
    assert back.name == "m" and back.path == path and back.nchan == 2
    assert back.diam_mean == 30.0 and back.diam_labels == 12.5
    assert all(p.dtype == torch.float32 for p in back.net.state_dict().values()
               if p.is_floating_point())
    x = np.random.default_rng(0).normal(size=(2, 2, 32, 24)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))[0].numpy()
    out, style = back.predict(x)
    assert out.shape == (2, 3, 32, 24) and style.shape == (2, 32)
    assert np.abs(out - ref).max() < (1e-2 * max(1.0, np.abs(ref).max()) if half else 1e-5)
    saved = torch.load(path, weights_only=True)
    assert set(saved) == set(net.state_dict())  # Cellpose's keys, nothing added
    assert saved["diam_labels"].dtype == torch.float32
    assert saved["output.2.weight"].dtype == (torch.float16 if half else torch.float32)
    assert read_metadata(path) == {"epochs": 3, "nbase": [2, 8, 16, 32]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth", "m.pth.json"]  # no temp files


def test_half_file_is_about_half_the_size(tmp_path):
    net = small_net(nbase=(2, 16, 32, 64))
    full = save_model(net, tmp_path / "full.pth").stat().st_size
    half = save_model(net, tmp_path / "half.pth", half=True).stat().st_size
    assert half < 0.6 * full


def test_save_replaces_an_existing_file(tmp_path):
    path = save_model(small_net(seed=0), tmp_path / "m.pth", metadata={"old": 1})
    save_model(small_net(seed=1), path)
    loaded = load_model(path).net.state_dict()["output.2.weight"]
    assert torch.equal(loaded, small_net(seed=1).state_dict()["output.2.weight"])
    assert read_metadata(path) == {}


def test_cellpose_file_loads_with_architecture_and_diameters():
    model = load_model(CELLPOSE_PTH)
    assert model.net.nbase == [2, 8, 16, 32, 64] and model.nchan == 2
    assert model.diam_mean == pytest.approx(17.0) and model.diam_labels == pytest.approx(21.5)
    assert not model.net.training and model.device == torch.device("cpu")
    ref = np.load(FIXTURES / "cpnet_parity.npz")
    out, style = model.predict(ref["x"])
    assert np.abs(out - ref["y"]).max() < 1e-4
    assert np.abs(style - ref["style"]).max() < 1e-4


def test_cellpose_file_without_suffix_loads_by_path(tmp_path):
    """Cellpose's own model files have no suffix (e.g. ``nucleitorch_0``)."""
    target = tmp_path / "nucleitorch_0"
    target.write_bytes(CELLPOSE_PTH.read_bytes())
    model = load_model(str(target))
    assert model.name == "nucleitorch_0" and model.net.nbase == [2, 8, 16, 32, 64]


def test_model_reads_defaults_from_net():
    net = small_net()
    model = Model(net=net, name="fresh")
    assert (model.diam_mean, model.diam_labels, model.nchan) == (30.0, 12.5, 2)
    assert model.device == torch.device("cpu")
    with pytest.raises(ValueError):
        model.predict(np.zeros((1, 3, 16, 16), np.float32))


def test_training_checkpoint_and_dataparallel_files_load(tmp_path):
    net = small_net()
    torch.save({"state_dict": net.state_dict(), "epoch": 4, "optimizer": {}}, tmp_path / "ck.pth")
    assert set(load_state_dict(tmp_path / "ck.pth")) == set(net.state_dict())
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, tmp_path / "dp.pth")
    assert load_model(tmp_path / "dp.pth").diam_labels == 12.5


def test_missing_files_and_names(dirs, tmp_path):
    bundled, user = dirs
    save_model(small_net(), bundled / "shipped.pth")
    expect_error(tmp_path / "nope.pth", "nope.pth", "not found", "shipped")
    expect_error("no_such_model", "no_such_model", "available: shipped")
    expect_error(tmp_path, "is a folder")


def test_default_model_missing_is_a_clear_error(dirs):
    msg = expect_error(None, "cp3d_nuclei", "not bundled")
    assert str(dirs[0]) in msg


def test_default_model_is_the_bundled_one(dirs):
    save_model(small_net(), dirs[0] / "cp3d_nuclei.pth", half=True)
    model = load_model(None)
    assert model.name == "cp3d_nuclei" and model.path.parent == dirs[0]
    assert model.net.output[2].weight.dtype == torch.float32


@pytest.mark.parametrize("content, expect", [
    (b"", "empty"),
    (b"not a torch file at all", "not a PyTorch model file"),
    (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a PyTorch model file"),
    ("truncated", "truncated or corrupt"),
])
def test_unreadable_files_are_named(tmp_path, content, expect):
    path = tmp_path / "bad.pth"
    if content == "truncated":
        good = CELLPOSE_PTH.read_bytes()
        content = good[: len(good) // 2]
    path.write_bytes(content)
    expect_error(path, str(path), expect)


class NotATensor:
    pass


def test_files_with_other_objects_are_refused(tmp_path):
    torch.save({"net": NotATensor()}, tmp_path / "pickled.pth")
    expect_error(tmp_path / "pickled.pth", "pickled.pth", "refused", "NotATensor")
    torch.save([1, 2, 3], tmp_path / "list.pth")
    expect_error(tmp_path / "list.pth", "list.pth", "not a network state dict")


def test_foreign_networks_are_named(tmp_path):
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "resnet.pth")
    expect_error(tmp_path / "resnet.pth", "resnet.pth", "not a Cellpose/cp3d network")
    torch.save({"encoder.pos_embed": torch.zeros(1), "W2": torch.zeros(1), "out.weight":
                torch.zeros(1)}, tmp_path / "cpsam")
    expect_error(tmp_path / "cpsam", "cpsam", "Cellpose 4")
    restore = CPnet([2, 8, 16], 1, 3)  # Cellpose 3 image restoration nets have one output
    torch.save(restore.state_dict(), tmp_path / "denoise.pth")
    expect_error(tmp_path / "denoise.pth", "denoise.pth", "1 outputs")
    state = small_net().state_dict()
    del state["upsample.up.res_up_1.conv.conv_2.full.bias"]
    torch.save(state, tmp_path / "partial.pth")
    expect_error(tmp_path / "partial.pth", "partial.pth", "do not match",
                 "res_up_1.conv.conv_2.full.bias")


def test_user_models_by_name_and_listing(dirs):
    bundled, user = dirs
    assert user_models_dir() == user
    save_model(small_net(), bundled / "shipped.pth")
    save_model(small_net(seed=1), user / "mine.pth", metadata={"note": "trained"})
    save_model(small_net(seed=2), user / "shipped.pth")  # a bundled name wins
    (user / "notes.txt").write_text("not a model")
    found = [(m.name, m.bundled) for m in list_models()]
    assert found == [("shipped", True), ("mine", False), ("shipped", False)]
    mine = load_model("mine")
    assert mine.name == "mine" and mine.path == user / "mine.pth"
    assert load_model("shipped").path == bundled / "shipped.pth"


def test_user_models_dir_default_is_per_user(monkeypatch):
    monkeypatch.delenv("CP3D_USER_MODELS", raising=False)
    import platformdirs

    path = user_models_dir()
    assert path.name == "models"
    assert path.parent == Path(platformdirs.user_data_dir("cp3d", appauthor=False))


def test_pick_device(monkeypatch, caplog):
    assert pick_device(False) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING, logger="cp3d"):
        assert pick_device(True) == torch.device("cpu")
    assert "GPU" in caplog.text
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device(True) == torch.device("cuda")


def test_metadata_sidecar_is_json(tmp_path):
    path = save_model(small_net(), tmp_path / "m.pth", metadata={"path": tmp_path, "n": 1})
    assert json.loads((tmp_path / "m.pth.json").read_text()) == {"path": str(tmp_path), "n": 1}
    assert read_metadata(path)["n"] == 1


def test_cellprob_shift_makes_threshold_zero_act_as_the_chosen_one():
    from cp3d.core.inference import predict_3d

    net = small_net(seed=3)
    rng = np.random.default_rng(0)
    vol = rng.normal(0, 1, (2, 6, 24, 24)).astype(np.float32)
    dP0, cp0 = predict_3d(net, vol, torch.device("cpu"), anisotropy=2.0)
    shift = models.shift_cellprob_threshold(net, -1.5)
    dP1, cp1 = predict_3d(net, vol, torch.device("cpu"), anisotropy=2.0)
    assert shift == pytest.approx(0.5)
    np.testing.assert_allclose(cp1, cp0 + 1.5, atol=1e-4)  # 3 views, each +0.5
    np.testing.assert_allclose(dP1, dP0, atol=1e-6)
    assert ((cp1 > 0) == (cp0 > -1.5)).mean() > 0.9999


def test_bundled_nuclei_model_has_cellpose_keys_and_widths():
    """The default model has the state-dict keys of Cellpose 3's CPnet (the fixture it wrote) and
    the widths its CellposeModel builds, so Cellpose loads it; the fast one is the narrow net."""
    theirs = torch.load(CELLPOSE_PTH, weights_only=True)
    for name, nbase in (("cp3d_nuclei", [2, 32, 64, 128, 256]),
                        ("cp3d_nuclei_fast", [2, 16, 32, 64, 128])):
        model = load_model(name)
        assert set(load_state_dict(model.path)) == set(theirs)
        assert model.net.nbase == nbase and model.path.parent == models.bundled_models_dir()
