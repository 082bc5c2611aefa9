"""The experiment trackers (training/trackers.py) in-process, with the real MLflow client on a file store:
replayed steps are not logged again, a failing tracker is counted and left, a server that is not there is a
warning; the settings they get are redacted. The end-to-end run with W&B offline and MLflow (Ctrl-C and
resume, values read back) is tests/test_training_operators.py's Ctrl-C test."""

import json
import shutil

import pytest
from tracker_files import mlflow_history, wandb_history

from conftest import free_port
from distseg.config import dump_config, flat_settings, load_config, redacted
from distseg.errors import UserError
from distseg.runs.run_dir import RunDir
from distseg.training import trackers as trackers_module
from distseg.training.trackers import DROP_AFTER, Trackers, accelerator_kwargs


@pytest.fixture
def acc(monkeypatch):
    from accelerate import Accelerator

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    a = Accelerator(cpu=True)
    yield a
    a.trackers.clear()


def mlflow_cfg(tmp_path, *extra):
    """A run's settings with MLflow; its folder made, as training's setup makes it before the trackers."""
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=trk", "train.trackers=[mlflow]", *extra])
    RunDir.of(cfg).path.mkdir(parents=True)
    return cfg


def test_a_resumed_run_continues_the_tracker_run_without_logging_a_replayed_step_again(tmp_path, acc):
    cfg, said = mlflow_cfg(tmp_path), []
    run_dir = RunDir.of(cfg)
    first = Trackers.start(cfg, acc, run_dir, resumed=False, say=said.append)
    for s in range(1, 7):
        first.log("train", {"train/loss": float(s)}, s)
    first.log("val", {"val/mIoU": 0.5}, 6)  # another kind at the same step is logged
    run_id = first.finish()["mlflow"]["run"]
    # killed after step 6, resumed from the step-3 checkpoint: steps 4-6 are trained again
    again = Trackers.start(cfg, acc, run_dir, resumed=True, say=said.append)
    for s in range(4, 9):
        again.log("train", {"train/loss": 100.0 + s}, s)
    summary = again.finish()
    assert summary == {"mlflow": {"run": run_id, "failures": 0, "logged": {"train": 8, "val": 6}}}
    assert mlflow_history(run_dir.path, run_id, "train/loss") == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.0), (6, 6.0), (7, 107.0), (8, 108.0)]
    assert mlflow_history(run_dir.path, run_id, "val/mIoU") == [(6, 0.5)]
    assert said == [] and first.describe() == again.describe() == \
        f"trackers: mlflow run {run_id} at {(run_dir.path / 'mlruns').resolve().as_uri()}"
    # a fresh start (no checkpoint to resume from) is a new tracker run
    fresh = Trackers.start(cfg, acc, run_dir, resumed=False, say=said.append)
    assert fresh.finish()["mlflow"]["run"] != run_id


