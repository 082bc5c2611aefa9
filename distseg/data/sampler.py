"""Sample-exact distribution of an epoch over ranks, in two shuffles (data.shuffle).

Both yield, per rank, the same number of batches of (sample index, epoch, valid); the tail is padded with
repeats marked invalid, so every rank yields as many batches as the others (DDP needs that) while each
sample counts exactly once per epoch: the trainer masks invalid samples out of the loss, the evaluator out
of the metrics. Both are pure functions of (seed, epoch, world, batch size), so a resumed run skips the
batches it consumed and continues with the same ones.

- `global`: one permutation of all samples per epoch, cut into global batches of world x batch; rank r
  takes the r-th slice of each. The global batch does not depend on how it is split over processes, but
  every rank reads every shard every epoch.
- `shards` (as MosaicML streaming): the shard order is permuted per epoch; the samples, in that order, are
  cut into `world` contiguous parts, one per rank, so a rank (and a node, whose ranks are consecutive)
  reads only its share of the shards; within a part, samples are shuffled inside windows of `window`
  consecutive shards. A node-local cache then needs room for a window, not for the dataset.
"""

from __future__ import annotations

import math

import numpy as np
import torch


class _EpochSampler:
    """Common protocol: set_epoch(epoch, skip_batches), len() batches per rank, iteration."""

    def __init__(self, n: int, batch_size: int, world: int, rank: int, seed: int):
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.b, self.world, self.rank, self.seed = n, batch_size, world, rank, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its shuffle) and how many of this epoch's batches were already consumed."""
        self.epoch, self.skip = epoch, skip_batches

    def batches(self) -> list[list[tuple[int, int, bool]]]:
        """This rank's batches of the current epoch: lists of (sample index, epoch, valid)."""
        raise NotImplementedError

    def __iter__(self):
        yield from self.batches()[self.skip:]


class EpochBatchSampler(_EpochSampler):
    """data.shuffle=global (and validation, unshuffled); see the module docstring."""

    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, shuffle: bool = False,
                 seed: int = 0):
        super().__init__(n, batch_size, world, rank, seed)
        self.shuffle = shuffle

    def __len__(self) -> int:
        return math.ceil(self.n / (self.b * self.world))

    def order(self) -> list[int]:
        """This epoch's sample order (shuffled by seed and epoch for training)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def batches(self) -> list[list[tuple[int, int, bool]]]:
        """This rank's batches: lists of (sample index, epoch, valid)."""
        order = self.order()
        g = self.b * self.world
        total = len(self) * g
        padded = [(i, True) for i in order] + [(order[k % self.n], False) for k in range(total - self.n)]
        out = []
        for j in range(len(self)):
            chunk = padded[j * g + self.rank * self.b: j * g + (self.rank + 1) * self.b]
            out.append([(i, self.epoch, v) for i, v in chunk])
        return out


class ShardWindowSampler(_EpochSampler):
    """data.shuffle=shards; see the module docstring. `shard_sizes` are the manifest's sample counts."""

    def __init__(self, shard_sizes: list[int], batch_size: int, world: int = 1, rank: int = 0, seed: int = 0,
                 window: int = 4):
        super().__init__(sum(shard_sizes), batch_size, world, rank, seed)
        self.sizes, self.window = list(shard_sizes), max(1, window)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)

    def __len__(self) -> int:
        return math.ceil(math.ceil(self.n / self.world) / self.b)

    def _rng(self, *keys: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, 0x5A4D, *keys])

    def _part(self) -> list[tuple[int, int]]:
        """This rank's (shard, sample) pairs in read order, before shuffling within windows."""
        order = self._rng().permutation(len(self.sizes))
        seq = [(int(k), int(i)) for k in order for i in range(self.offsets[k], self.offsets[k + 1])]
        lo, hi = self.n * self.rank // self.world, self.n * (self.rank + 1) // self.world
        return seq[lo:hi]

    def shard_order(self) -> list[int]:
        """The shards this rank reads this epoch, in the order it first reads them (for prefetching)."""
        return list(dict.fromkeys(k for k, _ in self._part()))

    def batches(self) -> list[list[tuple[int, int, bool]]]:
        """This rank's batches: lists of (sample index, epoch, valid)."""
        part = self._part()
        shards = list(dict.fromkeys(k for k, _ in part))
        samples: list[int] = []
        for w in range(0, len(shards), self.window):  # shuffle inside each window of consecutive shards
            members = set(shards[w:w + self.window])
            win = [i for k, i in part if k in members]
            samples += [win[j] for j in self._rng(self.rank, w).permutation(len(win))]
        rows = [(i, True) for i in samples]
        pool = samples or [0]  # fewer samples than ranks: this rank pads only
        rows += [(pool[k % len(pool)], False) for k in range(len(self) * self.b - len(samples))]
        return [[(i, self.epoch, v) for i, v in rows[j * self.b:(j + 1) * self.b]] for j in range(len(self))]
