"""What earlier versions wrote still reads: summaries of every version through RunSummary, a whole run
folder written by distseg at commit 21a2006 (tests/data/old_runs: before summary.json had a version)
inspects, resumes, evaluates and reports, and one written at 5064110 (before parameter groups; its tb/ left
out for size) resumes with its one optimizer group."""

import json
import shutil

import pytest
import torch

from conftest import ROOT, assert_user_error, base_overrides, run_train
from distseg.models.param_groups import ONE_GROUP
from distseg.runs.checkpoint import latest_checkpoint, read_state
from distseg.runs.listing import describe_run
from distseg.runs.run_dir import RunDir
from distseg.runs.summary import SUMMARY_VERSION, RunSummary

OLD = ROOT / "tests" / "data"
SEED_SUMMARY = {"name": "car", "steps": 40, "epochs": 4, "best_miou": 0.61, "final_miou": 0.6,
                "seconds": 12.5, "img_per_s": 9.6, "processes": 1, "preempted": False,
                "final_iou": {"background": 0.9, "car": 0.3}}  # the seed's training loop wrote these keys


def test_summaries_of_every_version_read_through_one_type(tmp_path):
    seed = RunSummary.from_dict(SEED_SUMMARY)
    assert (seed.best_score, seed.best_score_name, seed.finished, seed.version) == (0.61, "mIoU", True, 1)
    assert seed.outcome == "finished" and seed.history == [] and seed.extra == {}

    no_finished = {k: v for k, v in json.loads((OLD / "summaries" / "v1-21a2006.json").read_text()).items()
                   if k not in ("finished", "interrupted")}  # as written on 2026-11-26
    assert RunSummary.from_dict(no_finished).finished
    assert not RunSummary.from_dict({**no_finished, "preempted": True}).finished

    v1 = RunSummary.read(OLD / "summaries" / "v1-21a2006.json")
    assert v1.version == 1 and v1.finished and v1.steps == 3 and v1.best_score_name == "mIoU"
    assert v1.timing["images"] > 0 and len(v1.segments) == 1 and v1.git_commit.startswith("21a2006")

    newer = {**v1.to_dict(), "version": SUMMARY_VERSION + 1, "tracker_runs": {"wandb": "abc"}}
    (tmp_path / "s.json").write_text(json.dumps(newer))
    read = RunSummary.read(tmp_path / "s.json")
    assert read.extra == {"tracker_runs": {"wandb": "abc"}}, "a newer version's keys are kept"
    read.write(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == newer
    (tmp_path / "half.json").write_text('{"name": "x", "ste')
    assert RunSummary.read(tmp_path / "half.json") is None and RunSummary.read(tmp_path / "no.json") is None


@pytest.fixture
def old_run(tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(OLD / "old_runs" / "v1-21a2006", runs / "v1")
    return runs / "v1"


def test_an_old_run_folder_inspects_resumes_evaluates_and_reports(old_run, shards):
    from distseg.flows.evaluate import score_checkpoint
    from distseg.reporting.report import write_report

    listing = describe_run(old_run)
    assert "step-00000003" in listing and "summary: finished, 3 steps, 1 epochs" in listing

    settings = base_overrides(shards, old_run.parent, "v1", **{"data.batch_size": 2, "data.crop": "[32,64]",
                                                                "model.base": 4, "train.epochs": 2})
    p = run_train(settings)
    assert "resumed from" in p.stdout and "step-00000003" in p.stdout, p.stdout
    s = RunDir(old_run).read_summary()
    assert s.version == SUMMARY_VERSION and s.finished and s.epochs == 2
    assert [g["first_step"] for g in s.segments] == [0, 3], "the old segment is kept, the resumed one added"

    scores = score_checkpoint(str(old_run), "latest", shards=str(shards))
    assert 0 <= scores["miou"] <= 1
    out, built = write_report([str(old_run)], str(old_run.parent / "report.html"), images=1, checkpoints=1,
                              log=lambda *a: None)
    assert built and "v1" in out.read_text()


def test_a_run_made_before_parameter_groups_resumes_with_its_one_group(tmp_path, shards):
    """It keeps its one group whatever today's config asks (its config could not have chosen), on every
    resume; a run that recorded its grouping refuses a setting asking for other groups, writing nothing."""
    run = tmp_path / "runs" / "v2"
    shutil.copytree(OLD / "old_runs" / "v2-5064110", run)
    recorded = tmp_path / "runs" / "recorded"
    shutil.copytree(run, recorded)
    state_file = recorded / "checkpoints" / "step-00000003" / "trainer_state.json"
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "grouping": ONE_GROUP.record()}))
    tiny = {"data.batch_size": 2, "data.crop": "[32,64]", "model.base": 4, "train.epochs": 1}

    refused = run_train([*base_overrides(shards, recorded.parent, "recorded", **tiny), "optim.no_decay=true"],
                        check=False)
    assert_user_error(refused, 'parameter groups "one group", this start asks for "no decay on norms')
    assert "resume with optim.no_decay=false" in refused.stderr
    assert [c.name for c in (recorded / "checkpoints").iterdir()] == ["step-00000003"], "nothing written"

    p = run_train([*base_overrides(shards, run.parent, "v2", **tiny), "optim.no_decay=true"])
    assert "resumed from" in p.stdout and "parameter groups: one group (the run's own)" in p.stdout, p.stdout
    assert "was made before parameter groups were recorded: it resumes with its one group" in p.stdout
    ckpt = latest_checkpoint(run / "checkpoints")
    assert read_state(ckpt).step == 7 and read_state(ckpt).grouping is None, "still a run made before"
    assert len(torch.load(ckpt / "optimizer.bin", weights_only=True)["param_groups"]) == 1
