"""The Cellpose U-Net ("CPnet"), weight-compatible with Cellpose 2 and 3.

Module names, and so state-dict keys, follow Cellpose's exactly (``downsample.down.res_down_0
.conv.conv_0.0.weight``, ``upsample.up.res_up_0.conv.conv_1.full.weight``, ``output.2.weight``,
``diam_mean``, ``diam_labels``...), so a ``.pth`` saved by Cellpose loads here, and ours loads in
Cellpose when its widths are Cellpose's (``nbase`` 2-32-64-128-256, the only ones Cellpose's
``CellposeModel`` builds; :func:`widen` turns a narrower network into one of those).

Structure: residual down blocks (two pairs of BN-ReLU-conv, with a BN + 1x1 conv projection on
the skip), max-pooling between levels; a "style" vector, the L2-normalised global average of
the deepest features, is added (through a Linear layer) before the convolutions of the up
blocks; nearest-neighbour upsampling; a BN-ReLU-1x1 conv head giving (flow Y, flow X, cell
probability logit).

Inference speed (eval mode with gradients off, e.g. under ``torch.inference_mode()``): the
network then runs an equivalent "folded" form, where every batch norm that sits next to a
convolution with nothing non-linear in between is merged into that convolution's weights, and
the remaining additions / ReLUs run in place. Tensors are kept channels-last on the CPU, which
oneDNN convolutions prefer. Both are plain re-arrangements of the same arithmetic (outputs agree
to ~1e-6 relative); ``net.fold_bn = False`` / ``net.channels_last = False`` turn them off.
Training (``net.train()``, or gradients on) always uses the ordinary modules.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-5
BN_MOMENTUM = 0.05


def bn_relu_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    """BatchNorm, ReLU, conv: indices 0, 1, 2 as in Cellpose's ``batchconv``."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, k, padding=k // 2),
    )


