"""End-to-end training on synthetic shards: 1 vs 2 processes, kill + resume, exactly-once val, NaN stop,
fine-tuning with a new head, and metrics equal to the official Cityscapes evaluation."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, assert_user_error, run_cli

TRAIN = str(ROOT / "distseg" / "train.py")
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(shards, out, name, **extra):
    o = {"name": name, "output_dir": out, "data.shards": shards, "data.batch_size": 4, "data.val_batch_size": 2,
         "data.num_workers": 0, "data.crop": "[96,192]", "data.scale": "[0.75,1.25]", "model.base": 8,
         "model.depth": 2, "model.norm": "group", "optim.lr": 0.003, "train.epochs": 2, "train.val_every": 1,
         "train.progress": "false", "train.log_every": 1, "sched.warmup_steps": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run_train(overrides, procs=1, check=True, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if procs == 1:
        cmd = [sys.executable, TRAIN, *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
               "--dynamo_backend", "no", TRAIN, *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def weights(run_dir: Path, which="latest"):
    from distseg.checkpoint import latest_checkpoint, load_weights

    path = latest_checkpoint(run_dir / "checkpoints") if which == "latest" else run_dir / which
    return load_weights(path)


def val_pixels(shards: Path) -> int:
    man = json.loads((shards / "val.json").read_text())
    return sum(man["class_pixels"].values())


# SGD: the update is linear in the gradient, so equal gradients give equal weights up to float
# rounding (Adam would amplify rounding noise in near-zero gradients to whole learning-rate steps)
SGD = {"optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9}


@pytest.fixture(scope="module")
def one_proc_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_train(base_overrides(shards, out, "one", **SGD))
    return out / "one"


def test_one_vs_two_processes_same_weights_and_exactly_once_val(shards, one_proc_run, tmp_path):
    run_train(base_overrides(shards, tmp_path, "two", **SGD, **{"data.batch_size": 2, "data.val_batch_size": 3}),
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
    assert {"train/loss", "train/lr", "perf/img_per_s", "perf/data_wait_frac", "val/mIoU", "val/pixel_acc"} <= scalars
    assert any(t.startswith("val_iou/") for t in scalars)
    assert len(ea.Tags()["images"]) == 4
    losses = [e.value for e in ea.Scalars("train/loss")]
    assert len(losses) == 8 and all(np.isfinite(losses))
    lrs = [e.value for e in ea.Scalars("train/lr")]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[2]  # warmup, then poly decay
    assert (one_proc_run / "config.yaml").is_file() and (one_proc_run / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("loader", ["torch", "dali"])
def test_kill_and_resume_equals_uninterrupted(shards, tmp_path, loader):
    ov = {"data.batch_size": 2, "data.num_workers": 1, "train.ckpt_every": 3, "train.epochs": 2,
          "train.mixed_precision": "bf16", "train.clip_grad": 0.5, "loss.dice": 0.5, "data.loader": loader}
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
    wr, wk = weights(tmp_path / "ref"), weights(tmp_path / "killed")
    for k in wr:
        assert torch.equal(wr[k], wk[k]), k
    sr = json.loads((tmp_path / "ref" / "summary.json").read_text())
    sk = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert sr["final_miou"] == sk["final_miou"] and sr["steps"] == sk["steps"]
    # only complete checkpoints carry the final name; none is left half-written
    assert not [c for c in (tmp_path / "killed" / "checkpoints").iterdir() if c.name.endswith(".tmp")]


def test_nan_loss_stops_clearly(shards, tmp_path):
    p = run_train(base_overrides(shards, tmp_path, "nan", **{"optim.name": "sgd", "optim.lr": 1e30}), check=False)
    assert p.returncode == 3, p.stderr[-2000:]
    err = [l for l in p.stderr.splitlines() if l.startswith("error:")]
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


def test_evaluate_equals_official_cityscapes_evaluation(synth_root, shards, one_proc_run, tmp_path):
    """Predictions written by `distseg predict` scored by cityscapesscripts == `distseg evaluate`."""
    from distseg.data.shard import ShardOptions, run_shard

    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    png = tmp_path / "png"  # lossless val shards: evaluate sees exactly the pixels predict reads
    run_shard(synth_root, png, ShardOptions(split="val", image_format="png"), progress=False, log=lambda *a: None)
    res = tmp_path / "results"
    run_cli("predict", "--run", one_proc_run, "--out", res, synth_root / "leftImg8bit" / "val")
    ours_json = tmp_path / "ours.json"
    run_cli("evaluate", "--run", one_proc_run, "--shards", png, "--json", ours_json, "data.val_batch_size=1")
    ours = json.loads(ours_json.read_text())

    gts = sorted((synth_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds = [res / (g.name.replace("_gtFine_labelIds.png", "_pred_labelIds.png")) for g in gts]
    assert all(p.is_file() for p in preds)
    overlays = sorted((res / "overlay").glob("*.png"))
    assert len(overlays) == len(gts) and Image.open(overlays[0]).size == Image.open(gts[0]).size
    ev.args.evalInstLevelScore = False
    ev.args.JSONOutput = False
    ev.args.quiet = True
    official = ev.evaluateImgLists([str(p) for p in preds], [str(g) for g in gts], ev.args)
    from cityscapesscripts.helpers.labels import trainId2label

    for t in range(19):
        name = trainId2label[t].name
        o = official["classScores"][name]
        mine = ours["iou"][name]
        if np.isnan(o):
            assert mine is None, name
        else:
            assert mine == pytest.approx(o, abs=1e-12), name
    assert ours["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
    assert sum(v > 0 for v in official["classScores"].values() if not np.isnan(v)) >= 2  # a non-trivial comparison


def test_metrics_equal_official_on_noisy_predictions(synth_root, tmp_path):
    """Our confusion-matrix metrics vs cityscapesscripts on label-id results with misses, ignored ids and noise."""
    ev = pytest.importorskip("cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling")
    from distseg.labels import get_scheme
    from distseg.metrics import ConfusionMatrix

    scheme = get_scheme("trainid")
    rng = np.random.default_rng(0)
    gts = sorted((synth_root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    preds, cm = [], ConfusionMatrix(19)
    for g in gts:
        gt = np.asarray(Image.open(g))
        pred = gt.copy()
        noise = rng.random(gt.shape)
        pred[noise < 0.1] = rng.choice([7, 8, 11, 23, 26, 24, 0, 4], size=(noise < 0.1).sum())  # incl. ignored ids
        pred[:, : gt.shape[1] // 8] = 26  # a block of false 'car'
        path = tmp_path / g.name.replace("_gtFine_labelIds", "_pred")
        Image.fromarray(pred).save(path)
        preds.append(str(path))
        cm.update(torch.from_numpy(scheme.remap(pred).astype(np.int64)), torch.from_numpy(scheme.remap(gt).astype(np.int64)))
    ev.args.evalInstLevelScore = False
    ev.args.JSONOutput = False
    ev.args.quiet = True
    official = ev.evaluateImgLists(preds, [str(g) for g in gts], ev.args)
    s = cm.scores(scheme.eval_classes)
    for t, name in enumerate(scheme.class_names):
        o = official["classScores"][name]
        assert (np.isnan(o) and np.isnan(s["iou"][t])) or s["iou"][t] == pytest.approx(o, abs=1e-12), name
    assert s["miou"] == pytest.approx(official["averageScoreClasses"], abs=1e-12)
