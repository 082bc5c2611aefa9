"""slurm/train.sh and slurm/shard.sh on a real Slurm cluster (slurmctld + 2 emulated slurmd on 127.0.0.1,
started and stopped here by tools/local-slurm/): array sharding, a 2-node run equal to a 1-process run, and
a SIGUSR1 -> checkpoint -> requeue -> resume cycle that ends with the uninterrupted run's weights."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, SGD, base_overrides, run_train, val_pixels, weights

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.xdist_group("slurm")]  # one cluster
SLURM_TOOLS = ROOT / "tools" / "local-slurm"


def free_ports(n: int) -> int:
    """The first of n consecutive free loopback ports (slurmctld, then one slurmd per node)."""
    import socket

    from conftest import free_port

    def free(port: int) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0
    for _ in range(50):
        first = free_port()
        if all(free(first + k) for k in range(n)):
            return first
    raise RuntimeError("no run of free ports")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A throw-away cluster: munge, slurmctld and two slurmd on 127.0.0.1, stopped (jobs cancelled, ports
    freed) when the module's tests end, whether they passed or not."""
    if os.geteuid() != 0:
        pytest.skip("starting a local Slurm cluster needs root (CI runs as root)")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="distseg-slurm-", dir="/tmp"))  # munged wants every parent world-x
    base.chmod(0o755)
    port = free_ports(3)
    env = dict(os.environ, SLURM_LOCAL_NODES="2", SLURM_LOCAL_DIR=str(base), SLURM_LOCAL_CTLD_PORT=str(port),
               SLURM_LOCAL_SLURMD_PORT=str(port + 1))
    try:
        p = subprocess.run(["bash", str(SLURM_TOOLS / "start-local-slurm.sh")], env=env, capture_output=True,
                           text=True, timeout=900)
        assert p.returncode == 0, p.stdout + p.stderr
        env["SLURM_CONF"] = str(base / "etc" / "slurm.conf")
        env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
        env["OMP_NUM_THREADS"] = "1"
        yield env
    finally:
        subprocess.run(["bash", str(SLURM_TOOLS / "stop-local-slurm.sh"), "--purge"], env=env,
                       capture_output=True, timeout=300)


