"""The trackers' records read back, for the tracker tests: MLflow's through its client; W&B's offline run
files by hand, as wandb 0.31 no longer ships a Python reader of its `.wandb` transaction log. Its format
is LevelDB's log: a 7-byte `:W&B` header, then 32 KiB blocks of records, each with a 7-byte header (crc32,
length, type full/first/middle/last), holding protobuf `Record`s from wandb.proto."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The protobuf Records of one `.wandb` file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if kind == 0 and length == 0:
            pos += left
            continue
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def wandb_history(run_folder: Path) -> dict[str, list]:
    """Every offline W&B run under `<run_folder>/wandb` in the order they were made: {run id: [(step,
    {key: value}), ...]}, one list per id (a resumed run's processes append to the same id)."""
    out: dict[str, list] = {}
    for f in sorted((run_folder / "wandb").glob("offline-run-*/run-*.wandb")):
        rows = out.setdefault(f.stem.removeprefix("run-"), [])
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.append((items.pop("_step"), {k: v for k, v in items.items() if not k.startswith("_")}))
    return out


def mlflow_history(run_folder: Path, run_id: str, key: str) -> list[tuple[int, float]]:
    """(step, value) of one metric of an MLflow run in the run folder's file store, by step."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_folder / "mlruns").resolve().as_uri())
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def mlflow_params(run_folder: Path, run_id: str) -> dict[str, str]:
    """An MLflow run's parameters."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=(run_folder / "mlruns").resolve().as_uri()).get_run(run_id).data.params
