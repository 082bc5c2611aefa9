"""Opening a split's shards for reading in one label scheme: the manifest, the scheme check against it and the
lookup table masks go through at load time, in one call, so no reader can skip the check or derive the table
its own way (the loaders, the report and the benchmarks all open splits here)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from distseg.config import DataCfg
from distseg.labels import IGNORE, Scheme
from distseg.shards.manifest import check_scheme, load_manifest
from distseg.shards.shard_reader import ShardFiles, ShardSamples


@dataclass(frozen=True)
class OpenSplit:
    """A split's checked manifest and how its masks become the scheme's classes."""

    manifest: dict
    scheme: Scheme
    lut: np.ndarray | None  # uint8 labelId -> class, for labelid shards read in another scheme; else None

    @property
    def split(self) -> str:
        """The split the shards were made from, as their manifest names it."""
        return self.manifest["split"]

    def class_pixels(self) -> np.ndarray:
        """Labelled pixels per class of the scheme (float64), from the manifest's histogram in the shards'
        own label space: labelid counts are summed through the table the masks are read through."""
        hist = self.manifest["class_pixels"]
        if self.lut is None:
            return np.array([hist.get(n, 0) for n in self.scheme.class_names], np.float64)
        counts = np.zeros(self.scheme.num_classes)
        for label_id, n in enumerate(hist.values()):
            c = int(self.lut[label_id]) if label_id < len(self.lut) else IGNORE
            if c < self.scheme.num_classes:
                counts[c] += n
        return counts

    def samples(self, data: DataCfg, log=print) -> ShardSamples:
        """The split's samples by index, through the shard files the `data` settings give (cache, retries,
        verification); `.files` holds those."""
        return ShardSamples(self.manifest, ShardFiles.of(self.manifest, data), log=log)


def open_split(shards: str | os.PathLike, split: str, scheme: Scheme, verify: bool = False) -> OpenSplit:
    """The split's manifest, checked (see `load_manifest`) and refused in one line when its shards cannot give
    `scheme`'s classes; labelid shards get the scheme's table, applied to each mask as it is read."""
    man = load_manifest(shards, split, verify)
    return OpenSplit(man, scheme, scheme.lut if check_scheme(man, scheme) else None)
