"""The batch contract both loaders keep (torch_loader.TorchLoader, dali_loader.DaliLoader), and the loader
protocol the training loop, validation and resume rely on. Nothing else reaches into a loader."""

from __future__ import annotations

from typing import Iterator, Protocol, TypedDict

import numpy as np
import torch

from distseg.labels import IGNORE
from distseg.shards.split import OpenSplit


class Batch(TypedDict):
    """One batch of one process, on its device. N is the batch size (the last batch of a split may be
    smaller), H x W a crop in training or the full image in validation."""

    image: torch.Tensor  # N x 3 x H x W float32, normalised by data.mean / data.std
    mask: torch.Tensor  # N x H x W int64 class indexes of the run's scheme, labels.IGNORE = not labelled
    key: list[str]  # the samples' keys (`<city>_<seq>_<frame>`)
    valid: torch.Tensor  # N bool: False = padding that must count in no loss or metric
    corrupt: torch.Tensor  # N bool: True = a sample that could not be decoded (data.on_corrupt=skip)


def batch_problems(b: dict) -> list[str]:
    """How `b` breaks the contract (empty when it keeps it): missing fields, dtypes, shapes, devices."""
    missing = [k for k in Batch.__annotations__ if k not in b]
    if missing:
        return [f"missing {missing}"]
    n, image = len(b["key"]), b["image"]
    want = {"image": (torch.float32, (n, 3)), "mask": (torch.int64, (n,)), "valid": (torch.bool, (n,)),
            "corrupt": (torch.bool, (n,))}
    out = []
    for k, (dtype, lead) in want.items():
        t = b[k]
        if t.dtype != dtype or tuple(t.shape[:len(lead)]) != lead:
            out.append(f"{k}: {t.dtype} {tuple(t.shape)}, expected {dtype} with leading dims {lead}")
        elif t.device != image.device:
            out.append(f"{k} on {t.device}, image on {image.device}")
    if not out and tuple(b["mask"].shape[1:]) != tuple(image.shape[2:]):
        out.append(f"mask {tuple(b['mask'].shape)} does not match image {tuple(image.shape)}")
    return out


def masked_targets(batch: Batch) -> torch.Tensor:
    """The batch's masks with padded (invalid) samples set to ignore: they count in no loss or metric."""
    return batch["mask"].masked_fill(~batch["valid"].view(-1, 1, 1), IGNORE)  # no full-size fill tensor


class Loader(Protocol):
    """What a loader offers the loop. An epoch is `len(loader)` batches of this process; `set_epoch(e, j)`
    makes the next iteration epoch `e` from its batch `j` (a resume mid-epoch).

    Where the position lives decides how a run resumes. The torch loader keeps none of its own
    (`keeps_position = False`): its order is a pure function of (seed, epoch, layout), so the checkpointed
    `RunState.batch_in_epoch` is all it needs, and a resume on another process count converts that
    position through the samples consumed. DALI's reader has state of its own (`keeps_position = True`, a
    `PositionedLoader`), saved per rank in each checkpoint and restored in the same layout only
    (distseg/training/resume.py)."""

    split: OpenSplit  # the split it reads (with data.streams: the first stream's)
    shares: list[int] | None  # data.streams: each stream's samples per epoch; None without
    stream_sizes: list[int] | None  # data.streams: each stream's samples; None without
    keeps_position: bool

    @property
    def num_samples(self) -> int:
        """Samples of the split (without padding)."""

    def __len__(self) -> int:
        """Batches of this process per epoch."""

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """The epoch (0-based) the next iteration yields, from batch `skip_batches`."""

    def __iter__(self) -> Iterator[Batch]:
        """The epoch's batches of this process, on its device."""

    def stream_images(self, epochs: int, batches: int) -> list[int] | None:
        """data.streams: each stream's samples trained on at that position (None without streams)."""

    def class_draws(self, epochs: int, batches: int) -> list[int] | None:
        """data.sampling=rare: draws per class of the scheme at that position (None otherwise)."""

    def class_pixels(self) -> np.ndarray:
        """Labelled pixels per class of what it trains on, for the loss weights (data.streams: weighted
        by the streams' shares of an epoch)."""


class PositionedLoader(Loader, Protocol):
    """A loader whose position is its own (`keeps_position = True`: DALI's reader)."""

    def state_dict(self) -> bytes:
        """The position and random state, to save in a checkpoint (per rank)."""

    def load_state_dict(self, state: bytes) -> None:
        """Continue from a `state_dict()`."""
