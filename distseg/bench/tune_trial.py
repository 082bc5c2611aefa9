"""One trial of `distseg tune` (distseg/bench/tune.py), in its own process: `python -m
distseg.bench.tune_trial RESULT.json [--config C] [--warmup W] [--steps N] [--min-steps M] [--seconds S]
[SETTINGS...]`, or
once per rank under `python -m distseg.launch ... -m distseg.bench.tune_trial ...`.

It builds the run as `distseg train` does (training/setup.setup: the real loaders on the config's shards, the
model, optimizer, Accelerate's precision) into the throwaway run folder the settings name, then calls the
loop's own step (training/loop.train_step, and `settle`, which reads each step's flags one step late as the
loop does): W warm-up steps, then at least M steps (--min-steps), then until S seconds are spent or N
steps ran (`Window`). Rank 0 writes RESULT.json:
img/s (all ranks), the share of the window spent waiting for batches, peak memory (CUDA's max allocated, else
this process's peak RSS) and a status; a crash or an out-of-memory becomes a one-line reason there, so the
search goes on. A process of its own per trial is what lets trials differ in precision (Accelerate fixes it
once per process) and keeps a crash from taking the search with it.
"""

from __future__ import annotations

import argparse
import math
import os
import resource
import sys
import time

import torch

from distseg.config import load_config
from distseg.errors import UserError
from distseg.files import atomic_write_json

# what a trial's run must be, whatever the config says: no resume, no bar, no tracker runs, and a schedule
# long enough that the learning rate stays what training would use in its first steps
TRIAL_SETTINGS = ["name=trial", "train.resume=never", "train.progress=false", "train.trackers=[]",
                  "train.max_steps=1000000000", "train.log_every=1000000000"]


def peak_memory_mb(cuda: bool) -> float:
    """CUDA's max allocated bytes, else this process's peak resident set (the workers' own not counted)."""
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def batches(loader):
    """The loader's batches over consecutive epochs, without end (a trial may outlast an epoch)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch, 0)
        yield from loader
        epoch += 1


def steps_to_fill(elapsed: float, done: int, seconds: float) -> int:
    """How many steps fill a window of `seconds`, at the pace of the `done` steps that took `elapsed`."""
    if elapsed >= seconds or done < 1:
        return done
    return max(done, math.ceil(done * seconds / max(elapsed, 1e-9)))


class Window:
    """When the timed window ends: never before `min_steps` steps, then once `seconds` are spent, or at
    `cap` steps. One process reads its clock each step. Several ranks must stop at the same step without a
    collective per step: at the floor, one reduction agrees (the largest count of the ranks) on how many
    steps fill the window at the pace measured so far, so the window stays the seconds the budget planned."""

    def __init__(self, acc, seconds: float, min_steps: int, cap: int):
        self.acc, self.seconds, self.cap = acc, seconds, cap
        self.min_steps = min(max(1, min_steps), cap)
        self.started: float | None = None
        self.target: int | None = None

    def start(self) -> None:
        """The window begins now (after the warm-up)."""
        self.started = time.perf_counter()

    def over(self, done: int) -> bool:
        """Whether the window ends after `done` timed steps."""
        if done >= self.cap:
            return True
        if self.started is None or done < self.min_steps:
            return False
        elapsed = time.perf_counter() - self.started
        if self.acc.num_processes == 1:
            return elapsed >= self.seconds
        if self.target is None:
            mine = torch.tensor([float(steps_to_fill(elapsed, done, self.seconds))], device=self.acc.device)
            self.target = int(self.acc.reduce(mine, reduction="max").item())
        return done >= self.target


def measure(run, warmup: int, steps: int, seconds: float, min_steps: int = 1) -> dict:
    """Warm-up steps, then the timed window of the loop's own step; its figures."""
    from distseg.training.loop import settle, train_step

    acc, accum = run.acc, run.cfg.train.grad_accum
    it = batches(run.train_loader)
    window = Window(acc, seconds, min_steps, steps)
    done, images, waited = 0, 0, 0.0
    for k in range(warmup + steps):
        if k == warmup:
            settle(run)
            if acc.device.type == "cuda":
                torch.cuda.synchronize()
            window.start()
        t0 = time.perf_counter()
        group = [next(it) for _ in range(accum)]
        if window.started is not None:
            waited += time.perf_counter() - t0
        settle(run, train_step(run, group))
        run.state.step += 1
        if window.started is not None:
            done += 1
            images += sum(len(b["key"]) for b in group) * acc.num_processes
            if window.over(done):
                break
    settle(run)
    if acc.device.type == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - (window.started or time.perf_counter())
    return {"status": "ok", "img_per_s": images / max(wall, 1e-9), "data_wait": waited / max(wall, 1e-9),
            "steps": done, "seconds": wall, "images": images}


def reason(e: BaseException) -> tuple[str, str]:
    """A failure's status and one-line reason."""
    text = str(e).lower()
    if isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in text or \
            "not enough memory" in text:  # CUDA's, Python's and torch's CPU allocator's words for it
        return "out of memory", (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    if isinstance(e, UserError):
        return "failed", str(e)
    text = (str(e).strip().splitlines() or [""])[0]
    return "failed", f"{type(e).__name__}: {text}"[:300]


def run_trial(config: str | None, settings: list[str], warmup: int, steps: int, seconds: float,
              min_steps: int = 1) -> dict:
    """The trial's figures (rank 0's), or its failure."""
    from accelerate import Accelerator

    from distseg.training.setup import setup
    from distseg.training.trackers import accelerator_kwargs

    cuda = torch.cuda.is_available()
    acc = None
    try:
        cfg = load_config(config, [*settings, *TRIAL_SETTINGS])
        acc = Accelerator(cpu=not cuda, mixed_precision=cfg.train.mixed_precision, **accelerator_kwargs(cfg))
        run = setup(cfg, acc, None)
        out = measure(run, warmup, steps, seconds, min_steps)
        run.log.close()
        run.tb.close()
    except Exception as e:  # any failure is the trial's result, one line; the search goes on
        status, why = reason(e)
        out = {"status": status, "reason": why}
    out["peak_mb"] = peak_memory_mb(cuda)
    out["main"] = acc is None or acc.is_main_process
    out["processes"] = acc.num_processes if acc is not None else 1
    return out


def main(argv: list[str] | None = None) -> int:
    """Run one trial and write its result (rank 0); exit status 0 when it measured, 1 when it failed."""
    p = argparse.ArgumentParser(prog="python -m distseg.bench.tune_trial")
    p.add_argument("result")
    p.add_argument("--config", default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--min-steps", type=int, default=1)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("settings", nargs="*")
    a = p.parse_intermixed_args(argv)
    out = run_trial(a.config, a.settings, a.warmup, max(1, a.steps), a.seconds, a.min_steps)
    if out.pop("main"):
        atomic_write_json(a.result, out)
    code = 0 if out["status"] == "ok" else 1
    sys.stdout.flush()
    sys.stderr.flush()
    if out["processes"] > 1:  # as training/entry.py: a clean exit of several ranks may abort in teardown
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
