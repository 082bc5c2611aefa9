"""A training run as the loop sees it, split by what may change:

- `Run`: what setup builds once (config, Accelerator, folder, model, optimizer, loss, loaders, logging, the
  checkpoint writer) — frozen: no step replaces any of it;
- `Run.state`: the checkpointed position (`runs/checkpoint.RunState`), advanced by every step;
- `Run.process`: what this process has seen and nobody checkpoints (`ProcessState`): the last scores, stop
  requests, corrupt samples of the epoch, the flags held a step late.

The objects inside `Run` keep their own internal state (the checkpoint writer its write in flight, the clock
and the logger their timings, the stop flag its signals, the lease its heartbeat's finding); none of them is
replaced during a run.

`Run.assemble` builds one from its parts; `setup` (distseg/training/setup.py) calls it after reading and
validating the inputs, and the loop's in-process tests call it with tiny parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

import torch
from accelerate.utils import get_mixed_precision_context_manager

from distseg.config import Config
from distseg.data.batch import Loader
from distseg.data.streams import sampling_record, stream_record
from distseg.inference.segmenter import Segmenter
from distseg.labels import Scheme, get_scheme
from distseg.models.losses import SegLoss, build_loss
from distseg.models.param_groups import ParamGroup
from distseg.runs.checkpoint import RunState
from distseg.runs.checkpoint_writer import CheckpointWriter
from distseg.runs.run_dir import RunDir
from distseg.runs.run_lock import Lease
from distseg.training.step_flags import OneStepLate
from distseg.training.step_log import StepLogger
from distseg.training.stopping import StopFlag
from distseg.training.tensorboard import make_writer
from distseg.training.timing import RunClock
from distseg.training.trackers import Trackers


def open_segment(state: RunState, clock: RunClock, processes: int) -> None:
    """This process's segment of the run (training/loop.py's record_segment fills it in as it goes)."""
    start = datetime.fromtimestamp(clock.process_start).isoformat(timespec="seconds")
    state.segments.append({"start": start, "end": None, "first_step": state.step, "last_step": state.step,
                           "steps": 0, "images": 0, "seconds": 0.0, "processes": processes})


def step_autocast(acc):
    """The context `acc.autocast()` enters, made once: Accelerate builds it anew on every call (its state
    singleton and the device probe included: ~0.1 ms of host time per micro-batch, a launch-bound step's
    share). torch.autocast and nullcontext can be entered again after each exit, and mixed precision is fixed
    for the process, so one object serves every step."""
    return get_mixed_precision_context_manager(acc.native_amp, acc.autocast_handler)


@dataclass
class ProcessState:
    """What this process learns while it trains, lost when it ends (the checkpoint holds `RunState`)."""

    last_scores: dict | None = None  # the latest validation's scores
    stop_asked: bool = False  # a rank asked for a stop (seen in the flags): checkpoint and end
    interrupted: bool = False  # ... and it was a Ctrl-C (exit 130) rather than a scheduler's (75)
    preempted: bool = False  # the stop's checkpoint is written: the run ends here
    corrupt: int = 0  # samples skipped as undecodable (data.on_corrupt=skip) this epoch, all ranks
    late: OneStepLate = field(default_factory=OneStepLate)  # the last step's flags (training/step_flags.py)


@dataclass(frozen=True)
class Run:
    """Everything one training run holds; see the module for what a step may change."""

    cfg: Config
    acc: object  # accelerate.Accelerator
    dir: RunDir
    scheme: Scheme
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    groups: tuple[ParamGroup, ...]  # the optimizer's groups, in its order: each one's lr factor
    loss_fn: SegLoss
    train_loader: Loader
    val_loader: Loader
    segmenter: Segmenter  # validation's: the EMA weights when the run keeps an average
    max_steps: int
    log: StepLogger
    tb: object  # training/tensorboard.EventWriter on rank 0
    trackers: Trackers  # train.trackers (W&B, MLflow) on rank 0
    stop: StopFlag
    writer: CheckpointWriter  # checkpoints written off the critical path
    clock: RunClock  # where the time goes (summary.json "timing")
    state: RunState  # the checkpointed position
    ema: object = None  # torch.optim.swa_utils.AveragedModel of the weights (train.ema_decay > 0)
    lease: Lease | None = None  # rank 0's hold on the run folder
    provenance: dict = field(default_factory=dict)  # distseg version, git commit, config hash (rank 0)
    process: ProcessState = field(default_factory=ProcessState)
    autocast: object = None  # the forward's mixed-precision context, made once (`step_autocast`)

    @classmethod
    def assemble(cls, cfg: Config, acc, model, optimizer, groups: list[ParamGroup], train_loader: Loader,
                 val_loader: Loader, state: RunState, max_steps: int, *, clock: RunClock | None = None,
                 ema=None, lease: Lease | None = None, resumed: bool = False, provenance: dict | None = None,
                 stop: StopFlag | None = None) -> Run:
        """A run from its prepared parts (model and optimizer through `acc.prepare`): the loss, validation's
        Segmenter, TensorBoard (a resumed run's later points replace those a killed process logged past its
        checkpoint), the step logger, the trackers (their runs started or continued), the checkpoint writer
        and the stop flag (signal handlers) are made here; `state` gets this process's segment and layout
        (so: once per process)."""
        scheme, run_dir = get_scheme(cfg.data.scheme), RunDir.of(cfg)
        clock = clock or RunClock(acc.device.type == "cuda", acc.num_processes)
        open_segment(state, clock, acc.num_processes)
        state.world, state.batch_size = acc.num_processes, cfg.data.batch_size
        state.grad_accum = cfg.train.grad_accum
        state.shuffle, state.repeat = cfg.data.shuffle, cfg.data.repeat
        state.streams = stream_record(cfg.data, train_loader.shares, train_loader.stream_sizes) \
            if cfg.data.streams else []
        state.sampling = sampling_record(cfg.data, train_loader.num_samples, train_loader.shares) \
            if cfg.data.sampling == "rare" else {}
        epochs = math.ceil(max_steps / math.ceil(len(train_loader) / cfg.train.grad_accum))
        tb = make_writer(run_dir.tb, acc.is_main_process, purge_step=state.step + 1 if resumed else None)
        log = StepLogger(tb, cfg.train.log_every, max_steps, state.step, epochs, cfg.name,
                         acc.is_main_process, cfg.train.progress, clock.gpu)
        trackers = Trackers.start(cfg, acc, run_dir, resumed, log.print)
        segmenter = Segmenter.from_config(ema.module if ema is not None else model, cfg, acc.device)
        return cls(cfg=cfg, acc=acc, dir=run_dir, scheme=scheme, model=model, optimizer=optimizer,
                   groups=tuple(groups), loss_fn=build_loss(cfg, train_loader.class_pixels(), acc.device),
                   train_loader=train_loader, val_loader=val_loader, segmenter=segmenter, max_steps=max_steps,
                   log=log, tb=tb, trackers=trackers, stop=stop or StopFlag(),
                   writer=CheckpointWriter(acc, run_dir.checkpoints, cfg.train.keep_last), clock=clock,
                   state=state, ema=ema, lease=lease, provenance=provenance or {},
                   autocast=step_autocast(acc))
