"""Atomic checkpoints and the run state they carry.

A checkpoint is `checkpoints/step-NNNNNNNN/`: Accelerate's `save_state` files (model.safetensors,
optimizer.bin, random states), `loader_state_<rank>` where the loader has its own position (DALI), and
`trainer_state.json` = `RunState` below, written last. All ranks write under `.step-N.tmp`; rank 0 renames
it once complete, so only a folder named `step-N` with `trainer_state.json` counts as a checkpoint. The
writing itself, off the step path, is distseg/runs/checkpoint_writer.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from distseg import run_files as files
from distseg.errors import UserError, write_reason
from distseg.files import sha256_file

STATE_VERSION = 1


@dataclass
class RunState:
    """Where a run stands; saved as trainer_state.json in every checkpoint (schema version 1).

    Fields: `step` optimizer steps done; `epoch` epochs completed (the epoch in progress is epoch + 1,
    1-based); `batch_in_epoch` micro-batches of that epoch each process has consumed (0 at an epoch end);
    `samples` training samples seen, padding excluded; `world`, `batch_size`, `grad_accum`, `shuffle` and
    `repeat` (data.repeat: passes per epoch) the layout that wrote it; `streams` one {"shards", "split",
    "weight", "samples", "size"} per stream of data.streams (samples: its share of an epoch), empty without;
    `sampling` data.sampling=rare's settings {"sampling", "temperature", "min_pixels", "draws"} (draws per
    epoch), empty for uniform sampling;
    `best_score`, `best_step`, `best_epoch` the best validation score so far (mIoU, or the foreground IoU
    of a binary scheme; -1 before any), `best_scores` that validation's scores (per-class IoU, mIoU, pixel
    accuracy, category IoU);
    `history` one {"epoch", "step", "score"} per validation; `grouping` the optimizer's parameter grouping
    (models/param_groups.Grouping.record; None in a run made before grouping was recorded: one group);
    `segments` one {"start", "end", "first_step",
    "last_step", "steps", "images", "seconds", "processes"} per process start that trained (the last one up
    to this checkpoint); `run_id` drawn at a fresh start and kept by every resume (pruning touches only this
    run's checkpoints); `config` the run name.
    """

    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    config: str = ""
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    world: int = 1
    batch_size: int = 0
    grad_accum: int = 1
    best_score: float = -1.0
    best_step: int = 0
    best_epoch: int = 0
    history: list = field(default_factory=list)
    shuffle: str = "global"
    repeat: int = 1
    streams: list = field(default_factory=list)
    sampling: dict = field(default_factory=dict)
    best_scores: dict = field(default_factory=dict)
    grouping: dict | None = None
    segments: list = field(default_factory=list)
    version: int = STATE_VERSION

    def position(self) -> str:
        """Where in the epochs this state stands, as every printed line counts them: `end of epoch 8`, or
        `epoch 9 at batch 3` for a mid-epoch checkpoint (micro-batches of each process)."""
        if self.batch_in_epoch == 0:
            return f"end of epoch {self.epoch}"
        return f"epoch {self.epoch + 1} at batch {self.batch_in_epoch}"

    def to_json(self) -> str:
        """The trainer_state.json text."""
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> RunState:
        """Parse trainer_state.json: unknown keys are an error (a newer schema), missing ones get defaults."""
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        newer = isinstance(data, dict) and data.get("version", STATE_VERSION) > STATE_VERSION
        if not isinstance(data, dict) or set(data) - known or newer:
            raise ValueError(f"not a version-{STATE_VERSION} distseg trainer state")
        return cls(**data)


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if files.checkpoint_step(p.name) is not None
             and (p / files.TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: files.checkpoint_step(p.name))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ck = list_checkpoints(ckpt_dir)
    return ck[-1] if ck else None


def read_state(ckpt: Path) -> RunState:
    """The RunState of a checkpoint folder, or one clear error."""
    try:
        return RunState.from_json((ckpt / files.TRAINER_STATE).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{ckpt} is not a complete distseg checkpoint: {e}") from None


class NotWritten(UserError):
    """A checkpoint or the best weights could not be written (full disk, quota): every rank stops, the
    partial files are removed and the message names the newest complete checkpoint, which a rerun resumes."""

    collective = True

    @classmethod
    def naming_last(cls, what: str, reason: str, ckpt_dir: Path) -> NotWritten:
        """The error naming what could not be written, why, and the checkpoint a rerun resumes from."""
        last = latest_checkpoint(ckpt_dir)
        return cls(f"could not write {what}: {reason}; the newest complete checkpoint is {last or 'none'}: "
                   "free space and run the same command again to resume")


def all_ranks_wrote(accelerator, failure: BaseException | None, what: str, ckpt_dir: Path,
                    cleanup: Path | None = None) -> None:
    """Collective: if any rank failed to write its part of `what`, remove `cleanup` and raise NotWritten on
    every rank (a rank that raised alone would leave the others waiting at the next collective forever)."""
    failed = torch.tensor([float(failure is not None)], device=accelerator.device)
    if accelerator.num_processes > 1:
        failed = accelerator.reduce(failed, reduction="sum")
    if failed.item() == 0:
        return
    reason = "another rank could not write its part" if failure is None else write_reason(failure, ckpt_dir)
    if accelerator.is_main_process and cleanup is not None:  # after the reason: it may probe the free space
        shutil.rmtree(cleanup, ignore_errors=True)
    raise NotWritten.naming_last(what, reason, ckpt_dir)


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(folder: Path) -> None:
    """fsync every file of a checkpoint being written and record its sha256 in files.CHECKSUMS."""
    lines = []
    written_last = (files.TRAINER_STATE, files.CHECKSUMS)
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name not in written_last):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        lines.append(f"{sha256_file(p)}  {p.relative_to(folder)}\n")
    with open(folder / files.CHECKSUMS, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(folder)


def damage(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (truncated, corrupted, incomplete), or None when it can."""
    try:
        read_state(ckpt)
    except UserError as e:
        return str(e)
    sums = ckpt / files.CHECKSUMS
    if not sums.is_file():
        return None  # written before checksums existed: as complete as its state file says
    for line in sums.read_text().splitlines():
        digest, name = line.split("  ", 1)
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if sha256_file(p) != digest:
            return f"{name} fails its sha256 check (truncated or corrupted)"
    return None


def prune(ckpt_dir: Path, run_id: str, keep_last: int) -> None:
    """Remove all but the newest `keep_last` checkpoints of run `run_id`; other runs' checkpoints stay."""
    mine = []
    for ck in list_checkpoints(ckpt_dir):
        try:
            if read_state(ck).run_id == run_id:
                mine.append(ck)
        except UserError:
            continue
    for old in mine[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
