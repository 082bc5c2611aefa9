"""End-to-end training on synthetic shards: 1 vs 2 processes, gradient accumulation and OHEM normalised over
both, kill + resume, exactly-once val, NaN stop, fine-tuning with a new head, EMA weights scored by validation
as evaluate scores them, and every ready config trains."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import (
    ROOT,
    SGD,
    TRAIN,
    assert_user_error,
    base_overrides,
    run_cli,
    run_train,
    val_pixels,
    weights,
)
from distseg.config import load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models.weights import load_weights
from distseg.runs.checkpoint import latest_checkpoint, read_state
from distseg.shards.manifest import check_scheme, load_manifest

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
    # a new run's parameter grouping: recorded (config.yaml keeps `auto`, so that an experiment's stage
    # compares equal to today's config), and what the optimizer state holds
    ckpt = latest_checkpoint(one_proc_run / "checkpoints")
    params = list(weights(one_proc_run, kind="raw").values())  # group norm: no buffers, parameters alone
    convs = sum(v.dim() == 4 for v in params)  # the U-Net's convolution kernels: decayed; the rest is not
    assert read_state(ckpt).grouping == {"no_decay": True, "no_decay_names": [], "encoder_lr_mult": 1.0,
                                         "layer_decay": 1.0, "tensors": [convs, len(params) - convs]}
    groups = torch.load(ckpt / "optimizer.bin", weights_only=True)["param_groups"]
    assert [g["weight_decay"] for g in groups] == [load_config(None).optim.weight_decay, 0.0]


@pytest.mark.parametrize("loader", ["torch", "dali", "torch+shards"])
def test_kill_and_resume_equals_uninterrupted(shards, tmp_path, loader):
    # fp32: bf16 on a CPU without native bf16 is emulated ~100x slower, and a test's time may not depend on
    # the CPU's type; a bf16 kill and resume runs on CUDA (tests/test_training_gpu.py)
    ov = {"data.batch_size": 2, "data.num_workers": 1, "train.ckpt_every": 3, "train.epochs": 2,
          "train.mixed_precision": "no", "train.clip_grad": 0.5, "loss.dice": 0.5, "train.ema_decay": 0.9,
          "data.loader": loader.split("+")[0], "data.shuffle": "shards" if "shards" in loader else "global"}
    run_train(base_overrides(shards, tmp_path, "ref", **ov))
    args = base_overrides(shards, tmp_path, "killed", **ov)
    # torch: killed while the step-6 checkpoint is written on its thread (a slow disk: the test hook), with
    # step 3's complete; the others once step 3's is complete
    writing = loader == "torch"
    env = dict(os.environ, OMP_NUM_THREADS="1", DISTSEG_CHECKPOINT_THROTTLE="3" if writing else "0")
    proc = subprocess.Popen([sys.executable, TRAIN, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    ckpts = tmp_path / "killed" / "checkpoints"
    ck, in_flight = ckpts / "step-00000003", ckpts / ".step-00000006.tmp"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            ck.exists() and (in_flight.exists() or not writing)):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert ck.exists() and (in_flight.exists() or not writing)
    assert [c.name for c in ckpts.glob("step-*")] == ["step-00000003"]
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
    # the killed process's part is the step-3 checkpoint's segment; the resumed one takes it from there
    assert [(g["first_step"], g["last_step"]) for g in sk["segments"]] == [(0, 3), (3, sk["steps"])]
    # the killed process logged steps past step 3; TensorBoard shows each step once, the resumed values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    curves = []
    for name in ("ref", "killed"):
        ea = EventAccumulator(str(tmp_path / name / "tb"))
        ea.Reload()
        curves.append([(e.step, round(e.value, 5)) for e in ea.Scalars("train/loss")])
    assert curves[1] == curves[0] and len(curves[0]) == sk["steps"]
    # only complete checkpoints carry the final name; none is left half-written
    assert not [c for c in ckpts.iterdir() if c.name.endswith(".tmp")]


def test_nan_loss_stops_clearly(shards, tmp_path):
    p = run_train(base_overrides(shards, tmp_path, "nan", **{"optim.name": "sgd", "optim.lr": 1e30}),
                  check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "loss is not finite" in err[0] and "Traceback" not in p.stderr


def test_bad_config_is_one_line(shards, tmp_path):
    """The training entry's own error path, end to end; the inputs' messages are checked in-process."""
    p = run_train(base_overrides(shards, tmp_path, "bad", **{"train.epochz": 1}), check=False)
    assert_user_error(p, "unknown key train.epochz")
    assert not (tmp_path / "bad").exists()
    with pytest.raises(UserError, match="no manifest"):
        load_manifest(tmp_path / "nowhere", "train")
    with pytest.raises(UserError, match="re-shard with --scheme category"):
        check_scheme(load_manifest(shards, "train"), get_scheme("category"))


def test_finetune_with_new_head(person_shards, one_proc_run, tmp_path):
    p = run_train(base_overrides(person_shards, tmp_path, "ft", **{
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


def test_ohem_normalises_over_ranks_and_accumulation(shards, tmp_path):
    """Hard pixels are chosen per micro-batch: 2 processes x batch 2 see the micro-batches that 1 process x
    batch 2 x 2 accumulation steps sees, so with the loss normalised by the kept pixels of the whole global
    batch both give the same weights (SGD)."""
    ov = {**SGD, "data.batch_size": 2, "loss.ohem": "true", "loss.ohem_thresh": 0.06,
          "loss.ohem_min_kept": 2000, "train.epochs": 1}
    run_train(base_overrides(shards, tmp_path, "two", **ov), procs=2)
    run_train(base_overrides(shards, tmp_path, "acc", **ov, **{"train.grad_accum": 2}))
    w2 = load_weights(latest_checkpoint(tmp_path / "two" / "checkpoints"))
    wa = load_weights(latest_checkpoint(tmp_path / "acc" / "checkpoints"))
    for k in w2:
        torch.testing.assert_close(w2[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["steps"] == json.loads((tmp_path / "acc" / "summary.json").read_text())["steps"] == 4


def test_validation_scores_the_ema_weights(shards, tmp_path):
    """Validation scores the EMA weights, exactly what evaluate scores by default (resuming with an EMA is
    bit-identical: the kill + resume test above keeps one)."""
    run_train(base_overrides(shards, tmp_path, "ema", **{"train.ema_decay": 0.8, "train.epochs": 1}))
    run = tmp_path / "ema"
    assert json.loads((run / "best" / "meta.json").read_text())["ema"] is True
    raw, avg = load_weights(run / "best", "raw"), load_weights(run / "best", "ema")
    assert any(not torch.equal(raw[k], avg[k]) for k in raw)
    summary = json.loads((run / "summary.json").read_text())
    run_cli("evaluate", "--run", run, "--checkpoint", "latest", "--json", tmp_path / "s.json")
    miou = json.loads((tmp_path / "s.json").read_text())["miou"]
    assert miou == pytest.approx(summary["final_miou"], abs=1e-9)


# resnet18 and resnet34 build in tests/test_models.py; the README trains resnet18 from configs/resnet.yaml
@pytest.mark.parametrize("config,encoder", [("resnet", None), ("convnext", None), ("efficientnet", None),
                                            ("timm-resnet50d", "timm:resnet10t")])
def test_each_config_trains_two_steps(shards, tmp_path, config, encoder):
    path = ROOT / "configs" / f"{config}.yaml"
    cfg = load_config(path)
    assert cfg.model.pretrained == "imagenet" and cfg.sched.warmup_steps > 0 and cfg.sched.power > 0
    ov = {"model.pretrained": "none", "data.batch_size": 2, "data.crop": "[64,96]", "train.max_steps": 2,
          "train.mixed_precision": "no", "data.val_batch_size": 2}
    if encoder:
        ov["model.encoder"] = encoder
    args = base_overrides(shards, tmp_path, "cfg", **ov)
    args = [a for a in args if not a.startswith(("model.base", "model.depth", "model.norm", "optim.lr",
                                                 "sched."))]
    p = run_train(["--config", path, *args])
    if config == "convnext":  # the recipe's groups, printed at the start
        groups = "groups: no decay on norms, biases, 1-d tensors; encoder lr x0.729; layer decay 0.9"
        assert groups in p.stdout and "encoder stage 3, no decay" in p.stdout, p.stdout
    w = load_weights(latest_checkpoint(tmp_path / "cfg" / "checkpoints"), "raw")
    assert any(k.startswith("encoder.body.") for k in w) and all(torch.isfinite(v).all() for v in w.values())
    summary = json.loads((tmp_path / "cfg" / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_miou"])
    saved = load_config(tmp_path / "cfg" / "config.yaml")
    assert saved.model.encoder == (encoder or cfg.model.encoder) and saved.optim.name == cfg.optim.name
