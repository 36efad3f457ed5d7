"""The Cellpose U-Net ("CPnet"), weight-compatible with Cellpose 2 and 3.

Module names, and so state-dict keys, follow Cellpose's exactly (``downsample.down.res_down_0
.conv.conv_0.0.weight``, ``upsample.up.res_up_0.conv.conv_1.full.weight``, ``output.2.weight``,
``diam_mean``, ``diam_labels``...), so a ``.pth`` saved by Cellpose loads here and back.

Structure: four residual down blocks (two pairs of BN-ReLU-conv, with a 1x1 projection on the
skip), max-pooling between them; a "style" vector, the L2-normalised global average of the
deepest features, is added (through a Linear layer) inside every up block; nearest-neighbour
upsampling; a BN-ReLU-1x1 conv head giving (flow Y, flow X, cell probability logit).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def bn_relu_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    """BatchNorm, ReLU, conv: indices 0, 1, 2 as in Cellpose's ``batchconv``."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05),
        nn.ReLU(inplace=True),
        nn.Conv2d(cin, cout, k, padding=k // 2),
    )


def bn_conv(cin: int, cout: int, k: int) -> nn.Sequential:
    """BatchNorm then conv (no ReLU), Cellpose's ``batchconv0``: the residual projections."""
    return nn.Sequential(
        nn.BatchNorm2d(cin, eps=1e-5, momentum=0.05),
        nn.Conv2d(cin, cout, k, padding=k // 2),
    )


class ResDown(nn.Module):
    def __init__(self, cin: int, cout: int, k: int):
        super().__init__()
        self.conv = nn.Sequential()
        for t in range(4):
            self.conv.add_module(f"conv_{t}", bn_relu_conv(cin if t == 0 else cout, cout, k))
        self.proj = bn_conv(cin, cout, 1)

    def forward(self, x):
        x = self.proj(x) + self.conv[1](self.conv[0](x))
        return x + self.conv[3](self.conv[2](x))


class Downsample(nn.Module):
    def __init__(self, nbase: Sequence[int], k: int, max_pool: bool = True):
        super().__init__()
        self.down = nn.Sequential()
        for n in range(len(nbase) - 1):
            self.down.add_module(f"res_down_{n}", ResDown(nbase[n], nbase[n + 1], k))
        self.maxpool = nn.MaxPool2d(2, 2) if max_pool else nn.AvgPool2d(2, 2)

    def forward(self, x) -> list:
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

    def forward(self, style, x, skip=None):
        if skip is not None:
            x = x + skip
        return self.conv(x + self.full(style)[:, :, None, None])


class ResUp(nn.Module):
    def __init__(self, cin: int, cout: int, style_channels: int, k: int):
        super().__init__()
        self.conv = nn.Sequential()
        self.conv.add_module("conv_0", bn_relu_conv(cin, cout, k))
        for t in (1, 2, 3):
            self.conv.add_module(f"conv_{t}", StyleConv(cout, cout, style_channels, k))
        self.proj = bn_conv(cin, cout, 1)

    def forward(self, x, skip, style):
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

    def forward(self, style, features):
        x = self.up[-1](features[-1], features[-1], style)
        for n in range(len(self.up) - 2, -1, -1):
            x = self.up[n](self.upsampling(x), features[n], style)
        return x


def make_style(deepest: torch.Tensor) -> torch.Tensor:
    """Global average of the deepest features, L2-normalised per image."""
    style = deepest.mean(dim=(2, 3))
    return style / torch.sum(style**2, dim=1, keepdim=True) ** 0.5


class CPnet(nn.Module):
    """U-Net with style vector. ``nbase`` = [input channels, widths of the 4 levels...].

    ``forward(x)`` takes (N, nbase[0], H, W), H and W multiples of 2**(len(nbase)-2), and returns
    ``(out, style)``: out is (N, nout, H, W) = (flow Y, flow X, cell probability logit).
    """

    def __init__(self, nbase: Sequence[int], nout: int = 3, sz: int = 3,
                 max_pool: bool = True, diam_mean: float = 30.0):
        super().__init__()
        self.nbase = list(nbase)
        self.nchan = self.nbase[0]
        self.nout = nout
        self.sz = sz
        self.downsample = Downsample(self.nbase, sz, max_pool)
        nbase_up = self.nbase[1:] + [self.nbase[-1]]
        self.upsample = Upsample(nbase_up, sz)
        self.output = bn_relu_conv(nbase_up[0], nout, 1)
        self.diam_mean = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)
        self.diam_labels = nn.Parameter(torch.full((1,), float(diam_mean)), requires_grad=False)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(self.nbase) - 2)

    def forward(self, x: torch.Tensor):
        features = self.downsample(x)
        style = make_style(features[-1])
        y = self.upsample(style, features)
        return self.output(y), style


def nbase_from_state_dict(state: dict) -> list[int]:
    """Recover ``nbase`` from a state dict's conv shapes (Cellpose files do not store it)."""
    nbase = []
    n = 0
    while f"downsample.down.res_down_{n}.proj.1.weight" in state:
        w = state[f"downsample.down.res_down_{n}.proj.1.weight"]
        if n == 0:
            nbase.append(int(w.shape[1]))
        nbase.append(int(w.shape[0]))
        n += 1
    return nbase
