"""Run folders (`runs/<name>/`): which weights a name like `best` means, and the run's model with them.

evaluate, predict, the report and export all load a run through `load_run`, so they agree on what
`best`, `latest` or a path means and give the same error when a folder holds no weights yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distseg.checkpoint import latest_checkpoint, list_checkpoints, load_weights, weights_file
from distseg.config import Config, load_config
from distseg.errors import UserError
from distseg.labels import Scheme, get_scheme
from distseg.models import build_model, out_channels

CHECKPOINT_HELP = "best, latest or a checkpoint path"


@dataclass
class LoadedRun:
    """A run's resolved config, label scheme, model (eval mode, CPU) and the weights file it was given."""

    cfg: Config
    scheme: Scheme
    model: torch.nn.Module
    weights: Path


def resolve_weights(run_dir: Path, checkpoint: str) -> Path:
    """`best`, `latest` or a path -> a folder or file holding model weights, with a precise error."""
    if checkpoint == "best":
        path = run_dir / "best"
        if path.is_dir():
            return path
        if list_checkpoints(run_dir / "checkpoints"):
            raise UserError(f"{run_dir} has no best/ weights yet (no validation has finished): "
                            "use --checkpoint latest")
        raise UserError(f"{run_dir} has no checkpoints yet: train first")
    if checkpoint == "latest":
        path = latest_checkpoint(run_dir / "checkpoints")
        if path is None:
            raise UserError(f"{run_dir} has no checkpoints yet: train first")
        return path
    path = Path(checkpoint)
    if not path.exists():
        raise UserError(f"checkpoint {checkpoint!r} not found: use best|latest|PATH")
    return path


def find_run(checkpoint: str) -> Path:
    """The run folder holding a checkpoint path (runs/x/best, runs/x/checkpoints/step-N, a file inside):
    the nearest folder above it with a config.yaml."""
    path = Path(checkpoint).resolve()
    if checkpoint in ("best", "latest") or not path.exists():
        raise UserError(f"--checkpoint {checkpoint}: pass --run RUN, or the path of a checkpoint in a run")
    for folder in [path, *path.parents][:4]:
        if (folder / "config.yaml").is_file():
            return folder
    raise UserError(f"{checkpoint} is not inside a training run (no config.yaml above it): pass --run RUN")


def load_run(run: str | Path, checkpoint: str = "best", overrides: tuple[str, ...] = (),
             weights: str = "auto") -> LoadedRun:
    """The run's model with the chosen weights; `overrides` change its config (e.g. eval.mode=slide);
    `weights` picks the EMA average (`ema`), the trained weights (`raw`) or the average if kept (`auto`)."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a training run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    path = resolve_weights(run_dir, checkpoint)
    scheme = get_scheme(cfg.data.scheme)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes))
    if path.is_dir():
        path = weights_file(path, weights)
    sd = load_weights(path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"weights in {path} do not fit the run's model: {str(e).splitlines()[0]}") from None
    return LoadedRun(cfg, scheme, model.eval(), path)
