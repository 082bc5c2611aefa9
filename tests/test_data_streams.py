"""Weighted dataset streams (data.streams): the sampler's guarantees as pure functions of (seed, epoch,
layout) — exact per-stream counts, exactly-once within a stream's pass, distinct augmentation keys for a
repeated sample, equal batches per rank, the same global batches for any split over processes."""

import numpy as np
import pytest

from distseg.data.sampler import StreamSampler


def epoch_items(sizes, shares, world, bs, epoch, seed=0):
    """Every rank's valid (index, key) of an epoch, and the batch count of each rank."""
    items, lens = [], set()
    for r in range(world):
        s = StreamSampler(sizes, shares, bs, world, r, seed)
        s.set_epoch(epoch)
        batches = s.batches()
        lens.add(len(batches))
        items += [(i, k) for b in batches for i, k, v in b if v]
    return items, lens


@pytest.mark.parametrize("sizes,shares,world,bs", [([7, 5], [9, 4], 2, 3), ([11, 3, 4], [6, 5, 2], 3, 2),
                                                    ([5, 40], [5, 13], 4, 1), ([13], [13], 1, 4)])
def test_each_epoch_gives_every_stream_its_share_exactly_once_per_pass(sizes, shares, world, bs):
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    drawn = [[] for _ in sizes]
    for epoch in range(4):
        items, lens = epoch_items(sizes, shares, world, bs, epoch)
        assert len(lens) == 1, "every rank gets the same number of batches"
        assert len(items) == sum(shares)
        stream = np.searchsorted(offsets, [i for i, _ in items], side="right") - 1
        assert np.bincount(stream, minlength=len(sizes)).tolist() == shares, "each stream its exact share"
        for s in range(len(sizes)):
            drawn[s] += sorted(((k, i) for (i, k), st in zip(items, stream) if st == s))
    for s, n in enumerate(sizes):
        by_pass = {}
        for k, i in drawn[s]:
            by_pass.setdefault(k, []).append(i)
        for k, members in by_pass.items():
            assert len(members) == len(set(members)), f"stream {s} repeats a sample within pass {k}"
            full = [p for p in by_pass if p < max(by_pass)]
            if k in full:
                assert sorted(members) == list(range(offsets[s], offsets[s] + n)), "a whole pass: each once"


def test_a_small_stream_repeats_with_its_own_keys_and_a_large_one_continues():
    s = StreamSampler([3, 50], [7, 5], 4, 1, 0, seed=1)
    idx, keys = s.drawn(0)
    small = idx < 3
    pairs = list(zip(idx[small].tolist(), keys[small].tolist()))
    assert len(pairs) == 7 and len(set(pairs)) == 7, "a sample drawn twice in an epoch has another key"
    assert sorted(set(keys[small].tolist())) == [0, 1, 2]
    large = [sorted(s.drawn(e)[0][s.drawn(e)[0] >= 3].tolist()) for e in range(10)]
    assert sorted(sum(large, [])) == list(range(3, 53)), "ten epochs of 5 are one pass over 50"
    passes = [[i for e in range(10 * p, 10 * p + 10) for i in s.drawn(e)[0].tolist() if i >= 3]
              for p in (0, 1)]
    assert sorted(passes[1]) == sorted(passes[0]) and passes[1] != passes[0], "each pass its own order"


def test_the_global_batches_do_not_depend_on_the_split_over_processes():
    one = StreamSampler([9, 4], [8, 5], 4, 1, 0, seed=3)
    one.set_epoch(2)
    glob = [b for b in one.batches()]
    two = [StreamSampler([9, 4], [8, 5], 2, 2, r, seed=3) for r in range(2)]
    for t in two:
        t.set_epoch(2)
    merged = [a + b for a, b in zip(two[0].batches(), two[1].batches())]
    assert glob == merged


def test_seen_counts_each_stream_through_epochs_and_into_the_next():
    s = StreamSampler([7, 5], [9, 4], 3, 2, 0, seed=0)
    assert s.seen(2, 0) == [18, 8]
    s.set_epoch(2)
    first = [i for b in s.batches()[:1] for i, _, v in b if v]
    others = StreamSampler([7, 5], [9, 4], 3, 2, 1, seed=0)
    others.set_epoch(2)
    first += [i for b in others.batches()[:1] for i, _, v in b if v]
    assert s.seen(2, 1) == [18 + sum(i < 7 for i in first), 8 + sum(i >= 7 for i in first)]
