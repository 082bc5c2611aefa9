"""Pictures of predictions: class colours over an image (`predict --overlays`), image | ground truth |
prediction panels (TensorBoard), and the normalised tensors turned back into pixels."""

from __future__ import annotations

import numpy as np
import torch

from distseg.labels import IGNORE


def denormalize(img: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised 3xHxW -> uint8 HxWx3."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (img.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, classes: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an image; pixels of the ignore label (labels.IGNORE) keep the image."""
    col = palette[classes].astype(np.float32)
    out = rgb.astype(np.float32) * (1 - alpha) + col * alpha
    ignored = classes == IGNORE
    out[ignored] = rgb[ignored]
    return out.round().astype(np.uint8)


def panel(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Image | ground truth | prediction, stacked vertically (HxWx3 uint8)."""
    return np.concatenate([rgb, palette[gt], palette[pred]], axis=0)
