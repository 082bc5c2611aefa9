"""`distseg experiment PLAN`: a staged study (the seed's: automobile, then person fine-tuned from it vs from
scratch, then all classes) as one command.

A plan is a YAML file: `name`, `output_dir`, `shards` (one `labelid` sharding that every stage remaps to its
own scheme at load time), `root` (where to shard from if the shards are missing), `set` (overrides for every
stage), `stages` (each: `name`, `config`, optional `set`, and `init_from: <stage>` = that stage's best
checkpoint with a new head) and `compare` (stages to tabulate side by side). Each stage is an ordinary run
folder `<output_dir>/<stage>`: a rerun skips stages that finished with the same settings and resumes a
half-done one (training resumes from its newest checkpoint by itself). `--submit` sends the same plan to
Slurm as dependent jobs through slurm/train.sh, so every stage is preemption-safe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from distseg.config import dump_config, load_config
from distseg.errors import UserError
from distseg.files import atomic_write_json
from distseg.inference.metrics import percent
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

    def run_dir(self, stage: Stage) -> RunDir:
        """<output_dir>/<stage>."""
        return RunDir(self.output_dir / stage.name)

    def stage_overrides(self, stage: Stage, extra: tuple[str, ...] = ()) -> list[str]:
        """Everything a stage's training gets after its config file: where it lives, the shared shards, its
        starting weights, the plan's and the stage's settings, then the command line's."""
        ov = [f"name={stage.name}", f"output_dir={self.output_dir}", f"data.shards={self.shards}"]
        if stage.init_from:
            best = RunDir(self.output_dir / stage.init_from).best
            ov += [f"train.init_from={best}", "train.reset_head=true"]
        return ov + self.overrides + stage.overrides + list(extra)


def _strings(v, where: str) -> list[str]:
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise UserError(f"{where} must be a list of section.key=value strings")
    return list(v)


def load_plan(path: str | os.PathLike) -> Plan:
    """Read and check a plan file; every mistake is one line naming it."""
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
                _strings((spec.get("slurm") or {}).get("sbatch"), f"{p}: slurm.sbatch"))


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


def finished(plan: Plan, stage: Stage, extra: tuple[str, ...], log=print) -> bool:
    """The stage's run completed, with the effective settings it would run with now. Its saved config.yaml
    is loaded as any run's config is (a key added by a later version takes its default), so a new setting
    does not make every finished stage look unfinished; a saved key this version does not know (removed or
    renamed since) cannot be compared: the stage counts as not finished, and a line says why."""
    run = plan.run_dir(stage)
    summary = run.read_summary()
    if summary is None or not summary.finished or not run.config.is_file():
        return False
    try:
        saved = load_config(run.config)
    except (UserError, OSError) as e:
        log(f"stage {stage.name}: its saved settings do not load in this version ({e}): not counted as "
            "finished")
        return False
    now = load_config(config_path(stage), plan.stage_overrides(stage, extra))
    return dump_config(saved) == dump_config(now)


def train_command(plan: Plan, stage: Stage, extra: tuple[str, ...], procs: int) -> list[str]:
    """The training process(es) of a stage: train.py itself, or Accelerate's launcher through distseg.launch
    (the ranks' own error line and exit status, without the launcher's traceback) for several."""
    args = [str(TRAIN_SCRIPT), "--config", config_path(stage), *plan.stage_overrides(stage, extra)]
    if procs <= 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--dynamo_backend", "no", *args]


def run_plan(path: str, extra: tuple[str, ...] = (), procs: int = 1, report: bool = True, log=print) -> dict:
    """Run every stage in order (skipping finished ones), then compare. Returns the experiment summary."""
    plan = load_plan(path)
    ensure_shards(plan, log)
    for k, stage in enumerate(plan.stages, 1):
        head = f"stage {k}/{len(plan.stages)} {stage.name}"
        if finished(plan, stage, extra, log):
            log(f"{head}: finished earlier with the same settings, skipped")
            continue
        log(f"{head}: training in {plan.run_dir(stage).path}"
            + (f" from {stage.init_from}'s best checkpoint" if stage.init_from else ""))
        code = subprocess.run(train_command(plan, stage, extra, procs)).returncode
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
    """Table of the compared stages (best val score, its epoch, score per epoch) on the terminal and in
    <output_dir>/summary.json; a report of every stage with `report`."""
    stages = {}
    for stage in plan.stages:
        stages[stage.name] = plan.run_dir(stage).read_summary()
    rows = [f"{'stage':<22}{'score':>16}{'best':>8}{'epoch':>7}  per epoch"]
    for name in plan.compare or [s.name for s in plan.stages]:
        s = stages[name]
        if s is None:
            rows.append(f"{name:<22}{'-':>16}{'n/a':>8}{'-':>7}  (no summary)")
            continue
        # three significant digits: close scores of two stages stay apart
        per_epoch = " ".join(percent(h["score"], ".3g", "%") for h in s.history)
        best = percent(s.best_score if s.best_score >= 0 else None, ".3g", "%")
        rows.append(f"{name:<22}{s.best_score_name or '-':>16}{best:>8}{s.best_epoch:>7}  {per_epoch}")
    table = "\n".join(rows)
    log(table)
    summary = {"plan": plan.name, "stages": {n: stage_record(s) for n, s in stages.items()},
               "compare": plan.compare, "table": table}
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(plan.output_dir / TABLE_FILE, summary)
    if report:
        from distseg.reporting.report import write_report

        out, built = write_report([str(plan.run_dir(s).path) for s in plan.stages],
                                  str(plan.output_dir / "report.html"), log=log)
        log(f"report: {out}" + ("" if built else " (up to date: no stage changed)"))
    return summary


def submit(path: str, extra: tuple[str, ...] = (), sbatch_args: tuple[str, ...] = (), log=print) -> list[str]:
    """Submit the plan to Slurm: a shard job if shards are missing, one slurm/train.sh job per stage after the
    stage it starts from (--dependency=afterok: a requeued stage keeps its dependents waiting), then a
    comparison job after all of them. Returns the job ids."""
    plan = load_plan(path)
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

    me = [sys.executable, "-m", "distseg", "experiment", str(Path(path).resolve())]
    extra_set = [a for e in extra for a in ("--set", e)]
    missing = any(not local_path(manifest_location(plan.shards, s)).is_file() for s in ("train", "val")) \
        and not is_remote(plan.shards)
    shard_job = [sbatch("shard", [], ["--wrap", " ".join([*me, "--shard-only"])])] if missing else []
    for stage in plan.stages:
        after = shard_job + ([ids[stage.init_from]] if stage.init_from else [])
        ids[stage.name] = sbatch(stage.name, after, [str(REPO / "slurm" / "train.sh"),
                                                     *plan.stage_overrides(stage, extra)],
                                 env={"CONFIG": config_path(stage)})
    final = sbatch("compare", list(ids.values()), ["--wrap", " ".join([*me, "--compare-only", *extra_set])])
    return shard_job + list(ids.values()) + [final]
