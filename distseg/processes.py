"""How distseg's child processes end: with their parent. A rank under a launcher and a DataLoader worker ask
the kernel for SIGKILL when their parent dies (Linux prctl PR_SET_PDEATHSIG), so nothing trains or decodes on
as an orphan after the launcher or the rank is killed."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Ask the kernel for SIGKILL when the parent process dies (Linux); False where that is unavailable.
    Exits at once if the parent is already gone."""
    if not sys.platform.startswith("linux"):
        return False
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        return False
    if os.getppid() != parent:  # it died between the two calls: the request came too late
        os._exit(128 + signal.SIGKILL)
    return True


def worker_init(_worker_id: int = 0) -> None:
    """DataLoader worker start: die with the training process at once (rather than at torch's next watchdog
    check, seconds later), and leave Ctrl-C to it: it checkpoints before it exits, while a worker dying of
    KeyboardInterrupt would fail the epoch."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


_NOTED: set[str] = set()


def usable_workers(asked: int, setting: str) -> int:
    """Worker processes for a DataLoader: `asked`, capped to the cores this process may run on. More
    workers than cores only contend (and torch warns with a site-packages path, once per loader); distseg
    says it once, on rank 0, naming the setting."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if asked <= cores:
        return asked
    if setting not in _NOTED and os.environ.get("RANK", "0") == "0":
        print(f"note: {setting}={asked} is more than the {cores} cores here: using {cores} workers",
              flush=True)
    _NOTED.add(setting)
    return cores
