"""Runs that survive their operators: the run lock, no orphan ranks, Ctrl-C, full disks, and resuming on
another number of processes. Real processes, real signals, a real filesystem that fills up."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tracker_files import mlflow_history, mlflow_params, wandb_history

from conftest import (
    SGD,
    assert_user_error,
    base_overrides,
    run_cli,
    run_train,
    train_cmd,
    wait_for,
    weights,
)
from distseg.runs.checkpoint import damage, latest_checkpoint, list_checkpoints
from distseg.runs.run_dir import RunDir

ENV = dict(os.environ, OMP_NUM_THREADS="1")


def close(a: dict, b: dict) -> None:
    """Weights equal within the float noise of 1 vs 2 processes (the tolerance of test_training_e2e)."""
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc (ranks, and their DataLoader workers)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    """Running (not a zombie waiting to be reaped)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def newest_step(run: Path) -> int:
    ck = list_checkpoints(run / "checkpoints")
    return int(ck[-1].name.split("-")[1]) if ck else 0


# --- signals -------------------------------------------------------------------------------------------

def test_one_ctrl_c_asks_for_a_checkpoint_a_second_exits_at_once():
    code = ("from distseg.training.stopping import StopFlag\nimport time\nf = StopFlag()\n"
            "print('ready', flush=True)\nwhile not f.set: time.sleep(0.01)\n"
            "print('stop requested', flush=True)\ntime.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    assert p.stdout.readline().strip() == "ready"
    os.killpg(p.pid, signal.SIGINT)
    os.killpg(p.pid, signal.SIGINT)  # the same keypress, forwarded by a launcher: still one request
    heard = "SIGINT: stopping after this step, then checkpointing (Ctrl-C again exits at once, without one)"
    assert p.stdout.readline().strip() == heard  # at once, while the step runs
    assert p.stdout.readline().strip() == "stop requested"
    time.sleep(1.2)
    assert p.poll() is None, "the first Ctrl-C must not end the process"
    t = time.time()
    os.killpg(p.pid, signal.SIGINT)
    p.wait(timeout=10)
    assert time.time() - t < 5  # and as Python itself exits on an unhandled Ctrl-C:
    assert p.returncode == -signal.SIGINT and "KeyboardInterrupt" in p.stderr.read()


def test_ctrl_c_checkpoints_and_the_rerun_resumes(shards, tmp_path, monkeypatch):
    """... and the run's tracker runs (W&B offline, MLflow's file store) go on: see `check_trackers`."""
    args = base_overrides(shards, tmp_path, "cc", **{"train.epochs": 60, "train.ckpt_every": 2,
                                                     "train.trackers": "[wandb,mlflow]"})
    env = dict(ENV, WANDB_MODE="offline")
    p = subprocess.Popen([sys.executable, "-m", "distseg", "train", *args], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, start_new_session=True)
    wait_for(lambda: newest_step(tmp_path / "cc") >= 2 or p.poll() is not None, what="a checkpoint")
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "run the same command again to resume" in out
    stopped = newest_step(tmp_path / "cc")
    assert f"checkpointing at step {stopped}" in out and damage(latest_checkpoint(tmp_path / "cc" /
                                                                                  "checkpoints")) is None
    ids = json.loads((tmp_path / "cc" / "trackers.json").read_text())["runs"]
    again = run_train(args + [f"train.max_steps={stopped + 1}"], env={"WANDB_MODE": "offline"})
    assert f"resumed from {tmp_path / 'cc' / 'checkpoints' / f'step-{stopped:08d}'}" in again.stdout
    summary = json.loads((tmp_path / "cc" / "summary.json").read_text())
    segments = summary["segments"]
    assert [(g["first_step"], g["last_step"]) for g in segments] == [(0, stopped), (stopped, stopped + 1)]
    assert segments[0]["images"] == stopped * 4 and segments[1]["images"] == 4
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_trackers(tmp_path / "cc", ids, out + again.stdout, summary)


def check_trackers(run: Path, ids: dict, printed: str, summary: dict) -> None:
    """One W&B and one MLflow run over both processes (the ids the first one recorded), each step logged
    once with the loss and lr its step line printed; the last validation and the best score as
    summary.json has them; the settings as MLflow parameters."""
    assert summary["trackers"] == {name: {"run": ids[name], "failures": 0, "logged": {
        "train": summary["steps"], "val": summary["steps"], "best": summary["steps"]}} for name in ids}
    lines = re.findall(r"^step (\d+)/\d+ epoch \S+ loss (\S+) lr (\S+) ", printed, re.M)
    printed_steps = [(int(s), float(loss), float(lr)) for s, loss, lr in lines]
    assert [s for s, *_ in printed_steps] == list(range(1, summary["steps"] + 1))
    wandb_runs = wandb_history(run)
    assert list(wandb_runs) == [ids["wandb"]]
    rows = wandb_runs[ids["wandb"]]
    assert [step for step, _ in rows] == [s for s, *_ in printed_steps]  # each step once, in order
    assert [(step, round(v["train/loss"], 4), float(f"{v['train/lr']:.2e}")) for step, v in rows] == \
        printed_steps
    last, best = rows[-1][1], summary["best_score"]
    assert last["val/score"] == summary["history"][-1]["score"] and last["best/score"] == best
    assert last["val/mIoU"] == summary["final_miou"] and last["best/epoch"] == summary["best_epoch"]
    assert mlflow_history(run, ids["mlflow"], "train/loss") == [(s, v["train/loss"]) for s, v in rows]
    assert mlflow_history(run, ids["mlflow"], "best/score")[-1] == (summary["steps"], best)
    params = mlflow_params(run, ids["mlflow"])
    assert params["train.trackers"] == "[wandb, mlflow]" and params["train.ckpt_every"] == "2"


@pytest.mark.slow
def test_lock_ctrl_c_and_orphans_under_the_launcher(shards, tmp_path):
    """2 processes under distseg.launch: a second start is refused without touching the run; Ctrl-C to
    the process group checkpoints and exits 130 with one message; SIGKILL of the launcher alone takes
    every rank and data worker down within 10 s; the rerun, on 1 process, takes the lease over."""
    run = tmp_path / "ops"
    two = base_overrides(shards, tmp_path, "ops", **{"train.epochs": 60, "train.ckpt_every": 2,
                                                     "data.batch_size": 2, "data.num_workers": 1})

    def start():
        return subprocess.Popen(train_cmd(two, procs=2), env=ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)

    p = start()
    wait_for(lambda: newest_step(run) >= 2 or p.poll() is not None, what="the first checkpoint")
    holder = json.loads(RunDir(run).lease.read_text())
    assert holder["pid"] in descendants(p.pid)  # rank 0 holds it
    before = (run / "config.yaml").stat().st_mtime_ns, sorted(os.listdir(run / "tb"))
    second = run_train(base_overrides(shards, tmp_path, "ops", **{"train.epochs": 60}), check=False)
    assert_user_error(second, f"in use by pid {holder['pid']} on ")
    assert ((run / "config.yaml").stat().st_mtime_ns, sorted(os.listdir(run / "tb"))) == before

    os.killpg(p.pid, signal.SIGINT)  # Ctrl-C in the terminal: the launcher, both ranks, their workers
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "ChildFailedError" not in err and "death signal" not in err, err
    assert out.count("run the same command again to resume") == 1
    assert out.count("SIGINT: stopping after this step, then checkpointing") == 1
    assert not [c for c in (run / "checkpoints").iterdir() if c.name.endswith(".tmp")]
    assert not RunDir(run).lease.exists()

    p = start()
    interrupted_at = newest_step(run)
    wait_for(lambda: newest_step(run) > interrupted_at or p.poll() is not None, what="a new checkpoint")
    below = descendants(p.pid)
    assert len(below) >= 4, below  # 2 ranks, each with a data worker
    p.kill()  # the launcher alone
    p.communicate()
    t = time.time()
    wait_for(lambda: not any(alive(q) for q in below), 10, "the ranks and workers to exit")
    gone_after = time.time() - t

    resumed = run_train(base_overrides(shards, tmp_path, "ops", **{"train.epochs": 60, "train.ckpt_every": 2,
                                                                   "train.max_steps": newest_step(run) + 2}))
    assert "taking over the lease" in resumed.stdout and "is gone" in resumed.stdout
    assert "resuming 2 process(es) x data.batch_size 2" in resumed.stdout
    assert "resumed from" in resumed.stdout and gone_after < 10


# --- resuming on another number of processes ---------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("first,then", [((2, 2, 1), (1, 4, 1)), ((1, 4, 1), (2, 1, 2))],
                         ids=["2x2 to 1x4", "1x4 to 2x1x2accum"])
