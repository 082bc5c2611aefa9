"""Training entry: `accelerate launch distseg/train.py --config configs/X.yaml [section.key=value ...]`.

Also importable (`distseg.train.main(argv)`) and run by `distseg train`. Read `train()` top to bottom:
`setup` builds everything and decides where to resume; `train_one_epoch` runs optimizer steps until the
epoch ends, `max_steps` is reached or a stop is requested; `validate` scores the val split through the one
inference path (distseg/inference.py); `checkpoint` saves atomically; `finish` writes the summary.

Accelerate owns devices, DDP, mixed precision and checkpoint state; this loop owns sample-exact data,
global loss normalisation, gradient accumulation, poly LR, mid-epoch resume, TensorBoard and the summary.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # started as a script: make the package importable by absolute name
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from accelerate.utils import broadcast_object_list

from distseg.checkpoint import (
    NotWritten,
    RunState,
    all_ranks_wrote,
    damage,
    latest_checkpoint,
    list_checkpoints,
    load_weights,
    read_state,
    save_checkpoint,
    save_weights,
)
from distseg.config import Config, dump_config, load_config
from distseg.data.loader import build_loader, masked_targets
from distseg.errors import UserError, describe_os_error, write_reason
from distseg.files import atomic_write_json, atomic_write_text
from distseg.inference import InferenceSpec, Segmenter
from distseg.labels import Scheme, get_scheme
from distseg.losses import SegLoss, build_loss
from distseg.metrics import format_table
from distseg.models import build_model, out_channels
from distseg.optim import build_optimizer, lr_at
from distseg.run_lock import Lease, RunLocked, acquire
from distseg.step_log import StepLogger
from distseg.stopping import StopFlag, die_with_launcher
from distseg.tb import denormalize, make_writer, panel
from distseg.validation import score_loader

EXIT_PREEMPTED = 75  # checkpoint written on SIGUSR1/SIGTERM: requeue me
EXIT_DIVERGED = 3
# settings that change the weights' shapes or meaning: a run cannot resume across a change of these
MODEL_KEYS = ("model.encoder", "model.base", "model.depth", "model.norm", "data.scheme")
# the slots of train_step's all-reduced vector: sums over ranks of this step's numbers and stop reasons
LOSS_SUM, NORM, IMAGES, CORRUPT, NONFINITE, STOP, CTRL_C, LEASE_LOST, EVENTS_FAILED, LR = range(10)


class Diverged(UserError):
    """The loss became NaN or infinite: training stops on every rank (exit status 3)."""

    collective = True


@dataclass
class Run:
    """Everything one training run holds; built by `setup`, advanced by the steps below."""

    cfg: Config
    acc: object  # accelerate.Accelerator
    scheme: Scheme
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_fn: SegLoss
    train_loader: object
    val_loader: object
    segmenter: Segmenter  # validation's: the EMA weights when the run keeps an average
    state: RunState
    max_steps: int
    log: StepLogger
    tb: object
    stop: StopFlag
    last_scores: dict | None = None
    preempted: bool = False
    interrupted: bool = False  # the stop was a Ctrl-C (exit 130) rather than a scheduler's (75)
    lease: Lease | None = None  # rank 0's hold on the run folder
    corrupt: int = 0  # samples skipped as undecodable (data.on_corrupt=skip) this epoch, all ranks
    ema: object = None  # torch.optim.swa_utils.AveragedModel of the weights (train.ema_decay > 0)

    @property
    def ckpt_dir(self) -> Path:
        """runs/<name>/checkpoints."""
        return self.cfg.run_dir / "checkpoints"


# --- setup -----------------------------------------------------------------------------------------

def model_differences(saved: Config, cfg: Config) -> list[str]:
    """Settings in MODEL_KEYS that differ between a run's saved config and this one, as `key old -> new`."""
    out = []
    for key in MODEL_KEYS:
        sec, name = key.split(".")
        a, b = getattr(getattr(saved, sec), name), getattr(getattr(cfg, sec), name)
        if a != b:
            out.append(f"{key} {a} -> {b}")
    if not out:
        n = get_scheme(cfg.data.scheme).num_classes
        a, b = out_channels(saved, n), out_channels(cfg, n)
        if a != b:
            out.append(f"model outputs {a} -> {b} (loss.bce alone uses one logit)")
    return out


