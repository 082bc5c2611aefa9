"""`distseg tune`: the fastest settings for this machine, found by measuring the real training step.

Each trial is a process of its own (distseg/bench/tune_trial.py: the real loaders and the loop's own step on
the config's shards, in a throwaway run folder), so a trial may crash or run out of memory and the search
goes on. The search (`Search`, pure: it sees only results) runs the config as given twice (the second run
measures the noise between repeats), then data.num_workers up the rungs 0, 1, 2, 4, ... until img/s stops
rising or the cores run out (one rung down when going up did not help), then each further option on top of
the best so far, kept only when it beats it by more than the noise (and at least MIN_GAIN). By default only
settings that leave the training math unchanged are searched; the others only when asked for (`options`).

`Budget` is the tool's own accounting, counted from the command's process start (its own start-up is part
of the budget): every trial gets the same timed window, sized before the first so that the trials planned
fit, with a floor of steps (MIN_STEPS); a trial starts only when its expected cost (the median start-up of
the trials so far plus the window, or the floor at the slowest step measured) ends before the budget's end
less a reserve (the command's own end, or the measured spread of the trials' start-up when wider), and a
trial still running at 10% past the budget less the command's own end is stopped (`timed out`), so that the
whole command ends within 10% of it.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
from tqdm import tqdm

from distseg.bench.common import table
from distseg.config import Config, dump_config, load_config
from distseg.errors import UserError
from distseg.files import atomic_write_text

REPO = Path(__file__).resolve().parents[2]

MIN_GAIN = 0.02  # a change is kept when it beats the best so far by more than this share, or the noise
SEARCHES = ("workers", "channels_last", "compile")  # the default search: the training math stays the same
OVERHEAD_GUESS_S = 15.0  # a trial's cost beyond its window (start-up, warm-up) before one was measured
MIN_WINDOW_S, MAX_WINDOW_S = 2.0, 120.0
MARGIN = 0.10  # the budget may be overrun by at most this share (from the command's start to its end)
END_S = 1.5  # the command's own end after the last trial: stopping it, the table, tuned.yaml, the exit
# (about 1 s measured on 2 CPU cores after a trial stopped at its timeout)
MIN_STEPS = 5  # a trial's timed window runs at least this many steps (unless --steps is fewer)


@dataclass(frozen=True)
class Trial:
    """One measurement: `label` says what it changes against the best so far; `changes` holds every setting
    it changes against the config as given (key -> value as written on a command line)."""

    label: str
    changes: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    """A trial's outcome: status ok | failed | out of memory | timed out; figures when it measured."""

    trial: Trial
    status: str
    wall_s: float  # the trial's whole process, start-up included
    img_per_s: float | None = None
    data_wait: float | None = None  # share of the timed window spent waiting for batches
    peak_mb: float | None = None
    window_s: float = 0.0  # the timed window
    steps: int = 0
    reason: str = ""

    @property
    def ok(self) -> bool:
        """Whether it measured."""
        return self.status == "ok" and self.img_per_s is not None


def worker_rungs(cores: int) -> list[int]:
    """0, 1, 2, 4, ... up to the cores, and the cores themselves."""
    rungs, w = [0, 1], 2
    while w < cores:
        rungs.append(w)
        w *= 2
    return sorted(set(rungs + [max(cores, 1)]))