def sbatch(env, *args, extra_env=None):
    e = dict(env, **(extra_env or {}))
    p = subprocess.run(["sbatch", "--parsable", *map(str, args)], env=e, cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout.strip().split(";")[0]


def job_info(env, jid) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True,
                         text=True).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def wait_job(env, jid, timeout=300) -> list[dict]:
    """Wait until every task of the job (or array) is finished; returns their scontrol records."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", jid], env=env, capture_output=True,
                             text=True).stdout
        recs = [dict(kv.split("=",
                              1) for kv in line.split() if "=" in kv) for line in out.splitlines() if line]
        if recs and all(r["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                          "NODE_FAIL") for r in recs):
            return recs
        time.sleep(1)
    raise AssertionError(f"job {jid} did not finish in {timeout}s")


def empty_config(tmp_path) -> str:
    """All settings from the overrides, exactly as the direct reference run gets them."""
    p = tmp_path / "empty.yaml"
    p.write_text("{}\n")
    return str(p)


def test_shard_array_job(cluster, synth_root, tmp_path):
    from distseg.shards.shard import ShardOptions, run_shard

    out = tmp_path / "shards"
    jid = sbatch(cluster, "--array=0-1", f"--output={tmp_path}/shard-%a.out", "slurm/shard.sh",
                 extra_env={"SPLITS": "train val", "CITYSCAPES_DATASET": str(synth_root),
                            "SHARD_OUT": str(out),
                            "SHARD_ARGS": "--maxcount 4"})
    recs = wait_job(cluster, jid)
    assert len(recs) == 2 and all(r["JobState"] == "COMPLETED" for r in recs), recs
    ref = tmp_path / "ref"
    for split in ("train", "val"):
        run_shard(synth_root, ref, ShardOptions(split=split, maxcount=4), progress=False, log=lambda *a: None)
        a = json.loads((out / f"{split}.json").read_text())["shards"]
        b = json.loads((ref / f"{split}.json").read_text())["shards"]
        assert a == b


def test_two_node_job_equals_one_process_run(cluster, shards, tmp_path):
    ov = base_overrides(shards, tmp_path, "one", **SGD)
    run_train(ov)
    ov2 = base_overrides(shards, tmp_path, "two", **SGD, **{"data.batch_size": 2})
    jid = sbatch(cluster, "--nodes=2", f"--output={tmp_path}/two.out", "slurm/train.sh", *ov2,
                 extra_env={"CONFIG": empty_config(tmp_path)})
    (rec,) = wait_job(cluster, jid)
    log = (tmp_path / "two.out").read_text()
    assert rec["JobState"] == "COMPLETED", log[-3000:]
    assert "2 node(s) x 1 process(es)" in log
    s = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert s["processes"] == 2 and s["final_pixels"] == val_pixels(shards)
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)


def test_preempted_job_requeues_and_resumes_to_the_same_result(cluster, shards, tmp_path):
    # 6 epochs x 7 steps: long enough that the signal surely lands before the end
    extra = {"data.batch_size": 2, "data.num_workers": 0, "train.ckpt_every": 3, "train.epochs": 6,
             "train.val_every": 3}
    run_train(base_overrides(shards, tmp_path, "ref", **extra))
    ov = base_overrides(shards, tmp_path, "pre", **extra)
    jid = sbatch(cluster, "--nodes=1", f"--output={tmp_path}/pre.out", "slurm/train.sh", *ov,
                 extra_env={"CONFIG": empty_config(tmp_path)})
    ck = tmp_path / "pre" / "checkpoints" / "step-00000003"
    deadline = time.time() + 180
    while time.time() < deadline and not ck.exists():
        time.sleep(0.05)
    assert ck.exists(), (tmp_path / "pre.out").read_text()[-3000:]
    # what Slurm does before the time limit with --signal=B:USR1@N
    subprocess.run(["scancel", "--signal=USR1", "--batch", jid], env=cluster, check=True)
    (rec,) = wait_job(cluster, jid, timeout=300)
    log = (tmp_path / "pre.out").read_text()
    assert rec["JobState"] == "COMPLETED" and rec["Restarts"] == "1", log[-3000:]
    assert "requeueing job" in log and "resumed from" in log
    wr, wp = weights(tmp_path / "ref"), weights(tmp_path / "pre")
    for k in wr:
        assert torch.equal(wr[k], wp[k]), k
    assert json.loads((tmp_path / "pre" / "summary.json").read_text())["steps"] == \
        json.loads((tmp_path / "ref" / "summary.json").read_text())["steps"]
    assert not list(ROOT.glob(f".distseg-stop-{jid}*"))


def test_experiment_plan_as_dependent_jobs(cluster, synth_root, tmp_path):
    import re

    from test_reporting_experiment import TINY, write_plan

    plan = write_plan(tmp_path, synth_root)
    sets = [a for s in TINY + ["train.progress=false"] for a in ("--set", s)]
    p = subprocess.run(["bash", "slurm/experiment.sh", plan, *sets, "--sbatch",
                        f"--output={tmp_path}/%x-%j.out"],
                       env=cluster, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    jobs = dict(re.findall(r"submitted (\S+): job (\d+)", p.stdout))
    assert list(jobs) == ["shard", "automobile", "person_finetuned", "person_scratch", "compare"]
    recs = {name: wait_job(cluster, jid, timeout=600)[0] for name, jid in jobs.items()}
    logs = "".join(f.read_text() for f in tmp_path.glob("*.out"))
    assert all(r["JobState"] == "COMPLETED" for r in recs.values()), (recs, logs[-3000:])

    def t(name, key):
        return time.mktime(time.strptime(recs[name][key], "%Y-%m-%dT%H:%M:%S"))
    assert t("person_finetuned", "StartTime") >= t("automobile",
                                                   "EndTime")  # afterok on the stage it starts from
    assert t("automobile", "StartTime") >= t("shard", "EndTime")
    assert t("compare", "StartTime") >= max(t(n, "EndTime") for n in ("automobile", "person_finetuned",
                                                                       "person_scratch"))
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert all(summary["stages"][n]["finished"] for n in ("automobile", "person_finetuned", "person_scratch"))


def test_experiment_seeds_as_dependent_jobs(cluster, synth_root, tmp_path):
    """--seeds --submit: one job per stage and seed, each after its parent's job of the same seed (held, read
    back from slurmctld, then cancelled: the dependencies are the point, the training is tested above)."""
    import re

    from test_reporting_experiment import write_plan

    plan = write_plan(tmp_path, synth_root)
    p = subprocess.run([sys.executable, "-m", "distseg", "experiment", plan, "--seeds", "0,1", "--submit",
                        "--sbatch=--hold"], env=cluster, cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    jobs = dict(re.findall(r"submitted (\S+): job (\d+)", p.stdout))
    try:
        assert p.returncode == 0, p.stdout + p.stderr
        assert list(jobs) == ["shard", "automobile-seed0", "automobile-seed1", "person_finetuned-seed0",
                              "person_finetuned-seed1", "person_scratch-seed0", "person_scratch-seed1",
                              "compare"]

        def after(name: str) -> set[str]:
            out = subprocess.run(["scontrol", "show", "job", "-o", jobs[name]], env=cluster,
                                 capture_output=True, text=True).stdout
            return set(re.findall(r"afterok:(\d+)", out.split("Dependency=", 1)[1].split()[0]))
        for s in (0, 1):
            assert after(f"automobile-seed{s}") == {jobs["shard"]}
            assert after(f"person_finetuned-seed{s}") == {jobs["shard"], jobs[f"automobile-seed{s}"]}
            assert after(f"person_scratch-seed{s}") == {jobs["shard"]}
        assert after("compare") == {j for n, j in jobs.items() if n not in ("shard", "compare")}
        script = subprocess.run(["scontrol", "write", "batch_script", jobs["compare"], "-"], env=cluster,
                                capture_output=True, text=True).stdout
        assert "--seeds 0,1 --compare-only" in script, script
    finally:
        subprocess.run(["scancel", *jobs.values()], env=cluster, capture_output=True)
