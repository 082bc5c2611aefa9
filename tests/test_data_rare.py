"""Rare-class sampling (data/sampler.RareClassSampler, ClassPool): the class draw follows DAFormer's formula,
a drawn sample holds the drawn class, a class no sample holds is never drawn, every draw has its own
augmentation key, and the epoch is one global order, the same at any process count."""

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest

from distseg.config import load_config
from distseg.data.sampler import ClassPool, EpochBatchSampler, RareClassSampler, StreamSampler
from distseg.data.streams import rare_pools, sampling_record
from distseg.data.transforms import draw_params
from distseg.errors import UserError
from distseg.runs.checkpoint import RunState
from distseg.training.resume import check_sampling

MIN = 10


def counts(n=300, seed=0) -> np.ndarray:
    """Per-sample pixel counts of 6 classes: 0 everywhere and large, 1..3 in fewer and fewer samples,
    4 only below MIN pixels, 5 nowhere."""
    rng = np.random.default_rng(seed)
    c = np.zeros((n, 6), np.int64)
    c[:, 0] = rng.integers(5000, 9000, n)
    for k, share in ((1, 0.5), (2, 0.2), (3, 0.05)):
        has = rng.random(n) < share
        c[has, k] = rng.integers(MIN + 1, 400, has.sum())
    c[:, 4] = rng.integers(0, MIN + 1, n)  # never above MIN
    return c


def expected_probs(c: np.ndarray, temperature: float) -> dict[int, float]:
    """DAFormer: P(c) ~ exp((1 - f_c) / T) over the classes some sample holds above MIN pixels."""
    f = c.sum(0) / c.sum()
    drawable = [k for k in range(c.shape[1]) if (c[:, k] > MIN).any()]
    w = {k: np.exp((1 - f[k]) / temperature) for k in drawable}
    return {k: v / sum(w.values()) for k, v in w.items()}


def test_class_draws_follow_the_formula_and_hold_the_drawn_class():
    c, t = counts(), 0.1
    sampler = RareClassSampler([ClassPool.of(c, t, MIN)], [len(c)], [len(c)], batch_size=4, seed=3)
    want = expected_probs(c, t)
    assert sorted(want) == [0, 1, 2, 3], "a class only below the minimum, or absent, is left out"
    drawn, epochs = [], 40
    for e in range(epochs):
        idx, keys, cls = sampler.plan(e)
        assert (c[idx, cls] > MIN).all(), "every drawn sample holds its drawn class above the minimum"
        assert not np.isin(cls, [4, 5]).any()
        drawn.append(cls)
    drawn = np.concatenate(drawn)
    n = len(drawn)
    for k, p in want.items():  # binomial: within 4 standard deviations
        assert abs((drawn == k).mean() - p) < 4 * np.sqrt(p * (1 - p) / n) + 1e-9, (k, p)
    assert sampler.draws(epochs, 0, 6) == np.bincount(drawn, minlength=6).tolist()


def test_the_draw_is_rarer_first_at_low_temperature():
    c = counts()
    pool = ClassPool.of(c, 0.01, MIN)
    probs = dict(zip(pool.classes.tolist(), pool.probs))
    assert probs[3] > probs[2] > probs[1] > probs[0], "the rarer the class, the more it is drawn"


class Split:
    """What rare_pools reads of an opened split."""

    def __init__(self, c):
        self.c, self.split = c, "train"

    def class_counts(self, data):
        return self.c


def test_no_class_to_draw_is_refused_not_a_hang():
    c = counts()[:, [4, 5]]  # below the minimum, and nowhere
    assert len(ClassPool.of(c, 0.01, MIN).classes) == 0
    data = load_config(None, ["data.sampling=rare", f"data.rare_min_pixels={MIN}"]).data
    with pytest.raises(UserError, match=f"no sample of split train holds more than .*={MIN} pixels"):
        rare_pools([Split(c)], data)
    assert len(rare_pools([Split(counts())], data)[0].classes) == 4


def test_every_draw_has_its_own_augmentation_key():
    c = counts(n=40)
    sampler = RareClassSampler([ClassPool.of(c, 0.01, MIN)], [len(c)], [len(c)], batch_size=4, seed=1)
    for e in range(3):
        idx, keys, _ = sampler.plan(e)
        assert len(np.unique(keys)) == len(keys), "no two draws of an epoch share a key"
        twice = [i for i in np.unique(idx) if (idx == i).sum() > 1]
        assert twice, "with replacement, a small split repeats samples"
        i = twice[0]
        k1, k2 = keys[idx == i][:2]
        a = draw_params(1, int(k1), int(i), (0.5, 2.0), True, 0.2)
        b = draw_params(1, int(k2), int(i), (0.5, 2.0), True, 0.2)
        assert (a.scale, a.cy, a.cx) != (b.scale, b.cy, b.cx), "a sample drawn twice gets two crops"
    assert not set(sampler.plan(0)[1]) & set(sampler.plan(1)[1]), "nor across epochs"