class Search:
    """The plan of trials, fed one result at a time: `next()` is the trial to run (None: done), `record`
    takes its result. Pure: no process, no clock."""

    def __init__(self, workers: int | None, rungs: list[int], options: list[dict[str, str]],
                 min_gain: float = MIN_GAIN):
        self.workers, self.rungs, self.options, self.min_gain = workers, rungs, options, min_gain
        self.results: list[Result] = []
        self.best: Result | None = None
        self.best_rate = 0.0
        self.noise: float | None = None
        ups = [r for r in rungs if workers is not None and r > workers]
        downs = [r for r in rungs if workers is not None and r < workers]
        self.planned = 2 + len(ups) + (1 if downs else 0) + len(options)  # at most
        self._plan = self._trials(ups, downs)
        self._next = next(self._plan, None)

    def next(self) -> Trial | None:
        """The trial to run now; None when the search is done."""
        return self._next

    def planned_left(self) -> int:
        """At most this many trials are still to come (the worker rungs may stop early)."""
        return max(0, self.planned - len(self.results))

    def record(self, result: Result) -> None:
        """The result of `next()`'s trial: it decides the trial after it."""
        self.results.append(result)
        try:
            self._next = self._plan.send(result)
        except StopIteration:
            self._next = None

    def threshold(self) -> float:
        """The share a change must gain to be kept: the noise between repeats, at least `min_gain`."""
        return max(self.noise or 0.0, self.min_gain)

    def keep_if_faster(self, r: Result) -> bool:
        """Whether `r` beats the best so far by more than the threshold (and then it is the best)."""
        if not r.ok or r.img_per_s <= self.best_rate * (1 + self.threshold()):
            return False
        self.best, self.best_rate = r, r.img_per_s
        return True

    def _trials(self, ups: list[int], downs: list[int]):
        """The plan as a generator fed each result. Why this shape: the config as given runs twice because
        no change can be judged without the noise between two runs of the same settings; the workers go
        first and greedily up the rungs (each rung costs a whole trial, and img/s stops rising once the step
        rather than the loader is the limit), one rung down only when going up did not help; then each
        option once on top of the best so far, not every combination, so the trials grow with the options
        and fit a budget of minutes."""
        first = yield Trial("as given")
        if not first.ok:
            return
        again = yield Trial("as given, again (the noise)")
        rates = [r.img_per_s for r in (first, again) if r.ok]
        self.best, self.best_rate = first, statistics.mean(rates)
        if len(rates) == 2:
            self.noise = abs(rates[0] - rates[1]) / self.best_rate
        improved = False
        for w in ups:
            if not self.keep_if_faster((yield self._on_best({"data.num_workers": str(w)}))):
                break
            improved = True
        if not improved and downs:
            self.keep_if_faster((yield self._on_best({"data.num_workers": str(downs[-1])})))
        for option in self.options:
            self.keep_if_faster((yield self._on_best(option)))

    def _on_best(self, change: dict[str, str]) -> Trial:
        label = " ".join(f"{k}={v}" for k, v in change.items())
        return Trial(label, {**self.best.trial.changes, **change})

    def choice(self) -> dict[str, str]:
        """The settings to change against the config as given: none when nothing beat it."""
        return dict(self.best.trial.changes) if self.best is not None else {}


def process_age() -> float:
    """Seconds since this process started, from the kernel's start time (/proc, against the boot clock the
    kernel counts it on), else psutil, else 0: the command's own start-up (Python, torch, the config) is
    part of the budget the user gave, and it is spent before any of its code runs."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        return max(0.0, time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, AttributeError):
        pass
    try:
        import psutil

        return max(0.0, time.time() - psutil.Process().create_time())
    except Exception:  # no psutil, or it cannot read this process: the start-up is not counted
        return 0.0


class Budget:
    """The tool's own accounting of its time; see the module docstring. `spent`: seconds the command had
    already run when the search began (its start-up), counted against the budget."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic, spent: float = 0.0,
                 min_steps: int = 1):
        self.total, self.clock, self.min_steps = seconds, clock, max(1, min_steps)
        self.start = clock() - spent
        self.fixed_window: float | None = None

    def elapsed(self) -> float:
        """Seconds since the command started."""
        return self.clock() - self.start

    def hard_left(self) -> float:
        """Seconds until a running trial is stopped: past the budget by MARGIN less the command's own end."""
        return self.total * (1 + MARGIN) - END_S - self.elapsed()

    def overhead(self, results: list[Result]) -> float:
        """A trial's expected cost beyond its window: the median of those measured, else a guess."""
        seen = [r.wall_s - r.window_s for r in results if r.ok]
        return statistics.median(seen) if seen else OVERHEAD_GUESS_S

    def reserve(self, results: list[Result]) -> float:
        """Seconds the plan keeps spare before the budget's end: the command's own end, or more when the
        trials' measured cost beyond their window spread wider than that around the median `fits` plans
        with (a slower trial then still ends within the budget)."""
        seen = [r.wall_s - r.window_s for r in results if r.ok]
        spread = max(seen) - statistics.median(seen) if seen else 0.0
        return max(END_S, spread)

    def expected_window(self, results: list[Result], window: float) -> float:
        """A window's expected seconds: `window`, or the step floor at the slowest step measured when that
        is longer."""
        steps = [r.window_s / r.steps for r in results if r.ok and r.steps]
        return max(window, self.min_steps * max(steps)) if steps else window

    def window(self, results: list[Result], trials_left: int) -> float:
        """The timed window of every trial, set before the first from the trials planned and what is left
        (a trial's start-up guessed until measured), then the same for all: alike windows compare alike, the
        two runs of the config as given included."""
        if self.fixed_window is None:
            left = self.total - self.elapsed() - self.reserve(results)
            per_trial = left / max(1, trials_left) - self.overhead(results)
            self.fixed_window = min(MAX_WINDOW_S, max(MIN_WINDOW_S, per_trial))
        return self.fixed_window

    def fits(self, results: list[Result], window: float) -> bool:
        """Whether a trial of this window is expected to end before the budget's end less the reserve (the
        first always runs)."""
        if not results:
            return True
        cost = self.overhead(results) + self.expected_window(results, window)
        return self.elapsed() + cost <= self.total - self.reserve(results) + 1e-6


