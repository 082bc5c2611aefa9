"""Training on CUDA (marked `gpu`: skipped without CUDA; `tools/gpu-check.sh` runs them on a GPU machine):
a few steps with bf16 + channels_last, with fp16 (GradScaler) and with torch.compile; a kill and resume that
is bit-identical under train.deterministic=true, and otherwise within the spread of two uninterrupted runs;
the GPU's idle time between steps as a sleeping loader makes it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TRAIN, base_overrides, run_train, weights

pytestmark = pytest.mark.gpu

GPU = {"model.norm": "batch", "data.num_workers": 2, "data.batch_size": 2}


@pytest.mark.parametrize("precision,extra", [("bf16", {}), ("fp16", {}), ("bf16", {"model.compile": "true"})],
                         ids=["bf16+cl", "fp16", "bf16+cl+compile"])
def test_a_few_steps_on_cuda(shards, tmp_path, precision, extra):
    ov = dict(GPU, **extra, **{"train.mixed_precision": precision, "model.channels_last": "true",
                               "train.max_steps": 4})
    p = run_train(base_overrides(shards, tmp_path, "g", **ov))
    assert "process(es) on cuda" in p.stdout
    s = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert s["steps"] == 4 and s["finished"] and s["final_miou"] is not None
    assert s["timing"]["gpu_idle_s"] is not None  # measured on CUDA
    w = weights(tmp_path / "g")
    assert all(torch.isfinite(v).all() for v in w.values())


def kill_at_first_checkpoint(args, tmp_path, name):
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = tmp_path / name / "checkpoints" / "step-00000003"
    deadline = time.time() + 300
    while time.time() < deadline and not ck.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists()


@pytest.mark.parametrize("deterministic", [True, False])
def test_kill_and_resume_on_cuda(shards, tmp_path, deterministic):
    ov = dict(GPU, **{"train.ckpt_every": 3, "train.epochs": 2, "train.mixed_precision": "bf16",
                      "train.deterministic": str(deterministic).lower()})
    run_train(base_overrides(shards, tmp_path, "a", **ov))
    args = base_overrides(shards, tmp_path, "k", **ov)
    kill_at_first_checkpoint(args, tmp_path, "k")
    p = run_train(args)
    assert "resumed from" in p.stdout
    a, k = weights(tmp_path / "a"), weights(tmp_path / "k")
    sa = json.loads((tmp_path / "a" / "summary.json").read_text())
    sk = json.loads((tmp_path / "k" / "summary.json").read_text())
    assert sa["steps"] == sk["steps"] and sa["history"][0]["step"] == sk["history"][0]["step"]
    if deterministic:
        for key in a:
            assert torch.equal(a[key], k[key]), key
        return
    run_train(base_overrides(shards, tmp_path, "b", **ov))  # the spread of two uninterrupted runs
    b = weights(tmp_path / "b")
    for key in a:
        spread = (a[key].float() - b[key].float()).abs().max().item()
        assert (a[key].float() - k[key].float()).abs().max().item() <= 4 * spread + 1e-6, key


def test_gpu_idle_time_is_what_a_sleeping_loader_makes_it():
    from distseg.bench.step import plain_step, synthetic_batches, time_row
    from distseg.config import load_config

    cfg = load_config(None, ["model.base=8", "model.depth=2", "data.batch_size=2", "data.crop=[64,128]"])
    device = torch.device("cuda")
    step, _ = plain_step(cfg, 19, "plain", device)
    fast = synthetic_batches(cfg, 19, device, True)

    def sleepy(delay):
        while True:
            time.sleep(delay)
            yield next(fast)
    busy = time_row(step, fast, device, 3, 30, 60)
    delay = 0.05
    slept = time_row(step, sleepy(delay), device, 3, 30, 60)
    per_step = 1 / (slept["img_s"] / 2)  # seconds per step in the sleepy run
    implied = delay / per_step  # the share of each step the GPU waits for the sleeping loader
    assert slept["idle"] == pytest.approx(implied, rel=0.2), (slept, implied)
    assert busy["idle"] < 0.1, busy  # no delay: the GPU is fed at once
