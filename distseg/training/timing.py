"""Where a training process's time goes, measured in every run (summary.json "timing", TensorBoard
"timing/*") and shown by `distseg bench e2e`:

- start-up: from the process's start (the kernel's start time) to the end of the first optimizer step:
  imports, the Accelerator, loaders, model, resume, the first batch and the first step (cuDNN autotune);
- steps inside an epoch (every step but an epoch's first): their img/s, and their data wait;
- each epoch boundary: the first step of an epoch against the median step inside one (its extra data wait
  is the loader's refill), and the epoch-end checkpoint's time on the critical path;
- validation: its time and img/s, the first batch (start-up, first use of the shapes) apart;
- checkpoints: their time on the critical path (the capture; the write runs on a thread);
- whole run: images / seconds from the process's start until the summary is written.

On CUDA the time the GPU had no training work between consecutive steps (from the end of one step's work to
the start of the next one's, by CUDA events) is read without a synchronisation per step: an event pair is
read once both are reached, a step or more later. On the CPU the data wait stands in for it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections import deque

import torch


def process_start() -> float:
    """When this process started (epoch seconds), from /proc; now where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration, IndexError):
        return time.time()


class GpuIdle:
    """Seconds the GPU had no training work between steps, from CUDA event pairs read when both are done."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.last_end = None
        self.pending: deque = deque()
        self.idle = 0.0
        self.gaps = 0

    def step_begins(self) -> None:
        """Just before a step's first kernel is queued."""
        if self.enabled:
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            if self.last_end is not None:
                self.pending.append((self.last_end, start))

    def step_ends(self) -> None:
        """Just after a step's last kernel (the optimizer's) is queued."""
        if self.enabled:
            self.last_end = torch.cuda.Event(enable_timing=True)
            self.last_end.record()

    def collect(self) -> None:
        """Add up the gaps whose both events the GPU has reached (no waiting)."""
        while self.pending and self.pending[0][1].query():
            end, start = self.pending.popleft()
            self.idle += end.elapsed_time(start) / 1000
            self.gaps += 1


class RunClock:
    """The timing block of a training process; see the module docstring."""

    def __init__(self, cuda: bool, world: int = 1):
        self.process_start = process_start()
        self.first_step_end: float | None = None
        self.first_of_epoch = False
        self.mark = time.time()  # end of the previous step (or the start of an epoch's iteration)
        self.wait = 0.0  # data wait of the step in progress
        self.inner: list[float] = []  # durations of steps inside an epoch
        self.inner_wait: list[float] = []
        self.inner_images = 0
        self.boundaries: list[dict] = []  # per epoch opened: its first step and the checkpoint before it
        self.val = {"seconds": 0.0, "images": 0, "first_seconds": 0.0, "first_images": 0, "runs": 0}
        self.ckpt_seconds = 0.0
        self.epoch_end_ckpt = 0.0  # the last epoch-end checkpoint's critical-path time
        self.images = 0
        self.world = world  # every rank runs the same batches: images per step = this rank's x world
        self.gpu = GpuIdle(cuda)

    def epoch_begins(self) -> None:
        """The loop starts iterating an epoch: its first step's time counts from here (the GPU's gap since
        the last epoch's step held validation and is not counted as idle)."""
        self.mark = time.time()
        self.first_of_epoch = True
        self.gpu.last_end = None

    def waited(self, seconds: float) -> None:
        """The loop waited this long for the step's batches."""
        self.wait += seconds

    def step_done(self, images: int) -> None:
        """A step is done (on the host: queued, on CUDA); `images` its samples on this rank (padding too)."""
        now = time.time()
        took, self.mark = now - self.mark, now
        images *= self.world
        self.images += images
        if self.first_step_end is None:
            self.first_step_end = now
        elif self.first_of_epoch:
            self.boundaries.append({"step": took, "wait": self.wait, "checkpoint": self.epoch_end_ckpt})
        else:
            self.inner.append(took)
            self.inner_wait.append(self.wait)
            self.inner_images += images
        self.first_of_epoch, self.wait, self.epoch_end_ckpt = False, 0.0, 0.0
        self.gpu.collect()

    def checkpointed(self, seconds: float, epoch_end: bool) -> None:
        """A checkpoint held the loop for `seconds`."""
        self.ckpt_seconds += seconds
        if epoch_end:
            self.epoch_end_ckpt += seconds

    def validated(self, seconds: float, images: int, first_seconds: float, first_images: int) -> None:
        """A validation took `seconds` for `images`, its first batch `first_seconds` for `first_images`."""
        v = self.val
        v["seconds"] += seconds
        v["images"] += images
        v["first_seconds"] += first_seconds
        v["first_images"] += first_images
        v["runs"] += 1

    def summary(self, images_total: int | None = None) -> dict:
        """The timing block (seconds, img/s, shares of the run's wall time); steps of this process only."""
        now = time.time()
        wall = now - self.process_start
        step = statistics.median(self.inner) if self.inner else None
        wait = statistics.median(self.inner_wait) if self.inner_wait else 0.0
        bounds = [{"stall": b["step"] - step + b["checkpoint"], "refill": b["wait"] - wait,
                   "checkpoint": b["checkpoint"]} for b in self.boundaries] if step is not None else []
        v = self.val
        steady_val = (v["images"] - v["first_images"]) / max(v["seconds"] - v["first_seconds"], 1e-9)

        def mean(key):
            return statistics.mean(b[key] for b in bounds) if bounds else None
        first = statistics.mean(b["step"] for b in self.boundaries) / step if bounds else None
        out = {
            "start_up_s": (self.first_step_end or now) - self.process_start,
            "steady_img_per_s": self.inner_images / sum(self.inner) if self.inner else None,
            "step_s": step, "first_step_of_epoch_vs_inner": first,
            "epoch_boundary_stall_s": mean("stall"), "epoch_boundary_refill_s": mean("refill"),
            "epoch_boundary_checkpoint_s": mean("checkpoint"),
            "validation_s": v["seconds"], "validation_share": v["seconds"] / max(wall, 1e-9),
            "validation_img_per_s": steady_val if v["images"] > v["first_images"] else None,
            "validation_start_up_s": v["first_seconds"] / max(v["runs"], 1),
            "checkpoint_stall_s": self.ckpt_seconds, "checkpoint_share": self.ckpt_seconds / max(wall, 1e-9),
            "wall_s": wall, "images": self.images,
            "whole_run_img_per_s": (self.images if images_total is None else images_total) / max(wall, 1e-9),
            "data_wait_share": sum(self.inner_wait) / max(sum(self.inner), 1e-9) if self.inner else None,
        }
        if self.gpu.enabled:
            self.gpu.collect()
            out["gpu_idle_s"] = self.gpu.idle
            out["gpu_idle_share"] = self.gpu.idle / max(sum(self.inner), 1e-9) if self.inner else None
        return out
