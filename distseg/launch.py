"""`python -m distseg.launch [accelerate launch options] distseg/train.py ...`: `accelerate launch` with
distseg's own messages only, and the ranks' exit status passed through.

A bare `accelerate launch` answers a rank's one `error:` line with torch elastic's failure report (a
`ChildFailedError` traceback and a table per failed rank) and exits 1 whatever the rank returned, so a
caller cannot tell a bad config (2) from a diverged loss (3), a preemption (75, requeue) or a Ctrl-C
(130). This wrapper runs Accelerate's own launcher in this process, quiets torch elastic's logging, and
exits with the first failed rank's status (or 128 + signal when a rank was killed). slurm/*.sh and
`distseg experiment` start training through it; use it the same way by hand.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys


def rank_status(failures: dict) -> int:
    """The exit status to report for torch elastic's {rank: ProcessFailure}: the lowest rank's own status,
    or 128 + signal for a rank that was killed."""
    if not failures:
        return 1
    code = failures[min(failures)].exitcode
    return 128 - code if code < 0 else code


def quiet_loggers(prefixes: tuple[str, ...]) -> None:
    """Silence the launcher's loggers. torch elastic gives each module its own logger with its own level
    (WARNING), so a parent's level does not reach them: every one already made is set, after importing the
    modules the launcher uses ("Received 2 death signal" on a Ctrl-C comes from one of them)."""
    import torch.distributed.run  # noqa: F401  (makes the elastic agent's loggers)

    for prefix in prefixes:
        logging.getLogger(prefix).setLevel(logging.CRITICAL)
        for name in list(logging.root.manager.loggerDict):
            if name.startswith(prefix + "."):
                logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
    """Launch; returns the ranks' exit status."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    quiet_loggers(("torch.distributed", "accelerate"))
    try:
        launch_command(args)
    except ChildFailedError as e:
        return rank_status(e.failures)
    except subprocess.CalledProcessError as e:  # one process: Accelerate ran it as a subprocess
        return 128 - e.returncode if e.returncode < 0 else e.returncode
    except SignalException as e:  # the launcher itself was signalled; its ranks were stopped with it
        return 128 + int(e.sigval)
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
