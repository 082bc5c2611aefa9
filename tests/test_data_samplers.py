"""The samplers: equal batches on every rank, each sample once per epoch, a shuffle per epoch, resume by
skipping batches, and the global batch independent of its split over processes."""

import math

import pytest

from distseg.data.sampler import EpochBatchSampler


@pytest.mark.parametrize("n,b,world", [(14, 4, 1), (14, 2, 2), (5, 2, 2), (16, 4, 2), (7, 3, 3), (1, 4, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_equal_batches_and_each_sample_once(n, b, world, shuffle):
    for epoch in (0, 1):
        seen, lengths = [], set()
        for rank in range(world):
            s = EpochBatchSampler(n, b, world, rank, shuffle=shuffle, seed=5)
            s.set_epoch(epoch)
            batches = list(s)
            lengths.add(len(batches))
            assert all(len(bt) == b for bt in batches)
            seen += [i for bt in batches for i, e, v in bt if v]
        assert len(lengths) == 1
        assert sorted(seen) == list(range(n))


def test_sampler_shuffles_by_epoch_and_skips():
    s = EpochBatchSampler(20, 2, 2, 1, shuffle=True, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for bt in e0 for i, *_ in bt] != [i for bt in e1 for i, *_ in bt]
    s.set_epoch(0, skip_batches=3)
    assert list(s) == e0[3:]
    # the global batch does not depend on how it is split: 1 x 4 == 2 x 2
    one = EpochBatchSampler(20, 4, 1, 0, shuffle=True, seed=1)
    two = [EpochBatchSampler(20, 2, 2, r, shuffle=True, seed=1) for r in range(2)]
    for j, bt in enumerate(one):
        assert [i for i, *_ in bt] == [i for r in range(2) for i, *_ in list(two[r])[j]]


@pytest.mark.parametrize("world,b", [(1, 4), (2, 3), (3, 2), (4, 1)])
def test_shard_window_sampler_exactly_once_equal_batches_and_shard_share(world, b):
    from distseg.data.sampler import ShardWindowSampler

    sizes = [5, 4, 5, 3, 5, 4, 2, 5]
    shard_of = [k for k, n in enumerate(sizes) for _ in range(n)]
    orders = []
    for epoch in (0, 1):
        seen, lengths = [], set()
        for rank in range(world):
            s = ShardWindowSampler(sizes, b, world, rank, seed=3, window=2)
            s.set_epoch(epoch)
            batches = list(s)
            lengths.add(len(batches))
            assert all(len(bt) == b for bt in batches)
            seen += [i for bt in batches for i, e, v in bt if v and e == epoch]
            touched = {shard_of[i] for bt in batches for i, _, _ in bt}
            assert touched == set(s.shard_order())
            assert len(touched) <= math.ceil(len(sizes) / world) + 1  # its share, plus a boundary shard
            first_window = {shard_of[i] for bt in batches for i, _, v in bt if v}
            if rank == 0:
                orders.append([i for bt in batches for i, _, _ in bt])
            # resume mid-epoch: the same batches continue
            s2 = ShardWindowSampler(sizes, b, world, rank, seed=3, window=2)
            s2.set_epoch(epoch, skip_batches=1)
            assert list(s2) == batches[1:]
            assert first_window
        assert len(lengths) == 1 and sorted(seen) == list(range(sum(sizes)))
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_shard_window_shuffles_within_windows_only():
    from distseg.data.sampler import ShardWindowSampler

    sizes = [4] * 6
    s = ShardWindowSampler(sizes, 4, 1, 0, seed=0, window=2)
    order = [i for bt in s for i, _, _ in bt]
    shards = [i // 4 for i in order]
    for w in range(0, 24, 8):  # each run of 8 samples (2 shards) comes from exactly 2 shards
        assert len(set(shards[w:w + 8])) == 2
    assert order != sorted(order)


@pytest.mark.parametrize("shuffle", ["global", "shards"])
def test_a_repeated_split_sees_each_sample_once_per_pass_with_its_own_shuffle_and_key(shuffle):
    from distseg.data.sampler import ShardWindowSampler

    sizes, world, b, k = [5, 4, 5, 3], 2, 3, 3
    n = sum(sizes)
    for epoch in (0, 1):
        per_pass: dict[int, list[int]] = {}
        lengths = set()
        for rank in range(world):
            s = (EpochBatchSampler(n, b, world, rank, shuffle=True, seed=2, repeat=k) if shuffle == "global"
                 else ShardWindowSampler(sizes, b, world, rank, seed=2, window=2, repeat=k))
            s.set_epoch(epoch)
            batches = list(s)
            lengths.add(len(batches))
            for bt in batches:
                for i, key, valid in bt:
                    if valid:
                        per_pass.setdefault(key, []).append(i)
        assert len(lengths) == 1
        assert sorted(per_pass) == [epoch * k + p for p in range(k)]  # the pass is part of the key
        for key, seen in per_pass.items():
            assert sorted(seen) == list(range(n)), key  # exactly once per pass
    one = EpochBatchSampler(n, b, 1, 0, shuffle=True, seed=2, repeat=k)
    orders = [one.order()[0][p * n:(p + 1) * n].tolist() for p in range(k)]
    assert len({tuple(o) for o in orders}) == k  # each pass its own permutation
