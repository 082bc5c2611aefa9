"""How a training run starts: take the run folder's lease, read and validate every input (loaders, the
checkpoint to resume from), build the model, optimizer and loss, and only then write to the run folder, so a
start that fails on its inputs leaves nothing behind. `setup` returns the `Run` the loop advances.
"""

from __future__ import annotations

import math
from datetime import datetime

import torch
from accelerate.utils import broadcast_object_list

from distseg.config import Config, dump_config
from distseg.data.loader import build_loader
from distseg.data.streams import describe_sampling, describe_streams
from distseg.errors import UserError
from distseg.files import atomic_write_text
from distseg.inference.metrics import headline_name, percent
from distseg.labels import Scheme, get_scheme
from distseg.models import build_model, out_channels, sync_batchnorm
from distseg.models.optim import build_optimizer, lr_at
from distseg.models.param_groups import Grouping, ParamGroup, build_param_groups, requested_grouping
from distseg.models.weights import load_weights
from distseg.runs.checkpoint import RunState, read_state
from distseg.runs.run_dir import RunDir, provenance
from distseg.runs.run_lock import Lease, RunLocked, acquire
from distseg.training.resume import check_group_sizes, check_grouping, check_layout, choose_resume, restore
from distseg.training.run import Run
from distseg.training.timing import RunClock


def take_lease(cfg: Config, acc) -> Lease | None:
    """Rank 0 takes the run folder's lease (distseg/runs/run_lock.py) before anything is read or written
    there; when another live run holds it, every rank raises the same RunLocked."""
    lease, refusal = None, ""
    if acc.is_main_process:
        try:
            lease = acquire(RunDir.of(cfg), acc.print)
        except RunLocked as e:
            refusal = str(e)
    if acc.num_processes > 1:
        box = [refusal]
        broadcast_object_list(box)
        refusal = box[0]
    if refusal:
        raise RunLocked(refusal)
    return lease


def read_inputs(cfg: Config, acc, scheme: Scheme):
    """The loaders and the checkpoint to resume from with its state, all validated. Every rank reads the
    same files with the same settings, so a mistake here is the same on every rank: reported once."""
    try:
        train_loader = build_loader(cfg, cfg.data.train_split, acc, scheme, train=True)
        val_loader = build_loader(cfg, cfg.data.val_split, acc, scheme, train=False)
        resume_from = choose_resume(cfg, acc.print)
        state = read_state(resume_from) if resume_from else RunState(config=cfg.name)
        if resume_from is not None:
            check_layout(cfg, acc.num_processes, resume_from, state, acc.print, train_loader.shares,
                         train_loader.stream_sizes, train_loader.num_samples)
    except UserError as e:
        e.collective = True
        raise
    return train_loader, val_loader, resume_from, state


def choose_grouping(cfg: Config, acc, resume_from, state: RunState) -> Grouping:
    """The parameter grouping of this start: a new run's from the config, a resumed run's own
    (training/resume.check_grouping); a refusal is the same on every rank."""
    try:
        return check_grouping(cfg, resume_from, state, acc.print) if resume_from else \
            requested_grouping(cfg.optim)
    except UserError as e:
        e.collective = True
        raise


def make_groups(model: torch.nn.Module, grouping: Grouping, resume_from, state: RunState) -> list[ParamGroup]:
    """The optimizer's parameter groups, recorded in the run state with their sizes (a run made before
    grouping was recorded stays so: one group on every resume); a setting that does not fit the model, or
    groups that do not fit the checkpoint, are the same on every rank."""
    try:
        groups = build_param_groups(model, grouping)
        if resume_from is not None:
            check_group_sizes(resume_from, state, groups)
    except UserError as e:
        e.collective = True
        raise
    if resume_from is None or state.grouping is not None:
        state.grouping = grouping.record(groups)
    return groups


def print_rare_classes(run: Run) -> None:
    """Which classes rare sampling draws, and which it leaves out although the split has their pixels (no
    sample holds more than data.rare_min_pixels of them): a too high minimum would otherwise go unseen."""
    names, drawn = run.scheme.class_names, run.train_loader.drawable_classes()
    pixels = run.train_loader.class_pixels()
    left = [names[k] for k in range(len(names)) if k not in drawn and pixels[k] > 0]
    run.log.print(f"rare sampling draws {', '.join(names[k] for k in drawn)}"
                  + (f"; left out (no sample above data.rare_min_pixels={run.cfg.data.rare_min_pixels} "
                     f"pixels): {', '.join(left)}" if left else ""))


