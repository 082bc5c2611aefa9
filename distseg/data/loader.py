"""build_loader: one entry for both loaders, each a `batch.Loader` yielding `batch.Batch`es."""

from __future__ import annotations

from distseg.data.streams import epoch_shares, open_streams
from distseg.labels import Scheme
from distseg.shards.split import open_split


def build_loader(cfg, split: str, accelerator, scheme: Scheme, train: bool):
    """The configured loader for this process: device, world size and rank come from the Accelerator."""
    return make_loader(cfg, split, scheme, train, accelerator.device, accelerator.num_processes,
                       accelerator.process_index)


def make_loader(cfg, split: str, scheme: Scheme, train: bool, device="cpu", world: int = 1, rank: int = 0):
    """The configured loader for an explicit device, world size and rank. Loaders (and their workers) get the
    `data` settings and the seed, not the whole config. With data.streams, training reads the streams
    (data/streams.py); validation reads data.shards as always."""
    if train and cfg.data.streams:  # data.shards' train split is not read: it may not even exist
        opened = open_streams(cfg.data, scheme)
        shares = epoch_shares(cfg.data, [sp.manifest["total"] for sp in opened])
    else:
        opened, shares = open_split(cfg.data.shards, split, scheme), None
    if cfg.data.loader == "dali" and shares is None:
        from distseg.data.dali_loader import DaliLoader

        return DaliLoader(cfg.data, cfg.train.seed, opened, train, device, world, rank)
    from distseg.data.torch_loader import TorchLoader

    return TorchLoader(cfg.data, cfg.train.seed, opened, train, device, world, rank, cfg.model.channels_last,
                       shares)

