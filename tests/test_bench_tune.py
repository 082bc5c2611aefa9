"""`distseg tune`: the search's choice and budget on injected results (the search sees nothing else), and the
command end to end at tiny sizes: real trials in their own processes, a trial made to fail, tuned.yaml loaded
back. Speeds are shown, never asserted: what is asserted is that each figure was measured."""

import dataclasses

import pytest
import yaml

from conftest import ROOT, assert_user_error, run_cli
from distseg.bench.tune import (
    MARGIN,
    MIN_WINDOW_S,
    STOP_MARGIN,
    Asked,
    Budget,
    Result,
    Search,
    batch_split_refusal,
    run_search,
    split_options,
    tune,
    worker_rungs,
)
from distseg.config import load_config
from distseg.errors import UserError
from distseg.units import parse_duration

SYNTH = str(ROOT / "configs" / "synth.yaml")
TINY = ["model.base=8", "model.depth=2", "model.norm=group", "loss.dice=0", "data.crop=[64,128]",
        "data.batch_size=2", "data.val_batch_size=2", "train.mixed_precision=no"]


class FakeClock:
    """Seconds that pass only when a fake trial says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def fake_trials(clock, rates, overhead=5.0, started=None):
    """A stand-in for the trial processes: each takes `overhead` + its window on `clock`, measuring the
    rate `rates(trial)` (None: it failed)."""
    def measure(trial, window, timeout):
        if started is not None:
            started.append((clock.now, window, timeout))
        clock.now += overhead + window
        rate = rates(trial)
        if rate is None:
            return Result(trial, "failed", overhead, reason="RuntimeError: made to fail")
        return Result(trial, "ok", overhead + window, img_per_s=rate, data_wait=0.1, peak_mb=100.0,
                      window_s=window, steps=10)
    return measure


def test_parse_duration():
    assert [parse_duration(t) for t in ("10m", "90s", "1h", "1h30m", "45", "0.5m")] == \
        [600, 90, 3600, 5400, 45, 30]
    for bad in ("", "ten", "10x", "0", "-5s", "1hh", "1h30", "10m30"):
        with pytest.raises(UserError, match="bad duration"):
            parse_duration(bad, "--budget")


def test_with_the_first_trial_best_the_output_keeps_the_config(shards, tmp_path):
    clock = FakeClock()
    given = [*TINY, f"data.shards={shards}"]
    search = tune(SYNTH, given, 300, tmp_path / "tuned.yaml", measure=fake_trials(
        clock, lambda t: 10.0 if not t.changes else 9.0), clock=clock, log=lambda *a: None)
    assert search.choice() == {} and search.best is search.results[0]
    assert len(search.results) > 3 and all(r.ok for r in search.results)
    text = (tmp_path / "tuned.yaml").read_text()
    assert "settings changed: none" in text and "the config as given: 10.00 img/s" in text
    assert load_config(tmp_path / "tuned.yaml") == load_config(SYNTH, given)


def test_a_change_is_kept_only_past_the_noise_between_repeats():
    rates = {(): [10.0, 11.0], ("data.num_workers",): 11.2, ("model.compile",): 14.0}
    seen = []

    def rate(trial):
        got = rates[tuple(sorted(trial.changes))]
        seen.append(trial.changes)
        return got.pop(0) if isinstance(got, list) else got
    clock = FakeClock()
    search = Search(workers=2, rungs=worker_rungs(4), options=[{"model.compile": "true"}])
    run_search(search, Budget(600, clock), fake_trials(clock, rate))
    assert search.noise == pytest.approx(1 / 10.5)  # 10 vs 11
    # 4 workers gained 9.5% over the repeats' mean (10.5): inside the noise; one rung down, then compile
    assert seen == [{}, {}, {"data.num_workers": "4"}, {"data.num_workers": "1"}, {"model.compile": "true"}]
    assert search.choice() == {"model.compile": "true"}


def test_a_trial_made_to_fail_is_recorded_and_the_rest_go_on():
    clock = FakeClock()
    search = Search(workers=0, rungs=[0, 1], options=[{"model.compile": "true"}])
    run_search(search, Budget(600, clock), fake_trials(
        clock, lambda t: None if "data.num_workers" in t.changes else 10.0 + len(t.changes)))
    assert [r.status for r in search.results] == ["ok", "ok", "failed", "ok"]
    assert search.results[2].reason == "RuntimeError: made to fail"
    assert search.choice() == {"model.compile": "true"}


def test_the_budget_is_kept_by_the_tools_own_accounting():
    clock, started = FakeClock(), []
    budget = Budget(120, clock)
    search = Search(workers=0, rungs=worker_rungs(64), options=[{"model.compile": "true"}] * 20)
    left_out = run_search(search, budget, fake_trials(clock, lambda t: 10.0 + len(search.results),
                                                      started=started))
    assert left_out and search.next() is not None  # the plan was longer than the budget
    overhead = 5.0
    for k, (at, window, timeout) in enumerate(started):
        assert window >= MIN_WINDOW_S
        assert at - 1000.0 + timeout <= 120 * (1 + STOP_MARGIN) + 1e-9  # a trial is stopped past it
        if k:  # the first runs whatever it costs; the others start only when they fit
            assert at - 1000.0 + overhead + window <= 120
    assert budget.elapsed() <= 120 * (1 + MARGIN)
    assert not budget.fits(search.results, budget.window(search.results, search.planned_left()))


def test_a_plan_sized_to_the_budget_runs_whole_while_time_passes_between_reads():
    """The window is sized from what is left; a clock read a moment later must not find it too long."""
    class Ticking(FakeClock):
        def __call__(self):
            self.now += 1e-3
            return self.now
    clock = Ticking()
    measure = fake_trials(clock, lambda t: 10.0)

    def short(trial, window, timeout):  # the steps cap ends the window early, as --steps does
        r = measure(trial, 0.1, timeout)
        return dataclasses.replace(r, window_s=0.1)
    search = Search(workers=None, rungs=[], options=[])
    assert run_search(search, Budget(30, clock), short) == []
    assert len(search.results) == 2 and search.noise == 0


def test_a_trial_that_outruns_the_budget_is_stopped_and_none_starts_after_it():
    clock = FakeClock()
    budget = Budget(100, clock)
    quick = fake_trials(clock, lambda t: 10.0)

    def measure(trial, window, timeout):
        if "model.compile" not in trial.changes:
            return quick(trial, window, timeout)
        clock.now += timeout  # it would compile for ever: stopped at its timeout
        return Result(trial, "timed out", timeout, reason="stopped")
    search = Search(workers=None, rungs=[], options=[{"model.compile": "true"}, {"data.decode": "cpu"}])
    left_out = run_search(search, budget, measure)
    assert [r.status for r in search.results] == ["ok", "ok", "timed out"]
    assert left_out[0].changes == {"data.decode": "cpu"}
    assert budget.elapsed() == pytest.approx(100 * (1 + STOP_MARGIN)) and STOP_MARGIN < MARGIN


def test_batch_split_is_refused_with_batchnorm_or_dice_in_one_line():
    both = ["model.norm=sync_batch", "loss.dice=1"]
    for settings, names in ((["model.norm=batch"], ["model.norm=batch"]),
                            (["model.norm=group", "loss.dice=0.5"], ["loss.dice=0.5"]), (both, both)):
        why = batch_split_refusal(load_config(None, settings))
        assert "\n" not in why and "--batch-split-anyway" in why and all(n in why for n in names), why
    cfg = load_config(None, ["model.norm=group", "loss.dice=0", "data.batch_size=4", "train.grad_accum=2"])
    assert batch_split_refusal(cfg) is None
    splits = split_options(cfg, lambda *a: None)
    assert {(s["data.batch_size"], s["train.grad_accum"]) for s in splits} == {("2", "4"), ("8", "1")}


def test_tune_end_to_end_with_a_trial_made_to_fail(shards, tmp_path):
    out = tmp_path / "tuned.yaml"
    p = run_cli("tune", "-c", SYNTH, "--search", "", "--budget", "2m", "--warmup", "1", "--steps", "3",
                "--try", "data.val_split=nosuch", "--try", "data.num_workers=0", "--out", out, *TINY,
                f"data.shards={shards}", "data.num_workers=1", cwd=tmp_path)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in p.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| #")]
    assert [r[1] for r in rows] == ["as given", "as given, again (the noise)", "data.val_split=nosuch",
                                    "data.num_workers=0"]
    for r in rows:
        assert float(r[6]) > 0  # the trial's own seconds, measured for every row
        if r[7] == "ok":
            assert float(r[3]) > 0 and r[4].endswith("%") and float(r[5].split()[0]) > 0
    assert rows[2][7].startswith("failed: no manifest") and "nosuch.json" in rows[2][7]
    assert rows[3][7] == "ok"  # the search went on after the failure
    assert not (tmp_path / "runs").exists()  # the trials' run folders were their own
    head = [line for line in out.read_text().splitlines() if line.startswith("#")]
    assert len(head) == 4 and "CPU cores" in head[1] and "img/s" in head[2]
    tuned = load_config(out)
    expected = load_config(SYNTH, [*TINY, f"data.shards={shards}", "data.num_workers=1"])
    assert dataclasses.replace(tuned, data=dataclasses.replace(tuned.data, num_workers=1)) == expected
    assert yaml.safe_load(out.read_text())["data"]["shards"] == str(shards)


def test_tune_refusals_are_one_line(shards, tmp_path):
    assert_user_error(run_cli("tune", "-c", SYNTH, "--batch-split", check=False), "--batch-split-anyway")
    given = [f"data.shards={shards}"]

    def refused(match, out=tmp_path / "t.yaml", settings=given, **asked):
        with pytest.raises(UserError, match=match):
            tune(SYNTH, settings, 60, out, asked=Asked(**asked), log=lambda *a: None,
                 measure=lambda *a: pytest.fail("no trial runs after a refusal"))
    refused("data.nosuch", tries=["data.nosuch=1"])
    refused("the config itself", out=SYNTH)
    refused("--search: unknown 'everything'", searches=["everything"])
    refused("loss.dice=1", batch_split=True)
    refused(f"no manifest {tmp_path / 'nosuch'}", settings=[f"data.shards={tmp_path / 'nosuch'}"])
    refused("no manifest .*val_none.json", settings=[*given, "data.val_split=val_none"])
    refused(f"--out .*: no such folder {tmp_path / 'missing'}$", out=tmp_path / "missing" / "t.yaml")
    refused("is a folder", out=tmp_path)
    printed = []
    with pytest.raises(UserError, match="the config as given did not run .failed: RuntimeError"):
        tune(SYNTH, given, 60, tmp_path / "t.yaml", log=printed.append, measure=lambda trial, *_: Result(
            trial, "failed", 1.0, reason="RuntimeError: made to fail"))
    assert "| 1 | as given |" in printed[-1] and not (tmp_path / "t.yaml").exists()
    p = run_cli("tune", "-c", SYNTH, "--budget", "1h30", "--out", tmp_path / "missing" / "t.yaml", *given,
                check=False)
    assert_user_error(p, "bad duration '1h30'")
    p = run_cli("tune", "-c", SYNTH, "--out", tmp_path / "missing" / "t.yaml", *given, check=False)
    assert_user_error(p, "no such folder")


@pytest.mark.gpu
def test_tune_on_cuda_searches_the_step_options(shards, tmp_path):
    """On CUDA: channels_last and the decode are searched, and a trial in another precision runs in its own
    process beside the fp32 ones."""
    out = tmp_path / "tuned.yaml"
    p = run_cli("tune", "-c", SYNTH, "--search", "channels_last", "--decode", "--try",
                "train.mixed_precision=bf16", "--budget", "3m", "--warmup", "2", "--steps", "10",
                "--out", out, *TINY, f"data.shards={shards}", cwd=tmp_path)
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in p.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| #")]
    assert [r[1] for r in rows] == ["as given", "as given, again (the noise)", "model.channels_last=false",
                                    "data.decode=cpu", "train.mixed_precision=bf16"], p.stdout
    for r in rows:
        assert r[7] == "ok" and float(r[3]) > 0 and float(r[5].split()[0]) > 0, r
    assert "no GPU" not in out.read_text().splitlines()[1]
    load_config(out)


@pytest.mark.slow
def test_tune_on_two_processes_then_both_whole_runs_side_by_side(shards, tmp_path):
    """--procs 2 through the launcher; then bench e2e --tuned trains the config and tuned.yaml through the
    training entry `distseg train` runs."""
    out = tmp_path / "tuned.yaml"
    p = run_cli("tune", "-c", SYNTH, "--procs", "2", "--search", "", "--try", "data.num_workers=0",
                "--budget", "2m", "--warmup", "1", "--steps", "3", "--out", out, *TINY,
                f"data.shards={shards}", cwd=tmp_path)
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| #")]
    assert len(rows) == 3 and all("| ok |" in r for r in rows), p.stdout
    assert "2 process(es)" in out.read_text().splitlines()[1]
    e2e = run_cli("bench", "e2e", "-c", SYNTH, "--procs", "2", "--tuned", out, *TINY, f"data.shards={shards}",
                  "train.epochs=1", cwd=tmp_path)
    cells = [[x.strip() for x in line.split("|")[1:-1]] for line in e2e.stdout.splitlines()
             if line.startswith("| ")]
    table = {c[0]: c[1:] for c in cells}
    whole = table["whole run img/s (images / wall time from process start)"]
    assert float(whole[0]) > 0 and float(whole[1]) > 0 and whole[2].endswith("x")
