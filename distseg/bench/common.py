"""Timing, CPU and memory measurement and table formatting shared by the benchmarks.

CPU use is read from /proc/stat (whole machine, in cores), so DataLoader worker processes and DALI threads
are counted alike; peak host memory is sampled from /proc/self/statm by a thread (torch's CPU allocations
are invisible to tracemalloc), peak GPU memory comes from torch.cuda.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from contextlib import contextmanager

import torch


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measure(memory: bool = False):
    """Yields a dict filled on exit with wall seconds, CPU cores busy (machine-wide) and, with `memory`,
    the peak memory above the starting point in MB (GPU memory on CUDA, else this process's RSS)."""
    out: dict = {}
    cuda = torch.cuda.is_available()
    stop, peak = threading.Event(), [0]
    base = _rss()
    if memory and cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()

    def sample():
        while not stop.wait(0.005):
            peak[0] = max(peak[0], _rss())

    sampler = threading.Thread(target=sample, daemon=True) if memory and not cuda else None
    if sampler:
        sampler.start()
    j0, t0 = _busy_jiffies(), time.perf_counter()
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
        out["wall"] = time.perf_counter() - t0
        out["cores"] = (_busy_jiffies() - j0) / os.sysconf("SC_CLK_TCK") / max(out["wall"], 1e-9)
        if sampler:
            stop.set()
            sampler.join()
            out["peak_mb"] = max(0, max(peak[0], _rss()) - base) / 2**20
        elif memory:
            out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20


def table(headers: list[str], rows: list[list]) -> str:
    """A Markdown table; floats get 2 decimals below 10, 1 above."""
    def fmt(v):
        return (f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def device_name() -> str:
    """The GPU's name, or the CPU core count."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"


def with_data(cfg, **data_kw):
    """A copy of the config with some data.* settings changed."""
    c = copy.deepcopy(cfg)
    for k, v in data_kw.items():
        setattr(c.data, k, v)
    return c


def endless(loader):
    """Batches of consecutive epochs, forever."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1