def bn_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    """BatchNorm then conv (no ReLU), Cellpose's ``batchconv0``: the residual projections."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.Conv2d(cin, cout, k, padding=k // 2),
    )


class ResDown(nn.Module):
    """x -> proj(x) + conv1(conv0(x)) = x1 -> x1 + conv3(conv2(x1))."""

    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Sequential()
        for t in range(4):
            self.conv.add_module(f"conv_{t}", bn_relu_conv(cin if t == 0 else cout, cout, k))
        self.proj = bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class Downsample(nn.Module):
    def __init__(self, nbase: Sequence[int], k: int, max_pool: bool = True):
        super().__init__()
        self.down = nn.Sequential()
        for n in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{n}", ResDown(nbase[n], nbase[n + 1], k))
        self.maxpool = nn.MaxPool2d(2, 2) if max_pool else nn.AvgPool2d(2, 2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for n, block in enumerate(self.down):
            x = block(x if n == 0 else self.maxpool(features[-1]))
            features.append(x)
        return features


class StyleConv(nn.Module):
    """BN-ReLU-conv whose input first receives the style vector (and optionally a skip)."""

    def __init__(self, cin: int, cout: int, style_channels: int, k: int):
        super().__init__()
        self.conv = bn_relu_conv(cin, cout, k)
        self.full = nn.Linear(style_channels, cout)

    def forward(self, style: torch.Tensor, x: torch.Tensor,
                skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class ResUp(nn.Module):
    """x -> proj(x) + conv1(conv0(x) + skip) = x1 -> x1 + conv3(conv2(x1)), convs 1-3 styled."""

    def __init__(self, cin: int, cout: int, style_channels: int, k: int):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", bn_relu_conv(cin, cout, k))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", StyleConv(cout, cout, style_channels, k))
        self.proj = bn_conv(cin, cout, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        x = self.proj(x) + self.conv[1](style, self.conv[0](x), skip)
        return x + self.conv[3](style, self.conv[2](style, x))


class Upsample(nn.Module):
    def __init__(self, nbase_up: Sequence[int], k: int):
        super().__init__()
        self.upsampling = nn.Upsample(scale_factor=2, mode="nearest")
        self.up = nn.Sequential()
        for n in range(1, len(nbase_up)):
            self.up.add_module(f"res_up_{n - 1}",
                               ResUp(nbase_up[n], nbase_up[n - 1], nbase_up[-1], k))

    def forward(self, style: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        # the deepest block takes the deepest features twice (as input and as skip)
        x = self.up[-1](features[-1], features[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = self.up[n](self.upsampling(x), features[n], style)
        return x


def make_style(deepest: torch.Tensor) -> torch.Tensor:
    """Global average of the deepest features, L2-normalised per image."""
    style = deepest.mean(dim=(2, 3))
    return style / torch.sum(style**2, dim=1, keepdim=True) ** 0.5


class CPnet(nn.Module):
    """U-Net with style vector. ``nbase`` = [input channels, widths of the levels...].

    ``forward(x)`` takes (N, nbase[0], H, W), H and W multiples of :attr:`divisor`, and returns
    ``(out, style)``: out is (N, nout, H, W) = (flow Y, flow X, cell probability logit), style
    is (N, nbase[-1]). (Cellpose's forward also returns the down-path features; nothing in cp3d
    uses them.)
    """

    def __init__(self, nbase: Sequence[int], nout: int = 3, sz: int = 3,
                 max_pool: bool = True, diam_mean: float = 30.0):
        super().__init__()
        self.nbase = [int(n) for n in nbase]
        self.nchan = self.nbase[0]
        self.nout = int(nout)
        self.sz = int(sz)
        self.max_pool = bool(max_pool)
        self.downsample = Downsample(self.nbase, self.sz, self.max_pool)
        nbase_up = self.nbase[1:] + [self.nbase[-1]]
        self.upsample = Upsample(nbase_up, self.sz)
        self.output = bn_relu_conv(nbase_up[0], self.nout, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        #: inference switches (see the module docstring); not part of the state dict
        self.fold_bn = True
        self.channels_last = True
        self._folded: Optional[_Folded] = None
        self._folded_key: Optional[tuple] = None

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(self.nbase) - 2)

    @property
    def device(self) -> torch.device:
        return self.diam_mean.device

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fast = not self.training and not torch.is_grad_enabled()
        if fast and self.channels_last and x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        if fast and self.fold_bn:
            out, style = self._folded_params().forward(x)
        else:
            features = self.downsample(x)
            style = make_style(features[-1])
            out = self.output(self.upsample(style, features))
        return out.contiguous(), style

    def _folded_params(self) -> "_Folded":
        """The folded weights, rebuilt whenever a parameter or buffer has changed."""
        tensors = list(self.parameters()) + list(self.buffers())
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors)
        key += (self.channels_last,)
        if self._folded is None or key != self._folded_key:
            with torch.no_grad():
                self._folded = _Folded(self)
            self._folded_key = key
        return self._folded

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half()...: drop folded copies
        self._folded, self._folded_key = None, None
        return super()._apply(fn, *args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Folded inference form. With BN(x) = s*x + t per channel (eval mode):
#   BN after a conv with no ReLU between:   conv' = (s * W, s * b + t)           (exact)
#   BN (no ReLU) before a 1x1, unpadded conv:  conv' = (W * s_in, b + W @ t)       (exact)
#   BN of (conv + per-image style term):    conv' = (s * W, s * b), then + (s * style + t)
# Every other op is the same one as in the modules above, done in place where the input is a
# temporary.
# ---------------------------------------------------------------------------------------------


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return s, bn.bias - bn.running_mean * s


class _Conv:
    """A conv's weights (possibly folded) in the memory layout the forward pass uses."""

    def __init__(self, conv: nn.Conv2d, channels_last: bool,
                 out_scale: Optional[torch.Tensor] = None,
                 out_shift: Optional[torch.Tensor] = None,
                 in_bn: Optional[nn.BatchNorm2d] = None):
        w, b = conv.weight.detach(), conv.bias.detach()
        if in_bn is not None:  # only valid for 1x1 convs without padding
            s, t = _bn_scale_shift(in_bn)
            b = b + w.flatten(1) @ t
            w = w * s[None, :, None, None]
        if out_scale is not None:
            w = w * out_scale[:, None, None, None]
            b = b * out_scale
        if out_shift is not None:
            b = b + out_shift
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.weight = w.contiguous(memory_format=fmt)
        self.bias = b.contiguous()
        self.padding = conv.padding

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=self.padding)


