"""Training on weighted streams (data.streams) end to end: the loader over a fine and a labelid stream,
the refusals, and Ctrl-C + resume (on as many processes, and on fewer) against an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from conftest import SGD, TRAIN, base_overrides, run_train, wait_for, weights
from distseg.config import load_config
from distseg.data.loader import make_loader
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.runs.checkpoint import RunState
from distseg.shards.shard import ShardOptions, run_shard
from distseg.training.resume import check_streams

ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def labelid_shards(synth_root, tmp_path_factory):
    """The same train images sharded with label ids: a second stream, remapped to trainid at load time."""
    out = tmp_path_factory.mktemp("labelid")
    run_shard(synth_root, out, ShardOptions(split="train", scheme="labelid", maxcount=4), progress=False,
              log=lambda *a: None)
    return out


def streams_config(tmp_path, shards, second, weights=(3, 1), **data):
    path = tmp_path / "streams.yaml"
    streams = [{"shards": str(shards), "split": "train", "weight": weights[0]},
               {"shards": str(second), "split": "train", "weight": weights[1]}]
    path.write_text(yaml.safe_dump({"data": {"shards": str(shards), "streams": streams, **data}}))
    return path


def test_the_loader_draws_each_stream_its_share(shards, labelid_shards, tmp_path):
    cfg = load_config(streams_config(tmp_path, shards, labelid_shards, **{"batch_size": 3, "num_workers": 0,
                                                                         "crop": [64, 128]}), [])
    loaders = [make_loader(cfg, "train", get_scheme("trainid"), True, world=2, rank=r) for r in range(2)]
    assert loaders[0].shares == [14, 5]  # 14 samples at 3/4: an epoch of ceil(14 / 0.75) = 19
    items = []
    for L in loaders:
        L.set_epoch(1)
        items += [(i, int(m.max())) for b in L for i, v, m in zip(b["index"], b["valid"], b["mask"]) if v]
    fine = sorted(i for i, _ in items if i < 14)
    assert len(items) == 19 and fine == list(range(14)), "the fine stream once an epoch, with 5 of the other"
    assert all(m < 19 or m == 255 for _, m in items), "labelid masks arrive in trainid classes"
    assert loaders[0].stream_images(2, 0) == [28, 10]
    alone = make_loader(load_config(None, [f"data.shards={shards}"]), "train", get_scheme("trainid"), True)
    assert np.allclose(loaders[0].class_pixels(), alone.class_pixels() * (1 + 5 / 14))


def test_streams_are_refused_where_they_cannot_keep_their_guarantees(shards, labelid_shards, person_shards,
                                                                      tmp_path):
    trainid = get_scheme("trainid")
    for setting, needle in (({"loader": "dali"}, "data.loader=torch"), ({"shuffle": "shards"},
                                                                         "data.shuffle=global")):
        cfg = load_config(streams_config(tmp_path, shards, labelid_shards, **setting), [])
        with pytest.raises(UserError, match=needle) as e:
            make_loader(cfg, "train", trainid, True)
        assert "\n" not in str(e.value)
    cfg = load_config(streams_config(tmp_path, shards, person_shards), [])
    with pytest.raises(UserError, match=r"data.streams\[1\] .*person") as e:
        make_loader(cfg, "train", trainid, True)
    assert "\n" not in str(e.value)
    state = RunState(batch_size=2, streams=[
        {"shards": str(shards), "split": "train", "weight": 3, "samples": 14, "size": 14},
        {"shards": str(labelid_shards), "split": "train", "weight": 1, "samples": 5, "size": 14}])
    cfg = load_config(streams_config(tmp_path, shards, labelid_shards), [])
    check_streams(cfg, tmp_path, state, [14, 5], [14, 14])  # the same streams resume
    equal = load_config(streams_config(tmp_path, shards, labelid_shards, weights=(1, 1)), [])
    for cfg_now, shares, sizes in ((cfg, [14, 6], [14, 14]), (equal, [14, 14], [14, 14]),
                                   (cfg, [14, 5], [14, 20]), (load_config(None, [f"data.shards={shards}"]),
                                                              None, None)):
        with pytest.raises(UserError, match="other data.streams .*then: .*now: ") as e:
            check_streams(cfg_now, tmp_path, state, shares, sizes)
        assert "\n" not in str(e.value)
    for mix, needle in (((1e-6, 1), "so small a share"), ((1000, 1), r"data.streams\[1\] .*gets 0 of")):
        with pytest.raises(UserError, match=needle):
            make_loader(load_config(streams_config(tmp_path, shards, labelid_shards, weights=mix), []),
                        "train", trainid, True)


def test_ctrl_c_and_resume_with_streams_equal_an_uninterrupted_run(shards, labelid_shards, tmp_path):
    """2 processes x batch 1: an epoch of 19 samples is 10 steps. Ctrl-C while step 2's checkpoint is
    written (a slow disk: the test hook) stops mid-epoch; the rerun ends bit-identical to an uninterrupted
    run. A stop at step 2 on 2 processes finished on 1 x batch 2: each stream's count as uninterrupted."""
    config = streams_config(tmp_path, shards, labelid_shards)
    ov = {"data.batch_size": 1, "data.num_workers": 0, "train.max_steps": 12, "train.epochs": 60,
          "train.ckpt_every": 2, "train.deterministic": "true", "train.mixed_precision": "no", **SGD}

    def args(name, **more):
        return ["--config", str(config), *base_overrides(shards, tmp_path, name, **{**ov, **more})]
    run_train(args("ref"), procs=2)
    ref = json.loads((tmp_path / "ref" / "summary.json").read_text())
    seen = [s["images"] for s in ref["streams"]]  # an epoch (14 + 5) and 2 steps (4 samples) of the next
    assert sum(seen) == 23 and seen[0] >= 14 and seen[1] >= 5, seen

    p = subprocess.Popen([sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", "2",
                          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN,
                          *args("cc")], env=dict(ENV, DISTSEG_CHECKPOINT_THROTTLE="1"),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    writing = tmp_path / "cc" / "checkpoints" / ".step-00000002.tmp"
    wait_for(lambda: writing.exists() or p.poll() is not None, what="the step-2 checkpoint in flight")
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    again = run_train(args("cc"), procs=2)
    assert "resumed from" in again.stdout and int(again.stdout.split("batch ")[1].split(")")[0]) > 0
    assert "images seen per stream" in again.stdout
    for k, v in weights(tmp_path / "ref").items():
        assert torch.equal(v, weights(tmp_path / "cc")[k]), k
    cc = json.loads((tmp_path / "cc" / "summary.json").read_text())
    assert cc["streams"] == ref["streams"] and len(cc["segments"]) == 2

    stop = tmp_path / "stop"  # asked before step 1: read with step 1's flags, so the checkpoint is step 2's
    stop.touch()
    p = run_train(args("el"), procs=2, check=False, env={"DISTSEG_STOP_FILE": str(stop)})
    assert p.returncode == 75, p.stderr[-3000:]
    stop.unlink()
    p = run_train(args("el", **{"data.batch_size": 2}))
    assert "resuming 2 process(es) x data.batch_size 1" in p.stdout
    el = json.loads((tmp_path / "el" / "summary.json").read_text())
    assert el["streams"] == ref["streams"], "2 -> 1 processes: each stream's count as uninterrupted"
    for k, v in weights(tmp_path / "ref").items():  # the same samples trained on: SGD is linear in them
        torch.testing.assert_close(weights(tmp_path / "el")[k], v, rtol=1e-4, atol=1e-5, msg=k)
