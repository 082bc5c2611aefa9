"""TensorBoard helpers: a writer on rank 0 only, and side-by-side prediction images."""

from __future__ import annotations

import threading

import numpy as np
import torch


class NullWriter:
    """Stands in for SummaryWriter on ranks other than 0: every call does nothing."""

    failure = None

    def __getattr__(self, name):
        return lambda *a, **k: None


class EventWriter:
    """A SummaryWriter that keeps its first write failure instead of raising it. TensorBoard writes on a
    thread and re-raises a full disk at some later call (an add_scalar, an add_image in validation, close);
    the loop instead checks `failure` at every step, so that all ranks stop together with one line."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir, self.failure = log_dir, None
        self._w = SummaryWriter(str(log_dir))

    def __getattr__(self, name):
        method = getattr(self._w, name)

        def call(*args, **kwargs):
            if self.failure is not None:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as e:  # OSError from the writer thread, "Writer is closed" after it
                self.failure = e
                return None
        return call


def _quiet_writer_threads(args) -> None:
    """threading.excepthook: TensorBoard's writer thread dies of a full disk with a traceback; EventWriter
    reports that error as one line, so the traceback is left out. Other threads keep the default hook."""
    if type(args.thread).__name__ == "_AsyncWriterThread":
        return
    threading.__excepthook__(args)


def make_writer(log_dir, enabled: bool):
    """An EventWriter on rank 0, a NullWriter elsewhere."""
    if not enabled:
        return NullWriter()
    threading.excepthook = _quiet_writer_threads
    return EventWriter(log_dir)


def denormalize(img: torch.Tensor, mean, std) -> np.ndarray:
    """Normalised 3xHxW -> uint8 HxWx3."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    x = (img.detach().float().cpu() * s + m).clamp(0, 1)
    return (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def overlay(rgb: np.ndarray, classes: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an image; ignore (255) pixels keep the image."""
    col = palette[classes].astype(np.float32)
    out = rgb.astype(np.float32) * (1 - alpha) + col * alpha
    out[classes == 255] = rgb[classes == 255]
    return out.round().astype(np.uint8)


def panel(rgb: np.ndarray, gt: np.ndarray, pred: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Image | ground truth | prediction, stacked vertically (HxWx3 uint8)."""
    return np.concatenate([rgb, palette[gt], palette[pred]], axis=0)