def test_resume_mid_epoch_on_another_number_of_processes(shards, one_proc_run, tmp_path, first, then):
    """Stop after step 2 (mid-epoch; a stop asked for before step 1 is read with step 1's flags, a step
    later) in one layout (processes, batch, accumulation), finish in another with the same global batch of
    4: the weights equal the uninterrupted 1-process run's within 1- vs 2-process float noise, so every
    sample was trained on exactly once."""
    def args(layout, **more):
        return base_overrides(shards, tmp_path, "el", **SGD, **{"data.batch_size": layout[1],
                                                               "train.grad_accum": layout[2]}, **more)
    stop = tmp_path / "stop"
    stop.touch()
    p = run_train(args(first), procs=first[0], check=False, env={"DISTSEG_STOP_FILE": str(stop)})
    assert p.returncode == 75, p.stderr[-3000:]
    assert newest_step(tmp_path / "el") == 2
    stop.unlink()
    p = run_train(args(then), procs=then[0])
    assert f"resuming {first[0]} process(es) x data.batch_size {first[1]}" in p.stdout
    assert f"(step 2, epoch 1 at batch {8 // (then[0] * then[1])})" in p.stdout  # 8 samples in
    close(weights(one_proc_run), weights(tmp_path / "el"))
    s = json.loads((tmp_path / "el" / "summary.json").read_text())
    assert s["steps"] == 8 and s["finished"]

    p = run_train(args((1, 3, 1)), check=False)
    assert_user_error(p, "was trained with a global batch of 4")


