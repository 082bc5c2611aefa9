"""How a training process is asked to stop, and how it dies with its launcher.

- SIGUSR1 / SIGTERM (Slurm before the time limit, a launcher tearing down) and the file named by
  $DISTSEG_STOP_FILE (what slurm/train.sh creates): checkpoint at the next optimizer step, exit 75
  (requeue me). A second SIGTERM exits at once.
- SIGINT (Ctrl-C): checkpoint at the next step, exit 130 with a line saying how to resume. A second SIGINT
  exits at once. A terminal delivers Ctrl-C to the whole process group, and torch's elastic agent (under
  `accelerate launch`) forwards the one it received to its workers, so a rank sees one keypress as two
  signals milliseconds apart: signals within SAME_PRESS_S count as one.
- Launcher death: a rank started by a launcher (torch elastic sets TORCHELASTIC_RUN_ID) asks the kernel
  for SIGKILL when its parent dies (prctl PR_SET_PDEATHSIG), so no rank trains on as an orphan when the
  launcher is SIGKILLed. Checkpoints are written under a temporary name and renamed when complete, so
  being killed never leaves a half checkpoint that looks complete. DataLoader workers die with their rank
  the same way.
"""

from __future__ import annotations

import os
import signal
import time

from distseg.processes import die_with_parent

SAME_PRESS_S = 1.0


class StopFlag:
    """A request to checkpoint and exit, acted on at the next optimizer step by all ranks together."""

    def __init__(self):
        self.signalled: int | None = None  # the first stop signal received
        self.at = 0.0
        self.file = os.environ.get("DISTSEG_STOP_FILE") or None
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        now = time.monotonic()
        if self.signalled is None:
            self.signalled, self.at = signum, now
            self._acknowledge(signum)
            return
        if signum in (signal.SIGINT, signal.SIGTERM) and now - self.at >= SAME_PRESS_S:  # asked twice: go now
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    @staticmethod
    def _acknowledge(signum: int) -> None:
        """Say at once (rank 0) that the request was heard: a step can take minutes on a CPU, and silence
        invites the second Ctrl-C that exits without a checkpoint. os.write: safe inside a signal handler,
        whatever the print in progress."""
        if os.environ.get("RANK", "0") != "0":
            return
        again = " (Ctrl-C again exits at once, without one)" if signum == signal.SIGINT else ""
        text = f"{signal.Signals(signum).name}: stopping after this step, then checkpointing{again}\n"
        try:
            os.write(1, text.encode())
        except OSError:
            pass

    @property
    def set(self) -> bool:
        """Whether a stop was requested on this rank."""
        return self.signalled is not None or (self.file is not None and os.path.exists(self.file))

    @property
    def interrupted(self) -> bool:
        """The stop came from Ctrl-C (exit 130) rather than a scheduler (exit 75, requeue)."""
        return self.signalled == signal.SIGINT


def die_with_launcher() -> None:
    """A rank under a launcher (torch elastic sets TORCHELASTIC_RUN_ID): be SIGKILLed when it dies."""
    if os.environ.get("TORCHELASTIC_RUN_ID"):
        die_with_parent()
