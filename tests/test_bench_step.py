"""`bench train` times the step a run takes: its distseg rows call the training loop's own `train_step` on a
`Run` built as training builds it, and the launch-bound rows hold measured times and operator counts."""

import signal

import pytest
import torch

from distseg.config import load_config

TINY = ["model.base=4", "model.depth=2", "data.batch_size=2", "data.crop=[32,32]", "data.num_workers=0"]


@pytest.fixture
def in_process(tmp_path):
    """A fresh Accelerate state for this test's Accelerator and none left after; StopFlag's signal handlers
    given back to pytest."""
    from accelerate.state import AcceleratorState, GradientState

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for s, h in saved.items():
        signal.signal(s, h)


def test_the_bench_rows_run_the_loops_own_train_step(in_process, monkeypatch):
    from distseg.bench.step import measure_rows
    from distseg.data.batch import batch_problems
    from distseg.training import loop

    calls = []
    real = loop.train_step

    def spy(run, group):
        calls.append([b for b in group])
        return real(run, group)
    monkeypatch.setattr(loop, "train_step", spy)
    got = measure_rows(load_config(None, TINY), 19, [("fp32", "synthetic"), ("plain", "synthetic")], 1, 3,
                       60.0, False)
    assert len(calls) == 1 + 3  # warm-up and timed steps of the fp32 row; the plain row is plain PyTorch
    assert all(len(g) == 1 and batch_problems(g[0]) == [] for g in calls)  # batches as the loader's
    assert got["fp32", "synthetic"]["steps"] == 3 and got["fp32", "synthetic"]["img_s"] > 0
    assert got["plain", "synthetic"]["img_s"] > 0


def test_a_bench_step_changes_the_weights_as_the_training_runs_step(in_process, shards, tmp_path):
    """From the same seed and batch, one step of the bench's Run and one of the Run `setup` builds for a
    training run of the config (its shards, its loaders) leave the same weights and EMA."""
    from accelerate import Accelerator

    from distseg.bench.step import bench_run, loader_batch, real_step
    from distseg.training import loop
    from distseg.training.setup import setup

    cfg = load_config(None, TINY + [f"data.shards={shards}", f"output_dir={tmp_path}", "name=trained",
                                    "train.ema_decay=0.9", "train.clip_grad=0.5", "model.channels_last=false",
                                    "train.progress=false"])
    acc = Accelerator(cpu=True)
    trained = setup(cfg, acc, None)
    bench = bench_run(cfg, acc, tmp_path / "bench", 19)
    torch.manual_seed(1)
    batch = loader_batch(cfg, 19, acc.device, False)
    before = {k: v.clone() for k, v in bench.model.state_dict().items()}
    assert all(torch.equal(before[k], v) for k, v in trained.model.state_dict().items())
    loop.train_step(trained, [batch])
    real_step(bench)(batch)
    for mine, theirs in ((bench.model, trained.model), (bench.ema.module, trained.ema.module)):
        theirs = theirs.state_dict()
        for k, v in mine.state_dict().items():
            assert torch.allclose(v, theirs[k], atol=1e-7, rtol=0), k
    assert any(not torch.equal(before[k], v) for k, v in bench.model.state_dict().items())  # it stepped


def test_the_launch_bound_rows_hold_measured_times_and_operator_counts(in_process):
    from distseg.bench.step import launch_bound

    got = launch_bound(load_config(None, []), 19, steps=6, rounds=2)
    assert set(got) == {"plain", "real"}
    for row in got.values():
        assert row["ms"] > 0 and row["cpu_ms"] > 0 and row["steps"] == 6
        assert row["ops"] > 100 and row["ops"] == int(row["ops"])  # every step runs the same operators