def choose_resume(cfg: Config, log) -> Path | None:
    """The checkpoint to resume from (None: a fresh start), after checking the run folder may be used: the
    newest complete and undamaged one; a damaged one is reported by name and the previous one taken."""
    run_dir, r = cfg.run_dir, cfg.train.resume
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if r not in ("auto", "never", "fresh"):
        problem = damage(Path(r)) if Path(r).is_dir() else f"{r} is not a checkpoint folder"
        if problem:
            raise UserError(f"cannot resume from {r}: {problem}")
        return Path(r)
    if r == "never" and ckpts:
        raise UserError(f"{run_dir} holds checkpoints of an earlier run (newest: {ckpts[-1].name}): "
                        "continue it with train.resume=auto, move it aside and start again with "
                        "train.resume=fresh, or choose another name=...")
    if r != "auto" or not ckpts:
        return None
    saved_cfg = run_dir / "config.yaml"
    if saved_cfg.is_file():
        try:
            diff = model_differences(load_config(saved_cfg), cfg)
        except UserError:
            diff = []
        if diff:
            raise UserError(f"{run_dir} was trained with other model settings ({'; '.join(diff)}): resume "
                            "with the old settings, or start a new run with name=... or train.resume=fresh")
    for ck in reversed(ckpts):
        problem = damage(ck)
        if problem is None:
            return ck
        log(f"warning: checkpoint {ck} is damaged ({problem}): resuming from the one before it")
    raise UserError(f"every checkpoint in {run_dir / 'checkpoints'} is damaged: start again with "
                    "train.resume=fresh")


def prepare_run_dir(cfg: Config, acc) -> None:
    """Rank 0: move an old run aside (train.resume=fresh), then write the resolved config. Called only after
    every input was validated, so a start that fails early leaves nothing behind."""
    run_dir = cfg.run_dir
    if acc.is_main_process:
        if cfg.train.resume == "fresh" and run_dir.exists() and any(run_dir.iterdir()):
            aside = run_dir.with_name(f"{run_dir.name}.old-{datetime.now():%Y%m%d-%H%M%S}")
            run_dir.rename(aside)
            print(f"moved the earlier run aside to {aside}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
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


def take_lease(cfg: Config, acc) -> Lease | None:
    """Rank 0 takes the run folder's lease (distseg/run_lock.py) before anything is read or written there;
    when another live run holds it, every rank raises the same RunLocked."""
    lease, refusal = None, ""
    if acc.is_main_process:
        try:
            lease = acquire(cfg.run_dir, acc.print)
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
            check_layout(cfg, acc, resume_from, state)
    except UserError as e:
        e.collective = True
        raise
    return train_loader, val_loader, resume_from, state


def setup(cfg: Config, acc, lease: Lease | None) -> Run:
    """Loaders, model, optimizer and resume state, validated before anything is written to the run folder."""
    on_cuda = acc.device.type == "cuda"
    if on_cuda:  # fixed input shapes (crops): let cuDNN pick the fastest kernels; TF32 for fp32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    scheme = get_scheme(cfg.data.scheme)
    train_loader, val_loader, resume_from, state = read_inputs(cfg, acc, scheme)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes))
    if cfg.train.init_from and resume_from is None:
        init_weights(cfg, model, acc)
    prepare_run_dir(cfg, acc)

    if cfg.model.norm == "sync_batch" and acc.num_processes > 1 and on_cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if on_cuda and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model.parameters(), on_cuda)
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    ema = make_ema(cfg, acc, model)
    if resume_from is not None:
        restore(acc, resume_from, state, train_loader)

    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.grad_accum)
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    state.world, state.batch_size, state.shuffle = acc.num_processes, cfg.data.batch_size, cfg.data.shuffle
    state.grad_accum = cfg.train.grad_accum
    warn_about_settings(cfg, acc, max_steps)
    tb = make_writer(cfg.run_dir / "tb", acc.is_main_process)
    log = StepLogger(tb, cfg.train.log_every, max_steps, state.step, math.ceil(max_steps / steps_per_epoch),
                     cfg.name, acc.is_main_process, cfg.train.progress)
    segmenter = Segmenter(ema.module if ema is not None else model, InferenceSpec.from_config(cfg),
                          cfg.data.mean, cfg.data.std, acc.device, cfg.train.mixed_precision,
                          cfg.model.channels_last)
    log.print(f"training {cfg.name}: {train_loader.num_samples} train / {val_loader.num_samples} val "
              f"samples, {acc.num_processes} process(es) on {acc.device.type}, {len(train_loader)} "
              f"batches/epoch/process, {max_steps} steps, mixed precision {acc.mixed_precision}")
    loss_fn = build_loss(cfg, scheme, train_loader.man, acc.device)
    return Run(cfg, acc, scheme, model, optimizer, loss_fn, train_loader, val_loader, segmenter, state,
               max_steps, log, tb, StopFlag(), ema=ema, lease=lease)


