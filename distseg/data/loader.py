"""build_loader: one entry for both loaders, which share the batch contract
{"image": N x 3 x H x W float (normalised, on device), "mask": N x H x W int64 (255 = ignore),
 "key": [str], "valid": N bool (False = padding that must not count)}."""

from __future__ import annotations

from distseg.data.manifest import check_scheme, load_manifest
from distseg.labels import Scheme


def build_loader(cfg, split: str, accelerator, scheme: Scheme, train: bool):
    man = load_manifest(cfg.data.shards, split)
    lut = scheme.lut if check_scheme(man, scheme) else None
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    device = accelerator.device if accelerator is not None else "cpu"
    if cfg.data.loader == "dali":
        from distseg.data.dali_loader import DaliLoader

        return DaliLoader(cfg, split, train, device, world, rank, lut, man)
    from distseg.data.wds_loader import TorchLoader

    return TorchLoader(cfg, split, train, device, world, rank, lut, man)
