"""The seed's U-Net: DoubleConv encoder with max-pool, ConvTranspose2d decoder, concatenated skips,
1x1 head, raw logits. Width and depth are configurable; inputs of any size are padded to a multiple
of 2**depth and the logits cropped back, so val images need not be resized."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    """The seed's U-Net; see the module docstring."""
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
        h, w = x.shape[-2:]
        m = 2 ** self.depth
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
        skips = [self.inc(x)]
        for down in self.down:
            skips.append(down(F.max_pool2d(skips[-1], 2)))
        y = skips.pop()
        for up, dec in zip(self.up, self.dec):
            y = dec(torch.cat([skips.pop(), up(y)], dim=1))
        y = self.head(y)
        return y[..., :h, :w] if (ph or pw) else y


def build_model(cfg, num_classes: int) -> UNet:
    """The U-Net the config describes, with `num_classes` output channels."""
    return UNet(3, num_classes, cfg.model.base, cfg.model.depth, cfg.model.norm)


def out_channels(cfg, num_classes: int) -> int:
    """BCE-only training on a binary scheme uses one logit (foreground); everything else one per class."""
    if num_classes == 2 and cfg.loss.bce > 0 and cfg.loss.ce == 0 and cfg.loss.dice == 0:
        return 1
    return num_classes


def predict_classes(logits: torch.Tensor) -> torch.Tensor:
    """Logits N x C x H x W -> class map N x H x W (C == 1: foreground where logit > 0)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)