def check_layout(cfg: Config, acc, ckpt: Path, state: RunState) -> None:
    """Resuming in another layout (processes x data.batch_size x train.grad_accum): allowed when the global
    batch is the same, and then the interrupted epoch continues exactly where it stopped, each sample once
    (the global shuffle is one permutation cut into global batches, whatever their split over processes).
    A different global batch would change what a step is, the step count and the learning-rate schedule:
    refused. Shard-window shuffling assigns shards per rank: it resumes mid-epoch only in its own layout."""
    old = (state.world, state.batch_size, state.grad_accum)
    new = (acc.num_processes, cfg.data.batch_size, cfg.train.grad_accum)
    if old == new or not state.batch_size:
        return
    layout = "{} process(es) x data.batch_size {} x train.grad_accum {}".format
    if math.prod(old) != math.prod(new):
        raise UserError(f"{ckpt} was trained with a global batch of {math.prod(old)} ({layout(*old)}), this "
                        f"start has {math.prod(new)} ({layout(*new)}): choose data.batch_size and "
                        f"train.grad_accum so that processes x batch x accumulation = {math.prod(old)}, "
                        "or start a new run with name=...")
    if state.batch_in_epoch and "shards" in (state.shuffle, cfg.data.shuffle):
        raise UserError(f"{ckpt} stopped mid-epoch with data.shuffle={state.shuffle}, {layout(*old)}: with "
                        "data.shuffle=shards each rank reads its own shard windows, so resume mid-epoch in "
                        "that same layout, or from an epoch-end checkpoint")
    consumed = state.batch_in_epoch * old[0] * old[1]  # samples of this epoch already trained on
    state.batch_in_epoch = consumed // (new[0] * new[1])
    acc.print(f"resuming {layout(*old)} as {layout(*new)}: the same global batch of {math.prod(new)}")


def restore(acc, ckpt: Path, state: RunState, train_loader) -> None:
    """Accelerate's state (weights, optimizer, RNG) and, where the loader keeps one, its position."""
    acc.load_state(str(ckpt))
    loader_state = ckpt / f"loader_state_{acc.process_index}"
    if hasattr(train_loader, "load_state_dict"):
        if loader_state.is_file() and state.world == acc.num_processes:
            train_loader.load_state_dict(loader_state.read_bytes())
        elif state.batch_in_epoch:
            raise UserError(f"{ckpt} was written with another loader or process count; the DALI reader "
                            "position cannot be restored mid-epoch (resume from an epoch-end checkpoint)")
    acc.print(f"resumed from {ckpt} (step {state.step}, epoch {state.epoch + 1}, batch "
              f"{state.batch_in_epoch})")


# --- the loop --------------------------------------------------------------------------------------

