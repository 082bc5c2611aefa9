"""Experiment trackers beside TensorBoard: W&B and MLflow (`train.trackers`, the distseg[trackers] extra)
through Accelerate's tracker classes, on rank 0 only.

Logged: at every train.log_every step the step line's values (training/step_log.py's TensorBoard scalars:
train/loss, train/lr, perf/img_per_s, ...); at every validation its score, mIoU, pixel accuracy, each
class's IoU and each category's; at the end the best score with its epoch and step; at the start of a
tracker run the settings as parameters, redacted (config.flat_settings). MLflow's parameters cannot change,
so a resumed run keeps the ones its tracker run started with.

A resumed run continues the same tracker runs: their ids are in the run folder's trackers.json. A process
killed after its newest checkpoint logged steps that the resumed run trains again; those are not logged
again: a tracker logs a kind of values (train, val, best) only at a step past the last it logged of that
kind. So W&B's step only grows and MLflow keeps one point per step; a resume is bit-identical, so the
values kept are those the tracker would have got (TensorBoard shows the replayed ones instead: purge_step).
trackers.json records a step once the tracker holds it: MLflow stores every log at once, so after every
log; W&B's service process writes its files every 15 s and at the finish, so at the finish, and a resumed
offline W&B run reads the steps a killed process's files hold (training/wandb_files.py). An online W&B
run that was killed is continued from its last finish: W&B drops a step that does not grow, with a
warning of its own.

A tracker that cannot start or log (no W&B login, its server gone, a full disk) is one warning; training
goes on, and its failures are counted in trackers.json and summary.json. After DROP_AFTER failures in a row
it is left for the rest of the process: an MLflow server that is gone costs every call its HTTP retries.

Accelerate's `init_trackers` starts every tracker in one call, so one that cannot start would stop the
others too; each is started here on its own and put in `acc.trackers`, where `acc.log` finds it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from distseg.config import Config, flat_settings
from distseg.errors import UserError
from distseg.files import atomic_write_json
from distseg.runs.run_dir import RunDir
from distseg.training import wandb_files
from distseg.urls import is_url, redact

EXTRA = "pip install 'distseg[trackers]'"
DROP_AFTER = 3
DURABLE_AT_LOG = ("mlflow",)  # trackers whose log() returns once the value is stored (see the module)
# MLflow's HTTP client retries 7 times with a doubling backoff (minutes per call) by default; a run with
# a gone server should lose seconds per log, not minutes. The user's own settings win.
MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}


def accelerator_kwargs(cfg: Config) -> dict:
    """The Accelerator's `log_with` for train.trackers, once their packages are known to be there."""
    for name in cfg.train.trackers:
        if importlib.util.find_spec(name) is None:
            raise UserError(f"train.trackers={name} needs the {name} package: {EXTRA}")
    return {"log_with": list(cfg.train.trackers)} if cfg.train.trackers else {}


def mlflow_uri(cfg: Config, run_dir: RunDir) -> str:
    """train.mlflow_uri, or a file store in the run folder. MLflow 3 keeps its file store in maintenance
    and refuses it unless MLFLOW_ALLOW_FILE_STORE is set: set here for file stores only."""
    uri = cfg.train.mlflow_uri or run_dir.mlflow_store.resolve().as_uri()
    if not is_url(uri) or uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    for k, v in MLFLOW_HTTP.items():
        os.environ.setdefault(k, v)
    return uri


