"""Sample-exact distribution of an epoch over ranks, in two shuffles (data.shuffle).

Both yield, per rank, the same number of batches of (sample index, augmentation key, valid); the tail is
padded with repeats marked invalid, so every rank yields as many batches as the others (DDP needs that)
while each sample counts exactly once per pass: the trainer masks invalid samples out of the loss, the
evaluator out of the metrics. Both are pure functions of (seed, epoch, world, batch size), so a resumed run
skips the batches it consumed and continues with the same ones.

An epoch is `repeat` passes over the split (data.repeat, as mmsegmentation's RepeatDataset), each with its
own permutation and its own augmentation: pass p of epoch e has the key e * repeat + p, which draws both.
With repeat 1 the key is the epoch.

- `global`: one permutation of all samples per pass, the passes one after another, cut into global batches of
  world x batch; rank r takes the r-th slice of each. The global batch does not depend on how it is split
  over processes, but every rank reads every shard every epoch.
- `shards` (as MosaicML streaming): the shard order is permuted per pass; the samples, in that order, are
  cut into `world` contiguous parts, one per rank, so a rank (and a node, whose ranks are consecutive)
  reads only its share of the shards; within a part, samples are shuffled inside windows of `window`
  consecutive shards. A node-local cache then needs room for a window, not for the dataset.

With data.streams (`StreamSampler`, under `global`), the samples of several splits share one index space
(stream s holds [offset_s, offset_s + n_s)) and an epoch has a fixed size E, each stream its share q_s of it
(largest-remainder rounding: the shares sum to E). Each stream is drawn without replacement pass after pass:
its endless sequence is pass 0's permutation, then pass 1's, ..., and epoch e takes items [e q_s, (e+1) q_s)
of it, so a small stream repeats within an epoch (each pass its own permutation and augmentation key: the
pass number) and a large one is sub-sampled, continuing next epoch where it stopped. The streams' items are
then interleaved in one permutation of the epoch and cut into global batches as `global` does, which keeps
its guarantees: equal batches per rank, each stream's pass exactly once, any split over processes.

With data.sampling=rare (`RareClassSampler`, DAFormer's rare-class sampling), each slot of an epoch draws a
class c with probability proportional to exp((1 - f_c) / T), f_c the class's share of the labelled pixels,
then a sample holding more than data.rare_min_pixels of c, both with replacement; a class no sample holds
that way is left out of the draw. Each draw has its own augmentation key (its slot counted over the run,
epoch x draws + slot, mod 2^32), so a sample drawn twice gets two crops. The draws are a function of
(seed, epoch): the epoch is one global order cut into global batches as `global` does, so equal batches per
rank, a mid-epoch resume and a resume on another process count hold; exactly-once does not apply. With
data.streams each stream's share is drawn this way within the stream, then the epoch is interleaved as above.

The order of an epoch is a numpy array (8 bytes per sample and pass); batches are made when asked for, so
no Python object exists per sample of the dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


class _EpochSampler:
    """Common protocol: set_epoch(epoch, skip_batches), len() batches per rank, iteration, `batch(j)`."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int, repeat: int = 1):
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.b, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.repeat = max(1, repeat)
        self.epoch = 0
        self.skip = 0
        self._cache: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its shuffle) and how many of this epoch's batches were already consumed."""
        self.epoch, self.skip = epoch, skip_batches

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's (sample index, augmentation key, valid) of the epoch, one entry per slot."""
        raise NotImplementedError

    def rows(self, epoch: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`_rows` of an epoch (default: the current one), computed once per epoch; the two newest are kept
        (a loader reads the next epoch's first batches while the loop finishes the current one)."""
        epoch = self.epoch if epoch is None else epoch
        rows = self._cache.pop(epoch, None)
        if rows is None:
            current, self.epoch = self.epoch, epoch
            try:
                rows = self._rows()
            finally:
                self.epoch = current
        self._cache[epoch] = rows  # the most recently used last
        for old in list(self._cache)[:-2]:
            del self._cache[old]
        return rows

    def batch(self, j: int, epoch: int | None = None) -> list[tuple[int, int, bool]]:
        """This rank's j-th batch of an epoch (default: the current one): (sample index, augmentation key,
        valid) each."""
        idx, key, valid = (a[j * self.b:(j + 1) * self.b] for a in self.rows(epoch))
        return list(zip(idx.tolist(), key.tolist(), valid.tolist()))

    @property
    def epoch_free(self) -> bool:
        """Every epoch has the same batches (validation: no shuffle, no repeat)."""
        return False

    def batches(self) -> list[list[tuple[int, int, bool]]]:
        """Every batch of this rank's epoch (for tests and reports; the loader asks one at a time)."""
        return [self.batch(j) for j in range(len(self))]

    def __iter__(self):
        for j in range(self.skip, len(self)):
            yield self.batch(j)


class EpochBatchSampler(_EpochSampler):
    """data.shuffle=global (and validation, unshuffled); see the module docstring."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, shuffle: bool = False,
                 seed: int = 0, repeat: int = 1):
        super().__init__(n, batch_size, world, rank, seed, repeat)
        self.shuffle = shuffle

    def __len__(self) -> int:
        return math.ceil(self.n * self.repeat / (self.b * self.world))

    @property
    def epoch_free(self) -> bool:
        """Every epoch has the same batches (validation: no shuffle, no repeat)."""
        return not self.shuffle and self.repeat == 1

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's sample order and augmentation keys: its passes, each shuffled by (seed, pass key)."""
        keys = np.arange(self.repeat, dtype=np.int64) + self.epoch * self.repeat
        if not self.shuffle:
            return np.tile(np.arange(self.n, dtype=np.int64), self.repeat), np.repeat(keys, self.n)
        gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + int(k)) for k in keys]
        perms = [torch.randperm(self.n, generator=g).numpy() for g in gens]
        return np.concatenate(perms), np.repeat(keys, self.n)

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.cut(*self.order())

    def cut(self, order: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's global order cut into global batches of world x batch, padded; this rank's slices."""
        total, g = len(self) * self.b * self.world, self.b * self.world
        pad = total - len(order)  # the tail: repeats of the epoch's first samples, invalid
        order = np.concatenate([order, order[np.arange(pad) % len(order)]])
        keys = np.concatenate([keys, keys[np.arange(pad) % len(keys)]])
        valid = np.arange(total) < total - pad
        mine = (np.arange(total) % g) // self.b == self.rank  # rank r: slots [r*b, (r+1)*b) of each group
        return order[mine], keys[mine], valid[mine]


class StreamSampler(EpochBatchSampler):
    """data.streams under data.shuffle=global; see the module docstring. `sizes` are the streams' sample
    counts, `shares` their samples per epoch (summing to the epoch's size)."""

    def __init__(self, sizes: list[int], shares: list[int], batch_size: int, world: int = 1, rank: int = 0,
                 seed: int = 0):
        if min(sizes) < 1:
            raise ValueError("empty stream")
        super().__init__(sum(shares), batch_size, world, rank, shuffle=True, seed=seed)
        self.sizes, self.shares = np.asarray(sizes, np.int64), np.asarray(shares, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def stream_pass(self, s: int, p: int) -> np.ndarray:
        """Stream s's permutation in its pass p (indexes within the stream, int32)."""
        rng = np.random.default_rng([self.seed, 0x5354, s, p])
        return rng.permutation(np.arange(int(self.sizes[s]), dtype=np.int32))

    def packed(self, epoch: int) -> np.ndarray:
        """The epoch's items of every stream, stream after stream, each one int64: its index in the shared
        space above 32 bits, its augmentation key (the stream's pass) below, so the interleaving shuffles
        one array in place (8 bytes a sample while the epoch is planned)."""
        out, at = np.empty(int(self.shares.sum()), np.int64), 0
        for s, (n, q) in enumerate(zip(self.sizes.tolist(), self.shares.tolist())):
            start = epoch * q
            for p in range(start // n, (start + q - 1) // n + 1 if q else start // n):
                lo, hi = max(start, p * n) - p * n, min(start + q, (p + 1) * n) - p * n
                part = out[at:at + hi - lo]
                part[:] = self.stream_pass(s, p)[lo:hi]
                part += self.offsets[s]
                part <<= 32
                part |= p
                at += hi - lo
        return out

    @staticmethod
    def unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(index in the shared space, augmentation key = the stream's pass) of packed items."""
        return packed >> 32, packed & 0xFFFFFFFF

    def drawn(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's items of every stream, stream after stream, before they are interleaved."""
        return self.unpack(self.packed(epoch))

    def mixed(self, epoch: int) -> np.ndarray:
        """`packed(epoch)` interleaved in one permutation of the epoch (its global order)."""
        packed = self.packed(epoch)
        np.random.default_rng([self.seed, 0x4D49, epoch]).shuffle(packed)
        return packed

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global order: (index, augmentation key)."""
        return self.unpack(self.mixed(self.epoch))

    def seen(self, epochs: int, batches: int) -> list[int]:
        """Samples of each stream trained on after `epochs` whole epochs and `batches` batches (of each
        process) into the next one, padding excluded."""
        taken = self.unpack(self.mixed(epochs)[:batches * self.b * self.world])[0] if batches else None
        return per_stream(self.shares, self.offsets, epochs, taken)


def per_stream(shares: np.ndarray, offsets: np.ndarray, epochs: int, taken: np.ndarray | None) -> list[int]:
    """Samples of each stream after `epochs` whole epochs (its share each) and the indexes `taken` so far of
    the next (None: none), found by the stream each shared index falls in."""
    done = shares * epochs
    if taken is not None:
        stream = np.searchsorted(offsets, taken, side="right") - 1
        done = done + np.bincount(stream, minlength=len(shares))
    return done.tolist()


@dataclass(frozen=True)
class ClassPool:
    """One stream's rare-class draw: the classes it can draw, their probabilities, and for each the samples
    (indexes within the stream, int32) holding more than the minimum of its pixels."""

    classes: np.ndarray
    probs: np.ndarray
    members: tuple[np.ndarray, ...]

    @classmethod
    def of(cls, counts: np.ndarray, temperature: float, min_pixels: int) -> ClassPool:
        """From per-sample class pixel counts (samples x classes): f_c over all labelled pixels; a class with
        no sample above `min_pixels` is left out (it would get the largest weight and nothing to draw)."""
        totals = np.asarray(counts.sum(axis=0), np.float64)
        freq = totals / max(totals.sum(), 1.0)
        members = [np.flatnonzero(counts[:, c] > min_pixels).astype(np.int32) for c in range(counts.shape[1])]
        drawable = np.array([c for c, m in enumerate(members) if len(m)], np.int64)
        if not len(drawable):
            return cls(drawable, np.zeros(0), ())
        logits = (1.0 - freq[drawable]) / temperature
        p = np.exp(logits - logits.max())
        return cls(drawable, p / p.sum(), tuple(members[c] for c in drawable))

    def draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """`n` draws: (sample index within the stream, drawn class), in draw order."""
        which = rng.choice(len(self.classes), size=n, p=self.probs)
        picks = np.empty(n, np.int64)
        for k, members in enumerate(self.members):
            at = np.flatnonzero(which == k)
            picks[at] = members[rng.integers(0, len(members), size=len(at))]
        return picks, self.classes[which]


class RareClassSampler(EpochBatchSampler):
    """data.sampling=rare; see the module docstring. `pools` one `ClassPool` per stream (a single split: one),
    `sizes` the streams' samples, `shares` their draws per epoch."""

    def __init__(self, pools: list[ClassPool], sizes: list[int], shares: list[int], batch_size: int,
                 world: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(sum(shares), batch_size, world, rank, shuffle=True, seed=seed)
        self.pools, self.shares = pools, np.asarray(shares, np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.tallies: dict[int, np.ndarray] = {}  # epoch -> its draws per class, kept as epochs are planned

    def plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The epoch's global order: (index in the shared space, augmentation key, drawn class). The key is
        the draw's slot counted over the run (mod 2^32), so no two draws of an epoch share one."""
        idx, cls = [], []
        for s, (pool, q) in enumerate(zip(self.pools, self.shares.tolist())):
            picks, drawn = pool.draw(np.random.default_rng([self.seed, 0x5241, s, epoch]), q)
            idx.append(picks + self.offsets[s])
            cls.append(drawn)
        n = self.n
        keys = (np.arange(n, dtype=np.int64) + epoch * n) & 0xFFFFFFFF
        perm = np.random.default_rng([self.seed, 0x4D49, epoch]).permutation(n)
        drawn = np.concatenate(cls)[perm]
        self.tallies[epoch] = np.bincount(drawn)
        return np.concatenate(idx)[perm], keys, drawn

    def order(self) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global order: (index, augmentation key)."""
        idx, keys, _ = self.plan(self.epoch)
        return idx, keys

    def draws(self, epochs: int, batches: int, classes: int) -> list[int]:
        """Draws per class after `epochs` whole epochs and `batches` batches (of each process) into the next,
        padding excluded: a pure function of the position, as a resume needs (the epochs this process did
        not plan, before its resume, are planned again)."""
        out = np.zeros(classes, np.int64)
        for e in range(epochs):
            tally = self.tallies[e] if e in self.tallies else np.bincount(self.plan(e)[2])
            out[:len(tally)] += tally
        if batches:
            out += np.bincount(self.plan(epochs)[2][:batches * self.b * self.world], minlength=classes)
        return out.tolist()

    def seen(self, epochs: int, batches: int) -> list[int]:
        """Samples drawn from each stream so far (streams: as `StreamSampler.seen`)."""
        taken = self.plan(epochs)[0][:batches * self.b * self.world] if batches else None
        return per_stream(self.shares, self.offsets, epochs, taken)


class ShardWindowSampler(_EpochSampler):
    """data.shuffle=shards; see the module docstring. `shard_sizes` are the manifest's sample counts."""

    def __init__(self, shard_sizes: list[int], batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 window: int = 4, repeat: int = 1):
        super().__init__(sum(shard_sizes), batch_size, world, rank, seed, repeat)
        self.sizes, self.window = np.asarray(shard_sizes, np.int64), max(1, window)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n * self.repeat / self.world) / self.b)

    def _rng(self, key: int, *more: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, key, 0x5A4D, *more])

    def _sequence(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(shard, sample, augmentation key) of the epoch's passes in read order, before window shuffles."""
        shards, samples, keys = [], [], []
        for p in range(self.repeat):
            key = self.epoch * self.repeat + p
            order = self._rng(key).permutation(len(self.sizes))
            counts = self.sizes[order]
            shard = np.repeat(order, counts)
            starts = np.repeat(self.offsets[order] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
            shards.append(shard)
            samples.append(np.arange(len(shard), dtype=np.int64) + starts)
            keys.append(np.full(len(shard), key, np.int64))
        return np.concatenate(shards), np.concatenate(samples), np.concatenate(keys)

    def _part(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This rank's contiguous share of the epoch's sequence."""
        shard, sample, key = self._sequence()
        n = len(shard)
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        return shard[lo:hi], sample[lo:hi], key[lo:hi]

    def shard_order(self) -> list[int]:
        """The shards this rank reads this epoch, in the order it first reads them (for prefetching)."""
        shard, _, _ = self._part()
        return list(dict.fromkeys(shard.tolist()))

    def _rows(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        shard, sample, key = self._part()
        # a window: `window` consecutive shards of the rank's read order (a shard met again in a later pass
        # starts a new window), shuffled inside
        starts = np.flatnonzero(np.concatenate([[True], (shard[1:] != shard[:-1]) | (key[1:] != key[:-1])]))
        run_of = np.cumsum(np.isin(np.arange(len(shard)), starts)) - 1
        window_of = run_of // self.window
        out_s, out_k = [], []
        for w in range(int(window_of[-1]) + 1 if len(shard) else 0):
            members = np.flatnonzero(window_of == w)
            perm = self._rng(int(key[members[0]]), self.rank, w * self.window).permutation(len(members))
            out_s.append(sample[members[perm]])
            out_k.append(key[members[perm]])
        samples = np.concatenate(out_s) if out_s else np.zeros(0, np.int64)
        keys = np.concatenate(out_k) if out_k else np.zeros(0, np.int64)
        total = len(self) * self.b
        pad = total - len(samples)
        pool, pool_k = (samples, keys) if len(samples) else (np.zeros(1, np.int64),
                                                             np.full(1, self.epoch * self.repeat, np.int64))
        samples = np.concatenate([samples, pool[np.arange(pad) % len(pool)]])  # fewer samples than ranks:
        keys = np.concatenate([keys, pool_k[np.arange(pad) % len(pool_k)]])  # this rank pads only
        return samples, keys, np.arange(total) < total - pad
