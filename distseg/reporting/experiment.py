"""`distseg experiment PLAN`: a staged study (the seed's: automobile, then person fine-tuned from it vs from
scratch, then all classes) as one command.

A plan is a YAML file: `name`, `output_dir`, `shards` (one `labelid` sharding that every stage remaps to its
own scheme at load time), `root` (where to shard from if the shards are missing), `set` (overrides for every
stage), `stages` (each: `name`, `config`, optional `set`, and `init_from: <stage>` = that stage's best
checkpoint with a new head), `compare` (stages to tabulate side by side) and optional `seeds`. Each stage is
an ordinary run folder `<output_dir>/<stage>`: a rerun skips stages that finished with the same settings and
resumes a half-done one (training resumes from its newest checkpoint by itself). `--submit` sends the same
plan to Slurm as dependent jobs through slurm/train.sh, so every stage is preemption-safe.

With seeds (`--seeds 0,1,2` or the plan's `seeds:`) every stage runs once per seed, in
`<output_dir>/<stage>-seed<s>` with `train.seed=<s>`; a stage that starts from another starts from that
stage's run of the same seed. The comparison then gives each compared stage's mean ± sample std over its
seeds, every seed's score, and Welch's t-test of each later compared stage against the first (seeds.py).
"""

from __future__ import annotations

import html
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distseg.config import dump_config, load_config
from distseg.errors import UserError
from distseg.files import atomic_write_json
from distseg.inference.metrics import percent
from distseg.reporting.seeds import Spread, Verdict, finite, verdict
from distseg.runs.run_dir import RunDir
from distseg.runs.summary import RunSummary
from distseg.shards.manifest import manifest_location
from distseg.urls import is_remote, local_path

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"  # distseg/train.py
TABLE_FILE = "summary.json"  # the experiment's own: its compared stages, beside their run folders
REPO = TRAIN_SCRIPT.parents[1]


