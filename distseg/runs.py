"""Run folders (`runs/<name>/`): which weights a name like `best` means, and the run's model with them.

evaluate, predict, the report and export all load a run through `load_run`, so they agree on what
`best`, `latest` or a path means and give the same error when a folder holds no weights yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distseg.checkpoint import latest_checkpoint, list_checkpoints, load_weights
from distseg.config import Config, load_config
from distseg.errors import UserError
from distseg.labels import Scheme, get_scheme
from distseg.models.unet import build_model, out_channels

CHECKPOINT_HELP = "best, latest or a checkpoint path"


@dataclass
class LoadedRun:
    """A run's resolved config, label scheme, model (eval mode, CPU) and the weights it was given."""

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


def load_run(run: str | Path, checkpoint: str = "best", overrides: tuple[str, ...] = ()) -> LoadedRun:
    """The run's model with the chosen weights; `overrides` change its config (e.g. eval.mode=slide)."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a training run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    path = resolve_weights(run_dir, checkpoint)
    scheme = get_scheme(cfg.data.scheme)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes))
    sd = load_weights(path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"weights in {path} do not fit the run's model: {str(e).splitlines()[0]}") from None
    return LoadedRun(cfg, scheme, model.eval(), path)
