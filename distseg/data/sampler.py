"""Sample-exact distribution of an epoch over ranks.

The epoch's order (shuffled by seed+epoch for training) is cut into global batches of world x batch
samples; rank r takes the r-th slice of each. The tail is padded with repeats marked invalid, so every
rank yields the same number of batches (DDP needs that) while each sample counts exactly once: the
trainer masks invalid samples out of the loss, the evaluator out of the metrics.
"""

from __future__ import annotations

import math

import torch


class EpochBatchSampler:
    """Batches of (sample index, epoch, valid) for one rank; see the module docstring."""
    def __init__(self, n: int, batch_size: int, world: int = 1, rank: int = 0, shuffle: bool = False,
                 seed: int = 0):
        if n < 1:
            raise ValueError("empty dataset")
        self.n, self.b, self.world, self.rank = n, batch_size, world, rank
        self.shuffle, self.seed = shuffle, seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch (its shuffle) and how many of this epoch's batches were already consumed."""
        self.epoch, self.skip = epoch, skip_batches

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

    def __iter__(self):
        yield from self.batches()[self.skip:]
