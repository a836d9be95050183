"""The network of the ``hovernet`` family: a compact HoVer-style encoder-decoder.

A residual U-Net encoder (``width * 2**i`` channels at 1/2**i of the input, ``blocks`` residual blocks per
level) feeds three decoders of the same shape, one per branch, each with the encoder's skip connections:

- NP (nucleus pixels): 2 logits (background, nucleus);
- HV (horizontal and vertical distance to the nucleus' centre of mass): 2 channels, trained to [-1, 1];
- TP (nucleus type, only with ``n_types`` > 0): ``n_types + 1`` logits, 0 = background.

The forward pass returns one tensor (N, 4 [+ n_types + 1], H, W): NP logits, HV, then TP logits, so a
TorchScript export (``torch.jit.trace``) and the state dict of this module give the same output layout. The
input's height and width must be multiples of ``2 ** (levels - 1)``. Batch norm with ReLU, as HoVer-Net's
own blocks; transposed convolutions are avoided (nearest upsampling + conv gives no checkerboard in HV).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from qpbridge.errors import ModelCardError
from qpbridge.families.params import object_param


@dataclass(frozen=True)
class HoverArch:
    """The architecture's hyper-parameters, as a card's ``params.arch`` holds them."""

    width: int = 32
    levels: int = 4
    blocks: int = 2
    n_types: int = 0

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> HoverArch:
        arch = object_param(params, "arch", cls.__dataclass_fields__, "hovernet")
        values = {**asdict(cls()), **arch}
        for key, low in (("width", 1), ("levels", 2), ("blocks", 1), ("n_types", 0)):
            v = values[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ModelCardError(f"hovernet 'arch.{key}' must be an integer >= {low}, got {v!r}")
        return cls(**values)

    @property
    def out_channels(self) -> int:
        return 4 + (self.n_types + 1 if self.n_types else 0)

    @property
    def multiple(self) -> int:
        """Input sides must be multiples of this."""
        return 2 ** (self.levels - 1)


class _ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _ResBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.short(x), inplace=True)


class _Decoder(nn.Module):
    """Upsample, concatenate the skip, one conv per level; a 1x1 head at full resolution."""

    def __init__(self, channels: list[int], n_out: int) -> None:
        super().__init__()
        self.ups = nn.ModuleList(_ConvBN(channels[i + 1] + channels[i], channels[i])
                                 for i in reversed(range(len(channels) - 1)))
        self.head = nn.Conv2d(channels[0], n_out, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        for up, skip in zip(self.ups, reversed(feats[:-1]), strict=True):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = up(torch.cat([x, skip], dim=1))
        out: torch.Tensor = self.head(x)
        return out


class HoverNet(nn.Module):
    """NP, HV (and TP) maps of an RGB batch; see the module docstring for the output layout."""

    def __init__(self, arch: HoverArch) -> None:
        super().__init__()
        self.arch = arch
        chans = [arch.width * 2 ** i for i in range(arch.levels)]
        self.stem = _ConvBN(3, chans[0])
        stages: list[nn.Module] = []
        for i, c in enumerate(chans):
            cin = chans[max(i - 1, 0)] if i else chans[0]
            blocks = [_ResBlock(cin, c, stride=1 if i == 0 else 2)]
            blocks += [_ResBlock(c, c) for _ in range(arch.blocks - 1)]
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.np_branch = _Decoder(chans, 2)
        self.hv_branch = _Decoder(chans, 2)
        self.tp_branch = _Decoder(chans, arch.n_types + 1) if arch.n_types else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats: list[torch.Tensor] = []
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        outs = [self.np_branch(feats), self.hv_branch(feats)]
        if self.tp_branch is not None:
            outs.append(self.tp_branch(feats))
        return torch.cat(outs, dim=1)


def split_output(out: torch.Tensor) -> dict[str, torch.Tensor]:
    """The network's one tensor as named maps: ``np`` (N, 2), ``hv`` (N, 2) and, with types, ``tp``."""
    named = {"np": out[:, 0:2], "hv": out[:, 2:4]}
    if out.shape[1] > 4:
        named["tp"] = out[:, 4:]
    return named


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
