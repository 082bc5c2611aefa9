import json
import os
import socket
import sys
import time
from pathlib import Path

import pytest

from zygote import Zygote

ROOT = Path(__file__).resolve().parents[1]
ZYGOTE = Zygote()  # this test process's preloaded interpreter for distseg commands (tests/zygote.py)


def run_cli(*args, check=True, env=None, timeout=600, cwd=None):
    """Run `distseg ARGS` in its own process, as a user would (`ZYGOTE` forks it); a CompletedProcess."""
    e = dict(os.environ)
    e.update(env or {})
    p = ZYGOTE.run([sys.executable, "-m", "distseg", *args], e, cwd, timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"distseg {' '.join(map(str, args))} failed "
                             f"({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


def assert_user_error(p, needle: str):
    """Exit 2, exactly one line on stderr mentioning `needle`, and no traceback."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in p.stderr


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from distseg.shards.synth import write_synth

    root = tmp_path_factory.mktemp("cityscapes")
    write_synth(root, {"train": 14, "val": 5, "test": 2}, width=256, height=128, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def shards(synth_root, tmp_path_factory) -> Path:
    """train + val shards of the synthetic tree (trainid; train JPEG, val PNG: the defaults)."""
    from distseg.shards.shard import ShardOptions, run_shard

    out = tmp_path_factory.mktemp("shards")
    for split, maxcount in (("train", 4), ("val", 2)):
        run_shard(synth_root, out, ShardOptions(split=split, maxcount=maxcount), progress=False,
                  log=lambda *a: None)
    return out


@pytest.fixture(scope="session")
def person_shards(synth_root, tmp_path_factory) -> Path:
    """train + val shards of the synthetic tree with the binary person scheme (read-only for the tests)."""
    from distseg.shards.shard import ShardOptions, run_shard

    out = tmp_path_factory.mktemp("person-shards")
    for split in ("train", "val"):
        run_shard(synth_root, out, ShardOptions(split=split, scheme="person", maxcount=4), progress=False,
                  log=lambda *a: None)
    return out


TRAIN = str(ROOT / "distseg" / "train.py")


def split_keys(shards, split: str = "train") -> list[str]:
    """The sample keys of a split, in the order of its shards (from their index)."""
    from distseg.shards.manifest import load_manifest
    from distseg.shards.shard_reader import ShardFiles, ShardSamples

    man = load_manifest(shards, split)
    return ShardSamples(man, ShardFiles(man)).index.all_keys()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_overrides(shards, out, name, **extra):
    o = {"name": name, "output_dir": out, "data.shards": shards, "data.batch_size": 4,
         "data.val_batch_size": 2,
         "data.num_workers": 0, "data.crop": "[96,192]", "data.scale": "[0.75,1.25]", "model.base": 8,
         "model.depth": 2, "model.norm": "group", "optim.lr": 0.003, "train.epochs": 2, "train.val_every": 1,
         "train.progress": "false", "train.log_every": 1, "sched.warmup_steps": 2}
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def train_cmd(overrides, procs=1):
    """train.py itself for one process, distseg.launch (accelerate launch) with gloo on CPU for several."""
    if procs == 1:
        return [sys.executable, TRAIN, *map(str, overrides)]
    return [sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--main_process_port", str(free_port()), "--mixed_precision", "no",
            "--dynamo_backend", "no", TRAIN, *map(str, overrides)]


def run_train(overrides, procs=1, check=True, timeout=600, env=None):
    p = ZYGOTE.run(train_cmd(overrides, procs), dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), None,
                   timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"training failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}")
    return p


def weights(run_dir: Path, which="latest", kind="auto"):
    """The weights of a run's latest checkpoint (or of `which`, e.g. best): kind raw, ema or auto."""
    from distseg.models.weights import load_weights
    from distseg.runs.checkpoint import latest_checkpoint

    path = latest_checkpoint(run_dir / "checkpoints") if which == "latest" else run_dir / which
    return load_weights(path, kind)


def val_pixels(shards: Path) -> int:
    man = json.loads((shards / "val.json").read_text())
    return sum(man["class_pixels"].values())


# SGD: the update is linear in the gradient, so equal gradients give equal weights up to float
# rounding (Adam would amplify rounding noise in near-zero gradients to whole learning-rate steps)
SGD = {"optim.name": "sgd", "optim.lr": 0.05, "optim.momentum": 0.9}


@pytest.fixture(scope="session")
def one_proc_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    run_train(base_overrides(shards, out, "one", **SGD))
    return out / "one"


def pytest_collection_modifyitems(config, items):
    """Skip the GPU tests without CUDA; order the tests longest first (early, then slow, then the rest, each
    in file order): xdist's workers take them in this order, so the last to finish is a short one."""
    import torch

    items.sort(key=lambda item: 0 if "early" in item.keywords else 1 if "slow" in item.keywords else 2)

    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def wait_for(predicate, timeout=300.0, what="condition"):
    """Poll `predicate` until it holds; fail naming `what` after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
