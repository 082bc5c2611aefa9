"""Per-step bookkeeping kept out of the training loop (as torchvision's MetricLogger.log_every): the
throughput window, where the time went in it (on CUDA the GPU's idle time between steps, on the CPU the
data wait), the time left, TensorBoard scalars, the progress bar and a console line every N steps.

A step's flags are read one step late (training/step_flags.py), so a step is logged while the next one is
already under way, and the last step of an epoch is logged at once, before validation and the checkpoint.
The window's time is therefore not "now minus the last log" but the sum of the steps' own times, which the
loop hands over per step (`spent`): from fetching the step's batch to the end of its iteration, plus the
wait for the device when its flags are read at once. Validation, checkpoints and the loader's restart
between epochs belong to no step, so they neither inflate the next step's time nor empty the ETA."""

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
        self.pending: dict[int, list[float]] = {}  # step -> [seconds, data-wait seconds], until logged
        # a bar only on rank 0 and only on a terminal: in a log file it prints garbled repeats
        show = main and progress and sys.stderr.isatty()
        self.bar = tqdm(total=max_steps, initial=start_step, desc=name, unit="step", mininterval=2,
                        disable=not show, dynamic_ncols=True)
        self.main = main
        self.t_start = time.time()
        self.images_run = 0
        self._reset()

    def _reset(self) -> None:
        self.images = 0

    def print(self, text: str) -> None:
        """A line on rank 0 that does not break the progress bar."""
        if self.main:
            (self.bar.write if not self.bar.disable else print)(text, flush=True)

    def spent(self, step: int, seconds: float, waited: float = 0.0) -> None:
        """Optimizer step `step` took `seconds` of the loop's time, `waited` of them for the loader (called
        again for the same step, the times add up)."""
        times = self.pending.setdefault(step, [0.0, 0.0])
        times[0] += seconds
        times[1] += waited

    def _window(self, step: int) -> tuple[float, float]:
        """The seconds and data-wait seconds of the steps up to `step` not logged yet (then forgotten)."""
        done = [self.pending.pop(s) for s in sorted(self.pending) if s <= step]
        return sum(t for t, _ in done), sum(w for _, w in done)

    def step(self, step: int, epoch: int, loss: float, lr: float, images: int) -> dict | None:
        """After an optimizer step: `epoch` is 1-based, `images` the samples of this step on all ranks.
        Returns the values logged at this step (None between log steps), for the trackers."""
        self.images += images
        self.images_run += images
        self.bar.update(1)
        if step % self.every and step != self.max_steps:
            return None
        seconds, waited = self._window(step)
        dt = max(seconds, 1e-9)
        ips, wait = self.images / dt, waited / dt
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
