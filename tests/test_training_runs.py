"""A newcomer's first hour: run folders that cannot be mixed up, output without traps, errors that point
further. Each test runs the real command and checks the exact line or file a user sees."""

import json
import re
import shutil

import pytest

from conftest import SGD, assert_user_error, base_overrides, run_train
from distseg.errors import UserError
from distseg.runs.run_dir import RunDir

pytestmark = pytest.mark.slow


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def strict_json(path):
    def no_constants(c):
        raise AssertionError(f"{path} holds {c}: not valid JSON")
    return json.loads(path.read_text(), parse_constant=no_constants)


def test_changed_model_settings_refuse_to_resume_and_touch_nothing(shards, one_proc_run, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(one_proc_run, run)
    before = listing(run)
    p = run_train(base_overrides(shards, tmp_path, "one", **{"model.base": 16}), check=False)
    assert_user_error(p, f"{run} was trained with other model settings (model.base 8 -> 16)")
    assert "name=..." in p.stderr and "train.resume=fresh" in p.stderr
    assert listing(run) == before


def test_resume_never_refuses_and_fresh_moves_the_old_run_aside(shards, one_proc_run, tmp_path):
    from distseg.runs.checkpoint import list_checkpoints, read_state

    run = tmp_path / "one"
    shutil.copytree(one_proc_run, run)
    old_ckpts = [c.name for c in list_checkpoints(run / "checkpoints")]
    old_id = read_state(run / "checkpoints" / old_ckpts[-1]).run_id
    before = listing(run)
    p = run_train(base_overrides(shards, tmp_path, "one", **{"train.resume": "never"}), check=False)
    assert_user_error(p, f"{run} holds checkpoints of an earlier run (newest: {old_ckpts[-1]})")
    assert listing(run) == before
    p = run_train(base_overrides(shards, tmp_path, "one", **{"train.resume": "fresh", "train.epochs": 1}))
    (aside,) = tmp_path.glob("one.old-*")
    assert "moved the earlier run aside to" in p.stdout and listing(aside) == before
    new = list_checkpoints(run / "checkpoints")
    assert [c.name for c in new] == ["step-00000004"]  # 1 epoch of 4 steps, nothing of the old run
    assert read_state(new[0]).run_id != old_id


def test_rerunning_a_finished_run_says_so_in_one_line_and_touches_nothing(shards, one_proc_run, tmp_path):
    run = tmp_path / "one"
    shutil.copytree(one_proc_run, run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    summary = strict_json(run / "summary.json")
    p = run_train(base_overrides(shards, tmp_path, "one", **SGD))
    assert p.returncode == 0 and p.stderr.strip() == "", p.stderr
    best = summary["best"]["miou"] if summary["best_score_name"] == "mIoU" else summary["best_score"]
    assert p.stdout.strip() == (f"{run} finished earlier: {summary['epochs']} epochs ({summary['steps']} "
                                f"steps), best mIoU {100 * best:.2f}% at epoch {summary['best_epoch']}; "
                                "nothing to do (raise train.epochs to continue it)")
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before  # not even a new TensorBoard file


def test_summary_states_the_best_validation_totals_and_provenance(one_proc_run):
    import subprocess

    import distseg

    s = strict_json(one_proc_run / "summary.json")
    assert s["best_score"] == s["best"]["miou"] and s["best_step"] == s["best_epoch"] * 4
    assert set(s["best"]) >= {"miou", "pixel_acc", "iou", "category_iou"}
    assert len(s["best"]["iou"]) == 19 and s["best"]["category_iou"]["vehicle"] is not None
    (seg,) = s["segments"]
    assert seg["first_step"] == 0 and seg["last_step"] == seg["steps"] == s["steps"] == 8
    assert seg["images"] == 8 * 4 and s["seconds"] == seg["seconds"] > 0
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert s["distseg_version"] == distseg.__version__ and s["git_commit"].startswith(head)
    assert len(s["config_sha256"]) == 64


def test_a_start_that_fails_on_its_inputs_writes_nothing(shards, tmp_path):
    bad = tmp_path / "shards"
    shutil.copytree(shards, bad)
    (bad / "val.json").unlink()
    p = run_train(base_overrides(bad, tmp_path / "runs", "x"), check=False)
    assert_user_error(p, "no manifest")
    assert not (tmp_path / "runs").exists()
    # a folder that has a config but no checkpoints yet: one accurate hint, whichever checkpoint is asked
    (tmp_path / "runs" / "y").mkdir(parents=True)
    (tmp_path / "runs" / "y" / "config.yaml").write_text("name: y\n")
    for ck in ("best", "latest"):
        with pytest.raises(UserError, match="has no checkpoints yet: train first"):
            RunDir(tmp_path / "runs" / "y").weights(ck)


def test_mixed_precision_on_a_cpu_is_noted():
    """In-process: a bf16 run on a CPU would be emulated ~100x slower there without native bf16."""
    from types import SimpleNamespace

    import torch

    from distseg.config import load_config
    from distseg.training.setup import warn_about_settings

    said = []
    for device, precision in (("cpu", "bf16"), ("cpu", "no"), ("cuda", "bf16")):
        acc = SimpleNamespace(device=torch.device(device), print=said.append)
        warn_about_settings(load_config(None, [f"train.mixed_precision={precision}"]), acc, 1000)
    assert len(said) == 1 and said[0].startswith("note: train.mixed_precision=bf16 runs as CPU autocast here")


def test_output_numbering_warnings_no_bar_in_logs_and_valid_summary(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # progress bar asked for (the default), but stderr is a pipe here: no bar may garble the log
    p = run_train(base_overrides(shards, tmp_path, "r",
                                 **{"train.progress": "true", "sched.warmup_steps": 500}))
    assert "\r" not in p.stderr + p.stdout and "step/s" not in p.stderr
    out = p.stdout.splitlines()
    warn = "warning: sched.warmup_steps=500 >= the run's 8 steps"
    assert any(line.startswith(warn) for line in out), p.stdout
    # 14 samples, batch 4: 4 steps per epoch, 2 epochs, numbered from 1 on every line
    assert "step 4/8 epoch 1/2 " in p.stdout and "step 5/8 epoch 2/2 " in p.stdout
    assert re.search(r"step 4/8 epoch 1/2 .* img/s data-wait \d+% eta \d+s", p.stdout), p.stdout
    assert re.search(r"step 8/8 epoch 2/2 .* eta 0s", p.stdout)
    assert "epoch 1 step 4: val" in p.stdout and "epoch 2 step 8: val" in p.stdout
    assert "epoch 0" not in p.stdout and "epoch 3" not in p.stdout
    summary = strict_json(tmp_path / "r" / "summary.json")
    assert summary["epochs"] == 2 and summary["best_epoch"] in (1, 2)
    assert None in summary["final_iou"].values()  # absent classes are null, not NaN
    ea = EventAccumulator(str(tmp_path / "r" / "tb"))
    ea.Reload()
    assert sorted({e.value for e in ea.Scalars("train/epoch")}) == [1.0, 2.0]


def test_time_left_reads_as_people_read_it():
    from distseg.training.step_log import duration

    assert [duration(s) for s in (0, 44.6, 725, 11220, 187200)] == ["0s", "45s", "12m05s", "3h07m", "2d04h"]
