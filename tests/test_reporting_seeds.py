"""Seed repeats: `distseg experiment PLAN --seeds` runs each stage once per seed (a fine-tuning stage from
its parent of the same seed), and the table, its JSON and the report give each compared stage's mean ±
sample std and Welch's t-test, here checked against a direct computation from the runs' own summaries."""

import html
import json
import math
import statistics

import pytest
import torch
from scipy import special
from test_reporting_experiment import TINY, write_plan

from conftest import assert_user_error, run_cli
from distseg.errors import UserError
from distseg.reporting.experiment import load_plan, parse_seeds
from distseg.reporting.seeds import Spread, verdict, welch


def direct_welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Welch's test written out: t of mean(b) - mean(a), the Welch-Satterthwaite df, and the two-sided p
    from Student's t distribution through the regularized incomplete beta function."""
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.mean(b) - statistics.mean(a)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return t, df, float(special.betainc(df / 2, 0.5, df / (df + t * t)))


def test_spread_and_welch_equal_a_direct_computation():
    a, b = [0.41, 0.43, 0.40], [0.47, 0.52, 0.50, 0.49]
    sp = Spread(dict(enumerate(a)))
    assert sp.n == 3 and sp.mean == pytest.approx(sum(a) / 3)
    assert sp.std == pytest.approx(math.sqrt(sum((x - sum(a) / 3) ** 2 for x in a) / 2))
    assert sp.text() == f"{100 * sp.mean:.2f} ± {100 * sp.std:.2f}%"
    for got, want in zip(welch(a, b), direct_welch(a, b)):
        assert got == pytest.approx(want, rel=1e-9)
    v = verdict("scratch", sp, "finetuned", Spread(dict(enumerate(b))))
    assert v.significant and v.p < 0.05 and v.difference == pytest.approx(statistics.mean(b) - sp.mean)
    assert f"t = {v.t:.2f}, df = {v.df:.1f}, p = {v.p:.3g}" in v.text
    assert "exceeds the seeds' spread" in v.text
    close = verdict("x", Spread({0: 0.40, 1: 0.45}), "y", Spread({0: 0.41, 1: 0.46}))
    assert not close.significant and close.p > 0.05 and "within the seeds' spread" in close.text


def test_verdicts_that_cannot_be_tested_say_why():
    one = verdict("a", Spread({0: 0.4}), "b", Spread({0: 0.5, 1: 0.6}))
    assert one.p is None and one.significant is None and "at least 2 seeds per stage" in one.text
    flat = verdict("a", Spread({0: 0.4, 1: 0.4}), "b", Spread({0: 0.5, 1: 0.5}))
    assert flat.p is None and "no spread" in flat.text and "+10.00 points" in flat.text
    assert Spread({3: 0.25}).std is None and Spread({3: 0.25}).text() == "25.00%"


def test_seeds_settings_are_checked_in_one_line(synth_root, tmp_path):
    assert parse_seeds("0, 1,2") == [0, 1, 2] and parse_seeds(None) == [] and parse_seeds([4, 5]) == [4, 5]
    for bad in ("0,0", "a,b", "-1", "1,,2"):
        with pytest.raises(UserError, match="distinct non-negative integers"):
            parse_seeds(bad)
    plan = load_plan(write_plan(tmp_path, synth_root, seeds=[3, 4]))
    assert plan.seeds == [3, 4]
    assert load_plan(write_plan(tmp_path, synth_root, seeds=[3]), "0,1").seeds == [0, 1]
    with pytest.raises(UserError, match="the command line sets train.seed"):
        plan.check_seeds(("train.seed=7",))
    ft = plan.stages[1]
    assert plan.stage_overrides(ft, (), 4)[:5] == [
        "name=person_finetuned-seed4", f"output_dir={plan.output_dir}", f"data.shards={plan.shards}",
        f"train.init_from={plan.output_dir / 'automobile-seed4' / 'best'}", "train.reset_head=true"]
    assert plan.stage_overrides(ft, ("x.y=1",), 4)[-2:] == ["train.seed=4", "x.y=1"]


