"""What a W&B offline run's files hold, read back: the steps a resumed run must not log again.

W&B's service process writes an offline run's `.wandb` file every 15 s and when the run finishes, so a
process killed hard leaves a file holding only the steps written by then, which only the file itself can
tell. wandb 0.31 ships no Python reader for it; the format is LevelDB's log, so it is read here by hand: a
7-byte `:W&B` header, then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type
full/first/middle/last) and holding one protobuf `Record` of wandb.proto (or a part of one).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4
KIND_OF_PREFIX = {"train/": "train", "perf/": "train", "val/": "val", "val_iou/": "val",
                  "val_category_iou/": "val", "best/": "best"}  # what training/trackers.py logs, by kind


def records(path: Path) -> Iterator:
    """The protobuf Records of one `.wandb` file, in order; a record cut off at the end (the file of a
    killed process) is left out."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    if data[:4] != b":W&B":
        return
    pos, parts = HEADER, []
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if left < HEADER or (kind == 0 and length == 0):  # a block's padded tail
            pos += left
            continue
        if pos + HEADER + length > len(data):
            return
        parts.append(data[pos + HEADER:pos + HEADER + length])
        pos += HEADER + length
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def run_files(run_folder: Path, run_id: str) -> list[Path]:
    """The `.wandb` files of one W&B run id under `<run_folder>/wandb`, oldest first (a resumed run's
    processes each write their own offline-run folder)."""
    return sorted((run_folder / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def history(run_folder: Path, run_id: str) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every history row of the run's files, in the order written."""
    rows = []
    for f in run_files(run_folder, run_id):
        for rec in records(f):
            if rec.WhichOneof("record_type") == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.append((items.pop("_step"), {k: v for k, v in items.items() if not k.startswith("_")}))
    return rows


def held_steps(run_folder: Path, run_id: str) -> dict[str, int]:
    """The last step of each kind (train, val, best) the run's files hold."""
    held: dict[str, int] = {}
    for step, values in history(run_folder, run_id):
        for key in values:
            kind = next((k for p, k in KIND_OF_PREFIX.items() if key.startswith(p)), None)
            if kind is not None:
                held[kind] = max(held.get(kind, 0), step)
    return held
