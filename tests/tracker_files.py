"""The trackers' records read back for the tracker tests: MLflow's through its client, W&B's offline run
files through distseg/training/wandb_files.py."""

from __future__ import annotations

from pathlib import Path

from distseg.training import wandb_files


def wandb_history(run_folder: Path) -> dict[str, list]:
    """Every offline W&B run under `<run_folder>/wandb`: {run id: [(step, {key: value}), ...]}, one list per
    id (a resumed run's processes append to the same id)."""
    ids = {f.stem.removeprefix("run-") for f in (run_folder / "wandb").glob("offline-run-*/run-*.wandb")}
    return {run_id: wandb_files.history(run_folder, run_id) for run_id in sorted(ids)}


def mlflow_history(run_folder: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of an MLflow run in the run folder's file store, by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_folder / "mlruns").resolve().as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def mlflow_params(run_folder: Path, run_id: str) -> dict[str, str]:
    """An MLflow run's parameters."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_folder / "mlruns").resolve().as_uri()).get_run(run_id).data.params
