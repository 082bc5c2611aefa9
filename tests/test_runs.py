"""The runs room in-process: the lease (a live holder refused, a dead one, a requeued job or a silent one
taken over, the heartbeat noticing a takeover) and pruning that keeps other runs' checkpoints."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import wait_for
from distseg.runs import run_lock
from distseg.runs.run_dir import RunDir


def test_keep_last_prunes_only_this_runs_checkpoints(tmp_path):
    from distseg.run_files import TRAINER_STATE
    from distseg.runs.checkpoint import RunState, list_checkpoints, prune

    ck = tmp_path / "checkpoints"
    for step, rid in [(1, "old"), (2, "old"), (3, "new"), (4, "new"), (5, "new")]:
        d = ck / f"step-{step:08d}"
        d.mkdir(parents=True)
        (d / TRAINER_STATE).write_text(RunState(run_id=rid, step=step).to_json())
    prune(ck, "new", keep_last=2)
    assert [c.name for c in list_checkpoints(ck)] == ["step-00000001", "step-00000002", "step-00000004",
                                                      "step-00000005"]


def write_lease(run: Path, **fields) -> Path:
    holder = dict(host="node-elsewhere", pid=4242, start="1", job="", started="2026-11-26T00:00:00",
                  token="t" * 32)
    holder.update(fields)
    path = RunDir(run).lease
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".writing")  # whole or not at all, as a real holder writes it: a
    tmp.write_text(json.dumps(holder))  # heartbeat reading a half-written file would see no holder
    os.replace(tmp, path)
    return path


def test_lease_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    run = tmp_path / "runs" / "x"
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        write_lease(run, host=run_lock.Holder.me().host, pid=sleeper.pid,
                    start=run_lock._start_time(sleeper.pid))
        with pytest.raises(run_lock.RunLocked, match=f"in use by pid {sleeper.pid} on "):
            run_lock.acquire(RunDir(run), log=lambda m: None)
        sleeper.kill()  # killed, not yet reaped: a zombie, as a rank killed with its launcher stays until
        os.waitid(os.P_PID, sleeper.pid, os.WEXITED | os.WNOWAIT)  # init reaps it; it holds nothing
        said = []
        lease = run_lock.acquire(RunDir(run), log=said.append)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert said and f"its process {sleeper.pid} is gone" in said[0]
    assert json.loads(RunDir(run).lease.read_text())["pid"] == os.getpid()
    lease.release()
    assert not RunDir(run).lease.exists()


def test_lease_of_the_same_slurm_job_or_without_heartbeat_is_taken_over(tmp_path, monkeypatch):
    run = tmp_path / "y"
    path = write_lease(run, job="777")  # another node, heartbeat fresh
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(run_lock.RunLocked, match="node-elsewhere \\(Slurm job 777\\)"):
        run_lock.acquire(RunDir(run), log=lambda m: None)
    monkeypatch.setenv("SLURM_JOB_ID", "777")  # the requeued job takes over its own lease at once
    said = []
    run_lock.acquire(RunDir(run), log=said.append).release()
    assert "the same Slurm job 777, requeued" in said[0]

    monkeypatch.setenv("SLURM_JOB_ID", "778")
    path = write_lease(run, job="777")
    old = time.time() - run_lock.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    said = []
    run_lock.acquire(RunDir(run), log=said.append).release()
    assert "no heartbeat for" in said[0]


def test_heartbeat_refreshes_and_notices_a_takeover(tmp_path, monkeypatch):
    monkeypatch.setattr(run_lock, "HEARTBEAT_S", 0.05)
    run = tmp_path / "z"
    lease = run_lock.acquire(RunDir(run), log=lambda m: None)
    path = RunDir(run).lease
    os.utime(path, (1, 1))
    wait_for(lambda: path.stat().st_mtime > 1, 10, "a heartbeat")
    write_lease(run, pid=99, token="u" * 32)  # someone took it over (e.g. judged it stale)
    wait_for(lambda: lease.lost_to is not None, 10, "the loss to be noticed")
    assert lease.lost_to.pid == 99
    lease.release()
    assert path.exists(), "release must not remove a lease that is no longer ours"


def test_inspect_lists_checkpoints_by_epoch_and_where_best_came_from(one_proc_run):
    from distseg.runs.listing import describe_run

    text = describe_run(one_proc_run)
    meta = json.loads((one_proc_run / "best" / "meta.json").read_text())
    assert "step-00000004  step      4  end of epoch 1 " in text and "step-00000008  step      8  end of " \
        "epoch 2 " in text
    assert f"best: mIoU {100 * meta['score']:.2f}% at step {meta['step']} (end of epoch {meta['epoch']}); " \
        f"checkpoint step-{meta['step']:08d} kept" in text
    assert "summary: finished, 8 steps, 2 epochs" in text and "steps 0-8" in text


def test_a_checkpoint_states_its_place_in_the_epochs():
    from distseg.runs.checkpoint import RunState

    assert RunState(step=8, epoch=2, batch_in_epoch=0).position() == "end of epoch 2"
    assert RunState(step=5, epoch=1, batch_in_epoch=2).position() == "epoch 2 at batch 2"
