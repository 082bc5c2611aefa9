"""Several opened splits read as one (data.streams): one index space, stream s holding the samples
[offset_s, offset_s + n_s), each with its own label table. A single split is the case of one stream, read
exactly as before (the same indexes, the same reads). The order of an epoch over them is the sampler's
(data/sampler.StreamSampler)."""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

import numpy as np

from distseg.config import DataCfg, default_epoch_samples, stream_shares
from distseg.data.sampler import ClassPool
from distseg.errors import UserError
from distseg.labels import Scheme
from distseg.shards.split import OpenSplit, open_split
from distseg.urls import redact

MAX_DEFAULT_EPOCH = 100  # a default epoch beyond this many times the streams' samples is refused


class Sources:
    """The samples of one or more opened splits by index in the shared space."""

    def __init__(self, splits: list[OpenSplit], data: DataCfg):
        self.splits = splits
        self.samples = [sp.samples(data) for sp in splits]
        self.luts = [sp.lut.astype(np.uint8) if sp.lut is not None else None for sp in splits]
        self.offsets = [0, *accumulate(len(s) for s in self.samples)]

    def __len__(self) -> int:
        return self.offsets[-1]

    def sizes(self) -> list[int]:
        """Samples of each stream."""
        return [len(s) for s in self.samples]

    def locate(self, i: int) -> tuple[int, int]:
        """(stream, index within it) of a shared index. A worker looks each sample up four times (key, two
        members, label table): a bisection of a list, ~0.2 us, where numpy's search costs ~3 us."""
        s = bisect_right(self.offsets, i) - 1
        return s, i - self.offsets[s]

    def key(self, i: int) -> str:
        """The sample's key."""
        s, j = self.locate(i)
        return self.samples[s].key(j)

    def shard_name(self, i: int) -> str:
        """The shard holding it."""
        s, j = self.locate(i)
        return self.samples[s].shard_name(j)

    def read(self, i: int, member: str) -> bytes:
        """One member of the sample (image, mask, json)."""
        s, j = self.locate(i)
        return self.samples[s].read(j, member)

    def lut(self, i: int) -> np.ndarray | None:
        """The label table its mask is read through (None: already in the scheme's classes)."""
        return self.luts[self.locate(i)[0]]

    @property
    def single(self):
        """The one stream's ShardSamples (its index and files drive prefetching), None with several."""
        return self.samples[0] if len(self.samples) == 1 else None

    def class_pixels(self, shares: list[int] | None = None) -> np.ndarray:
        """Labelled pixels per class of the scheme, for the loss weights: with shares, each stream's
        histogram weighted by the fraction of it an epoch draws (its expected pixels per epoch); without
        (a single split), that split's."""
        if shares is None:
            return self.splits[0].class_pixels()
        weighted = [sp.class_pixels() * q / n for sp, q, n in zip(self.splits, shares, self.sizes())]
        return np.sum(weighted, axis=0)


def epoch_shares(data: DataCfg, sizes: list[int]) -> list[int]:
    """Each stream's samples per epoch: data.epoch_samples (default: one pass over the first stream at its
    share, x data.repeat) split by the weights with largest-remainder rounding, so they sum exactly."""
    weights = [st.weight for st in data.streams]
    total = data.epoch_samples or default_epoch_samples(sizes[0], weights, data.repeat)
    if not data.epoch_samples and total > MAX_DEFAULT_EPOCH * sum(sizes) * data.repeat:
        raise UserError(f"data.streams[0] (weight {weights[0]:g}) is so small a share that one pass over it "
                        f"takes an epoch of {total:,} samples, {total / sum(sizes):,.0f}x all the streams' "
                        "samples: raise its weight, or set data.epoch_samples")
    shares = stream_shares(weights, total)
    for k, q in enumerate(shares):
        if q == 0:
            raise UserError(f"data.streams[{k}] (weight {weights[k]:g}) gets 0 of the epoch's {total} "
                            "samples, so it would never be trained on: raise its weight or "
                            "data.epoch_samples")
    return shares


def open_streams(data: DataCfg, scheme: Scheme) -> list[OpenSplit]:
    """Every stream's split, opened for the run's scheme: a stream whose shards cannot give the scheme's
    classes (another scheme; labelid shards are remapped) is refused naming the stream."""
    if data.loader == "dali":
        raise UserError("data.streams reads through the torch loader: set data.loader=torch (DALI streams "
                        "are not supported yet)")
    if data.shuffle == "shards":
        raise UserError("data.streams mixes streams in one global permutation: set data.shuffle=global "
                        "(shard-window streams are not supported yet)")
    splits = []
    for k, st in enumerate(data.streams):
        try:
            splits.append(open_split(st.shards, st.split, scheme))
        except UserError as e:
            raise UserError(f"data.streams[{k}] ({redact(st.shards)}, {st.split}): {e}") from None
    return splits


def rare_pools(splits: list[OpenSplit], data: DataCfg) -> list[ClassPool]:
    """Each stream's rare-class draw (data.sampling=rare) from its shards' per-sample class counts, in the
    run's classes; a stream where no class reaches data.rare_min_pixels in any sample is refused."""
    pools = []
    for k, sp in enumerate(splits):
        pool = ClassPool.of(sp.class_counts(data), data.rare_temperature, data.rare_min_pixels)
        if not len(pool.classes):
            where = f"data.streams[{k}] ({sp.split})" if data.streams else f"split {sp.split}"
            raise UserError(f"data.sampling=rare: no sample of {where} holds more than data.rare_min_pixels="
                            f"{data.rare_min_pixels} pixels of any class: lower data.rare_min_pixels")
        pools.append(pool)
    return pools


def stream_record(data: DataCfg, shares: list[int], sizes: list[int]) -> list[dict]:
    """What the run state keeps of the streams (a resume must have the same): location, split, weight, its
    samples per epoch and its size (a re-sharded stream would change every pass's permutation)."""
    return [{"shards": redact(st.shards), "split": st.split, "weight": st.weight, "samples": q, "size": n}
            for st, q, n in zip(data.streams, shares, sizes)]


def rare_draws(data: DataCfg, samples: int, shares: list[int] | None) -> int:
    """Draws per epoch with data.sampling=rare: the streams' shares, else data.epoch_samples, else the
    uniform epoch's size (the split's samples x data.repeat)."""
    return sum(shares) if shares is not None else data.epoch_samples or samples * data.repeat


def sampling_record(data: DataCfg, samples: int, shares: list[int] | None) -> dict:
    """What the run state keeps of data.sampling (a resume must have the same: each changes every epoch's
    draws); empty for uniform sampling, as every run before rare sampling had."""
    if data.sampling != "rare":
        return {}
    return {"sampling": "rare", "temperature": data.rare_temperature, "min_pixels": data.rare_min_pixels,
            "draws": rare_draws(data, samples, shares)}


def describe_sampling(record: dict) -> str:
    """`rare (temperature 0.01, a class counts above 3000 pixels, 2975 draws per epoch)`."""
    return (f"rare (temperature {record['temperature']:g}, a class counts above {record['min_pixels']} "
            f"pixels, {record['draws']} draws per epoch)")


def describe_streams(records: list[dict]) -> str:
    """`shards/fine train weight 3 (2975 of 2975 per epoch); ...`, or `none (data.shards)`."""
    return "; ".join(f"{r['shards']} {r['split']} weight {r['weight']:g} ({r['samples']} of "
                     f"{r.get('size', '?')} per epoch)" for r in records) or "none (data.shards)"
