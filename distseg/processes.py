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