@pytest.mark.parametrize("world,batch", [(2, 3), (4, 1)])
def test_one_global_order_whatever_the_process_count(world, batch):
    """The ranks' slices of each global batch are the one-process order cut alike; every rank gets as many
    batches; the position after k batches maps between layouts through the samples consumed."""
    c = counts(n=50)
    pool = ClassPool.of(c, 0.05, MIN)
    one = RareClassSampler([pool], [50], [50], batch_size=world * batch, seed=7)
    ranks = [RareClassSampler([pool], [50], [50], batch_size=batch, world=world, rank=r, seed=7)
             for r in range(world)]
    for s in (one, *ranks):
        s.set_epoch(2)
    assert len({len(r) for r in ranks}) == 1
    for j in range(len(one)):
        whole = one.batch(j)
        parts = [x for r in ranks for x in r.batch(j)]
        assert parts == whole
    resumed = RareClassSampler([pool], [50], [50], batch_size=batch, world=world, rank=1, seed=7)
    resumed.set_epoch(2, skip_batches=3)
    assert list(resumed) == ranks[1].batches()[3:], "a mid-epoch resume continues with the same batches"


def test_streams_draw_their_share_within_themselves():
    a, b = counts(n=30, seed=1), counts(n=70, seed=2)
    pools = [ClassPool.of(a, 0.01, MIN), ClassPool.of(b, 0.01, MIN)]
    sampler = RareClassSampler(pools, [30, 70], [45, 15], batch_size=5, seed=0)
    idx, _, cls = sampler.plan(0)
    assert len(idx) == 60 and (idx < 30).sum() == 45 and (idx >= 30).sum() == 15
    both = np.concatenate([a, b])
    assert (both[idx, cls] > MIN).all()
    sampler.set_epoch(0)
    assert sampler.seen(0, 2) == [int((idx[:10] < 30).sum()), int((idx[:10] >= 30).sum())]


def test_the_refusals_are_one_line():
    for bad, needle in ((["data.sampling=rare", "data.loader=dali"], "data.loader=torch"),
                        (["data.sampling=rare", "data.shuffle=shards"], "data.shuffle=global"),
                        (["data.sampling=sometimes"], "data.sampling must be one of uniform, rare"),
                        (["data.rare_temperature=0"], "data.rare_temperature must be > 0"),
                        (["data.epoch_samples=100"], "data.epoch_samples is the epoch's length")):
        with pytest.raises(UserError, match=needle):
            load_config(None, bad)
    assert load_config(None, ["data.sampling=rare", "data.epoch_samples=100"]).data.epoch_samples == 100


def test_uniform_sampling_orders_every_epoch_as_before():
    """data.sampling=uniform is untouched: the global and stream samplers' rows (index, key, valid) of
    three epochs hash as they did at c90fff4, before rare sampling."""
    h = hashlib.sha256()
    for s in (EpochBatchSampler(37, 3, 2, 1, shuffle=True, seed=5, repeat=2),
              StreamSampler([20, 9], [15, 10], 3, 2, 0, seed=5)):
        for e in range(3):
            s.set_epoch(e)
            for a in s.rows():
                h.update(np.ascontiguousarray(a).astype(np.int64).tobytes())
    assert h.hexdigest()[:16] == "79d67ff27b3ced5b"


def test_a_resume_with_other_sampling_is_one_line():
    ckpt = Path("runs/r/checkpoints/step-00000002")
    rare = load_config(None, ["data.sampling=rare", "data.rare_min_pixels=100"])
    state = RunState(step=2, batch_size=4, sampling=sampling_record(rare.data, 14, None))
    check_sampling(rare, ckpt, state, 14, None)
    for other, needle in ((load_config(None), "this start has data.sampling=uniform"),
                          (load_config(None, ["data.sampling=rare"]), "data.rare_min_pixels=3000"),
                          (rare, "(15 draws per epoch)")):
        with pytest.raises(UserError, match=re.escape(needle)):
            check_sampling(other, ckpt, state, 15 if other is rare else 14, None)
    with pytest.raises(UserError, match="trained with data.sampling=uniform"):
        check_sampling(rare, ckpt, RunState(step=2, batch_size=4), 14, None)  # a run made before: uniform