def print_groups(run: Run, grouping: Grouping, resumed: bool) -> None:
    """Each group's tensors, parameters, base learning rate and the weight decay its optimizer group applies
    (a resumed optimizer keeps the decay it was saved with), once at the start."""
    kept = " (the run's own)" if resumed else ""
    run.log.print(f"parameter groups: {grouping.describe()}{kept}")
    for g, opt_group in zip(run.groups, run.optimizer.param_groups, strict=True):
        run.log.print(g.line(run.cfg.optim.lr, opt_group["weight_decay"]))


def prepare_run_dir(cfg: Config, acc) -> None:
    """Rank 0: move an old run aside (train.resume=fresh), then write the resolved config. Called only after
    every input was validated, so a start that fails early leaves nothing behind."""
    run = RunDir.of(cfg)
    if acc.is_main_process:
        if cfg.train.resume == "fresh" and run.path.exists() and any(run.path.iterdir()):
            aside = run.path.with_name(f"{run.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
            run.path.rename(aside)
            print(f"moved the earlier run aside to {aside}", flush=True)
        run.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run.config, dump_config(cfg))
    acc.wait_for_everyone()


def init_weights(cfg: Config, model: torch.nn.Module, acc) -> None:
    """Fine-tuning: load train.init_from into the matching tensors (a new 1x1 head with train.reset_head)."""
    sd = load_weights(cfg.train.init_from)
    own = model.state_dict()
    keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape
            and not (cfg.train.reset_head and k.startswith("head."))}
    body = [k for k in own if not k.startswith("head.")]
    if sum(k in keep for k in body) < len(body) / 2:
        raise UserError(f"{cfg.train.init_from} does not fit this model: {sum(k in keep for k in body)} of "
                        f"{len(body)} tensors match (model.encoder / model.base / model.depth differ?)")
    model.load_state_dict(keep, strict=False)
    acc.print(f"initialised {len(keep)}/{len(own)} tensors from {cfg.train.init_from}"
              f"{' (new head)' if cfg.train.reset_head else ''}")


def warn_about_settings(cfg: Config, acc, max_steps: int) -> None:
    """Settings that silently make a run learn nothing or run slowly."""
    if cfg.sched.warmup_steps >= max_steps:
        acc.print(f"warning: sched.warmup_steps={cfg.sched.warmup_steps} >= the run's {max_steps} steps: the "
                  "learning rate never reaches optim.lr (it ends at "
                  f"{lr_at(max_steps - 1, cfg, max_steps):.2e}); "
                  "lower sched.warmup_steps")
    if acc.device.type == "cpu" and cfg.train.mixed_precision != "no":
        acc.print(f"note: train.mixed_precision={cfg.train.mixed_precision} runs as CPU autocast here "
                  "(no GPU): slower than on a GPU, and not what a GPU run computes bit for bit")


def make_ema(cfg: Config, acc, model: torch.nn.Module):
    """An exponential moving average of the weights (and BN buffers), registered with Accelerate so that a
    checkpoint holds it and a resume restores it exactly; None when train.ema_decay is 0."""
    if not cfg.train.ema_decay:
        return None
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    ema = AveragedModel(acc.unwrap_model(model), multi_avg_fn=get_ema_multi_avg_fn(cfg.train.ema_decay),
                        use_buffers=True)
    acc.register_for_checkpointing(ema)
    return ema


def prepare_model(cfg: Config, acc, model: torch.nn.Module, groups: list[ParamGroup]):
    """Model and optimizer on the device: SyncBatchNorm across GPUs, channels_last, DDP, torch.compile. Both
    conversions keep the parameter objects, so the groups made before them still hold the model's."""
    on_cuda = acc.device.type == "cuda"
    if cfg.model.norm == "sync_batch" and acc.num_processes > 1 and on_cuda:
        model = sync_batchnorm(model)
    if on_cuda and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, groups, on_cuda)
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    return model, optimizer


