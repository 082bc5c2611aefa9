"""The training process: config -> Accelerator -> `train` -> exit status, with every error as one line.

Run by `distseg train` in this process, and by `accelerate launch distseg/train.py` (or `python -m
distseg.launch ... distseg/train.py`) once per rank. Exit status: 0 done, 2 a user error, 3 diverged,
75 preempted (checkpointed: requeue me), 130 interrupted (Ctrl-C, checkpointed).
"""

from __future__ import annotations

import os
import sys

import torch

from distseg.config import Config, load_config
from distseg.errors import UserError, describe_os_error
from distseg.runs.run_dir import RunDir
from distseg.training.loop import Diverged, train
from distseg.training.stopping import die_with_launcher
from distseg.training.trackers import accelerator_kwargs, finish_all

EXIT_PREEMPTED = 75  # checkpoint written on SIGUSR1/SIGTERM: requeue me
EXIT_DIVERGED = 3


def print_error(e: BaseException, acc, cfg: Config | None) -> None:
    """Print an error as one line: once for an error every rank raises alike (rank 0), else on each rank
    that has it. Errors before the Accelerator exists (arguments, config) are alike on every rank."""
    collective = acc is None or getattr(e, "collective", False)
    if collective and not (acc.is_main_process if acc is not None else os.environ.get("RANK", "0") == "0"):
        return
    if isinstance(e, OSError):  # a write failed: say where, and what a rerun resumes from
        last = RunDir.of(cfg).latest() if cfg is not None else None
        text = f"{describe_os_error(e)}{f'; the newest complete checkpoint is {last}' if last else ''}"
    else:
        text = str(e)
    print(f"error: {text}", file=sys.stderr)


def main(config: str | None, overrides: list[str] | tuple[str, ...]) -> int:
    """Train; returns the exit status (0, 2 user error, 3 diverged, 75 preempted, 130 interrupted)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    die_with_launcher()
    code, acc, cfg = 0, None, None
    try:
        cfg = load_config(config, overrides)
        if cfg.train.deterministic:  # cuBLAS reads it when CUDA starts: before the Accelerator
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision,
                          **accelerator_kwargs(cfg))
        set_seed(cfg.train.seed)
        summary = train(cfg, acc)
        code = 0 if summary is None else 130 if summary.interrupted else EXIT_PREEMPTED if summary.preempted \
            else 0
    except (UserError, OSError) as e:
        print_error(e, acc, cfg)
        code = EXIT_DIVERGED if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written: the run resumes from its newest checkpoint)",
              file=sys.stderr)
        code = 130
    multi = acc is not None and acc.num_processes > 1
    if acc is not None:
        finish_all(acc)
        acc.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    if multi:  # a clean exit of several gloo/NCCL processes sometimes aborts in teardown (SIGABRT)
        os._exit(code)
    return code
