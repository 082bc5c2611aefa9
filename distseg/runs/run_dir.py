"""Run folders (`runs/<name>/`): their layout (`RunDir`), which weights a name like `best` means, and the
run's model with them.

evaluate, predict, the report and export all load a run through `load_run`, so they agree on what
`best`, `latest` or a path means and give the same error when a folder holds no weights yet.
"""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from distseg import run_files as files
from distseg.config import Config, dump_config, load_config
from distseg.errors import UserError
from distseg.labels import Scheme, get_scheme
from distseg.models import build_model, out_channels
from distseg.models.weights import load_weights, weights_file
from distseg.runs.checkpoint import latest_checkpoint, list_checkpoints
from distseg.runs.summary import RunSummary

CHECKPOINT_HELP = "best, latest or a checkpoint path"


@dataclass(frozen=True)
class RunDir:
    """A run folder `<output_dir>/<name>/` and the paths of its parts, named in distseg/run_files.py:
    the resolved config (passwords and URL signatures removed), complete checkpoints (runs/checkpoint.py),
    the best validation's weights, the summary (rewritten at the end of every training segment),
    TensorBoard's events, and the lease beside it (moving a run aside leaves the lease in place)."""

    path: Path

    @classmethod
    def of(cls, cfg: Config) -> RunDir:
        """The run folder a config trains into."""
        return cls(Path(cfg.output_dir) / cfg.name)

    @property
    def name(self) -> str:
        """The run's name (the folder's)."""
        return self.path.name

    @property
    def config(self) -> Path:
        """config.yaml."""
        return self.path / files.CONFIG

    @property
    def checkpoints(self) -> Path:
        """checkpoints/."""
        return self.path / files.CHECKPOINTS

    @property
    def best(self) -> Path:
        """best/."""
        return self.path / files.BEST

    @property
    def summary(self) -> Path:
        """summary.json."""
        return self.path / files.SUMMARY

    @property
    def tb(self) -> Path:
        """tb/ (TensorBoard)."""
        return self.path / files.TENSORBOARD

    @property
    def trackers(self) -> Path:
        """The experiment trackers' record: their run ids and the last step each kind was logged at."""
        return self.path / files.TRACKERS

    @property
    def mlflow_store(self) -> Path:
        """MLflow's default file store (train.mlflow_uri empty)."""
        return self.path / files.MLFLOW_STORE

    @property
    def lease(self) -> Path:
        """The lease file, beside the folder."""
        return self.path.parent / files.lease_name(self.name)

    def is_run(self) -> bool:
        """Whether the folder was started by training (it has its config.yaml)."""
        return self.config.is_file()

    def require(self) -> RunDir:
        """Itself, or one error when the folder is not a training run, naming the runs that are there."""
        if self.is_run():
            return self
        if not self.path.exists():
            raise UserError(f"{self.path} does not exist{runs_beside(self.path.parent)}")
        inside = runs_beside(self.path)
        raise UserError(f"{self.path} is not a training run (no config.yaml){inside}")

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        return latest_checkpoint(self.checkpoints)

    def read_summary(self) -> RunSummary | None:
        """The run's summary.json (any version), None when absent or unreadable."""
        return RunSummary.read(self.summary)

    def weights(self, checkpoint: str) -> Path:
        """`best`, `latest` or a path -> a folder or file holding model weights, with a precise error."""
        if checkpoint == "best":
            if self.best.is_dir():
                return self.best
            if list_checkpoints(self.checkpoints):
                raise UserError(f"{self.path} has no best/ weights yet (no validation has finished): "
                                "use --checkpoint latest")
            raise UserError(f"{self.path} has no checkpoints yet: train first")
        if checkpoint == "latest":
            path = self.latest()
            if path is None:
                raise UserError(f"{self.path} has no checkpoints yet: train first")
            return path
        path = Path(checkpoint)
        if not path.exists():
            raise UserError(f"checkpoint {checkpoint!r} not found: use best|latest|PATH")
        return path


def runs_beside(folder: Path, most: int = 8) -> str:
    """`: runs in F: a, b, c` for the run folders in F (a typo's likely targets), or '' when F holds none."""
    try:
        names = sorted(p.name for p in folder.iterdir() if RunDir(p).is_run())
    except OSError:
        return ""
    if not names:
        return ""
    more = f" (+{len(names) - most} more)" if len(names) > most else ""
    return f"; runs in {folder}: {', '.join(names[:most])}{more}"


@dataclass
class LoadedRun:
    """A run's resolved config, label scheme, model (eval mode, CPU) and the weights file it was given."""

    cfg: Config
    scheme: Scheme
    model: torch.nn.Module
    weights: Path


def provenance(cfg: Config) -> dict:
    """What made a run, for summary.json and best/meta.json: the distseg version, the git commit when the
    package is a checkout (with '+dirty' for uncommitted changes), and a hash of the resolved config."""
    from distseg import __version__

    where, commit = Path(__file__).resolve().parents[2], None
    try:
        head = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode == 0:
            dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit = head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    digest = hashlib.sha256(dump_config(cfg).encode()).hexdigest()
    return {"distseg_version": __version__, "git_commit": commit, "config_sha256": digest}


def find_run(checkpoint: str) -> Path:
    """The run folder holding a checkpoint path (runs/x/best, runs/x/checkpoints/step-N, a file inside):
    the nearest folder above it with a config.yaml."""
    path = Path(checkpoint).resolve()
    if checkpoint in ("best", "latest") or not path.exists():
        raise UserError(f"--checkpoint {checkpoint}: pass --run RUN, or the path of a checkpoint in a run")
    for folder in [path, *path.parents][:4]:
        if RunDir(folder).is_run():
            return folder
    raise UserError(f"{checkpoint} is not inside a training run (no config.yaml above it): pass --run RUN")


def load_run(run: str | Path, checkpoint: str = "best", overrides: tuple[str, ...] = (),
             weights: str = "auto") -> LoadedRun:
    """The run's model with the chosen weights; `overrides` change its config (e.g. eval.mode=slide);
    `weights` picks the EMA average (`ema`), the trained weights (`raw`) or the average if kept (`auto`)."""
    run_dir = RunDir(Path(run)).require()
    cfg = load_config(run_dir.config, overrides)
    path = run_dir.weights(checkpoint)
    scheme = get_scheme(cfg.data.scheme)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes), pretrained=False)  # all loaded below
    if path.is_dir():
        path = weights_file(path, weights)
    sd = load_weights(path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"weights in {path} do not fit the run's model: {str(e).splitlines()[0]}") from None
    return LoadedRun(cfg, scheme, model.eval(), path)