def _bn_relu(x: torch.Tensor, st: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """relu(s*x + t) into a new tensor (``x`` is still needed by the caller)."""
    return torch.addcmul(st[1], x, st[0]).relu_()


def _per_channel(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1, 1, 1) if v.dim() == 2 else v.reshape(1, -1, 1, 1)


class _FoldedDown:
    def __init__(self, block: ResDown, cl: bool):
        c = block.conv
        self.bn0 = tuple(map(_per_channel, _bn_scale_shift(c.conv_0[0])))
        self.conv0 = _Conv(c.conv_0[2], cl, *_bn_scale_shift(c.conv_1[0]))
        self.conv1 = _Conv(c.conv_1[2], cl)
        self.proj = _Conv(block.proj[1], cl, in_bn=block.proj[0])
        self.bn2 = tuple(map(_per_channel, _bn_scale_shift(c.conv_2[0])))
        self.conv2 = _Conv(c.conv_2[2], cl, *_bn_scale_shift(c.conv_3[0]))
        self.conv3 = _Conv(c.conv_3[2], cl)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(self.conv0(_bn_relu(x, self.bn0)).relu_())
        x1 += self.proj(x)
        out = self.conv3(self.conv2(_bn_relu(x1, self.bn2)).relu_())
        return out.add_(x1)


class _FoldedUp:
    def __init__(self, block: ResUp, cl: bool):
        c = block.conv
        self.bn0 = tuple(map(_per_channel, _bn_scale_shift(c.conv_0[0])))
        # BN of conv_1 sees conv_0's output + skip + style: scale folded into conv_0,
        # the skip is added scaled, the shift goes with the style term
        self.s1, self.t1 = _bn_scale_shift(c.conv_1.conv[0])
        self.conv0 = _Conv(c.conv_0[2], cl, self.s1)
        self.conv1 = _Conv(c.conv_1.conv[2], cl)
        self.proj = _Conv(block.proj[1], cl, in_bn=block.proj[0])
        self.s2, self.t2 = _bn_scale_shift(c.conv_2.conv[0])
        self.s3, self.t3 = _bn_scale_shift(c.conv_3.conv[0])
        self.conv2 = _Conv(c.conv_2.conv[2], cl, self.s3)
        self.conv3 = _Conv(c.conv_3.conv[2], cl)
        self.full = [(m.full.weight.detach(), m.full.bias.detach())
                     for m in (c.conv_1, c.conv_2, c.conv_3)]

    def __call__(self, x: torch.Tensor, skip: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        f1, f2, f3 = (F.linear(style, w, b) for w, b in self.full)
        h = self.conv0(_bn_relu(x, self.bn0))
        h.addcmul_(skip, _per_channel(self.s1)).add_(_per_channel(self.s1 * f1 + self.t1))
        x1 = self.conv1(h.relu_())
        x1 += self.proj(x)
        h = torch.addcmul(_per_channel(self.s2 * f2 + self.t2), x1, _per_channel(self.s2))
        h = self.conv2(h.relu_())
        h.add_(_per_channel(self.s3 * f3 + self.t3))
        return self.conv3(h.relu_()).add_(x1)


class _Folded:
    """Eval-mode CPnet with batch norms folded (see above): copies of the weights, rebuilt by
    :meth:`CPnet._folded_params` whenever the net's own change."""

    def __init__(self, net: CPnet):
        cl = net.channels_last and net.device.type == "cpu"  # measured on CPU only
        self.down = [_FoldedDown(b, cl) for b in net.downsample.down]
        self.pool = net.downsample.maxpool  # max (or average) 2x2 pooling module
        self.up = [_FoldedUp(b, cl) for b in net.upsample.up]
        self.out_bn = tuple(map(_per_channel, _bn_scale_shift(net.output[0])))
        self.out_conv = _Conv(net.output[2], cl)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = []
        for n, block in enumerate(self.down):
            x = block(x if n == 0 else self.pool(features[-1]))
            features.append(x)
        style = make_style(features[-1])
        x = self.up[-1](features[-1], features[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = self.up[n](F.interpolate(x, scale_factor=2.0, mode="nearest"), features[n], style)
        return self.out_conv(_bn_relu(x, self.out_bn)), style


def architecture_from_state_dict(state: dict) -> dict:
    """``nbase``, ``nout`` and ``sz`` read from a state dict's tensor shapes (Cellpose files do
    not store them). Raises ``KeyError``/``ValueError`` if the layer names or shapes are not a
    CPnet's."""
    nbase: list[int] = []
    n = 0
    while f"downsample.down.res_down_{n}.proj.1.weight" in state:
        w = state[f"downsample.down.res_down_{n}.proj.1.weight"]
        if w.dim() != 4:
            raise ValueError(f"{w.dim() - 2}D convolutions (only 2D networks are supported)")
        if n == 0:
            nbase.append(int(w.shape[1]))
        nbase.append(int(w.shape[0]))
        n += 1
    if len(nbase) < 3:
        raise KeyError("downsample.down.res_down_0.proj.1.weight")
    nout = int(state["output.2.weight"].shape[0])
    sz = int(state["downsample.down.res_down_0.conv.conv_0.2.weight"].shape[-1])
    return {"nbase": nbase, "nout": nout, "sz": sz}


def nbase_from_state_dict(state: dict) -> list[int]:
    """Recover ``nbase`` from a state dict's conv shapes."""
    return architecture_from_state_dict(state)["nbase"]


def widen(net: CPnet, nbase: Sequence[int], noise: float = 0.0, seed: int = 0) -> CPnet:
    """A wider CPnet computing the same function as ``net`` (Net2WiderNet, Chen et al. 2016).

    Each level's width must be a whole multiple ``k`` of the old one. Every channel is copied
    ``k`` times (batch-norm statistics with it), and the weights reading a copied channel are
    divided by ``k`` so that the sum over the copies is unchanged; the style Linear layers are
    divided by ``sqrt(k)`` instead, because the style vector is L2-normalised and its copies
    are each ``1/sqrt(k)`` of the original. So narrow weights trained on a CPU can seed a
    Cellpose-sized network (``nbase`` 2-32-64-128-256). ``noise`` (relative to each weight
    tensor's std) breaks the symmetry between the copies, which Adam would otherwise keep.
    """
    nbase = [int(n) for n in nbase]
    if len(nbase) != len(net.nbase) or nbase[0] != net.nbase[0] or any(
            n % o for n, o in zip(nbase, net.nbase)):
        raise ValueError(f"cannot widen nbase {net.nbase} to {nbase}: same input channels and "
                         "depth, each width a multiple of the old one")
    wide = CPnet(nbase, net.nout, net.sz, net.max_pool, float(net.diam_mean.item()))
    old = net.state_dict()
    gen = torch.Generator().manual_seed(seed)
    new_state = {}
    for key, target in wide.state_dict().items():
        t = old[key].detach().float().clone()
        for dim in range(min(t.dim(), 2)):
            k = target.shape[dim] // t.shape[dim]
            if k == 1:
                continue
            t = torch.cat([t] * k, dim=dim)
            if dim == 1:  # inputs: the copies' contributions must add up to the original
                t = t / (k ** 0.5 if key.endswith(".full.weight") else k)
        if noise and t.dim() >= 2 and t.dtype.is_floating_point:
            t = t + noise * t.std() * torch.randn(t.shape, generator=gen)
        new_state[key] = t.to(target.dtype)
    wide.load_state_dict(new_state)
    return wide