class FinishedEarlier(Exception):
    """The run folder holds a run that already reached its last step: nothing is done (exit status 0)."""


def backends(cfg: Config, acc) -> None:
    """cuDNN autotuning (fixed input shapes: crops) and TF32 on CUDA; train.deterministic turns to
    deterministic algorithms (an op without a deterministic kernel warns once rather than stopping)."""
    if acc.device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True


def step_plan(cfg: Config, train_loader) -> int:
    """The run's optimizer steps."""
    return cfg.train.max_steps or cfg.train.epochs * math.ceil(len(train_loader) / cfg.train.grad_accum)


def finished_earlier(cfg: Config, state: RunState, scheme: Scheme) -> FinishedEarlier:
    """The one line a rerun of a finished run prints."""
    best = f"best {headline_name(scheme)} {percent(state.best_score, unit='%')} at epoch {state.best_epoch}" \
        if state.best_score >= 0 else "no validation"
    return FinishedEarlier(f"{RunDir.of(cfg).path} finished earlier: {state.epoch} epochs ({state.step} "
                           f"steps), {best}; nothing to do (raise train.epochs to continue it)")


def setup(cfg: Config, acc, lease: Lease | None) -> Run:
    """Loaders, model, optimizer and resume state, validated before anything is written to the run folder
    (a finished run is left as it is: FinishedEarlier)."""
    clock = RunClock(acc.device.type == "cuda", acc.num_processes)
    backends(cfg, acc)
    scheme = get_scheme(cfg.data.scheme)
    train_loader, val_loader, resume_from, state = read_inputs(cfg, acc, scheme)
    max_steps = step_plan(cfg, train_loader)
    if resume_from is not None and state.step >= max_steps:
        raise finished_earlier(cfg, state, scheme)
    run, grouping = build_run(cfg, acc, train_loader, val_loader, state, max_steps, clock, lease, resume_from)
    run.log.print(f"training {cfg.name}: {train_loader.num_samples} train / {val_loader.num_samples} val "
                  f"samples, {acc.num_processes} process(es) on {acc.device.type}, {len(train_loader)} "
                  f"batches/epoch/process, {max_steps} steps, mixed precision {acc.mixed_precision}"
                  f"{f'; streams: {describe_streams(state.streams)}' if state.streams else ''}"
                  f"{f'; sampling: {describe_sampling(state.sampling)}' if state.sampling else ''}")
    print_groups(run, grouping, resume_from is not None)
    if run.trackers.describe():
        run.log.print(run.trackers.describe())
    if state.sampling:
        print_rare_classes(run)
    return run


def build_run(cfg: Config, acc, train_loader, val_loader, state: RunState, max_steps: int, clock: RunClock,
              lease: Lease | None = None, resume_from=None) -> tuple[Run, Grouping]:
    """The run of validated inputs: model (seeded by train.seed), parameter groups, optimizer, prepared as
    training prepares them, the EMA, the resumed state, and the `Run` around them; rank 0 writes the run
    folder here. `setup` calls it, and `distseg bench train` builds the step it times with it (synthetic
    loaders, a throwaway run folder), so the bench's step is the one a run takes."""
    grouping = choose_grouping(cfg, acc, resume_from, state)
    torch.manual_seed(cfg.train.seed)
    # a resume loads every tensor from its checkpoint: no need for the pretrained weights again
    model = build_model(cfg, out_channels(cfg, get_scheme(cfg.data.scheme).num_classes),
                        pretrained=resume_from is None)
    if cfg.train.init_from and resume_from is None:
        init_weights(cfg, model, acc)
    groups = make_groups(model, grouping, resume_from, state)
    prepare_run_dir(cfg, acc)
    model, optimizer = prepare_model(cfg, acc, model, groups)
    ema = make_ema(cfg, acc, model)
    if resume_from is not None:
        restore(acc, resume_from, state, train_loader)
    warn_about_settings(cfg, acc, max_steps)
    run = Run.assemble(cfg, acc, model, optimizer, groups, train_loader, val_loader, state, max_steps,
                       clock=clock, ema=ema, lease=lease, resumed=resume_from is not None,
                       provenance=provenance(cfg) if acc.is_main_process else {})
    return run, grouping
