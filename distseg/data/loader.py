"""build_loader: one entry for both loaders, each a `batch.Loader` yielding `batch.Batch`es."""

from __future__ import annotations

from distseg.data.manifest import check_scheme, load_manifest
from distseg.labels import Scheme


def build_loader(cfg, split: str, accelerator, scheme: Scheme, train: bool):
    """The configured loader for this process: device, world size and rank come from the Accelerator."""
    return make_loader(cfg, split, scheme, train, accelerator.device, accelerator.num_processes,
                       accelerator.process_index)


def make_loader(cfg, split: str, scheme: Scheme, train: bool, device="cpu", world: int = 1, rank: int = 0):
    """The configured loader for an explicit device, world size and rank. Loaders (and their workers) get the
    `data` settings and the seed, not the whole config."""
    man = load_manifest(cfg.data.shards, split)
    lut = scheme.lut if check_scheme(man, scheme) else None
    if cfg.data.loader == "dali":
        from distseg.data.dali_loader import DaliLoader

        return DaliLoader(cfg.data, cfg.train.seed, split, train, device, world, rank, lut, man)
    from distseg.data.torch_loader import TorchLoader

    return TorchLoader(cfg.data, cfg.train.seed, split, train, device, world, rank, lut, man,
                       cfg.model.channels_last)

