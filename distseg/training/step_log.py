"""Per-step bookkeeping kept out of the training loop (as torchvision's MetricLogger.log_every): the
throughput window, where the time went in it (on CUDA the GPU's idle time between steps, on the CPU the
data wait), the time left, TensorBoard scalars, the progress bar and a console line every N steps."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class StepLogger:
    """Call `waited` with the seconds spent fetching data and `step` after each optimizer step."""

    def __init__(self, tb, every: int, max_steps: int, start_step: int, epochs: int, name: str, main: bool,
                 progress: bool, gpu=None):
        self.tb, self.every, self.max_steps, self.epochs = tb, every, max_steps, epochs
        self.gpu = gpu if gpu is not None and gpu.enabled else None  # timing.GpuIdle on CUDA
        self.last_step, self.idle_mark = start_step, 0.0
        # a bar only on rank 0 and only on a terminal: in a log file it prints garbled repeats
        show = main and progress and sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, desc=name, unit="step", mininterval=2,
                        disable=not show, dynamic_ncols=True)
        self.main = main
        self.t_start = time.time()
        self.images_run = 0
        self._reset()

    def _reset(self) -> None:
        self.t0, self.wait, self.images = time.time(), 0.0, 0

    def print(self, text: str) -> None:
        """A line on rank 0 that does not break the progress bar."""
        if self.main:
            (self.bar.write if not self.bar.disable else print)(text, flush=True)

    def waited(self, seconds: float) -> None:
        """Time the loop spent waiting for the loader (counted as data-wait)."""
        self.wait += seconds

    def step(self, step: int, epoch: int, loss: float, lr: float, images: int) -> dict | None:
        """After an optimizer step: `epoch` is 1-based, `images` the samples of this step on all ranks.
        Returns the values logged at this step (None between log steps), for the trackers."""
        self.images += images
        self.images_run += images
        self.bar.update(1)
        if step % self.every and step != self.max_steps:
            return None
        dt = max(time.time() - self.t0, 1e-9)
        ips, wait = self.images / dt, self.wait / dt
        eta = (self.max_steps - step) * dt / max(step - self.last_step, 1)
        scalars = [("train/loss", loss), ("train/lr", lr), ("train/epoch", epoch), ("perf/img_per_s", ips),
                   ("perf/data_wait_frac", wait)]
        where = f"data-wait {100 * wait:.0f}%"
        if self.gpu is not None:  # the GPU's idle time between steps in this window, as far as it is known
            self.gpu.collect()
            idle = (self.gpu.idle - self.idle_mark) / dt
            self.idle_mark = self.gpu.idle
            scalars.append(("perf/gpu_idle_frac", idle))
            where = f"gpu-idle {100 * idle:.0f}%"
        for tag, v in scalars:
            self.tb.add_scalar(tag, v, step)
        if self.bar.disable:
            self.print(f"step {step}/{self.max_steps} epoch {epoch}/{self.epochs} loss {loss:.4f} lr "
                       f"{lr:.2e} {ips:.1f} img/s {where} eta {duration(eta)}")
        else:
            self.bar.set_postfix(epoch=f"{epoch}/{self.epochs}", loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                                 ips=f"{ips:.1f}", eta=duration(eta))
        self.last_step = step
        self._reset()
        return dict(scalars)

    def throughput(self) -> float:
        """Images per second over this process's run (resumed steps excluded)."""
        return self.images_run / max(time.time() - self.t_start, 1e-9)

    def close(self) -> None:
        """Close the progress bar."""
        self.bar.close()


def duration(seconds: float) -> str:
    """45s, 12m05s, 3h07m, 2d04h: a time left, as people read it."""
    s = int(round(max(seconds, 0)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
