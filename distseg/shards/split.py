"""Opening a split's shards for reading in one label scheme: the manifest, the scheme check against it and the
lookup table masks go through at load time, in one call, so no reader can skip the check or derive the table
its own way (the loaders, the report and the benchmarks all open splits here)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from distseg.config import DataCfg
from distseg.errors import UserError
from distseg.labels import IGNORE, Scheme
from distseg.shards.class_counts import images_per_class, in_scheme, open_split_counts
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

    def class_counts(self, data: DataCfg) -> np.ndarray:
        """Each sample's pixels of each class of the scheme: shape (samples, scheme.num_classes), rows in the
        sample index's order (`ShardSamples` indices), so a sampler knows which classes an image holds
        without decoding it. Shards stored in the scheme itself: the memory-mapped file, read-only and
        shared by every process of the node (no copy); labelid shards: their columns summed through the
        table into the scheme's classes (uint32, in this process's memory). The file comes through the
        shard files the `data` settings give (remote: the node cache, verified by its sha256)."""
        record = self.manifest.get("class_counts")
        if record is None:
            raise UserError(f"{self.manifest['_path']} has no per-sample class counts (shards made before "
                            "they were recorded): re-shard (`distseg shard` with the same settings adds "
                            "them), or use data.sampling=uniform")
        stored = open_split_counts(ShardFiles.of(self.manifest, data).counts_file(), record,
                                   self.manifest["_path"])
        if stored.shape != (self.manifest["total"], self.manifest["scheme"]["num_classes"]):
            raise UserError(f"{self.manifest['_path']}: its class counts are {list(stored.shape)}, not "
                            f"{self.manifest['total']} samples x {self.manifest['scheme']['num_classes']} "
                            "classes: re-shard")
        return stored if self.lut is None else in_scheme(stored, self.lut, self.scheme.num_classes)

    def images_per_class(self, data: DataCfg) -> np.ndarray:
        """How many samples hold each class of the scheme (int64), from `class_counts`."""
        return images_per_class(self.class_counts(data))

    def samples(self, data: DataCfg, log=print) -> ShardSamples:
        """The split's samples by index, through the shard files the `data` settings give (cache, retries,
        verification); `.files` holds those."""
        return ShardSamples(self.manifest, ShardFiles.of(self.manifest, data), log=log)


def open_split(shards: str | os.PathLike, split: str, scheme: Scheme, verify: bool = False) -> OpenSplit:
    """The split's manifest, checked (see `load_manifest`) and refused in one line when its shards cannot give
    `scheme`'s classes; labelid shards get the scheme's table, applied to each mask as it is read."""
    man = load_manifest(shards, split, verify)
    return OpenSplit(man, scheme, scheme.lut if check_scheme(man, scheme) else None)
