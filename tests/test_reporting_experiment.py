"""`distseg experiment` with a tiny plan: stages in order, finished stages skipped on a rerun, a killed stage
resumed, stage 2a really started from stage 1's weights (and 2b not), the comparison table; bad plans are
one line. A stage stored by an older version (tests/data/old_stage: a config.yaml without a key added
since) still counts as finished, by its effective settings."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import ROOT, assert_user_error, run_cli
from distseg.config import dump_config, load_config
from distseg.errors import UserError
from distseg.reporting.experiment import Plan, Stage, config_path, finished, load_plan

OLD_STAGE = ROOT / "tests" / "data" / "old_stage"  # written by distseg, less train.async_checkpoint
TINY = ["model.base=8", "model.depth=2", "model.norm=group", "data.crop=[64,128]", "data.batch_size=2",
        "data.val_batch_size=2", "data.num_workers=0", "train.epochs=2", "train.progress=false",
        "sched.warmup_steps=0", "train.mixed_precision=no", "train.log_every=1", "train.val_every=1",
        "data.scale=[0.75,1.25]"]


def write_plan(tmp_path, synth_root, **extra) -> str:
    plan = {"name": "tiny", "output_dir": str(tmp_path / "runs"), "shards": str(tmp_path / "shards"),
            "root": str(synth_root), "set": TINY,
            "stages": [{"name": "automobile", "config": "configs/automobile.yaml"},
                       {"name": "person_finetuned", "config": "configs/person.yaml",
                        "init_from": "automobile",
                        "set": ["optim.lr=1e-12", "train.ckpt_every=2"]},
                       {"name": "person_scratch", "config": "configs/person.yaml",
                        "set": ["train.init_from=''"]}],
            "compare": ["person_finetuned", "person_scratch"]}
    plan.update(extra)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    return str(path)


@pytest.mark.slow
def test_experiment_runs_skips_and_resumes_stages(synth_root, tmp_path):
    from distseg.models.weights import load_weights
    from distseg.runs.checkpoint import latest_checkpoint

    plan = write_plan(tmp_path, synth_root)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # first run, killed (the whole process group) while the second stage has saved a checkpoint mid-way
    proc = subprocess.Popen([sys.executable, "-m", "distseg", "experiment", plan, "--no-report"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, cwd=ROOT)
    ck = tmp_path / "runs" / "person_finetuned" / "checkpoints" / "step-00000002"
    deadline = time.time() + 600
    while time.time() < deadline and not ck.exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ck.exists()
    p = run_cli("experiment", plan, "--no-report", env=env)
    out = p.stdout
    assert "stage 1/3 automobile: finished earlier with the same settings, skipped" in out
    assert "resumed from" in out and "stage 2/3 person_finetuned: training" in out
    assert out.index("stage 2/3") < out.index("stage 3/3")
    # 2a starts from automobile's best weights (lr ~0 keeps them), 2b from fresh ones
    best = load_weights(tmp_path / "runs" / "automobile" / "best")
    ft = load_weights(latest_checkpoint(tmp_path / "runs" / "person_finetuned" / "checkpoints"))
    scratch = load_weights(latest_checkpoint(tmp_path / "runs" / "person_scratch" / "checkpoints"))
    body = [k for k in best if not k.startswith("head.")]
    assert all(torch.allclose(best[k], ft[k], atol=1e-6) for k in body)
    assert not all(torch.allclose(best[k], scratch[k], atol=1e-3) for k in body)
    summary = json.loads((tmp_path / "runs" / "summary.json").read_text())
    assert summary["compare"] == ["person_finetuned", "person_scratch"]
    for name in summary["compare"]:
        s = summary["stages"][name]
        assert s["finished"] and s["best_score_name"] == "foreground IoU" and len(s["history"]) == 2
        (row,) = [line for line in out.split("per epoch")[-1].splitlines() if line.startswith(name)]
        # three significant digits with the unit: close scores of two stages stay apart
        assert f" foreground IoU{100 * s['best_score']:>7.3g}%" in row, row
        assert row.endswith(" ".join(f"{100 * h['score']:.3g}%" for h in s["history"])), row
    # a rerun with nothing to do skips every stage
    p = run_cli("experiment", plan, "--no-report", env=env)
    assert p.stdout.count("skipped") == 3 and "training in" not in p.stdout


@pytest.mark.slow
def test_bad_plans_are_one_line(synth_root, tmp_path):
    plan = write_plan(tmp_path, synth_root, stages=[{"name": "a", "config": "configs/person.yaml",
                                                     "init_from": "zzz"}])
    assert_user_error(run_cli("experiment", plan, check=False), "starts from 'zzz', which is not an earlier "
                                                                "stage")
    plan = write_plan(tmp_path, synth_root, stages=[{"name": "a", "config": "configs/nope.yaml"}])
    with pytest.raises(UserError, match="config file not found: configs/nope.yaml"):
        load_plan(plan)
    with pytest.raises(UserError, match="experiment plan not found"):
        load_plan(tmp_path / "none.yaml")


def old_plan(output_dir) -> tuple[Plan, Stage]:
    """The plan whose one stage tests/data/old_stage holds, with that stage's settings."""
    tiny = ["model.base=8", "model.depth=2", "model.norm=group", "data.crop=[64,128]", "data.batch_size=2",
            "data.val_batch_size=2", "data.num_workers=0", "train.epochs=1", "train.progress=false",
            "sched.warmup_steps=0", "train.mixed_precision=no"]
    stage = Stage("person", "configs/person.yaml", ["train.init_from=''"])
    return Plan("old", output_dir, "shards/labelid", "", tiny, [stage], [], []), stage


def test_a_stage_stored_by_an_older_version_is_finished_by_its_effective_settings(monkeypatch):
    monkeypatch.chdir(ROOT)  # the stored config names its output_dir relative to the repository
    plan, stage = old_plan(OLD_STAGE.relative_to(ROOT))
    saved = (OLD_STAGE / "person" / "config.yaml").read_text()
    now = dump_config(load_config(config_path(stage), plan.stage_overrides(stage)))
    assert "async_checkpoint" not in saved and saved != now  # the text differs: an older version wrote it
    assert finished(plan, stage, ())
    assert not finished(plan, stage, ("train.epochs=2",))  # a setting that changed still counts
    assert not finished(plan, stage, ("train.async_checkpoint=false",))  # so does the key it lacks


def test_a_stored_key_this_version_does_not_know_is_not_finished_with_a_line(tmp_path):
    shutil.copytree(OLD_STAGE, tmp_path, dirs_exist_ok=True)
    config = tmp_path / "person" / "config.yaml"
    text = config.read_text().replace("output_dir: tests/data/old_stage", f"output_dir: {tmp_path}")
    plan, stage = old_plan(tmp_path)
    config.write_text(text)
    assert finished(plan, stage, ())
    config.write_text(text.replace("  keep_last: 2\n", "  keep_last: 2\n  retired_key: 1\n"))
    said = []
    assert not finished(plan, stage, (), log=said.append)
    assert len(said) == 1 and "stage person" in said[0] and "unknown key train.retired_key" in said[0]
