"""`distseg tune`: the search's choice and budget on injected results (the search sees nothing else), and the
command end to end at tiny sizes: real trials in their own processes, a trial made to fail, tuned.yaml loaded
back. Speeds are shown, never asserted: what is asserted is that each figure was measured."""

import dataclasses
import time

import pytest
import torch
import yaml

from conftest import ROOT, assert_user_error, run_cli
from distseg.bench import tune_trial
from distseg.bench.tune import (
    END_S,
    MARGIN,
    MIN_WINDOW_S,
    Asked,
    Budget,
    Result,
    Search,
    Trial,
    batch_split_refusal,
    candidates,
    dali_option,
    outcome,
    process_age,
    run_search,
    split_options,
    tune,
    worker_rungs,
)
from distseg.config import load_config
from distseg.errors import UserError
from distseg.units import parse_duration

IMPORTED = time.monotonic()
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
    """A stand-in for the trial processes: each takes `overhead` (seconds, or a function of the trial's
    number) + its window on `clock`, measuring the rate `rates(trial)` (None: it failed)."""
    def measure(trial, window, timeout):
        if started is not None:
            started.append((clock.now, window, timeout))
        cost = overhead(len(started or [])) if callable(overhead) else overhead
        if cost + window > timeout:  # stopped at its timeout, as TrialProcess does
            clock.now += timeout
            return Result(trial, "timed out", timeout, reason="stopped")
        clock.now += cost + window
        rate = rates(trial)
        if rate is None:
            return Result(trial, "failed", overhead, reason="RuntimeError: made to fail")
        return Result(trial, "ok", cost + window, img_per_s=rate, data_wait=0.1, peak_mb=100.0,
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
    assert len({window for _, window, _ in started}) == 1  # every trial the same window
    for k, (at, window, timeout) in enumerate(started):
        assert window >= MIN_WINDOW_S
        assert at - 1000.0 + timeout <= 120 * (1 + MARGIN) - END_S + 1e-9  # a trial is stopped past it
        if k:  # the first runs whatever it costs; the others start only when they fit, the reserve spare
            assert at - 1000.0 + overhead + window <= 120 - END_S + 1e-9
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
    assert budget.elapsed() == pytest.approx(100 * (1 + MARGIN) - END_S)


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
@pytest.mark.early
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


def test_the_start_up_is_charged_and_a_slower_trial_still_ends_within_the_budget(shards, tmp_path):
    """The command's own start-up (before the search) counts; the trials' start-up varies (5 to 9 s), and the
    last trial would run for ever: the command still ends within 10% of the budget, its own end included."""
    clock, started = FakeClock(), []
    costs = {1: 5.0, 2: 9.0, 3: 5.0}
    measure = fake_trials(clock, lambda t: 10.0 + len(started), overhead=lambda k: costs.get(k, 1e9),
                          started=started)
    search = tune(SYNTH, [f"data.shards={shards}"], 40, tmp_path / "t.yaml", log=lambda *a: None,
                  measure=measure, clock=clock, spent=2.5, asked=Asked(searches=["workers", "compile"]))
    begin = 1000.0 - 2.5  # when the command started, on the fake clock
    assert [r.status for r in search.results] == ["ok", "ok", "ok", "timed out"]
    for k, (at, window, timeout) in enumerate(started, 1):
        assert at - begin + timeout == pytest.approx(40 * (1 + MARGIN) - END_S)  # stopped from the start
        if k in (2, 3):  # planned to end before the budget less the reserve: trial 2's 4 s spread was kept
            assert at - begin + costs[k] + window <= 40
    assert clock.now - begin + END_S == pytest.approx(40 * (1 + MARGIN))


def test_the_step_floor_is_planned_for():
    """With steps slower than the window allows, a trial costs the floor of steps: the plan counts that."""
    clock = FakeClock()
    budget, no_floor = Budget(60, clock, min_steps=5), Budget(60, clock, min_steps=1)
    window = budget.window([], 4)
    assert window == MIN_WINDOW_S  # 59 s / 4 trials less the start-up guessed (15 s)
    slow = Result(Trial("as given"), "ok", 20.0, img_per_s=1.0, window_s=15.0, steps=5)  # 3 s a step
    assert budget.expected_window([slow], window) == 15.0  # 5 steps of 3 s
    assert no_floor.expected_window([slow], window) == 3.0  # one step outlasts the 2 s window
    clock.now += 40.0
    assert budget.window([slow], 3) == window  # the window stays what it was for the first trial
    # 40 s spent + 5 s start-up + 15 s of the floor > 60 s less the reserve (the command's end, 1 s)
    assert not budget.fits([slow], window) and no_floor.fits([slow], window)


def test_the_reserve_is_the_measured_spread_of_the_start_up():
    budget = Budget(60, FakeClock())
    results = [Result(Trial("t"), "ok", o + 2.0, img_per_s=1.0, window_s=2.0, steps=5) for o in (5, 6, 9)]
    assert budget.reserve([]) == END_S and budget.reserve(results) == pytest.approx(3.0)
    assert budget.overhead(results) == pytest.approx(6.0)


def test_process_age_counts_from_the_process_start():
    assert process_age() >= time.monotonic() - IMPORTED - 0.02  # clock ticks of 10 ms


def test_a_trial_window_runs_at_least_the_floor_then_its_seconds_and_ranks_agree(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(tune_trial.time, "perf_counter", lambda: now[0])

    class Acc:
        num_processes, device = 2, "cpu"

        def reduce(self, t, reduction):
            assert reduction == "max"
            return t * 2 if self.other_rank_slower else t
    assert tune_trial.steps_to_fill(2.0, 5, 8.0) == 20 and tune_trial.steps_to_fill(9.0, 5, 8.0) == 5
    for acc_procs in (1, 2):
        acc = Acc()
        acc.num_processes, acc.other_rank_slower = acc_procs, False
        w = tune_trial.Window(acc, seconds=1.0, min_steps=5, cap=100)
        w.start()
        stops = []
        for done in range(1, 100):
            now[0] += 0.5  # a step takes 0.5 s: the seconds are spent after 2 steps, the floor holds to 5
            if w.over(done):
                stops.append(done)
                break
        assert stops == [5]
        w = tune_trial.Window(acc, seconds=8.0, min_steps=5, cap=100)
        now[0] = 0.0
        w.start()
        done = next(d for d in range(1, 100) if (now.__setitem__(0, now[0] + 0.5) or w.over(d)))
        assert done == 16  # 8 s of 0.5 s steps, by the clock or by the pace agreed at the floor
    acc = Acc()
    acc.other_rank_slower = True  # the largest count of the ranks is kept: every rank stops at it
    w = tune_trial.Window(acc, seconds=8.0, min_steps=5, cap=20)
    now[0] = 0.0
    w.start()
    now[0] = 2.5
    assert not w.over(5) and w.target == 32 and w.over(20)  # the cap still ends it


def test_the_default_search_and_what_each_opt_in_changes(shards):
    cfg = load_config(SYNTH, [f"data.shards={shards}"])
    for cuda in (False, True):
        printed = []
        got = candidates(cfg, SYNTH, [], cuda, ["workers", "channels_last", "compile"], False, False, False,
                         [], printed.append)
        flipped = {"model.channels_last": str(not cfg.model.channels_last).lower()}
        assert got == ([flipped] if cuda else []) + [{"model.compile": str(not cfg.model.compile).lower()}]
        assert printed == ([] if cuda else ["model.channels_last: not searched: training applies it on CUDA "
                                            "only (no GPU here)"])
        printed = []
        got = candidates(load_config(SYNTH, ["model.norm=group", "loss.dice=0"]), SYNTH,
                         ["model.norm=group", "loss.dice=0"], cuda, [], True, True, True,
                         ["train.mixed_precision=bf16"], printed.append)
        opted = [{"data.loader": "dali"}, {"data.batch_size": "2", "train.grad_accum": "2"},
                 {"train.mixed_precision": "bf16"}]
        assert got == ([{"data.decode": "cpu"}] if cuda else []) + opted
        lines = [next(line for line in printed if line.startswith(flag)) for flag in
                 ("--decode:", "--dali:", "--batch-split:", "--try train.mixed_precision=bf16")]
        assert "decoded pixels differ" in lines[0] and "sample order" in lines[1]
        assert "BatchNorm" in lines[2] and "tried as given" in lines[3]
        assert ("data.decode: not searched: data.decode=gpu needs CUDA" in printed) is not cuda


def test_dali_option(monkeypatch):
    printed = []
    cfg = load_config(SYNTH, [])
    assert dali_option(cfg, SYNTH, [], printed.append) == [{"data.loader": "dali"}]  # DALI imports here
    assert printed[0].startswith("--dali: data.loader=dali changes what the model sees")
    for settings, why in ((["data.loader=dali"], "the config already uses dali"),
                          (["data.sampling=rare"], "data.sampling")):
        printed.clear()
        assert dali_option(load_config(SYNTH, settings), SYNTH, settings, printed.append) == []
        assert printed[-1].startswith("data.loader: not searched: ") and why in printed[-1], printed
    monkeypatch.setattr("distseg.data.dali_loader.dali_missing", lambda: "DALI is not installed (pip ...)")
    printed.clear()
    assert dali_option(cfg, SYNTH, [], printed.append) == []
    assert printed[-1] == "data.loader: not searched: DALI is not installed (pip ...)"


def test_a_failure_becomes_its_status_and_one_line():
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nsecond line")
    assert tune_trial.reason(oom) == ("out of memory", "CUDA out of memory. Tried to allocate 2.00 GiB")
    cpu = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you")
    assert tune_trial.reason(cpu)[0] == "out of memory"
    assert tune_trial.reason(MemoryError()) == ("out of memory", "MemoryError")
    assert tune_trial.reason(ValueError("bad\nmore")) == ("failed", "ValueError: bad")
    trial = Trial("t")
    killed = outcome(trial, -9, 3.0, None, "last line")
    assert (killed.status, killed.reason) == ("failed", "killed by SIGKILL: last line") and not killed.ok
    assert outcome(trial, 1, 3.0, None, "boom").reason == "exit status 1: boom"
    assert outcome(trial, None, 44.0, None, "").status == "timed out"
    got = outcome(trial, 1, 3.0, {"status": "out of memory", "reason": "CUDA out of memory"}, "")
    assert (got.status, got.reason) == ("out of memory", "CUDA out of memory")


def test_bench_e2e_tuned_runs_the_choice_and_refuses_a_setting_that_would_undo_it(shards, tmp_path):
    from distseg.bench.e2e import tuned_runs
    from distseg.config import dump_config

    given = [*TINY, f"data.shards={shards}"]
    base = tmp_path / "base.yaml"
    base.write_text(dump_config(load_config(SYNTH, given)))
    tuned = tmp_path / "tuned.yaml"
    tuned.write_text("# distseg tune ...\n# settings changed: data.num_workers=0 model.compile=true\n" +
                     dump_config(load_config(base, ["data.num_workers=0", "model.compile=true"])))
    (a, sa), (b, sb) = tuned_runs(str(base), str(tuned), ["train.epochs=1"])
    ran = load_config(a, sa), load_config(b, sb)
    got = [(c.data.num_workers, c.model.compile, c.train.epochs) for c in ran]
    assert got == [(1, False, 1), (0, True, 1)]  # the tuned run carries the choice; both get the rest
    for setting in ("data.num_workers=1", "model.compile=false"):
        with pytest.raises(UserError, match=f"^{setting}: .* chose {setting.split('=')[0]}, .*leave it out"):
            tuned_runs(str(base), str(tuned), ["train.epochs=1", setting])
    p = run_cli("bench", "e2e", "-c", base, "--tuned", tuned, "data.num_workers=1", check=False)
    assert_user_error(p, "data.num_workers=1: ")
    plain = tmp_path / "plain.yaml"  # no header: the settings where it differs from the config were chosen
    plain.write_text(dump_config(load_config(base, ["data.num_workers=0"])))
    with pytest.raises(UserError, match="chose data.num_workers"):
        tuned_runs(str(base), str(plain), ["data.num_workers=1"])
    runs = tuned_runs(str(base), str(plain), ["model.compile=true"])
    assert runs[1] == (str(plain), ["model.compile=true"])
