"""The names inside a run folder, the one place that spells them. `runs/run_dir.RunDir` builds a run's
paths on them; the rooms below runs/ (models/ writes a weights folder, data/ refuses a run folder given as
shards) import them from here, a leaf.

    <output_dir>/<name>/            a run folder
      config.yaml                   the resolved config it was started with
      checkpoints/step-NNNNNNNN/    complete checkpoints (`.step-NNNNNNNN.tmp` while written)
        trainer_state.json          runs/checkpoint.RunState, written last
        checksums.sha256            every other file's sha256
        loader_state_<rank>         a loader's own position (DALI), per rank
        random_states_<rank>.pkl    Accelerate's name for each rank's random states
        model.safetensors, optimizer.bin, ...   Accelerate's save_state files; ema.safetensors the average
      best/                         the best validation's weights (model, ema .safetensors) and meta.json
      summary.json                  runs/summary.RunSummary
      tb/                           TensorBoard event files
      trackers.json                 the experiment trackers' run ids and last logged steps (train.trackers)
      mlruns/, wandb/               their local stores: MLflow's default file store, W&B's run files
    <output_dir>/.<name>.lease      the lease of the process that owns the run (beside it, not in it)
"""

from __future__ import annotations

import re
from pathlib import Path

CONFIG = "config.yaml"
CHECKPOINTS = "checkpoints"
BEST = "best"
SUMMARY = "summary.json"
TENSORBOARD = "tb"
TRACKERS = "trackers.json"
MLFLOW_STORE = "mlruns"
TRAINER_STATE = "trainer_state.json"
CHECKSUMS = "checksums.sha256"  # every other file of a checkpoint, `sha256sum` format
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
META = "meta.json"
LOADER_STATE = "loader_state"
RNG_STATES = "random_states"

_STEP = re.compile(r"^step-(\d{8})$")


def checkpoint_name(step: int) -> str:
    """`step-NNNNNNNN`: a checkpoint's folder name, by the optimizer step it was taken at."""
    return f"step-{step:08d}"


def staging_name(name: str) -> str:
    """The hidden name a folder (a checkpoint, best/) is written under until it is complete."""
    return f".{name}.tmp"


def replaced_name(name: str) -> str:
    """The hidden name a folder is moved to while its replacement is renamed into place."""
    return f".{name}.old"


def partial_checkpoint_name(step: int) -> str:
    """The hidden name a checkpoint is written under until it is complete."""
    return staging_name(checkpoint_name(step))


def checkpoint_step(name: str) -> int | None:
    """The step of a checkpoint folder's name, None for any other name."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def rank_file(name: str, rank: int) -> str:
    """`<name>_<rank>`: a file each process writes into a checkpoint."""
    return f"{name}_{rank}"


def lease_name(run_name: str) -> str:
    """The lease file's name, beside the run folder."""
    return f".{run_name}.lease"


def looks_like_run(folder: Path) -> bool:
    """Whether a folder is (or was started as) a run folder: its config, or its checkpoints."""
    return (folder / CONFIG).is_file() or (folder / CHECKPOINTS).is_dir()