def make_tracker(name: str, cfg: Config, run_dir: RunDir, run_id: str | None):
    """Accelerate's tracker for `name`, set to continue `run_id` (None: a new tracker run)."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    project = cfg.train.tracker_project
    if name == "wandb":
        import wandb

        # console off: W&B would wrap stdout, and the step lines are distseg's own
        return LOGGER_TYPE_TO_CLASS[name](project, name=cfg.name, dir=str(run_dir.path), id=run_id,
                                          resume="allow" if run_id else None,
                                          settings=wandb.Settings(console="off", silent=True))
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri(cfg, run_dir))
    return LOGGER_TYPE_TO_CLASS[name](project, run_id=run_id, run_name=cfg.name)


def tracker_run_id(tracker) -> str:
    """The id a resumed run continues."""
    return tracker.run.id if tracker.name == "wandb" else tracker.active_run.info.run_id


def where(tracker, cfg: Config, run_dir: RunDir) -> str:
    """Where a person finds the tracker run, for the start line."""
    if tracker.name == "mlflow":
        return f"mlflow run {tracker_run_id(tracker)} at {redact(mlflow_uri(cfg, run_dir))}"
    run = tracker.run
    if run.offline:
        return f"wandb offline run {run.id} in {run.dir.rsplit('/files', 1)[0]} (`wandb sync` uploads it)"
    return f"wandb run {run.url}"


def short(e: BaseException) -> str:
    """An exception as part of one line, the URLs in it without passwords (a tracker server's URI)."""
    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://\S+", lambda m: redact(m.group(0)), " ".join(str(e).split()))
    text = text or type(e).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def new_record() -> dict:
    """trackers.json's content for new tracker runs: per tracker its run id, the last step it logged of
    each kind, its failures."""
    return {"runs": {}, "logged": {}, "failures": {}}


def read_record(path: Path) -> dict:
    """trackers.json, or a new record when there is none (or it cannot be read: new tracker runs)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return new_record()
    return {k: record.get(k, {}) for k in new_record()}


class Trackers:
    """The run's started trackers (none on other ranks) and their record; see the module."""

    def __init__(self, acc=None, path: Path | None = None, record: dict | None = None, say=print):
        self.acc, self.path, self.say = acc, path, say
        self.record = record or new_record()
        self.active: dict = {}
        self.in_a_row: dict[str, int] = {}
        self.warned: set[str] = set()
        self.places: list[str] = []  # where each started tracker run is, for the start line
        self.sent: dict[str, dict] = {}  # per tracker the last step logged of each kind by this process

    @classmethod
    def start(cls, cfg: Config, acc, run_dir: RunDir, resumed: bool, say) -> Trackers:
        """Start (or, resumed, continue) a tracker run per train.trackers on rank 0."""
        if not cfg.train.trackers or not acc.is_main_process:
            return cls(acc, say=say)
        record = read_record(run_dir.trackers) if resumed else new_record()
        self = cls(acc, run_dir.trackers, record, say)
        for name in cfg.train.trackers:
            known = record["runs"].get(name)
            try:
                tracker = make_tracker(name, cfg, run_dir, known)
                tracker.start()
                if known is None:
                    tracker.store_init_configuration(flat_settings(cfg))
                record["runs"][name] = tracker_run_id(tracker)
                self.sent[name] = self.held(name, tracker, run_dir)
                self.places.append(where(tracker, cfg, run_dir))
            except Exception as e:  # any library's failure: the run goes on without this tracker
                self.failed(name, f"could not start ({short(e)})")
                continue
            self.active[name] = tracker
            acc.trackers.append(tracker)
        self.save()
        return self

    def held(self, name: str, tracker, run_dir: RunDir) -> dict[str, int]:
        """The last step of each kind the tracker run holds: the record's, or for an offline W&B run what
        its files hold (a process killed before its finish wrote part of its steps)."""
        held = dict(self.record["logged"].get(name, {}))
        if name == "wandb" and tracker.run.offline:
            held |= wandb_files.held_steps(run_dir.path, tracker.run.id)
        return held

    def describe(self) -> str:
        """`trackers: wandb offline run ID in FOLDER (...); mlflow run ID at URI`, or "" without any."""
        return f"trackers: {'; '.join(self.places)}" if self.places else ""

    def log(self, kind: str, values: dict, step: int) -> None:
        """`values` at `step` to every tracker that has not logged this kind at this step or later."""
        for name, tracker in list(self.active.items()):
            sent = self.sent[name]
            if step <= sent.get(kind, 0):
                continue
            try:
                tracker.log(values, step=step)
            except Exception as e:  # the same: counted, and training goes on
                self.failed(name, f"could not log step {step} ({short(e)})")
                continue
            sent[kind], self.in_a_row[name] = step, 0
            if name in DURABLE_AT_LOG:
                self.record["logged"][name] = dict(sent)
        self.save()

    def failed(self, name: str, what: str) -> None:
        """Count a failure; a tracker's first in this process is a warning, the DROP_AFTER-th in a row
        leaves it."""
        fails = self.record["failures"]
        if name not in self.warned:
            self.warned.add(name)
            self.say(f"warning: tracker {name} {what}: training goes on; failures are counted in "
                     "summary.json")
        fails[name] = fails.get(name, 0) + 1
        self.in_a_row[name] = self.in_a_row.get(name, 0) + 1
        if name in self.active and self.in_a_row[name] >= DROP_AFTER:
            self.say(f"warning: tracker {name} failed {DROP_AFTER} times in a row: not logged to again by "
                     "this process")
            self.drop(name)

    def drop(self, name: str) -> None:
        """Stop using a tracker in this process (it is not finished: it may not answer)."""
        tracker = self.active.pop(name)
        if self.acc is not None and tracker in self.acc.trackers:
            self.acc.trackers.remove(tracker)

    def save(self) -> None:
        """trackers.json, atomically (rank 0)."""
        if self.path is None:
            return
        try:
            atomic_write_json(self.path, self.record)
        except OSError as e:
            self.say(f"warning: cannot write {self.path} ({short(e)}): a resume may log some steps again")

    def finish(self) -> dict:
        """End every tracker run (W&B flushes its run files here); returns summary.json's `trackers`."""
        for name, tracker in list(self.active.items()):
            try:
                tracker.finish()
                self.record["logged"][name] = dict(self.sent.get(name, self.record["logged"].get(name, {})))
            except Exception as e:  # the same rule as a log
                self.failed(name, f"could not finish ({short(e)})")
            if name in self.active:
                self.drop(name)
        self.save()
        rec = self.record
        return {name: {"run": rec["runs"].get(name), "failures": rec["failures"].get(name, 0),
                       "logged": rec["logged"].get(name, {})} for name in rec["runs"] | rec["failures"]}


def finish_all(acc) -> None:
    """End the trackers a run left started (it stopped on an error): what Accelerate's `end_training` does,
    without letting a tracker's own failure replace the run's error."""
    for tracker in list(getattr(acc, "trackers", [])):
        try:
            tracker.finish()
        except Exception:  # the run's error is the one to report
            pass
    acc.trackers.clear()
