"""Atomic checkpoints and the run state they carry.

A checkpoint is `checkpoints/step-NNNNNNNN/`: Accelerate's `save_state` files (model.safetensors,
optimizer.bin, random states), `loader_state_<rank>` where the loader has its own position (DALI), and
`trainer_state.json` = `RunState` below, written last. All ranks write under `.step-N.tmp`; rank 0 renames
it once complete, so only a folder named `step-N` with `trainer_state.json` counts as a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree

from distseg.errors import UserError, write_reason
from distseg.files import sha256_file
from distseg.models.weights import write_safetensors

STATE_FILE = "trainer_state.json"
RNG_STATE_NAME = "random_states"  # Accelerate's name for each rank's random states
SUMS_FILE = "checksums.sha256"  # every other file of the checkpoint, `sha256sum` format
STATE_VERSION = 1
_STEP = re.compile(r"^step-(\d{8})$")


@dataclass
class RunState:
    """Where a run stands; saved as trainer_state.json in every checkpoint (schema version 1).

    Fields: `step` optimizer steps done; `epoch` epochs completed (the epoch in progress is epoch + 1,
    1-based); `batch_in_epoch` micro-batches of that epoch each process has consumed (0 at an epoch end);
    `samples` training samples seen, padding excluded; `world`, `batch_size`, `grad_accum`, `shuffle` and
    `repeat` (data.repeat: passes per epoch) the layout that wrote it; `best_score`, `best_step`,
    `best_epoch` the best validation score so far (mIoU, or the foreground IoU of a binary scheme; -1 before
    any), `best_scores` that validation's scores (per-class IoU, mIoU, pixel accuracy, category IoU);
    `history` one {"epoch", "step", "score"} per validation; `segments` one {"start", "end", "first_step",
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
    best_scores: dict = field(default_factory=dict)
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
    found = [p for p in ckpt_dir.iterdir() if _STEP.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    ck = list_checkpoints(ckpt_dir)
    return ck[-1] if ck else None


def read_state(ckpt: Path) -> RunState:
    """The RunState of a checkpoint folder, or one clear error."""
    try:
        return RunState.from_json((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{ckpt} is not a complete distseg checkpoint: {e}") from None


class _Frozen:
    """A state captured at the checkpoint step, handed to Accelerate's writer as the live object would be."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        """The captured state."""
        return self._state


def _to_host(obj):
    """Tensors (in any nesting of dicts, lists, tuples) copied to host memory. On CUDA the copies are queued
    on the current stream into pinned memory: they read the values of this step even though the next step's
    kernels follow in the stream; the writer waits for them (a CUDA event) before it serialises."""
    def copy(t):
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_cuda:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t.detach(), non_blocking=True)
        return t.detach().clone()
    return torch.utils._pytree.tree_map(copy, obj)


def _rng_states(step: int) -> dict:
    """This process's random states now, in the form Accelerate's load_state restores."""
    states = {"step": step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


@dataclass
class _Snapshot:
    """Everything one rank writes for a checkpoint, captured at its step (host copies)."""

    final: Path
    tmp: Path
    state_json: str
    run_id: str
    models: list
    optimizers: list
    scaler: dict | None
    custom: list
    rng: dict
    rank_files: dict
    ema: dict | None
    ready: object = None  # a CUDA event the host copies wait for (None on the CPU)


class CheckpointWriter:
    """Checkpoints written off the critical path. `begin` (collective, at a step) captures the state in host
    memory and starts a thread that writes this rank's files into `.step-N.tmp` in Accelerate's layout, so
    `load_state` restores it. The ranks learn that every thread finished from the step's all-reduced flags
    (`flags`/`observe`, a step later), and rank 0 then finishes on a thread of its own: ema.safetensors, the
    checksums of every file and fsync, trainer_state.json, the rename to `step-N`, pruning. A failure on any
    rank (a full disk) reaches every rank the same way and stops them all with one line. `wait` (collective)
    blocks until the checkpoint in flight is complete: before the next one, at a stop and at the end.

    Until the rename, the newest complete checkpoint is the previous one: a kill during a write leaves it
    loadable. Written by hand because Accelerate's save_state writes in the caller's thread."""

    def __init__(self, acc, ckpt_dir: Path, keep_last: int):
        self.acc, self.ckpt_dir, self.keep_last = acc, ckpt_dir, keep_last
        self.snap: _Snapshot | None = None
        self.thread: threading.Thread | None = None
        self.phase = 0  # 1: this rank writes its files; 2: rank 0 finishes; 0: nothing in flight
        self.error: BaseException | None = None

    def begin(self, state: RunState, rank_files: dict | None = None, ema_state: dict | None = None) -> Path:
        """Collective: capture this step's state and start writing it; returns the checkpoint's final path."""
        self.wait()
        acc = self.acc
        final = self.ckpt_dir / f"step-{state.step:08d}"
        tmp = self.ckpt_dir / f".{final.name}.tmp"
        failure = None
        if acc.is_main_process:
            try:
                self.ckpt_dir.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except Exception as e:
                failure = e
        all_ranks_wrote(acc, failure, f"checkpoint {final}", self.ckpt_dir, cleanup=tmp)
        cuda = acc.device.type == "cuda"
        snap = _Snapshot(final, tmp, state.to_json(), state.run_id,
                         _to_host([acc.get_state_dict(m, unwrap=False) for m in acc._models]),
                         _to_host([o.state_dict() for o in acc._optimizers]),
                         _to_host(acc.scaler.state_dict()) if acc.scaler is not None else None,
                         _to_host([o.state_dict() for o in acc._custom_objects]), _rng_states(acc.step),
                         dict(rank_files or {}), _to_host(ema_state))
        if cuda:
            snap.ready = torch.cuda.Event()
            snap.ready.record()
        self.snap, self.phase, self.error = snap, 1, None
        self.thread = threading.Thread(target=self._guarded, args=(self._write_rank,), name="checkpoint",
                                       daemon=True)
        self.thread.start()
        return final

    def _guarded(self, work) -> None:
        try:
            work()
        except BaseException as e:  # reported to every rank through the step flags or `wait`
            self.error = e

    def _write_rank(self) -> None:
        """Phase 1, every rank: this rank's files, as Accelerate's save_state lays them out."""
        from accelerate.checkpointing import save_accelerator_state, save_custom_state

        snap, acc = self.snap, self.acc
        if snap.ready is not None:
            snap.ready.synchronize()
        throttle = float(os.environ.get("DISTSEG_CHECKPOINT_THROTTLE", "0") or 0)
        if throttle:  # test hook: a slow disk, so that a test can kill the process during the write
            time.sleep(throttle)
        save_accelerator_state(str(snap.tmp), snap.models, [_Frozen(o) for o in snap.optimizers], [], [],
                               acc.process_index, snap.rng["step"],
                               _Frozen(snap.scaler) if snap.scaler is not None else None,
                               safe_serialization=True)
        torch.save(snap.rng, snap.tmp / f"{RNG_STATE_NAME}_{acc.process_index}.pkl")  # as of the step
        for i, custom in enumerate(snap.custom):
            save_custom_state(_Frozen(custom), str(snap.tmp), i)
        for name, data in snap.rank_files.items():
            f = snap.tmp / f"{name}_{acc.process_index}"
            f.write_bytes(data) if isinstance(data, bytes) else f.write_text(data)

    def _finish(self) -> None:
        """Phase 2, rank 0: durable before it is named complete (checksums and fsync of every file, then the
        state), then renamed into place; older checkpoints of this run pruned."""
        snap = self.snap
        if snap.ema is not None:
            write_safetensors(snap.ema, snap.tmp / "ema.safetensors")
        write_checksums(snap.tmp)
        with open(snap.tmp / STATE_FILE, "w") as f:
            f.write(snap.state_json)
            f.flush()
            os.fsync(f.fileno())
        if snap.final.exists():
            shutil.rmtree(snap.final)
        snap.tmp.rename(snap.final)
        _fsync_dir(self.ckpt_dir)
        prune(self.ckpt_dir, snap.run_id, self.keep_last)

    def flags(self) -> tuple[float, float]:
        """(this rank's files still being written, this rank's write failed), for the step's all-reduce."""
        busy = self.phase == 1 and self.thread is not None and self.thread.is_alive()
        return float(busy), float(self.error is not None)

    def observe(self, busy: float, failed: float) -> None:
        """The all-reduced `flags` of a step (every rank sees the same numbers, so all act alike)."""
        if failed > 0:
            self._fail()
        if self.phase == 1 and busy == 0:  # every rank's files are written
            self.thread.join()
            if self.acc.is_main_process:
                self.phase = 2
                self.thread = threading.Thread(target=self._guarded, args=(self._finish,),
                                               name="checkpoint-finish", daemon=True)
                self.thread.start()
            else:
                self.phase, self.snap = 0, None
        elif self.phase == 2 and not self.thread.is_alive() and self.error is None:
            self.phase, self.snap = 0, None

    def _fail(self) -> None:
        final = self.snap.final if self.snap else self.ckpt_dir / "step-?"
        error, tmp = self.error, self.snap.tmp if self.snap else None
        if self.thread is not None:
            self.thread.join()
        self.phase, self.snap, self.thread, self.error = 0, None, None, None
        reason = ("another rank could not write its part" if error is None
                  else write_reason(error, self.ckpt_dir))
        if self.acc.is_main_process and tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise NotWritten.naming_last(f"checkpoint {final}", reason, self.ckpt_dir)

    def wait(self) -> Path | None:
        """Collective: finish the checkpoint in flight (if any rank has one) before going on; returns it."""
        final = self.snap.final if self.snap else None
        if self.phase == 1:
            self.thread.join()
        all_ranks_wrote(self.acc, self.error if self.phase == 1 else None, f"checkpoint {final}",
                        self.ckpt_dir, cleanup=self.snap.tmp if self.snap else None)
        if self.acc.is_main_process and self.phase in (1, 2):
            if self.phase == 1:
                self._guarded(self._finish)
            else:
                self.thread.join()
        failure = self.error if self.acc.is_main_process else None
        try:
            all_ranks_wrote(self.acc, failure, f"checkpoint {final}", self.ckpt_dir,
                            cleanup=self.snap.tmp if self.snap else None)
        finally:
            self.phase, self.snap, self.thread, self.error = 0, None, None, None
        self.acc.wait_for_everyone()
        return final


def save_checkpoint(accelerator, ckpt_dir: Path, state: RunState, keep_last: int,
                    rank_files: dict | None = None, ema_state: dict | None = None) -> Path:
    """Collective: a checkpoint written and complete before it returns (every rank must call it at the same
    step). `rank_files` ({name: str or bytes}) are written by each rank with its index appended (e.g. a DALI
    reader position); `ema_state`, the weight average, also goes to ema.safetensors for evaluate, predict
    and export."""
    writer = CheckpointWriter(accelerator, ckpt_dir, keep_last)
    writer.begin(state, rank_files, ema_state)
    return writer.wait()


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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checksums(folder: Path) -> None:
    """fsync every file of a checkpoint being written and record its sha256 in SUMS_FILE."""
    lines = []
    for p in sorted(q for q in folder.rglob("*") if q.is_file() and q.name not in (STATE_FILE, SUMS_FILE)):
        with open(p, "rb") as f:
            os.fsync(f.fileno())
        lines.append(f"{sha256_file(p)}  {p.relative_to(folder)}\n")
    with open(folder / SUMS_FILE, "w") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(folder)


def damage(ckpt: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (truncated, corrupted, incomplete), or None when it can."""
    try:
        read_state(ckpt)
    except UserError as e:
        return str(e)
    sums = ckpt / SUMS_FILE
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
