"""CPnet is weight-compatible with Cellpose 3: the fixture was written by Cellpose 3.1.1.2's own
CPnet (random weights, randomised batch-norm statistics) with its inputs and outputs."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cp3d.core.errors import ModelError
from cp3d.core.models import load_model, load_state_dict, save_model
from cp3d.core.net import CPnet

FIXTURES = Path(__file__).parent / "fixtures"


def test_cellpose_state_dict_loads_with_identical_keys_and_outputs():
    state = torch.load(FIXTURES / "cpnet_random_state.pth", weights_only=True)
    net = CPnet([2, 8, 16, 32, 64], 3, 3)
    assert set(net.state_dict()) == set(state)
    net.load_state_dict(state, strict=True)
    net.eval()
    ref = np.load(FIXTURES / "cpnet_parity.npz")
    with torch.no_grad():
        y, style = net(torch.from_numpy(ref["x"]))
    assert np.abs(y.numpy() - ref["y"]).max() < 1e-4
    assert np.abs(style.numpy() - ref["style"]).max() < 1e-4


def test_load_model_reads_architecture_and_diameters_from_file():
    model = load_model(FIXTURES / "cpnet_random_state.pth")
    assert model.net.nbase == [2, 8, 16, 32, 64]
    assert model.diam_mean == pytest.approx(17.0) and model.diam_labels == pytest.approx(21.5)
    ref = np.load(FIXTURES / "cpnet_parity.npz")
    out, _ = model.predict(ref["x"])
    assert np.abs(out - ref["y"]).max() < 1e-4


def test_default_size_network_shapes():
    net = CPnet([2, 32, 64, 128, 256], 3, 3).eval()
    with torch.no_grad():
        y, style = net(torch.zeros(1, 2, 64, 64))
    assert y.shape == (1, 3, 64, 64) and style.shape == (1, 256)
    assert sum(p.numel() for p in net.parameters()) > 4_000_000


@pytest.mark.parametrize("half", [False, True])
def test_save_load_round_trip(tmp_path, half):
    torch.manual_seed(0)
    net = CPnet([2, 8, 16, 32], 3, 3, diam_mean=30.0).eval()
    path = save_model(net, tmp_path / "m.pth", metadata={"epochs": 3}, half=half)
    back = load_model(path)
    x = np.random.default_rng(0).normal(size=(1, 2, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = net(torch.from_numpy(x))[0].numpy()
    out, _ = back.predict(x)
    assert np.abs(out - ref).max() < (2e-2 if half else 1e-6)
    assert (tmp_path / "m.pth.json").exists()
    assert set(torch.load(path, weights_only=True)) == set(net.state_dict())


@pytest.mark.parametrize("content, expect", [
    (b"", "not a readable model file"),
    (b"not a torch file at all", "not a readable model file"),
])
def test_corrupt_model_files_are_named(tmp_path, content, expect):
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        load_model(path)
    assert "bad.pth" in str(info.value) and expect in str(info.value)


def test_truncated_and_foreign_state_dicts(tmp_path):
    good = (FIXTURES / "cpnet_random_state.pth").read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelError, match="cut.pth"):
        load_model(cut)
    foreign = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(3, 3)}, foreign)
    with pytest.raises(ModelError, match="not a Cellpose/cp3d network"):
        load_model(foreign)


def test_missing_model_lists_what_exists(tmp_path, monkeypatch):
    monkeypatch.setenv("CP3D_USER_MODELS", str(tmp_path))
    save_model(CPnet([2, 8, 16], 3, 3), tmp_path / "mine.pth")
    assert load_model("mine").name == "mine"
    with pytest.raises(ModelError, match="mine"):
        load_model("does_not_exist")
    with pytest.raises(ModelError, match="nope.pth"):
        load_model(tmp_path / "nope.pth")


def test_checkpoint_dict_with_state_dict_loads(tmp_path):
    net = CPnet([2, 8, 16], 3, 3)
    torch.save({"state_dict": net.state_dict(), "epoch": 4}, tmp_path / "ck.pth")
    assert set(load_state_dict(tmp_path / "ck.pth")) == set(net.state_dict())