@pytest.mark.slow
def test_rare_sampling_resumes_mid_epoch_on_another_number_of_processes(shards, tmp_path):
    """data.sampling=rare: 2 processes x 2 stopped after step 2, finished by 1 process x 4, equal the
    uninterrupted 1 x 4 run, draws per class included (a resume with other sampling: tests/test_data_rare)."""
    rare = {"data.sampling": "rare", "data.rare_min_pixels": 100, "data.rare_temperature": 0.05}

    def args(name, batch):
        return base_overrides(shards, tmp_path, name, **SGD, **rare, **{"data.batch_size": batch})
    run_train(args("ref", 4))
    stop = tmp_path / "stop"
    stop.touch()
    p = run_train(args("rare", 2), procs=2, check=False, env={"DISTSEG_STOP_FILE": str(stop)})
    assert p.returncode == 75 and newest_step(tmp_path / "rare") == 2, p.stderr[-3000:]
    stop.unlink()
    p = run_train(args("rare", 4))
    assert "resuming 2 process(es) x data.batch_size 2" in p.stdout and "sampling: rare (" in p.stdout
    close(weights(tmp_path / "ref"), weights(tmp_path / "rare"))
    ref, resumed = (json.loads((tmp_path / n / "summary.json").read_text()) for n in ("ref", "rare"))
    assert resumed["sampling"] == ref["sampling"] and sum(ref["sampling"]["class_draws"].values()) == 2 * 14


# --- full disks ----------------------------------------------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs (a filesystem that really fills), grown to 64 MiB by calling the returned function."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")

    def grow():
        subprocess.run(["mount", "-o", "remount,size=64m", str(mnt)], check=True)
    try:
        yield mnt, grow
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_while_training_is_one_line_and_the_rerun_resumes_exactly(shards, tmp_path, small_fs):
    mnt, grow = small_fs
    ov = {"train.ckpt_every": 1, "train.keep_last": 2}
    ref = run_train(base_overrides(shards, tmp_path, "ref", **ov))
    assert ref.returncode == 0
    args = base_overrides(shards, mnt, "full", **ov)
    p = run_train(args, check=False)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: could not write "), p.stderr[-3000:]
    assert "No space left on device" in errors[0]
    last = latest_checkpoint(mnt / "full" / "checkpoints")
    assert f"the newest complete checkpoint is {last or 'none'}" in errors[0]
    leftovers = [q for q in (mnt / "full").rglob("*") if ".tmp" in q.name]
    assert not leftovers and all(damage(c) is None for c in list_checkpoints(mnt / "full" / "checkpoints"))

    grow()
    again = run_train(args)
    if last:
        assert f"resumed from {last}" in again.stdout
    for kind in ("raw",):
        wr, wf = weights(tmp_path / "ref", kind=kind), weights(mnt / "full", kind=kind)
        for k in wr:
            assert torch.equal(wr[k], wf[k]), k


def test_full_disk_while_sharding_or_predicting_names_the_file(synth_root, one_proc_run, small_fs):
    mnt, _ = small_fs
    (mnt / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))  # room for a few files only
    p = run_cli("shard", "--root", synth_root, "--split", "train", "--out", mnt / "shards", check=False)
    assert_user_error(p, f"No space left on device: {mnt / 'shards' / 'train-000000.tar'}")
    assert not list((mnt / "shards").glob("*.tar*")), "no partial shard, under any name"
    shutil.rmtree(mnt / "shards")
    p = run_cli("predict", "--run", one_proc_run, "--root", synth_root, "--split", "val",
                "--out", mnt / "pred", "--overlays", mnt / "ov", check=False)
    assert_user_error(p, "No space left on device: " + str(mnt))
    assert not [q for q in mnt.rglob("*") if ".tmp" in q.name]


def test_damaged_newest_checkpoint_falls_back_to_the_previous(shards, tmp_path):
    ov = base_overrides(shards, tmp_path, "r", **SGD, **{"train.ckpt_every": 2, "data.batch_size": 2,
                                                         "train.keep_last": 2})
    run_train(ov)
    final = weights(tmp_path / "r")
    ckpts = sorted((tmp_path / "r" / "checkpoints").iterdir())
    newest = ckpts[-1] / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated by a crash
    p = run_train(ov)
    assert f"warning: checkpoint {ckpts[-1]} is damaged (model.safetensors fails its sha256 check" in p.stdout
    assert f"resumed from {ckpts[-2]}" in p.stdout
    w = weights(tmp_path / "r")
    for k in final:
        assert torch.equal(final[k], w[k]), k
