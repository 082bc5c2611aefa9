"""Where the torch loader's time goes, per part of its work (`distseg bench data --profile`).

Each process keeps one `PARTS`: while it is on, the loader adds the CPU time of this thread spent in each
part (member reads, decode, transform, collate in a worker; the wait for a batch and its conversion in the
main process). A DataLoader worker sends a snapshot of its sums and of its process's CPU time with every
batch (`snapshot`), so the main process also learns what the worker spent outside the parts: the hand-off
of its batches (pickling, file descriptors over a socket, the queues). Off, a part costs one attribute read.
"""

from __future__ import annotations

import os
import time

WORKER_PARTS = ("reads", "decode", "transform", "collate")
MAIN_PARTS = ("wait", "receive", "finish")


class Parts:
    """CPU seconds per part of this process's loader work, summed while `on`."""

    def __init__(self):
        self.on = False
        self.seconds: dict[str, float] = {}
        self.images = 0

    def mark(self) -> float:
        """Now, on this thread's CPU clock (0 when off)."""
        return time.thread_time() if self.on else 0.0

    def add(self, name: str, since: float, inner: float = 0.0) -> float:
        """Add the time since `since` to `name`, less `inner` seconds (a part inside it, counted apart);
        returns now, the start of the next part."""
        if not self.on:
            return 0.0
        now = time.thread_time()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - since - inner
        return now

    def get(self, name: str) -> float:
        """Seconds so far in `name`."""
        return self.seconds.get(name, 0.0)

    def snapshot(self) -> dict:
        """The sums so far, the images done and this process's CPU seconds (all its threads), with its pid."""
        return {"pid": os.getpid(), "seconds": dict(self.seconds), "images": self.images,
                "cpu": time.process_time()}


PARTS = Parts()


def worker_breakdown(first: dict[int, dict], last: dict[int, dict]) -> dict:
    """Milliseconds per image in the workers, from each worker's first and last snapshot seen: every part,
    the hand-off (the worker's CPU time outside the parts) and the total; `images`: how many it covers."""
    images = sum(last[p]["images"] - first[p]["images"] for p in last)
    per = 1000 / max(images, 1)
    out = {k: per * sum(last[p]["seconds"].get(k, 0.0) - first[p]["seconds"].get(k, 0.0) for p in last)
           for k in WORKER_PARTS}
    total = per * sum(last[p]["cpu"] - first[p]["cpu"] for p in last)
    out["hand-off"] = max(0.0, total - sum(out.values()))
    out["total"], out["images"] = total, images
    return out


class LoaderParts:
    """What the main process learns while a loader's parts are timed: each worker's first and last snapshot
    (by pid) and its own parts, per image of the batches it converted."""

    def __init__(self):
        self.first: dict[int, dict] = {}
        self.last: dict[int, dict] = {}
        self.main = dict.fromkeys(MAIN_PARTS, 0.0)
        self.images = 0

    def received(self, snap: dict | None, wall: float, cpu: float) -> None:
        """A batch came: its worker's snapshot, the wall time waited for it, the CPU time receiving it."""
        if snap is not None:
            self.first.setdefault(snap["pid"], snap)
            self.last[snap["pid"]] = snap
        self.main["wait"] += wall
        self.main["receive"] += cpu

    def finished(self, cpu: float, images: int) -> None:
        """A batch was converted for the device (unpack, normalise, masks to int64)."""
        self.main["finish"] += cpu
        self.images += images

    def restart(self) -> None:
        """Count from here (after a warm-up: the workers' start and first batches left out)."""
        self.first = dict(self.last)
        self.main, self.images = dict.fromkeys(MAIN_PARTS, 0.0), 0

    def breakdown(self) -> dict:
        """{"worker": `worker_breakdown`, "main": ms per image of each main part}."""
        per = 1000 / max(self.images, 1)
        return {"worker": worker_breakdown(self.first, self.last),
                "main": {**{k: per * v for k, v in self.main.items()}, "images": self.images}}