def train_step(run: Run, group: list[dict]) -> torch.Tensor:
    """Forward/backward over one accumulation group, then one optimizer step. The loss is normalised by the
    labelled pixels (summed class weights; OHEM: kept pixels) of the whole group on all ranks, so grad_accum
    and world size do not change the gradient. Returns the all-reduced [pixel loss sum, normaliser, images,
    corrupt samples, non-finite, stop, Ctrl-C, lease lost, TensorBoard write failed, lr]."""
    acc, model, world, loss_fn = run.acc, run.model, run.acc.num_processes, run.loss_fn
    masks = [masked_targets(b) for b in group]
    after = loss_fn.count_after_forward  # OHEM: the kept pixels are known only after each forward
    n_global = torch.stack([loss_fn.norm_count(m) for m in masks]).sum()
    if world > 1 and not after:
        n_global = acc.reduce(n_global, reduction="sum")
    sums = torch.zeros(4, device=acc.device)  # pixel loss sum, normaliser, images, corrupt (this rank)
    for k, (b, mask) in enumerate(zip(group, masks)):
        x = b["image"]
        if run.segmenter.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (nullcontext() if k == len(group) - 1 or world == 1 else acc.no_sync(model)):
            with acc.autocast():
                logits = model(x)
            pix, count = loss_fn.pixel_sum(logits, mask)
            scale = world if after else world / n_global.clamp(min=1e-12)  # DDP averages: x world
            acc.backward(pix * scale + loss_fn.mean_terms(logits, mask) / len(group))
        corrupt = b["corrupt"].sum().float().to(acc.device) if "corrupt" in b else sums[CORRUPT] * 0
        sums += torch.stack([pix.detach().float(), count.to(acc.device), b["valid"].sum().float(), corrupt])
    lost = run.lease is not None and run.lease.lost_to is not None
    flags = torch.cat([sums, torch.tensor([float(not torch.isfinite(sums[LOSS_SUM])), float(run.stop.set),
                                           float(run.stop.interrupted), float(lost),
                                           float(run.tb.failure is not None)], device=acc.device)])
    if world > 1:
        flags = acc.reduce(flags, reduction="sum")
    if flags[LEASE_LOST] > 0:
        holder = run.lease.lost_to.describe() if lost else "another process"
        raise RunLocked(f"the lease of {run.cfg.run_dir} was taken over by {holder}: this run stops here "
                        "without writing anything more")
    if flags[EVENTS_FAILED] > 0:
        raise events_not_written(run)
    if flags[NONFINITE] > 0:
        last = latest_checkpoint(run.ckpt_dir) or "none"
        raise Diverged(f"loss is not finite at step {run.state.step + 1} (epoch {run.state.epoch + 1}): "
                       f"training stopped; last good checkpoint: {last}. Lower optim.lr, add "
                       "train.clip_grad, or use train.mixed_precision=bf16 instead of fp16")
    if after:  # gradients are linear in the loss: divide them by the kept pixels of all ranks and steps
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(flags[NORM].clamp(min=1e-12))
    lr = lr_at(run.state.step, run.cfg, run.max_steps)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    if run.cfg.train.clip_grad > 0:
        acc.clip_grad_norm_(model.parameters(), run.cfg.train.clip_grad)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update_parameters(acc.unwrap_model(model))
    return torch.cat([flags, torch.tensor([lr], device=flags.device)])


def train_one_epoch(run: Run) -> None:
    """Optimizer steps from the state's position until the epoch ends, max_steps, or a stop request."""
    st, cfg = run.state, run.cfg
    run.train_loader.set_epoch(st.epoch, st.batch_in_epoch)
    it = iter(run.train_loader)
    per_epoch = len(run.train_loader)
    while st.batch_in_epoch < per_epoch:
        t0 = time.time()
        n = min(cfg.train.grad_accum, per_epoch - st.batch_in_epoch)
        group = [b for b in (next(it, None) for _ in range(n)) if b is not None]
        run.log.waited(time.time() - t0)
        if not group:
            break
        flags = train_step(run, group)
        st.step += 1
        st.batch_in_epoch += len(group)
        st.samples += int(flags[IMAGES])
        run.corrupt += int(flags[CORRUPT])
        loss = float(flags[LOSS_SUM] / flags[NORM].clamp(min=1))
        run.log.step(st.step, st.epoch + 1, loss, float(flags[LR]), int(flags[IMAGES]))
        if flags[STOP] > 0:
            run.interrupted = bool(flags[CTRL_C] > 0)
            run.log.print(f"{'interrupted' if run.interrupted else 'stop requested'}: checkpointing at step "
                          f"{st.step} (a second Ctrl-C exits at once, without it)")
            ck = checkpoint(run)
            if run.acc.is_main_process and run.stop.file:  # tells slurm/train.sh the checkpoint is complete
                atomic_write_text(Path(run.stop.file + ".done"), f"{ck}\n")
            run.preempted = True
            run.log.print(f"checkpoint {ck} is complete: run the same command again to resume")
            return
        if st.step >= run.max_steps:
            return
        if cfg.train.ckpt_every and st.step % cfg.train.ckpt_every == 0 and st.batch_in_epoch < per_epoch:
            checkpoint(run)


