"""The plain U-Net: DoubleConv encoder with max-pool, ConvTranspose2d decoder, concatenated skips,
1x1 head, raw logits. Width and depth are configurable; inputs of any size are padded to a multiple
of 2**depth and the logits cropped back, so val images need not be resized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_to_multiple(x: torch.Tensor, m: int) -> tuple[torch.Tensor, int, int]:
    """`x` padded at the bottom and right to a multiple of `m`, with the padding (rows, columns). An input
    that fits already is returned as it is (F.pad by 0 would copy it: a full pass over memory per step). A
    graph traced with symbolic sizes (`export --dynamic`) always pads, by 0 where it fits, so that one
    graph serves every size without a branch on the size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % m, (-w) % m
    if isinstance(ph, int) and isinstance(pw, int) and ph == 0 and pw == 0:
        return x, 0, 0
    return F.pad(x, (0, pw, 0, ph)), ph, pw


def crop_padding(y: torch.Tensor, ph, pw) -> torch.Tensor:
    """Undo `pad_to_multiple` on the output (a negative pad: a new tensor, not a view, so it exports)."""
    if isinstance(ph, int) and isinstance(pw, int) and ph == 0 and pw == 0:
        return y
    return F.pad(y, (0, -pw, 0, -ph))


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normalisation layer named by model.norm."""
    if kind in ("batch", "sync_batch"):  # sync_batch: converted by the trainer under multi-GPU DDP
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(8 if channels % 8 == 0 else 1, channels)
    return nn.Identity()


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> norm -> ReLU) x 2: one U-Net level."""
    def __init__(self, cin: int, cout: int, norm: str = "batch"):
        bias = norm == "none"
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=bias), make_norm(norm, cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=bias), make_norm(norm, cout), nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """The plain U-Net; see the module docstring."""
    def __init__(self, in_channels: int = 3, num_classes: int = 19, base: int = 64, depth: int = 4,
                 norm: str = "batch"):
        super().__init__()
        self.depth = depth
        chans = [base * 2 ** i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, chans[0], norm)
        self.down = nn.ModuleList(DoubleConv(chans[i], chans[i + 1], norm) for i in range(depth))
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2,
                                                   stride=2) for i in reversed(range(depth)))
        self.dec = nn.ModuleList(DoubleConv(chans[i] * 2, chans[i], norm) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images N x 3 x H x W -> logits N x C x H x W."""
        x, ph, pw = pad_to_multiple(x, 2 ** self.depth)
        return crop_padding(self.body(x), ph, pw)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of an input whose sides are multiples of 2**depth."""
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([skips.pop(), up(y)], dim=1))
        return self.head(y)