def test_w_and_b_steps_count_as_logged_once_its_run_finished(tmp_path, acc, monkeypatch):
    """W&B's offline files are written when its run finishes: a step logged by a process killed before that
    is not in them, so it is recorded at the finish only and logged again by the resumed run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=wb", "train.trackers=[wandb]"])
    run_dir = RunDir.of(cfg)
    run_dir.path.mkdir(parents=True)
    first = Trackers.start(cfg, acc, run_dir, resumed=False, say=print)
    for s in (1, 2, 3):
        first.log("train", {"train/loss": float(s)}, s)
    assert json.loads(run_dir.trackers.read_text())["logged"] == {}  # not yet in W&B's files
    run_id = first.finish()["wandb"]["run"]
    assert json.loads(run_dir.trackers.read_text())["logged"] == {"wandb": {"train": 3}}
    again = Trackers.start(cfg, acc, run_dir, resumed=True, say=print)
    for s in (2, 3, 4, 5):
        again.log("train", {"train/loss": 10.0 + s}, s)
    assert again.finish()["wandb"] == {"run": run_id, "failures": 0, "logged": {"train": 5}}
    assert [(step, v["train/loss"]) for step, v in wandb_history(run_dir.path)[run_id]] == \
        [(1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]


def test_a_tracker_that_cannot_log_is_one_warning_counted_then_left(tmp_path, acc):
    cfg, said = mlflow_cfg(tmp_path), []
    run_dir = RunDir.of(cfg)
    t = Trackers.start(cfg, acc, run_dir, resumed=False, say=said.append)
    t.log("train", {"train/loss": 1.0}, 1)
    shutil.rmtree(run_dir.mlflow_store)
    run_dir.mlflow_store.write_text("")  # its folder is gone: every write fails
    for s in range(2, 2 + DROP_AFTER + 2):
        t.log("train", {"train/loss": float(s)}, s)
    warnings = [line for line in said if line.startswith("warning:")]
    assert len(warnings) == 2, said
    assert warnings[0].startswith("warning: tracker mlflow could not log step 2 (") and \
        warnings[0].endswith("): training goes on; failures are counted in summary.json")
    assert warnings[1] == (f"warning: tracker mlflow failed {DROP_AFTER} times in a row: not logged to "
                           "again by this process")
    assert acc.trackers == [] and t.finish()["mlflow"]["failures"] == DROP_AFTER


def test_a_tracker_server_that_is_not_there_is_a_warning_and_training_goes_on(tmp_path, acc, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the user's setting wins over distseg's 2
    cfg, said = mlflow_cfg(tmp_path, f"train.mlflow_uri=http://bob:hunter2@127.0.0.1:{free_port()}"), []
    t = Trackers.start(cfg, acc, RunDir.of(cfg), resumed=False, say=said.append)
    t.log("train", {"train/loss": 1.0}, 1)
    assert len(said) == 1 and said[0].startswith("warning: tracker mlflow could not start (API request to "
                                                 "http://bob:***@127.0.0.1:"), said
    assert t.finish() == {"mlflow": {"run": None, "failures": 1, "logged": {}}}


def test_settings_saved_and_sent_to_trackers_are_redacted():
    cfg = load_config(None, ["train.mlflow_uri=https://bob:hunter2@mlflow.lab:5000/x?token=abc",
                             "data.shards=s3://bkt/shards?X-Amz-Signature=f00"])
    for text in (dump_config(cfg), str(flat_settings(cfg))):
        assert "hunter2" not in text and "abc" not in text and "f00" not in text
        assert "https://bob:***@mlflow.lab:5000/x?***" in text and "s3://bkt/shards?***" in text
    params = flat_settings(cfg)
    assert params["train.trackers"] == "[]" and params["data.crop"] == "[512, 1024]"
    assert params["optim.lr"] == cfg.optim.lr and len(params) > 80
    nested = {"wandb_api_key": "k1", "token": "t", "db_password": "p", "secret": "", "monkey": 1,
              "aws_secret_access_key": "s",
              "hosts": ["https://u:pw@h/a"], "name": "plain"}
    assert redacted(nested) == {"wandb_api_key": "***", "token": "***", "db_password": "***", "secret": "",
                                "monkey": 1, "aws_secret_access_key": "***", "hosts": ["https://u:***@h/a"],
                                "name": "plain"}


def test_tracker_settings_are_checked(monkeypatch):
    with pytest.raises(UserError, match=r"train.trackers lists each of wandb, mlflow at most once"):
        load_config(None, ["train.trackers=[neptune]"])
    with pytest.raises(UserError, match=r"at most once"):
        load_config(None, ["train.trackers=[mlflow,mlflow]"])
    real = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec",
                        lambda name: None if name == "wandb" else real(name))
    with pytest.raises(UserError, match=r"^train.trackers=wandb needs the wandb package: pip install "
                                        r"'distseg\[trackers\]'$"):
        accelerator_kwargs(load_config(None, ["train.trackers=[mlflow,wandb]"]))
    assert accelerator_kwargs(load_config(None, ["train.trackers=[mlflow]"])) == {"log_with": ["mlflow"]}
