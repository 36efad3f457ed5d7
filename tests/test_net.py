"""CPnet is weight-compatible with Cellpose 3. The fixtures were written by Cellpose 3.1.1.2's own
CPnet (random weights, randomised batch-norm statistics) with its inputs and outputs; see
tests/fixtures/cpnet_fixture.json for the recipe."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cp3d.core.net import CPnet, architecture_from_state_dict, widen

FIXTURES = Path(__file__).parent / "fixtures"
META = json.loads((FIXTURES / "cpnet_fixture.json").read_text())


def cellpose_net() -> CPnet:
    state = torch.load(FIXTURES / "cpnet_random_state.pth", weights_only=True)
    net = CPnet(META["nbase"], 3, 3)
    assert set(net.state_dict()) == set(state)
    net.load_state_dict(state, strict=True)
    return net.eval()


def randomise_bn(net: CPnet, seed: int = 0) -> CPnet:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
    return net


# (fold_bn, channels_last, grad): grad=True forces the plain module path
MODES = {"modules": (False, False, True), "modules-channels-last": (False, True, False),
         "folded": (True, False, False), "folded-channels-last": (True, True, False)}


@pytest.mark.parametrize("mode", MODES)
def test_outputs_match_cellpose(mode):
    net = cellpose_net()
    net.fold_bn, net.channels_last, grad = MODES[mode]
    ref = np.load(FIXTURES / "cpnet_parity.npz")
    ctx = torch.enable_grad() if grad else torch.inference_mode()
    with ctx:
        y, style = net(torch.from_numpy(ref["x"]))
    assert y.shape == ref["y"].shape == (2, 3, 64, 48)
    assert y.is_contiguous()
    assert np.abs(y.detach().numpy() - ref["y"]).max() < 1e-4
    assert np.abs(style.detach().numpy() - ref["style"]).max() < 1e-4


def test_training_mode_matches_cellpose_batch_statistics():
    """In train mode BN uses batch statistics and updates running stats (momentum 0.05)."""
    net = cellpose_net().train()
    ref = np.load(FIXTURES / "cpnet_parity.npz")
    ref_t = np.load(FIXTURES / "cpnet_parity_train.npz")
    with torch.no_grad():
        y, style = net(torch.from_numpy(ref["x"]))
    assert np.abs(y.numpy() - ref_t["y"]).max() < 1e-4
    assert np.abs(style.numpy() - ref_t["style"]).max() < 1e-4
    bn = net.downsample.down.res_down_0.conv.conv_0[0]
    assert np.allclose(bn.running_mean.numpy(), ref_t["running_mean_res_down_0_conv_0"], atol=1e-6)
    assert np.allclose(bn.running_var.numpy(), ref_t["running_var_res_down_0_conv_0"], atol=1e-6)


def test_full_size_network_has_cellpose_keys_and_shapes():
    ref = json.loads((FIXTURES / "cpnet_full_keys.json").read_text())["shapes"]
    net = CPnet([2, 32, 64, 128, 256], 3, 3)
    shapes = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert shapes == ref
    assert architecture_from_state_dict(net.state_dict()) == {
        "nbase": [2, 32, 64, 128, 256], "nout": 3, "sz": 3}
    assert net.divisor == 8
    with torch.inference_mode():
        y, style = net.eval()(torch.zeros(1, 2, 32, 48))
    assert y.shape == (1, 3, 32, 48) and style.shape == (1, 256)


def test_folded_path_equals_modules_on_full_size_net():
    torch.manual_seed(1)
    net = randomise_bn(CPnet([2, 32, 64, 128, 256], 3, 3)).eval()
    x = torch.randn(2, 2, 32, 40)
    with torch.no_grad():
        net.fold_bn, net.channels_last = False, False
        ref, ref_style = net(x)
        net.fold_bn, net.channels_last = True, True
        y, style = net(x)
    scale = max(1.0, float(ref.abs().max()))
    assert float((y - ref).abs().max()) < 1e-4 * scale
    assert float((style - ref_style).abs().max()) < 1e-5
    assert torch.allclose(style.norm(dim=1), torch.ones(2))


def test_folded_weights_follow_weight_changes():
    """The folded copy is rebuilt after an in-place update, a load or a move."""
    torch.manual_seed(2)
    net = randomise_bn(CPnet([2, 8, 16], 3, 3)).eval()
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        before = net(x)[0].clone()
        net.upsample.up.res_up_0.conv.conv_3.conv[2].weight.mul_(2.0)  # optimizer-style step
        net.downsample.down.res_down_0.conv.conv_1[0].running_var.add_(1.0)
        after = net(x)[0]
        net.fold_bn = False
        plain = net(x)[0]
    assert float((after - before).abs().max()) > 1e-3
    assert float((after - plain).abs().max()) < 1e-5
    other = randomise_bn(CPnet([2, 8, 16], 3, 3), seed=5).eval()
    net.fold_bn = True
    net.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert float((net(x)[0] - other(x)[0]).abs().max()) < 1e-5


def test_gradients_flow_in_eval_mode_with_grad_enabled():
    net = CPnet([2, 8, 16], 3, 3).eval()
    x = torch.randn(1, 2, 16, 16, requires_grad=True)
    y, _ = net(x)
    y.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    assert net.output[2].weight.grad is not None


def test_average_pooling_variant():
    torch.manual_seed(3)
    net = CPnet([2, 8, 16], 3, 3, max_pool=False).eval()
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        folded = net(x)[0]
        net.fold_bn = False
        plain = net(x)[0]
        net.downsample.maxpool = torch.nn.MaxPool2d(2, 2)
        maxpooled = net(x)[0]
    assert float((folded - plain).abs().max()) < 1e-5
    assert float((maxpooled - plain).abs().max()) > 1e-4


def test_folded_copy_built_in_inference_mode_serves_no_grad_calls():
    net = CPnet([2, 8, 16], 3, 3).eval()
    x = torch.randn(1, 2, 16, 16)
    with torch.inference_mode():
        a = net(x)[0]
    with torch.no_grad():
        b = net(x)[0]
    assert torch.equal(a, b)


def test_widen_keeps_the_function_and_gives_cellpose_widths():
    """A narrow net widened to Cellpose's widths computes the same flows and probability."""
    torch.manual_seed(2)
    narrow = randomise_bn(CPnet([2, 16, 32, 64, 128], 3, 3, diam_mean=17.0), seed=3).eval()
    with torch.no_grad():
        narrow.diam_labels.fill_(21.5)
    wide = widen(narrow, [2, 32, 64, 128, 256]).eval()
    assert architecture_from_state_dict(wide.state_dict())["nbase"] == [2, 32, 64, 128, 256]
    assert float(wide.diam_mean) == 17.0 and float(wide.diam_labels) == 21.5
    x = torch.randn(2, 2, 48, 40)
    with torch.no_grad():
        ref, ref_style = narrow(x)
        y, style = wide(x)
        wide.fold_bn = False
        y_modules, _ = wide(x)
    scale = float(ref.abs().max())
    assert float((y - ref).abs().max()) < 1e-4 * scale
    assert float((y_modules - ref).abs().max()) < 1e-4 * scale
    # the style vector is the narrow one copied twice, each copy scaled by 1/sqrt(2)
    assert torch.allclose(style, torch.cat([ref_style] * 2, dim=1) / 2 ** 0.5, atol=1e-5)
    # noise makes the copies differ, and moves the outputs only a little
    noisy = widen(narrow, [2, 32, 64, 128, 256], noise=0.01).eval()
    w = noisy.downsample.down.res_down_0.conv.conv_0[2].weight
    assert not torch.equal(w[:16], w[16:])
    with torch.no_grad():
        y_noisy, _ = noisy(x)
    change = float((y_noisy - ref).abs().max())
    assert 0 < change < 0.1 * scale


def test_widen_refuses_widths_that_are_not_multiples():
    with pytest.raises(ValueError, match="multiple"):
        widen(CPnet([2, 16, 32, 64, 128], 3, 3), [2, 24, 48, 96, 192])
    with pytest.raises(ValueError, match="input channels"):
        widen(CPnet([2, 16, 32, 64, 128], 3, 3), [1, 32, 64, 128, 256])