def report_corrupt(run: Run) -> None:
    """After an epoch with data.on_corrupt=skip: how many samples could not be decoded and were left out."""
    if run.corrupt:
        run.log.print(f"warning: epoch {run.state.epoch}: {run.corrupt} sample(s) could not be decoded and "
                      "were left out (data.on_corrupt=skip)")
        run.tb.add_scalar("data/corrupt_skipped", run.corrupt, run.state.step)
    run.corrupt = 0


def score_of(scheme: Scheme, scores: dict) -> tuple[str, float]:
    """The number that picks the best checkpoint: mIoU, or the foreground IoU of a binary scheme."""
    if scheme.num_classes == 2:
        return "foreground IoU", scores["iou"].get(1, math.nan)
    return "mIoU", scores["miou"]


def validate(run: Run) -> None:
    """Score the val split (every image once, whatever the number of ranks); log it; keep the best weights."""
    st, scheme, main = run.state, run.scheme, run.acc.is_main_process
    cm, examples = score_loader(run.segmenter, run.val_loader, scheme, run.acc,
                                run.cfg.train.tb_images if main else 0)
    scores = cm.scores(scheme.eval_classes)
    run.last_scores = scores
    name, score = score_of(scheme, scores)
    run.tb.add_scalar("val/mIoU", scores["miou"], st.step)
    run.tb.add_scalar("val/pixel_acc", scores["pixel_acc"], st.step)
    for c, v in scores["iou"].items():
        if not math.isnan(v):
            run.tb.add_scalar(f"val_iou/{scheme.class_names[c]}", v, st.step)
    pal = scheme.palette()
    for i, (img, gt, pred) in enumerate(examples):
        rgb = denormalize(img, run.cfg.data.mean, run.cfg.data.std)
        picture = panel(rgb, gt.numpy().astype("uint8"), pred.numpy().astype("uint8"), pal)
        run.tb.add_image(f"val/example_{i}", picture, st.step, dataformats="HWC")
    st.history.append({"epoch": st.epoch, "step": st.step, "score": None if math.isnan(score) else score})
    run.log.print(f"epoch {st.epoch} step {st.step}: val {name} {100 * score:.2f}, mIoU "
                  f"{100 * scores['miou']:.2f}, pixel acc {100 * scores['pixel_acc']:.2f} "
                  f"({scores['pixels']} px)")
    if score > st.best_score:
        st.best_score, st.best_step, st.best_epoch = score, st.step, st.epoch
        failure = None
        if main:
            meta = {"step": st.step, "epoch": st.epoch, "score": score, "score_name": name,
                    "miou": scores["miou"], "scheme": scheme.describe(), "config": run.cfg.name,
                    "ema": run.ema is not None}
            try:
                save_weights(run.acc.unwrap_model(run.model).state_dict(), run.cfg.run_dir / "best", meta,
                             ema_state(run))
            except Exception as e:  # a full disk: reported on every rank, the previous best stays
                failure = e
        all_ranks_wrote(run.acc, failure, f"the best weights {run.cfg.run_dir / 'best'}", run.ckpt_dir)
    run.acc.wait_for_everyone()


def checkpoint(run: Run) -> Path:
    """Save a checkpoint on all ranks (collective), with the loader's own position where it has one."""
    loader = run.train_loader
    extra = {"loader_state": loader.state_dict()} if hasattr(loader, "state_dict") else None
    return save_checkpoint(run.acc, run.ckpt_dir, run.state, run.cfg.train.keep_last, extra, ema_state(run))


def ema_state(run: Run) -> dict | None:
    """The averaged model's weights (what evaluate, predict and export load by default), or None."""
    return run.ema.module.state_dict() if run.ema is not None else None


def events_not_written(run: Run) -> NotWritten:
    """The error for a failed TensorBoard write (a full disk), naming what a rerun resumes from."""
    failure = run.tb.failure
    reason = "failed on rank 0" if failure is None else write_reason(failure, run.cfg.run_dir)
    return NotWritten.naming_last(f"TensorBoard events to {run.cfg.run_dir / 'tb'}", reason, run.ckpt_dir)