@dataclass
class Stage:
    """One stage of a plan: an ordinary training run with the plan's and its own overrides."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    init_from: str = ""  # a stage name


@dataclass
class Plan:
    """A parsed experiment plan."""

    name: str
    output_dir: Path
    shards: str
    root: str
    overrides: list[str]
    stages: list[Stage]
    compare: list[str]
    sbatch: list[str]
    seeds: list[int] = field(default_factory=list)  # [] = one run per stage, without a seed in its name

    def runs(self) -> list[tuple[Stage, int | None]]:
        """Every run of the plan in the order it trains: each stage, once per seed."""
        return [(stage, seed) for stage in self.stages for seed in (self.seeds or [None])]

    def run_name(self, stage: str, seed: int | None) -> str:
        """`<stage>`, or `<stage>-seed<s>` in a plan with seeds."""
        return stage if seed is None else f"{stage}-seed{seed}"

    def run_dir(self, stage: Stage, seed: int | None = None) -> RunDir:
        """<output_dir>/<stage> (with seeds: <stage>-seed<s>)."""
        return RunDir(self.output_dir / self.run_name(stage.name, seed))

    def stage_overrides(self, stage: Stage, extra: tuple[str, ...] = (),
                        seed: int | None = None) -> list[str]:
        """Everything a stage's training gets after its config file: where it lives, the shared shards, its
        starting weights (its parent's run of the same seed), the plan's and the stage's settings, its seed,
        then the command line's."""
        ov = [f"name={self.run_name(stage.name, seed)}", f"output_dir={self.output_dir}",
              f"data.shards={self.shards}"]
        if stage.init_from:
            best = RunDir(self.output_dir / self.run_name(stage.init_from, seed)).best
            ov += [f"train.init_from={best}", "train.reset_head=true"]
        seeded = [] if seed is None else [f"train.seed={seed}"]
        return ov + self.overrides + stage.overrides + seeded + list(extra)

    def check_seeds(self, extra: tuple[str, ...]) -> None:
        """With seeds, the plan owns train.seed: a setting of it elsewhere would be silently overridden."""
        if not self.seeds:
            return
        for where, ov in [("the plan's set", self.overrides), ("the command line", extra),
                          *[(f"stage {st.name}'s set", st.overrides) for st in self.stages]]:
            if any(o.split("=", 1)[0].strip() == "train.seed" for o in ov):
                raise UserError(f"{where} sets train.seed, which the seeds {seeds_text(self.seeds)} set per "
                                "run: leave it out")


def seeds_text(seeds: list[int]) -> str:
    """`0,1,2`: seeds as --seeds takes them."""
    return ",".join(map(str, seeds))


def parse_seeds(text: str | list | None, where: str = "--seeds") -> list[int]:
    """`0,1,2` (or a YAML list) as distinct non-negative integers; one line for anything else."""
    if text is None or text == "":
        return []
    parts = [str(x).strip() for x in (text if isinstance(text, list) else str(text).split(","))]
    if not all(p.isdigit() for p in parts) or len(set(map(int, parts))) != len(parts):
        raise UserError(f"{where} must be distinct non-negative integers, e.g. 0,1,2 (got {text!r})")
    return [int(p) for p in parts]


def _strings(v, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{where} must be a list of section.key=value strings")
    return list(v)


def load_plan(path: str | os.PathLike, seeds: str | None = None) -> Plan:
    """Read and check a plan file; every mistake is one line naming it. `seeds` (the command line's) replaces
    the plan's own `seeds:`."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"experiment plan not found: {p}")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"experiment plan {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("stages"), list) or not spec["stages"]:
        raise UserError(f"{p}: expected a mapping with a non-empty list 'stages'")
    stages, names = [], set()
    for i, st in enumerate(spec["stages"]):
        if not isinstance(st, dict) or "name" not in st or "config" not in st:
            raise UserError(f"{p}: stages[{i}] needs 'name' and 'config'")
        name = str(st["name"])
        if name in names or "/" in name:
            raise UserError(f"{p}: stage name {name!r} is repeated or not a plain folder name")
        init = str(st.get("init_from") or "")
        if init and init not in names:
            raise UserError(f"{p}: stage {name!r} starts from {init!r}, which is not an earlier stage")
        if not (REPO / st["config"]).is_file() and not Path(st["config"]).is_file():
            raise UserError(f"{p}: stage {name!r}: config file not found: {st['config']}")
        names.add(name)
        stages.append(Stage(name, str(st["config"]), _strings(st.get("set"), f"{p}: stages[{i}].set"), init))
    compare = _strings(spec.get("compare"), f"{p}: compare")
    unknown = [c for c in compare if c not in names]
    if unknown:
        raise UserError(f"{p}: compare names unknown stage {unknown[0]!r}")
    return Plan(str(spec.get("name", p.stem)), Path(spec.get("output_dir", f"runs/{p.stem}")),
                str(spec.get("shards", "shards/labelid")), str(spec.get("root") or ""),
                _strings(spec.get("set"), f"{p}: set"), stages, compare,
                _strings((spec.get("slurm") or {}).get("sbatch"), f"{p}: slurm.sbatch"),
                parse_seeds(seeds) if seeds else parse_seeds(spec.get("seeds"), f"{p}: seeds"))


def config_path(stage: Stage) -> str:
    """A stage's config file: relative to the repository when it is there, else as written."""
    return str(REPO / stage.config) if (REPO / stage.config).is_file() else stage.config


def ensure_shards(plan: Plan, log=print) -> None:
    """Shard train and val once with scheme labelid (every stage remaps it to its own scheme) if missing."""
    from distseg.shards.shard import ShardOptions, run_shard

    if is_remote(plan.shards):
        return  # remote shards are read, not made here
    for split in ("train", "val"):
        if not local_path(manifest_location(plan.shards, split)).is_file():
            log(f"sharding {split} into {plan.shards} (scheme labelid)")
            run_shard(plan.root or None, plan.shards, ShardOptions(split=split, scheme="labelid"),
                      workers=max(1, min(8, os.cpu_count() or 1)), progress=sys.stderr.isatty(), log=log)


def stage_record(s: RunSummary | None) -> dict:
    """A stage's entry in the experiment's summary.json (`missing` when its run wrote no summary)."""
    if s is None:
        return {"missing": True}
    return {"finished": s.finished, "best_score": s.best_score, "best_score_name": s.best_score_name,
            "best_epoch": s.best_epoch, "history": s.history, "steps": s.steps}


def finished(plan: Plan, stage: Stage, extra: tuple[str, ...], log=print, seed: int | None = None) -> bool:
    """The stage's run completed, with the effective settings it would run with now. Its saved config.yaml
    is loaded as any run's config is (a key added by a later version takes its default), so a new setting
    does not make every finished stage look unfinished; a saved key this version does not know (removed or
    renamed since) cannot be compared: the stage counts as not finished, and a line says why."""
    run = plan.run_dir(stage, seed)
    summary = run.read_summary()
    if summary is None or not summary.finished or not run.config.is_file():
        return False
    try:
        saved = load_config(run.config)
    except (UserError, OSError) as e:
        log(f"stage {plan.run_name(stage.name, seed)}: its saved settings do not load in this version ({e}): "
            "not counted as finished")
        return False
    now = load_config(config_path(stage), plan.stage_overrides(stage, extra, seed))
    return dump_config(saved) == dump_config(now)


def train_command(plan: Plan, stage: Stage, extra: tuple[str, ...], procs: int,
                  seed: int | None = None) -> list[str]:
    """The training process(es) of a stage: train.py itself, or Accelerate's launcher through distseg.launch
    (the ranks' own error line and exit status, without the launcher's traceback) for several."""
    args = [str(TRAIN_SCRIPT), "--config", config_path(stage), *plan.stage_overrides(stage, extra, seed)]
    if procs <= 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--dynamo_backend", "no", *args]


def run_plan(path: str, extra: tuple[str, ...] = (), procs: int = 1, report: bool = True, log=print,
             seeds: str | None = None) -> dict:
    """Run every stage in order, once per seed (skipping finished runs), then compare. Returns the
    experiment summary."""
    plan = load_plan(path, seeds)
    plan.check_seeds(extra)
    ensure_shards(plan, log)
    for k, (stage, seed) in enumerate(plan.runs(), 1):
        head = f"stage {k}/{len(plan.runs())} {plan.run_name(stage.name, seed)}"
        if finished(plan, stage, extra, log, seed):
            log(f"{head}: finished earlier with the same settings, skipped")
            continue
        log(f"{head}: training in {plan.run_dir(stage, seed).path}"
            + (f" from {plan.run_name(stage.init_from, seed)}'s best checkpoint" if stage.init_from else ""))
        code = subprocess.run(train_command(plan, stage, extra, procs, seed)).returncode
        if code:
            raise StageFailed(f"{head} failed (exit status {code}); rerun the same command to resume it",
                              code)
    return compare(plan, report, log)


class StageFailed(UserError):
    """A stage's training exited non-zero: the experiment stops with its exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def compare(plan: Plan, report: bool = True, log=print) -> dict:
    """Table of the compared stages (best val score, its epoch, score per epoch; with seeds: mean ± std over
    the seeds, each seed's score, and the t-test verdicts) on the terminal and in <output_dir>/summary.json;
    a report of every run with `report`."""
    summaries = {plan.run_name(st.name, seed): plan.run_dir(st, seed).read_summary()
                 for st, seed in plan.runs()}
    names = plan.compare or [s.name for s in plan.stages]
    summary = {"plan": plan.name, "stages": {n: stage_record(s) for n, s in summaries.items()},
               "compare": plan.compare}
    preface = ""
    if plan.seeds:
        score_names, spreads, table = seeds_table(plan, names, summaries)
        firsts = [n for n in names if spreads[n] is not None]
        verdicts = [verdict(firsts[0], spreads[firsts[0]], n, spreads[n]) for n in firsts[1:]]
        table = "\n".join([table, *[v.text for v in verdicts]])
        summary |= {"seeds": plan.seeds, "spread": {n: sp.record() | {"score_name": score_names[n]}
                                                    for n, sp in spreads.items() if sp is not None},
                    "verdicts": [v.record() for v in verdicts]}
        preface = seeds_html(plan, names, score_names, spreads, verdicts)
    else:
        table = runs_table(names, summaries)
    log(table)
    summary["table"] = table
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.output_dir / TABLE_FILE, summary)
    if report:
        from distseg.reporting.report import write_report

        out, built = write_report([str(plan.run_dir(st, seed).path) for st, seed in plan.runs()],
                                  str(plan.output_dir / "report.html"), log=log, preface=preface)
        log(f"report: {out}" + ("" if built else " (up to date: no stage changed)"))
    return summary


def runs_table(names: list[str], summaries: dict[str, RunSummary | None]) -> str:
    """One row per compared stage of a plan without seeds: its best score, the epoch, the score per epoch."""
    rows = [f"{'stage':<22}{'score':>16}{'best':>8}{'epoch':>7}  per epoch"]
    for name in names:
        s = summaries[name]
        if s is None:
            rows.append(f"{name:<22}{'-':>16}{'n/a':>8}{'-':>7}  (no summary)")
            continue
        # three significant digits: close scores of two stages stay apart
        per_epoch = " ".join(percent(h["score"], ".3g", "%") for h in s.history)
        best = percent(s.best_score if s.best_score >= 0 else None, ".3g", "%")
        rows.append(f"{name:<22}{s.best_score_name or '-':>16}{best:>8}{s.best_epoch:>7}  {per_epoch}")
    return "\n".join(rows)


def seeds_table(plan: Plan, names: list[str], summaries: dict[str, RunSummary | None]
                ) -> tuple[dict[str, str], dict[str, Spread | None], str]:
    """One row per compared stage of a plan with seeds: mean ± sample std of its finished seeds' best scores,
    then each seed's (and the epoch it was reached at). A seed whose run has not finished is named, not
    counted."""
    rows = [f"{'stage':<22}{'score':>16}{'mean ± std':>18}  per seed: best (epoch)"]
    score_names, spreads = {}, {}
    for name in names:
        scores, parts = {}, []
        for seed in plan.seeds:
            s = summaries[plan.run_name(name, seed)]
            if s is None or not s.finished or not finite(s.best_score):
                parts.append(f"{seed}: {'not finished' if s is None or not s.finished else 'no score'}")
                continue
            scores[seed] = s.best_score
            score_names[name] = s.best_score_name or "score"
            parts.append(f"{seed}: {percent(s.best_score, unit='%')} ({s.best_epoch})")
        spreads[name] = Spread(scores) if scores else None
        spread = spreads[name].text() if scores else "n/a"
        rows.append(f"{name:<22}{score_names.get(name, '-'):>16}{spread:>18}  {', '.join(parts)}")
    return score_names, spreads, "\n".join(rows)


def seeds_html(plan: Plan, names: list[str], score_names: dict[str, str], spreads: dict[str, Spread | None],
               verdicts: list[Verdict]) -> str:
    """The report's section of the seeds' spread: the same table and verdicts as the terminal's."""
    head = "".join(f"<th>seed {s}</th>" for s in plan.seeds)
    rows = []
    for n in names:
        sp = spreads[n]
        cells = "".join(f"<td>{percent(sp.scores[s], unit='%') if sp and s in sp.scores else 'n/a'}</td>"
                        for s in plan.seeds)
        rows.append(f"<tr><td>{html.escape(n)}</td><td>{html.escape(score_names.get(n, '-'))}</td>"
                    f"<td>{sp.text() if sp else 'n/a'}</td>{cells}</tr>")
    said = "".join(f"<p class=verdict>{html.escape(v.text)}</p>" for v in verdicts)
    return (f"<h2>Seeds {seeds_text(plan.seeds)}: best score, mean ± sample std</h2><table class=seeds>"
            f"<tr><th>stage</th><th>score</th><th>mean ± std</th>{head}</tr>{''.join(rows)}</table>{said}")


def submit(path: str, extra: tuple[str, ...] = (), sbatch_args: tuple[str, ...] = (), log=print,
           seeds: str | None = None) -> list[str]:
    """Submit the plan to Slurm: a shard job if shards are missing, one slurm/train.sh job per stage and seed
    after its parent's job of the same seed (--dependency=afterok: a requeued stage keeps its dependents
    waiting), then a comparison job after all of them. Returns the job ids."""
    plan = load_plan(path, seeds)
    plan.check_seeds(extra)
    ids: dict[str, str] = {}

    def sbatch(name: str, after: list[str], argv: list[str], env: dict | None = None) -> str:
        dep = [f"--dependency=afterok:{':'.join(after)}"] if after else []
        cmd = ["sbatch", "--parsable", f"--job-name={plan.name}-{name}", f"--chdir={REPO}", *plan.sbatch,
               *sbatch_args, *dep, *argv]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **(env or {})))
        if p.returncode:
            raise UserError(f"sbatch failed for {name}: "
                            f"{p.stderr.strip().splitlines()[-1] if p.stderr else p.returncode}")
        jid = p.stdout.strip().split(";")[0]
        log(f"submitted {name}: job {jid}" + (f" (after {', '.join(after)})" if after else ""))
        return jid

    me = [sys.executable, "-m", "distseg", "experiment", str(Path(path).resolve()),
          *(["--seeds", seeds_text(plan.seeds)] if plan.seeds else [])]
    extra_set = [a for e in extra for a in ("--set", e)]
    missing = any(not local_path(manifest_location(plan.shards, s)).is_file() for s in ("train", "val")) \
        and not is_remote(plan.shards)
    shard_job = [sbatch("shard", [], ["--wrap", shlex.join([*me, "--shard-only"])])] if missing else []
    for stage, seed in plan.runs():
        name = plan.run_name(stage.name, seed)
        after = shard_job + ([ids[plan.run_name(stage.init_from, seed)]] if stage.init_from else [])
        ids[name] = sbatch(name, after, [str(REPO / "slurm" / "train.sh"),
                                         *plan.stage_overrides(stage, extra, seed)],
                           env={"CONFIG": config_path(stage)})
    final = sbatch("compare", list(ids.values()), ["--wrap", shlex.join([*me, "--compare-only", *extra_set])])
    return shard_job + list(ids.values()) + [final]