@pytest.mark.slow
def test_two_seeds_per_stage_with_their_spread_and_verdict(synth_root, tmp_path):
    from distseg.models.weights import load_weights
    from distseg.reporting.experiment import compare
    from distseg.runs.checkpoint import latest_checkpoint

    stages = [{"name": "automobile", "config": "configs/automobile.yaml"},
              {"name": "person_finetuned", "config": "configs/person.yaml", "init_from": "automobile",
               "set": ["optim.lr=1e-12"]}]
    plan = write_plan(tmp_path, synth_root, stages=stages, compare=["automobile", "person_finetuned"],
                      set=[s for s in TINY if not s.startswith("train.epochs")] + ["train.epochs=1"])
    p = run_cli("experiment", plan, "--seeds", "0,1", "--no-report")
    runs = tmp_path / "runs"
    order = [line.split(":")[0] for line in p.stdout.splitlines() if ": training in" in line]
    assert order == ["stage 1/4 automobile-seed0", "stage 2/4 automobile-seed1",
                     "stage 3/4 person_finetuned-seed0", "stage 4/4 person_finetuned-seed1"]
    # each run's own seed; fine-tuning of seed s starts from automobile's run of seed s
    for name in ("automobile-seed0", "automobile-seed1", "person_finetuned-seed1"):
        assert f"seed: {name[-1]}" in (runs / name / "config.yaml").read_text()
    best = {s: load_weights(runs / f"automobile-seed{s}" / "best") for s in (0, 1)}
    ft = load_weights(latest_checkpoint(runs / "person_finetuned-seed1" / "checkpoints"))
    body = [k for k in ft if not k.startswith("head.")]
    assert all(torch.allclose(best[1][k], ft[k], atol=1e-6) for k in body)
    assert not all(torch.allclose(best[0][k], ft[k], atol=1e-3) for k in body)
    # the spread and the verdict, from the runs' own summaries
    summary = json.loads((runs / "summary.json").read_text())
    own = {n: {s: json.loads((runs / f"{n}-seed{s}" / "summary.json").read_text())["best_score"]
               for s in (0, 1)} for n in ("automobile", "person_finetuned")}
    for name, scores in own.items():
        sp = summary["spread"][name]
        assert sp["scores"] == {str(s): v for s, v in scores.items()} and sp["n"] == 2
        assert sp["mean"] == pytest.approx(statistics.mean(scores.values()))
        assert sp["std"] == pytest.approx(statistics.stdev(scores.values()))
        (row,) = [ln for ln in summary["table"].splitlines()
                  if ln.split()[0] == name and ln.split()[1] != "vs"]  # its row, not a verdict naming it
        assert f"{100 * sp['mean']:.2f} ± {100 * sp['std']:.2f}%" in row
        assert all(f"{s}: {100 * v:.2f}% (1)" in row for s, v in scores.items()), row
    (v,) = summary["verdicts"]
    a, b = list(own["automobile"].values()), list(own["person_finetuned"].values())
    assert (v["a"], v["b"]) == ("automobile", "person_finetuned")
    for got, want in zip((v["t"], v["df"], v["p"]), direct_welch(a, b)):
        assert got == pytest.approx(want, rel=1e-6)
    assert summary["table"].endswith("\n" + v["text"]) and summary["table"] in p.stdout
    assert summary["seeds"] == [0, 1]
    # a rerun skips all four; the report shows the same table and verdict
    p = run_cli("experiment", plan, "--seeds", "0,1", "--no-report")
    assert p.stdout.count("skipped") == 4 and "training in" not in p.stdout
    compare(load_plan(plan, "0,1"), report=True, log=lambda line: None)
    page = (runs / "report.html").read_text()
    assert html.escape(v["text"]) in page and "<th>seed 1</th>" in page
    for sp in summary["spread"].values():
        assert f"{100 * sp['mean']:.2f} ± {100 * sp['std']:.2f}%" in page
    assert_user_error(run_cli("experiment", plan, "--seeds", "0,x", check=False), "--seeds must be distinct")