def run_search(search: Search, budget: Budget,
               measure: Callable[[Trial, float, float], Result]) -> list[Trial]:
    """Run the search's trials while they fit the budget; `measure(trial, window_s, timeout_s)` runs one.
    Returns the trials the budget left out."""
    while (trial := search.next()) is not None:
        window = budget.window(search.results, search.planned_left())
        if not budget.fits(search.results, window):
            return [trial]
        search.record(measure(trial, window, max(1.0, budget.hard_left())))
    return []


def candidates(cfg: Config, config: str | None, overrides: list[str], cuda: bool, searches: list[str],
               decode: bool, dali: bool, batch_split: bool, tries: list[str], log) -> list[dict[str, str]]:
    """The options tried one at a time after the workers, in order; printed lines say what each opt-in
    changes, and why an asked-for one is not searched here."""
    options: list[dict[str, str]] = []

    def flag(v: bool) -> str:
        return str(not v).lower()
    if "channels_last" in searches:
        if cuda:
            options.append({"model.channels_last": flag(cfg.model.channels_last)})
        else:
            log("model.channels_last: not searched: training applies it on CUDA only (no GPU here)")
    if decode:
        log("--decode: data.decode=cpu|gpu changes what the model sees: the decoded pixels differ slightly")
        now = cfg.data.decode if cfg.data.decode != "auto" else ("gpu" if cuda else "cpu")
        if cuda:
            options.append({"data.decode": "cpu" if now == "gpu" else "gpu"})
        else:
            log("data.decode: not searched: data.decode=gpu needs CUDA")
    if dali:
        options += dali_option(cfg, config, overrides, log)
    if batch_split:
        options += split_options(cfg, log)
    for t in tries:
        key, _, value = t.partition("=")
        load_config(config, [*overrides, t])  # a bad setting is refused before any trial runs
        log(f"--try {t}: your setting, tried as given")
        options.append({key.strip(): value})
    if "compile" in searches:  # last: its warm-up (the compilation) is the longest
        options.append({"model.compile": flag(cfg.model.compile)})
    return options


def dali_option(cfg: Config, config: str | None, overrides: list[str], log) -> list[dict[str, str]]:
    """data.loader=dali when DALI imports and the config allows it."""
    from distseg.data.dali_loader import dali_missing

    log("--dali: data.loader=dali changes what the model sees: its own sample order and random draws, and a "
        "run cannot resume on another process count")
    if cfg.data.loader == "dali":
        log("data.loader: not searched: the config already uses dali")
        return []
    missing = dali_missing()
    if missing:
        log(f"data.loader: not searched: {missing}")
        return []
    try:
        load_config(config, [*overrides, "data.loader=dali"])
    except UserError as e:
        log(f"data.loader: not searched: {e}")
        return []
    return [{"data.loader": "dali"}]


