"""Joint image+mask augmentation in plain torch ops, so it runs the same on CPU workers and on the GPU.

Random parameters come from a generator seeded by (seed, epoch, sample index): a sample gets the same
augmentation whichever rank, worker or device processes it, which makes resume and 1-vs-N-process
runs reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from distseg.labels import IGNORE


@dataclass(frozen=True)
class AugParams:
    """One sample's augmentation, drawn by `draw_params`."""
    scale: float
    cy: float  # crop offset as a fraction of the free room
    cx: float
    flip: bool
    brightness: float
    contrast: float
    saturation: float


def draw_params(seed: int, epoch: int, index: int, scale: tuple[float, float], flip: bool,
                color: float) -> AugParams:
    """The augmentation of one sample: a function of (seed, epoch, index) only."""
    rng = np.random.default_rng([seed, epoch, index, 7])
    u = rng.random(7)  # always 7 draws, in a fixed order
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    jit = [1.0 + color * (2 * v - 1) for v in u[4:7]]
    return AugParams(float(s), float(u[1]), float(u[2]), bool(flip and u[3] < 0.5), *map(float, jit))


def normalize(img: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0,1] float C x H x W -> normalised float32."""
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def augment(img: torch.Tensor, mask: torch.Tensor, p: AugParams, crop: list[int] | tuple, mean, std
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """img uint8 3xHxW, mask uint8 HxW -> (normalised float 3xhxw, int64 hxw), crop size (h, w) if given.

    Order chosen for speed at Cityscapes size: resize (uint8 on CPU, where torch has a fast kernel),
    crop, and only then the float work (colour, normalise) on the crop; padding comes last, so padded
    image pixels are exactly 0 (the mean) and padded mask pixels are ignore.
    """
    h, w = img.shape[-2:]
    nh, nw = max(1, round(h * p.scale)), max(1, round(w * p.scale))
    x = img.unsqueeze(0)
    m = mask.unsqueeze(0).unsqueeze(0)
    if (nh, nw) != (h, w):
        if x.device.type != "cpu":
            x = x.float()
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        m = F.interpolate(m.float(), size=(nh, nw), mode="nearest").to(torch.uint8)
    x, m = x[0], m[0, 0]
    if crop:
        ch, cw = crop
        y0, x0 = int(p.cy * max(0, nh - ch)), int(p.cx * max(0, nw - cw))
        x, m = x[:, y0:y0 + ch, x0:x0 + cw], m[y0:y0 + ch, x0:x0 + cw]
    x = x.float() / 255.0 if x.dtype == torch.uint8 else (x / 255.0).clamp(0, 1)
    if p.brightness != 1.0:
        x = (x * p.brightness).clamp(0, 1)
    if p.contrast != 1.0:
        g = _gray(x).mean()
        x = ((x - g) * p.contrast + g).clamp(0, 1)
    if p.saturation != 1.0:
        g = _gray(x)
        x = ((x - g) * p.saturation + g).clamp(0, 1)
    x = normalize(x, mean, std)
    m = m.long()
    if crop:
        ph, pw = ch - x.shape[-2], cw - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            m = F.pad(m, (0, pw, 0, ph), value=IGNORE)
    if p.flip:
        x = x.flip(-1)
        m = m.flip(-1)
    return x.contiguous(), m.contiguous()


def prepare_val(img: torch.Tensor, mask: torch.Tensor, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Validation: normalise only. Rescaling for inference (eval.scales) is done by distseg/inference.py."""
    return normalize(img, mean, std).contiguous(), mask.long()
