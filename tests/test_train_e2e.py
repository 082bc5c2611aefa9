"""End-to-end training on synthetic shards: 1 vs 2 processes, kill + resume, exactly-once val, NaN stop,
fine-tuning with a new head, and metrics equal to the official Cityscapes evaluation."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import SGD, TRAIN, assert_user_error, base_overrides, run_train, val_pixels, weights

pytestmark = pytest.mark.slow


def test_one_vs_two_processes_same_weights_and_exactly_once_val(shards, one_proc_run, tmp_path):
    run_train(base_overrides(shards, tmp_path, "two", **SGD,
                             **{"data.batch_size": 2, "data.val_batch_size": 3}),
              procs=2)
    two = tmp_path / "two"
    w1, w2 = weights(one_proc_run), weights(two)
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    s1 = json.loads((one_proc_run / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    assert s2["processes"] == 2 and s1["steps"] == s2["steps"] == 8  # 14 samples, global batch 4, 2 epochs
    # 5 val images over 2 ranks x 3 per batch: padded, yet every pixel counted exactly once
    assert s1["final_pixels"] == s2["final_pixels"] == val_pixels(shards)
    assert s1["final_miou"] == pytest.approx(s2["final_miou"], abs=1e-3)


def test_grad_accumulation_equals_the_same_global_batch(shards, one_proc_run, tmp_path):
    """2 processes x batch 1 x 2 accumulation steps == 1 process x batch 4 (global batch 4)."""
    run_train(base_overrides(shards, tmp_path, "acc", **SGD, **{"data.batch_size": 1, "train.grad_accum": 2}),
              procs=2)
    w1, w2 = weights(one_proc_run), weights(tmp_path / "acc")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    assert json.loads((tmp_path / "acc" / "summary.json").read_text())["steps"] == 8


def test_tensorboard_and_run_folder(one_proc_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(one_proc_run / "tb"))
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    assert {"train/loss", "train/lr", "perf/img_per_s", "perf/data_wait_frac", "val/mIoU",
            "val/pixel_acc"} <= scalars
    assert any(t.startswith("val_iou/") for t in scalars)
    assert len(ea.Tags()["images"]) == 4
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert len(losses) == 8 and all(np.isfinite(losses))
    lrs = [e.value for e in ea.Scalars("train/lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then poly decay
    assert (one_proc_run / "config.yaml").is_file()
    assert (one_proc_run / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("loader", ["torch", "dali", "torch+shards"])
def test_kill_and_resume_equals_uninterrupted(shards, tmp_path, loader):
    ov = {"data.batch_size": 2, "data.num_workers": 1, "train.ckpt_every": 3, "train.epochs": 2,
          "train.mixed_precision": "bf16", "train.clip_grad": 0.5, "loss.dice": 0.5, "train.ema_decay": 0.9,
          "data.loader": loader.split("+")[0], "data.shuffle": "shards" if "shards" in loader else "global"}
    run_train(base_overrides(shards, tmp_path, "ref", **ov))
    args = base_overrides(shards, tmp_path, "killed", **ov)
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ck = tmp_path / "killed" / "checkpoints" / "step-00000003"
    deadline = time.time() + 300
    while time.time() < deadline and not ck.exists():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists()
    p = run_train(args)
    assert "resumed from" in p.stdout
    batch = int(p.stdout.split("batch ")[1].split(")")[0])
    assert batch > 0, "the resume must start mid-epoch"
    for kind in ("raw", "ema"):  # the weight average resumes exactly too
        wr, wk = weights(tmp_path / "ref", kind=kind), weights(tmp_path / "killed", kind=kind)
        for k in wr:
            assert torch.equal(wr[k], wk[k]), (kind, k)
    sr = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sk = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert sr["final_miou"] == sk["final_miou"] and sr["steps"] == sk["steps"]
    # only complete checkpoints carry the final name; none is left half-written
    assert not [c for c in (tmp_path / "killed" / "checkpoints").iterdir() if c.name.endswith(".tmp")]


def test_nan_loss_stops_clearly(shards, tmp_path):
    p = run_train(base_overrides(shards, tmp_path, "nan", **{"optim.name": "sgd", "optim.lr": 1e30}),
                  check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "loss is not finite" in err[0] and "Traceback" not in p.stderr


def test_bad_config_is_one_line(shards, tmp_path):
    p = run_train(base_overrides(shards, tmp_path, "bad", **{"train.epochz": 1}), check=False)
    assert_user_error(p, "unknown key train.epochz")
    p = run_train(base_overrides(tmp_path / "nowhere", tmp_path, "bad2"), check=False)
    assert_user_error(p, "no manifest")
    p = run_train(base_overrides(shards, tmp_path, "bad3", **{"data.scheme": "category"}), check=False)
    assert_user_error(p, "re-shard with --scheme category")


def test_finetune_with_new_head(synth_root, one_proc_run, tmp_path):
    from distseg.data.shard import ShardOptions, run_shard

    shards = tmp_path / "person"
    for split in ("train", "val"):
        run_shard(synth_root, shards, ShardOptions(split=split, scheme="person", maxcount=4), progress=False,
                  log=lambda *a: None)
    p = run_train(base_overrides(shards, tmp_path, "ft", **{
        "data.scheme": "person", "train.init_from": one_proc_run / "best", "train.max_steps": 1,
        "optim.lr": 1e-12, "sched.warmup_steps": 0}))
    assert "(new head)" in p.stdout
    src, ft = weights(one_proc_run, "best"), weights(tmp_path / "ft")
    assert ft["head.weight"].shape[0] == 2 and src["head.weight"].shape[0] == 19
    body = [k for k in src if not k.startswith("head.")]
    for k in body:
        torch.testing.assert_close(src[k], ft[k], rtol=0, atol=1e-6, msg=k)


def test_shard_shuffle_refuses_a_mid_epoch_resume_in_another_layout(shards, tmp_path):
    ov = {"data.shuffle": "shards", "data.batch_size": 2, "train.max_steps": 3}
    run_train(base_overrides(shards, tmp_path, "r", **ov))  # stops inside epoch 1 (7 batches)
    p = run_train(base_overrides(shards, tmp_path, "r",
                                 **dict(ov, **{"train.max_steps": 6, "data.batch_size": 1})),
                  procs=2, check=False)
    assert "with data.shuffle=shards each rank reads its own shard windows" in p.stderr
    assert p.returncode != 0
    p = run_train(base_overrides(shards, tmp_path, "r", **dict(ov, **{"train.max_steps": 6})))
    assert "resumed from" in p.stdout
