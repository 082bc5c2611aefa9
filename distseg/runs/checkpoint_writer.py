"""Checkpoints written off the step path: the state captured in host memory at the step, the files
written on a thread in Accelerate's `save_state` layout (so `load_state` restores them), then checked,
fsynced and renamed by rank 0 (distseg/runs/checkpoint.py holds the layout and the run state).

Written by hand because Accelerate's save_state writes in the caller's thread. Accelerate's private
attributes are read in `accelerate_state` alone, its file writers called in `write_accelerate_files` alone;
tests/test_training_loop.py fails loudly if either moves.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.utils._pytree

from distseg import run_files as files
from distseg.errors import write_reason
from distseg.models.weights import write_safetensors
from distseg.runs.checkpoint import (
    NotWritten,
    RunState,
    all_ranks_wrote,
    fsync_dir,
    prune,
    write_checksums,
)


def accelerate_state(acc) -> dict:
    """What Accelerate's save_state would write for this process, read through its private attributes
    (`_models`, `_optimizers`, `_custom_objects`, `scaler`, `step`), checked against accelerate 1.15.0 (the
    version tools/constraints.txt pins; pyproject.toml allows >= 1.0): models' state dicts (as prepared,
    not unwrapped), optimizers', the grad scaler's or None, the objects registered for checkpointing (the
    EMA) and the step. Live tensors: copy them (`to_host`)."""
    return {"models": [acc.get_state_dict(m, unwrap=False) for m in acc._models],
            "optimizers": [o.state_dict() for o in acc._optimizers],
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "custom": [o.state_dict() for o in acc._custom_objects], "step": acc.step}


def write_accelerate_files(folder: Path, state: dict, rng: dict, rank: int) -> None:
    """This rank's files of `accelerate_state` + `rng_states` in `folder`, as save_state lays them out:
    accelerate.checkpointing's writers (public in that module, not in the package's API), checked against
    accelerate 1.15.0; the test writes a checkpoint with them and restores it with load_state."""
    from accelerate.checkpointing import save_accelerator_state, save_custom_state

    scaler = Frozen(state["scaler"]) if state["scaler"] is not None else None
    save_accelerator_state(str(folder), state["models"], [Frozen(o) for o in state["optimizers"]], [], [],
                           rank, state["step"], scaler, safe_serialization=True)
    torch.save(rng, folder / f"{files.rank_file(files.RNG_STATES, rank)}.pkl")  # as of the step
    for i, custom in enumerate(state["custom"]):
        save_custom_state(Frozen(custom), str(folder), i)


class Frozen:
    """A state captured at the checkpoint step, handed to Accelerate's writer as the live object would be."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        """The captured state."""
        return self._state


def to_host(obj):
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


def rng_states(step: int) -> dict:
    """This process's random states now, in the form Accelerate's load_state restores."""
    states = {"step": step, "random_state": random.getstate(), "numpy_random_seed": np.random.get_state(),
              "torch_manual_seed": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


@dataclass
class Snapshot:
    """Everything one rank writes for a checkpoint, captured at its step (host copies)."""

    final: Path
    tmp: Path
    state_json: str
    run_id: str
    accelerate: dict  # accelerate_state, on the host
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
    loadable."""

    def __init__(self, acc, ckpt_dir: Path, keep_last: int):
        self.acc, self.ckpt_dir, self.keep_last = acc, ckpt_dir, keep_last
        self.snap: Snapshot | None = None
        self.thread: threading.Thread | None = None
        self.phase = 0  # 1: this rank writes its files; 2: rank 0 finishes; 0: nothing in flight
        self.error: BaseException | None = None

    def begin(self, state: RunState, rank_files: dict | None = None, ema_state: dict | None = None) -> Path:
        """Collective: capture this step's state and start writing it; returns the checkpoint's final path."""
        self.wait()
        acc = self.acc
        final = self.ckpt_dir / files.checkpoint_name(state.step)
        tmp = self.ckpt_dir / files.partial_checkpoint_name(state.step)
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
        snap = Snapshot(final, tmp, state.to_json(), state.run_id, to_host(accelerate_state(acc)),
                        rng_states(acc.step), dict(rank_files or {}), to_host(ema_state))
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
        snap, acc = self.snap, self.acc
        if snap.ready is not None:
            snap.ready.synchronize()
        throttle = float(os.environ.get("DISTSEG_CHECKPOINT_THROTTLE", "0") or 0)
        if throttle:  # test hook: a slow disk, so that a test can kill the process during the write
            time.sleep(throttle)
        write_accelerate_files(snap.tmp, snap.accelerate, snap.rng, acc.process_index)
        for name, data in snap.rank_files.items():
            f = snap.tmp / files.rank_file(name, acc.process_index)
            f.write_bytes(data) if isinstance(data, bytes) else f.write_text(data)

    def _finish(self) -> None:
        """Phase 2, rank 0: durable before it is named complete (checksums and fsync of every file, then the
        state), then renamed into place; older checkpoints of this run pruned."""
        snap = self.snap
        if snap.ema is not None:
            write_safetensors(snap.ema, snap.tmp / files.EMA_WEIGHTS)
        write_checksums(snap.tmp)
        with open(snap.tmp / files.TRAINER_STATE, "w") as f:
            f.write(snap.state_json)
            f.flush()
            os.fsync(f.fileno())
        if snap.final.exists():
            shutil.rmtree(snap.final)
        snap.tmp.rename(snap.final)
        fsync_dir(self.ckpt_dir)
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
        final = self.snap.final if self.snap else self.ckpt_dir
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
