"""build_loader: one entry for both loaders, which share the batch contract
{"image": N x 3 x H x W float (normalised, on device), "mask": N x H x W int64 (255 = ignore),
 "key": [str], "valid": N bool (False = padding that must not count)}."""

from __future__ import annotations

import torch

from distseg.labels import Scheme
from distseg.shards.split import open_split


def build_loader(cfg, split: str, accelerator, scheme: Scheme, train: bool):
    """The configured loader for this process: device, world size and rank come from the Accelerator."""
    return make_loader(cfg, split, scheme, train, accelerator.device, accelerator.num_processes,
                       accelerator.process_index)


def make_loader(cfg, split: str, scheme: Scheme, train: bool, device="cpu", world: int = 1, rank: int = 0):
    """The configured loader for an explicit device, world size and rank. Loaders (and their workers) get the
    `data` settings and the seed, not the whole config."""
    opened = open_split(cfg.data.shards, split, scheme)
    if cfg.data.loader == "dali":
        from distseg.data.dali_loader import DaliLoader

        return DaliLoader(cfg.data, cfg.train.seed, opened, train, device, world, rank)
    from distseg.data.torch_loader import TorchLoader

    return TorchLoader(cfg.data, cfg.train.seed, opened, train, device, world, rank, cfg.model.channels_last)


def masked_targets(batch: dict) -> torch.Tensor:
    """The batch's masks with padded (invalid) samples set to ignore: they count in no loss or metric."""
    m = batch["mask"]
    return torch.where(batch["valid"].view(-1, 1, 1), m, torch.full_like(m, 255))