def finish(run: Run) -> dict:
    """Write summary.json (valid JSON: absent classes are null) and print the final table on rank 0."""
    st, scheme = run.state, run.scheme
    s = run.last_scores
    summary = {"name": run.cfg.name, "steps": st.step, "epochs": st.epoch, "best_score": st.best_score,
               "best_score_name": score_of(scheme, s)[0] if s else None, "best_epoch": st.best_epoch,
               "best_step": st.best_step, "final_miou": s["miou"] if s else None,
               "final_pixels": s["pixels"] if s else None, "seconds": time.time() - run.log.t_start,
               "img_per_s": run.log.throughput(), "processes": run.acc.num_processes,
               "preempted": run.preempted, "interrupted": run.interrupted,
               "finished": not run.preempted and st.step >= run.max_steps,
               "final_iou": {scheme.class_names[c]: v for c, v in s["iou"].items()} if s else {},
               "history": st.history}
    if run.acc.is_main_process:
        atomic_write_json(run.cfg.run_dir / "summary.json", summary)
        if s and not run.preempted:
            print(format_table(s, scheme.class_names))
            best = f"{score_of(scheme, s)[0]} {100 * st.best_score:.2f} (epoch {st.best_epoch})"
            print(f"steps {st.step}  epochs {st.epoch}  best {best}  time {summary['seconds']:.0f}s  "
                  f"processes {run.acc.num_processes}  -> {run.cfg.run_dir}")
    run.tb.close()
    if run.tb.failure is not None:
        raise events_not_written(run)
    return summary


def train(cfg: Config, acc) -> dict:
    """Run (or resume) training to max_steps, holding the run folder's lease; returns the summary."""
    lease = take_lease(cfg, acc)
    try:
        run = setup(cfg, acc, lease)
        st = run.state
        while st.step < run.max_steps and not run.preempted:
            train_one_epoch(run)
            if run.preempted:
                break
            if st.batch_in_epoch >= len(run.train_loader):  # the epoch is complete
                st.epoch += 1
                st.batch_in_epoch = 0
                report_corrupt(run)
                if st.epoch % cfg.train.val_every == 0 or st.step >= run.max_steps:
                    validate(run)
                checkpoint(run)
            elif st.step >= run.max_steps:  # stopped inside an epoch by max_steps
                validate(run)
                checkpoint(run)
        run.log.close()
        if not run.preempted and run.last_scores is None:
            validate(run)
        return finish(run)
    finally:
        if lease is not None:
            lease.release()


# --- entry -----------------------------------------------------------------------------------------

class _Args(argparse.ArgumentParser):
    """argparse with its errors as distseg's one `error:` line (exit status 2) instead of usage + message."""

    def error(self, message):
        if "unrecognized arguments: --" in message:
            message += " (settings are written section.key=value, without dashes: e.g. train.epochs=2)"
        raise UserError(message)


def parse_args(argv):
    """--config and dotted overrides."""
    ap = _Args(prog="distseg train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", default=None, help="YAML config (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 data.batch_size=4")
    return ap.parse_args(argv)


def print_error(e: BaseException, acc, cfg: Config | None) -> None:
    """Print an error as one line: once for an error every rank raises alike (rank 0), else on each rank
    that has it. Errors before the Accelerator exists (arguments, config) are alike on every rank."""
    collective = acc is None or getattr(e, "collective", False)
    if collective and not (acc.is_main_process if acc is not None else os.environ.get("RANK", "0") == "0"):
        return
    if isinstance(e, OSError):  # a write failed: say where, and what a rerun resumes from
        last = latest_checkpoint(cfg.run_dir / "checkpoints") if cfg is not None else None
        text = f"{describe_os_error(e)}{f'; the newest complete checkpoint is {last}' if last else ''}"
    else:
        text = str(e)
    print(f"error: {text}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Train; returns the exit status (0, 2 user error, 3 diverged, 75 preempted, 130 interrupted)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    die_with_launcher()
    code, acc, cfg = 0, None, None
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
        set_seed(cfg.train.seed)
        summary = train(cfg, acc)
        code = 130 if summary["interrupted"] else EXIT_PREEMPTED if summary["preempted"] else 0
    except (UserError, OSError) as e:
        print_error(e, acc, cfg)
        code = EXIT_DIVERGED if isinstance(e, Diverged) else 2
    except KeyboardInterrupt:
        print("interrupted (no checkpoint written: the run resumes from its newest checkpoint)",
              file=sys.stderr)
        code = 130
    multi = acc is not None and acc.num_processes > 1
    if acc is not None:
        acc.end_training()
    sys.stdout.flush()
    sys.stderr.flush()
    if multi:  # a clean exit of several gloo/NCCL processes sometimes aborts in teardown (SIGABRT)
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