def batch_split_refusal(cfg: Config) -> str | None:
    """Why --batch-split would change what the model learns beyond the step's noise, or None."""
    why = []
    if cfg.model.norm in ("batch", "sync_batch"):
        why.append(f"model.norm={cfg.model.norm} (BatchNorm's statistics are per micro-batch)")
    if cfg.loss.dice > 0:
        why.append(f"loss.dice={cfg.loss.dice:g} (the Dice term is a mean per micro-batch)")
    if not why:
        return None
    return (f"--batch-split is refused with {' and '.join(why)}: a smaller micro-batch changes what the "
            "model learns; add --batch-split-anyway to search it all the same")


def split_options(cfg: Config, log) -> list[dict[str, str]]:
    """data.batch_size x train.grad_accum at the same global batch: half the micro-batch, or twice it."""
    log("--batch-split: data.batch_size x train.grad_accum at the same global batch changes what the model "
        "sees per micro-batch: BatchNorm's statistics and the Dice term (a mean per micro-batch)")
    b, a = cfg.data.batch_size, cfg.train.grad_accum
    out = []
    if b % 2 == 0:
        out.append({"data.batch_size": str(b // 2), "train.grad_accum": str(a * 2)})
    if a % 2 == 0:
        out.append({"data.batch_size": str(b * 2), "train.grad_accum": str(a // 2)})
    return out


def machine(procs: int) -> str:
    """The machine in one line: cores, CPU, GPU, versions."""
    from distseg import __version__

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}" if torch.cuda.is_available() \
        else "no GPU"
    return (f"{os.cpu_count()} CPU cores ({cpu}), {gpu}; {procs} process(es); torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}), distseg {__version__}, Python {platform.python_version()}")


def rate(r: Result | None) -> str:
    """A result's img/s as printed."""
    return "-" if r is None or r.img_per_s is None else f"{r.img_per_s:.2f} img/s"


def noise(search: Search) -> str:
    """The noise between the repeats as printed."""
    return "not measured (no repeat ran)" if search.noise is None else f"{100 * search.noise:.1f}%"


def trial_rows(results: list[Result]) -> str:
    """Every trial: settings, img/s, data wait, peak memory, the trial's seconds, status."""
    rows = []
    for i, r in enumerate(results, 1):
        changed = " ".join(f"{k}={v}" for k, v in r.trial.changes.items()) or "(the config as given)"
        rows.append([i, r.trial.label, changed, "-" if r.img_per_s is None else float(r.img_per_s),
                     "-" if r.data_wait is None else f"{100 * r.data_wait:.1f}%",
                     "-" if r.peak_mb is None else f"{r.peak_mb:.0f} MB", f"{r.wall_s:.1f}",
                     r.status + (f": {r.reason}" if r.reason else "")])
    return table(["#", "trial", "settings against the config", "img/s", "data wait", "peak memory",
                  "trial s", "status"], rows)


CHANGED = "settings changed: "  # the header line of tuned.yaml that names the choice (`changed_line`)


def changed_line(tuned: str) -> str:
    """What a tuned.yaml's header says was changed (its `CHANGED` line), or '' for a file without one."""
    with open(tuned) as f:
        for line in f:
            if not line.startswith("#"):
                break
            if line.startswith("# " + CHANGED):
                return line[len("# " + CHANGED):].strip()
    return ""


def tuned_text(config: str | None, overrides: list[str], search: Search, procs: int) -> str:
    """tuned.yaml: the config plus the chosen settings, under a header saying where and when it was
    measured and what the first trial and the choice ran at."""
    choice = search.choice()
    cfg = load_config(config, [*overrides, *(f"{k}={v}" for k, v in choice.items())])
    first = search.results[0]
    chosen = " ".join(f"{k}={v}" for k, v in choice.items()) or "none: the config as given measured fastest"
    gain = f" ({search.best.img_per_s / first.img_per_s:.2f}x)" if choice else ""
    header = [f"distseg tune, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC: {config or 'the defaults'}"
              f"{' ' + ' '.join(overrides) if overrides else ''}, plus the settings measured fastest here",
              f"machine: {machine(procs)}",
              f"the config as given: {rate(first)}; the choice: {rate(search.best)}{gain}; noise between "
              f"repeats {noise(search)}",
              f"{CHANGED}{chosen}"]
    return "".join(f"# {line}\n" for line in header) + dump_config(cfg)


def summary_lines(search: Search, budget: Budget, left_out: list[Trial]) -> list[str]:
    """The noise, the budget's use and the choice, as printed after the table."""
    choice = search.choice()
    chosen = " ".join(f"{k}={v}" for k, v in choice.items())
    lines = [f"noise between repeats of the config as given: {noise(search)} (a change is kept when it gains "
             f"more than {100 * search.threshold():.1f}%)",
             f"budget {budget.total:.0f} s: used {budget.elapsed():.0f} s from the command's start, in "
             f"{len(search.results)} trials"]
    if left_out:
        more = search.planned_left() - 1
        lines.append(f"not tried within the budget: {left_out[0].label}"
                     f"{f' and up to {more} more' if more > 0 else ''}")
    first = search.results[0]
    lines.append(f"choice: {chosen} ({rate(search.best)} against {rate(first)} as given)" if choice else
                 f"choice: the config as given ({rate(first)}): nothing beat it by more than the noise")
    return lines



def free_port() -> int:
    """A TCP port free now, for a trial's rendezvous (trials run one after another)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TrialProcess:
    """Runs a trial as its own process (through the launcher with several), the progress bar showing the
    trial in flight against the budget."""

    def __init__(self, config: str | None, overrides: list[str], procs: int, warmup: int, steps: int,
                 bar: tqdm, budget: Budget):
        self.config, self.overrides, self.procs = config, overrides, procs
        self.warmup, self.steps, self.bar, self.budget = warmup, steps, bar, budget
        self.min_steps = min(budget.min_steps, steps)
        self.count = 0

    def command(self, result: Path, folder: Path, trial: Trial, window: float) -> list[str]:
        """The trial's command line: its settings after the user's, the throwaway run folder last."""
        config = ["--config", self.config] if self.config else []
        args = ["-m", "distseg.bench.tune_trial", str(result), *config,
                "--warmup", str(self.warmup), "--steps", str(self.steps), "--min-steps",
                str(self.min_steps), "--seconds", f"{window:.2f}",
                *self.overrides, *(f"{k}={v}" for k, v in trial.changes.items()), f"output_dir={folder}"]
        if self.procs == 1:
            return [sys.executable, *args]
        return [sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", str(self.procs),
                "--num_machines", "1", "--main_process_port", str(free_port()), "--dynamo_backend", "no",
                *args]

    def __call__(self, trial: Trial, window: float, timeout: float) -> Result:
        """Run `trial` with a timed window of `window` seconds, stopped after `timeout`; its result."""
        self.count += 1
        self.bar.set_description_str(f"trial {self.count}: {trial.label}"[:60])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get(
            "PYTHONPATH")])]))
        with tempfile.TemporaryDirectory(prefix="distseg-tune-") as tmp:
            result, t0 = Path(tmp) / "result.json", time.monotonic()
            with open(Path(tmp) / "log.txt", "w+") as log:
                p = subprocess.Popen(self.command(result, Path(tmp) / "runs", trial, window), stdout=log,
                                     stderr=subprocess.STDOUT, env=env, start_new_session=True)
                code = self.wait(p, t0, timeout)
                log.seek(0)
                last = ([line.strip() for line in log if line.strip()] or ["(no output)"])[-1][:300]
            wall = time.monotonic() - t0
            got = json.loads(result.read_text()) if code is not None and result.is_file() else None
        return outcome(trial, code, wall, got, last)

    def wait(self, p: subprocess.Popen, t0: float, timeout: float) -> int | None:
        """The trial's exit status, or None once it ran `timeout` seconds (then it and its children are
        stopped)."""
        try:
            while True:
                left = timeout - (time.monotonic() - t0)
                if left <= 0:
                    return p.poll()
                try:  # never past the timeout by more than a wake-up: the budget's end is near
                    return p.wait(timeout=min(0.5, left))
                except subprocess.TimeoutExpired:
                    self.bar.n = min(self.bar.total, round(self.budget.elapsed()))
                    self.bar.refresh()
        finally:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def outcome(trial: Trial, code: int | None, wall: float, got: dict | None, last: str) -> Result:
    """A trial process's result from its exit status (None: stopped at its timeout), its result file's
    contents (None: it wrote none) and its last line of output."""
    if code is None:
        return Result(trial, "timed out", wall, reason=f"stopped after {wall:.0f} s, past the budget")
    if got is not None:
        return Result(trial, got["status"], wall, got.get("img_per_s"), got.get("data_wait"),
                      got.get("peak_mb"), got.get("seconds", 0.0), got.get("steps", 0), got.get("reason", ""))
    try:
        why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
    except ValueError:
        why = f"killed by signal {-code}"
    return Result(trial, "failed", wall, reason=f"{why}: {last}")


@dataclass
class Asked:
    """What `distseg tune` was asked to search, beyond the config."""

    searches: list[str] = field(default_factory=lambda: list(SEARCHES))
    decode: bool = False
    dali: bool = False
    batch_split: bool = False
    batch_split_anyway: bool = False
    tries: list[str] = field(default_factory=list)
    warmup: int = 3
    steps: int = 100
    min_steps: int = MIN_STEPS


def check_shards(cfg: Config) -> None:
    """Refuse at once, in one line, a config whose manifests are missing: otherwise the first trial's process
    would start (imports, a few seconds) only to fail on them."""
    from distseg.shards.manifest import load_manifest

    d = cfg.data
    train = [(s.shards, s.split) for s in d.streams] or [(d.shards, d.train_split)]
    for shards, split in [*train, (d.shards, d.val_split)]:
        load_manifest(shards, split)


def check_out(out: Path, config: str | None) -> None:
    """Refuse an --out that could not be written before any trial runs, not after the whole budget."""
    out = Path(out)
    if config and out.resolve() == Path(config).resolve():
        raise UserError(f"--out {out} is the config itself: write the tuned config to another file")
    folder = out.parent
    if not folder.is_dir():
        raise UserError(f"--out {out}: no such folder {folder}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: the folder {folder} is not writable")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: name the file to write, e.g. {out / 'tuned.yaml'}")


def plan(config: str | None, overrides: list[str], procs: int, asked: Asked, log) -> Search:
    """The search for this config on this machine; a refused request is one UserError."""
    cfg = load_config(config, overrides)
    unknown = [s for s in asked.searches if s not in SEARCHES]
    if unknown:
        raise UserError(f"--search: unknown {unknown[0]!r}: use some of {', '.join(SEARCHES)}")
    if asked.batch_split and not asked.batch_split_anyway and (refusal := batch_split_refusal(cfg)):
        raise UserError(refusal)
    options = candidates(cfg, config, overrides, torch.cuda.is_available(), asked.searches, asked.decode,
                         asked.dali, asked.batch_split, asked.tries, log)
    check_shards(cfg)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = cfg.data.num_workers if "workers" in asked.searches else None
    return Search(workers, worker_rungs(max(1, cores // procs)), options)


def tune(config: str | None, overrides: list[str], budget_s: float, out: Path, procs: int = 1,
         asked: Asked | None = None, log=print, measure=None, clock=time.monotonic,
         spent: float = 0.0) -> Search:
    """Search, print every trial and the choice, write `out` (tuned.yaml); `measure` stands in for the
    trial processes (tests); `spent`: seconds the command ran before this call (its start-up), counted
    against the budget."""
    asked = asked or Asked()
    budget = Budget(budget_s, clock, spent, min(asked.min_steps, asked.steps))  # first: the plan counts too
    check_out(out, config)
    if procs < 1:
        raise UserError("--procs must be at least 1")
    search = plan(config, overrides, procs, asked, log)
    log(f"tuning for {budget_s:.0f} s on {machine(procs)}")
    with tqdm(total=round(budget_s), unit="s", disable=None, leave=False) as bar:
        runner = measure or TrialProcess(config, overrides, procs, asked.warmup, asked.steps, bar, budget)
        left_out = run_search(search, budget, runner)
    log(trial_rows(search.results))
    first = search.results[0]
    if not first.ok:
        raise UserError(f"the config as given did not run ({first.status}: {first.reason}): nothing to tune")
    for line in summary_lines(search, budget, left_out):
        log(line)
    atomic_write_text(Path(out), tuned_text(config, overrides, search, procs))
    log(f"wrote {out}: distseg train -c {out}")
    return search
