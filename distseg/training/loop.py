"""The training loop. Read `train()` top to bottom: `setup` (distseg/training/setup.py) builds everything and
decides where to resume; `train_one_epoch` runs optimizer steps until the epoch ends, `max_steps` is reached
or a stop is requested; `validate` scores the val split through the one inference path; `checkpoint` saves
atomically; `finish` writes the summary.

Accelerate owns devices, DDP, mixed precision and checkpoint state; this loop owns sample-exact data,
global loss normalisation, gradient accumulation, poly LR, mid-epoch resume, TensorBoard and the summary.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from datetime import datetime
from pathlib import Path

import torch
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

from distseg import run_files as files
from distseg.config import Config
from distseg.data.batch import Batch, masked_targets
from distseg.errors import UserError, write_reason
from distseg.files import atomic_write_text
from distseg.inference.metrics import category_iou, format_table, headline, headline_name, percent
from distseg.inference.scoring import score_loader
from distseg.inference.visual import denormalize, panel
from distseg.models.optim import lr_at, set_lr
from distseg.models.weights import save_weights
from distseg.runs.checkpoint import NotWritten, all_ranks_wrote, latest_checkpoint
from distseg.runs.run_lock import Lease, RunLocked
from distseg.runs.summary import RunSummary
from distseg.training.run import Run
from distseg.training.setup import FinishedEarlier, setup, take_lease
from distseg.training.step_flags import StepFlags, host_values
from distseg.training.step_log import duration


class Diverged(UserError):
    """The loss became NaN or infinite: training stops on every rank (exit status 3)."""

    collective = True


def train_step(run: Run, group: list[Batch]) -> torch.Tensor:
    """Forward/backward over one accumulation group, then one optimizer step. The loss is normalised by the
    labelled pixels (summed class weights; OHEM: kept pixels) of the whole group on all ranks, so grad_accum
    and world size do not change the gradient. Returns the all-reduced StepFlags vector, on the device:
    nothing is read back here, so the host goes on to the next batch while the device works."""
    acc, model, world, loss_fn = run.acc, run.model, run.acc.num_processes, run.loss_fn
    run.clock.gpu.step_begins()
    masks = [masked_targets(b) for b in group]
    after = loss_fn.count_after_forward  # OHEM: the kept pixels are known only after each forward
    counts = [loss_fn.norm_count(m) for m in masks]
    # one micro-batch: the count itself (acc.reduce below returns a new tensor, counts[0] stays this rank's)
    n_global = counts[0] if len(counts) == 1 else torch.stack(counts).sum()
    if world > 1 and not after:
        n_global = acc.reduce(n_global, reduction="sum")
    sums = None
    for k, (b, mask) in enumerate(zip(group, masks)):
        x = b["image"]
        if run.segmenter.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with (nullcontext() if k == len(group) - 1 or world == 1 else acc.no_sync(model)):
            with run.autocast:
                logits = model(x)
            pix, count = loss_fn.pixel_sum(logits, mask, counts[k])
            if after:  # DDP averages the gradients: x world
                loss = pix * world if world > 1 else pix
            else:
                n = n_global.clamp(min=1e-12)
                loss = pix / n if world == 1 else pix * (world / n)
            if loss_fn.dice:  # terms already means over the micro-batch, averaged over the group
                loss = loss + loss_fn.mean_terms(logits, mask) / len(group)
            backward(acc, loss)
        micro = StepFlags.sums(acc.device, loss_sum=pix, norm=count, images=b["valid"].sum(),
                               corrupt=b["corrupt"].sum())
        sums = micro if sums is None else sums + micro
    flags = StepFlags.reduce(StepFlags.pack(sums, **host_values(run)), acc)
    if after:  # gradients are linear in the loss: divide them by the kept pixels of all ranks and steps
        kept = StepFlags.view(flags).norm.clamp(min=1e-12)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(kept)
    set_lr(run.optimizer, run.groups, lr_at(run.state.step, run.cfg, run.max_steps))
    if run.cfg.train.clip_grad > 0:
        acc.clip_grad_norm_(model.parameters(), run.cfg.train.clip_grad)
    step_optimizer(run.optimizer)
    if run.ema is not None:
        run.ema.update_parameters(acc.unwrap_model(model))
    run.clock.gpu.step_ends()
    return flags


def backward(acc, loss: torch.Tensor) -> None:
    """`acc.backward(loss)`. Accelerate divides the loss by its own gradient_accumulation_steps (an operator
    per micro-batch; distseg accumulates on its own, so always by 1) and scales it for fp16's GradScaler, or
    hands it to DeepSpeed / Megatron; in every other case it calls `loss.backward()`, which is called here
    directly: the same gradients, one operator and its Python fewer."""
    if acc.scaler is not None or acc.gradient_accumulation_steps != 1 or \
            acc.distributed_type in (DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        acc.backward(loss)
    else:
        loss.backward()


def step_optimizer(optimizer) -> None:
    """`optimizer.step()`, then its gradients dropped. Accelerate's AcceleratedOptimizer adds fp16's
    GradScaler and XLA's gradient sync, and otherwise calls the optimizer it wraps, after looking for a
    package on disk at every step (accelerate's is_lomo_available: importlib's find_spec) and an
    inspect.signature per zero_grad: ~0.5 ms of host time per step, a tenth of a launch-bound step on the
    CPU (`distseg bench train --launch-bound`). Without a scaler or XLA, and with gradients synchronised
    (distseg accumulates on its own), the wrapped optimizer is stepped directly: the same update. Only the
    plain wrapper qualifies: DeepSpeed's and Megatron's subclasses step inside backward, and their `step`
    must stay a no-op. The attributes read (`optimizer`, `scaler`, `gradient_state`, `accelerator_state`)
    were checked against accelerate 1.15.0, the pinned version."""
    if type(optimizer) is not AcceleratedOptimizer or optimizer.scaler is not None or \
            not optimizer.gradient_state.sync_gradients or \
            optimizer.accelerator_state.distributed_type == DistributedType.XLA:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return
    optimizer.optimizer.step()
    optimizer.optimizer.zero_grad(set_to_none=True)


def settle(run: Run, flags: torch.Tensor | None = None) -> None:
    """Act on the previous step's flags and hold `flags` (training/step_flags.py: read one step late); with
    no `flags`, on the held ones now (before a checkpoint, validation or the end). A lost lease, a failed
    TensorBoard write or a non-finite loss raises on every rank; a stop request sets
    `run.process.stop_asked`."""
    late, proc = run.process.late, run.process
    t0 = time.time()
    settled = late.take() if flags is None else late.swap(flags, run.state.step, run.state.epoch + 1)
    if settled is None:
        return
    if flags is None:  # read at once: the wait for the device to finish that step is part of its time
        run.log.spent(settled.step, time.time() - t0)
    f, step, epoch = settled.flags, settled.step, settled.epoch
    if f.lease_lost > 0:
        holder = run.lease.lost_to.describe() if run.lease and run.lease.lost_to else "another process"
        raise RunLocked(f"the lease of {run.dir.path} was taken over by {holder}: this run stops here "
                        "without writing anything more")
    if f.events_failed > 0:
        raise events_not_written(run)
    if f.nonfinite > 0:  # the weights after this step are not kept: no checkpoint is written past here
        last = latest_checkpoint(run.dir.checkpoints) or "none"
        raise Diverged(f"loss is not finite at step {step} (epoch {epoch}): training stopped; last good "
                       f"checkpoint: {last}. Lower optim.lr, add train.clip_grad, or use "
                       "train.mixed_precision=bf16 instead of fp16")
    run.writer.observe(f.ckpt_busy, f.ckpt_failed)
    run.state.samples += int(f.images)
    proc.corrupt += int(f.corrupt)
    lr = lr_at(step - 1, run.cfg, run.max_steps)
    logged = run.log.step(step, epoch, f.loss_sum / max(f.norm, 1), lr, int(f.images))
    if logged:
        run.trackers.log("train", logged, step)
    if f.stop > 0:
        proc.stop_asked, proc.interrupted = True, f.ctrl_c > 0


def train_one_epoch(run: Run) -> None:
    """Optimizer steps from the state's position until the epoch ends, max_steps, or a stop request."""
    st, cfg = run.state, run.cfg
    run.train_loader.set_epoch(st.epoch, st.batch_in_epoch)
    it = iter(run.train_loader)
    per_epoch = len(run.train_loader)
    run.clock.epoch_begins()
    while st.batch_in_epoch < per_epoch:
        t0 = time.time()
        n = min(cfg.train.grad_accum, per_epoch - st.batch_in_epoch)
        group = [b for b in (next(it, None) for _ in range(n)) if b is not None]
        waited = time.time() - t0
        run.clock.waited(waited)
        if not group:
            break
        flags = train_step(run, group)
        st.step += 1
        st.batch_in_epoch += len(group)
        settle(run, flags)
        run.clock.step_done(sum(len(b["key"]) for b in group))
        run.log.spent(st.step, time.time() - t0, waited)
        if st.step >= run.max_steps:  # the run's last step: its flags now (a stop it asked for is moot)
            settle(run)
            return
        if cfg.train.ckpt_every and st.step % cfg.train.ckpt_every == 0 and st.batch_in_epoch < per_epoch:
            checkpoint(run)
        if run.process.stop_asked:
            stop_here(run)
            return


def stop_here(run: Run) -> None:
    """A stop was requested on some rank (Ctrl-C, SIGUSR1/SIGTERM, the stop file): checkpoint on all ranks
    and wait for it, tell slurm/train.sh the checkpoint is complete, and end the run as preempted."""
    run.log.print(f"{'interrupted' if run.process.interrupted else 'stop requested'}: checkpointing at step "
                  f"{run.state.step} (a second Ctrl-C exits at once, without it)")
    checkpoint(run)
    ck = run.writer.wait()
    if run.acc.is_main_process and run.stop.file:
        atomic_write_text(Path(run.stop.file + ".done"), f"{ck}\n")
    run.process.preempted = True
    run.log.print(f"checkpoint {ck} is complete: run the same command again to resume")


def report_corrupt(run: Run) -> None:
    """After an epoch with data.on_corrupt=skip: how many samples could not be decoded and were left out."""
    proc = run.process
    if proc.corrupt:
        run.log.print(f"warning: epoch {run.state.epoch}: {proc.corrupt} sample(s) could not be decoded and "
                      "were left out (data.on_corrupt=skip)")
        run.tb.add_scalar("data/corrupt_skipped", proc.corrupt, run.state.step)
    proc.corrupt = 0


class TimedBatches:
    """A loader whose first batch is timed apart (start-up, first use of the shapes) from the rest."""

    def __init__(self, loader, cuda: bool):
        self.loader, self.cuda = loader, cuda
        self.start, self.first_done, self.first_images, self.images = time.time(), None, 0, 0

    def set_epoch(self, *args) -> None:
        """The loader's own."""
        self.loader.set_epoch(*args)

    def __iter__(self):
        for j, b in enumerate(self.loader):
            if j == 1:  # the first batch is done once the second is asked for
                if self.cuda:
                    torch.cuda.synchronize()
                self.first_done, self.first_images = time.time(), self.images
            self.images += len(b["key"])
            yield b


def validate(run: Run) -> None:
    """Score the val split (every image once, whatever the number of ranks); log it; keep the best weights."""
    st, scheme, main = run.state, run.scheme, run.acc.is_main_process
    timed = TimedBatches(run.val_loader, run.acc.device.type == "cuda")
    cm, examples = score_loader(run.segmenter, timed, scheme, run.acc, run.cfg.train.tb_images if main else 0)
    scores = cm.scores(scheme.eval_classes)
    end = time.time()
    first = (timed.first_done or end) - timed.start
    run.clock.validated(end - timed.start, timed.images, first, timed.first_images or timed.images)
    run.process.last_scores = scores
    name, score = headline(scheme, scores)
    run.tb.add_scalar("val/mIoU", scores["miou"], st.step)
    run.tb.add_scalar("val/pixel_acc", scores["pixel_acc"], st.step)
    for c, v in scores["iou"].items():
        if not math.isnan(v):
            run.tb.add_scalar(f"val_iou/{scheme.class_names[c]}", v, st.step)
    run.trackers.log("val", validation_values(run, cm, name, score, scores), st.step)
    pal = scheme.palette()
    for i, (img, gt, pred) in enumerate(examples):
        rgb = denormalize(img, run.cfg.data.mean, run.cfg.data.std)
        picture = panel(rgb, gt.numpy().astype("uint8"), pred.numpy().astype("uint8"), pal)
        run.tb.add_image(f"val/example_{i}", picture, st.step, dataformats="HWC")
    st.history.append({"epoch": st.epoch, "step": st.step, "score": None if math.isnan(score) else score})
    also = "" if name == "mIoU" else f", mIoU {percent(scores['miou'], unit='%')}"
    run.log.print(f"epoch {st.epoch} step {st.step}: val {name} {percent(score, unit='%')}{also}, pixel acc "
                  f"{percent(scores['pixel_acc'], unit='%')} ({scores['pixels']} px){streams_seen(run)}")
    if score > st.best_score:
        st.best_score, st.best_step, st.best_epoch = score, st.step, st.epoch
        st.best_scores = {"iou": {scheme.class_names[c]: v for c, v in scores["iou"].items()},
                          "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
                          "pixels": scores["pixels"], "category_iou": category_iou(cm, scheme)}
        save_best(run, name, score, scores)
    run.acc.wait_for_everyone()


def validation_values(run: Run, cm, name: str, score: float, scores: dict) -> dict:
    """A validation as tracker metrics: its ranking score, mIoU, pixel accuracy, each class's IoU and each
    category's (classes absent from the split are left out, as in TensorBoard)."""
    names = run.scheme.class_names
    values = {"val/score": score, "val/mIoU": scores["miou"], "val/pixel_acc": scores["pixel_acc"],
              **{f"val_iou/{names[c]}": v for c, v in scores["iou"].items()},
              **{f"val_category_iou/{k}": v for k, v in (category_iou(cm, run.scheme) or {}).items()}}
    return {k: v for k, v in values.items() if not math.isnan(v)}


def stream_images(run: Run) -> list[int]:
    """Images trained on per stream of data.streams so far, all processes and segments (empty without)."""
    st = run.state
    return run.train_loader.stream_images(st.epoch, st.batch_in_epoch) if st.streams else []


def sampling_summary(run: Run) -> dict:
    """data.sampling=rare's settings and its draws per class so far (empty for uniform sampling)."""
    st = run.state
    if not st.sampling or not run.acc.is_main_process:  # rank 0 writes it; the others need not replay
        return {}
    draws = run.train_loader.class_draws(st.epoch, st.batch_in_epoch)
    return {**st.sampling, "class_draws": dict(zip(run.scheme.class_names, draws))}


def streams_seen(run: Run) -> str:
    """`; images seen per stream: train of shards/fine 2975, train_extra of shards/coarse 992` (empty
    without streams)."""
    seen = stream_images(run)
    named = [f"{rec['split']} of {rec['shards']} {n}" for rec, n in zip(run.state.streams, seen)]
    return f"; images seen per stream: {', '.join(named)}" if named else ""


def save_best(run: Run, name: str, score: float, scores: dict) -> None:
    """Rank 0 replaces best/ atomically; a failure (a full disk) stops every rank, the previous best stays."""
    st, failure = run.state, None
    if run.acc.is_main_process:
        meta = {"step": st.step, "epoch": st.epoch, "epoch_end": st.batch_in_epoch == 0,
                "checkpoint": files.checkpoint_name(st.step), "score": score, "score_name": name,
                "miou": scores["miou"], "scheme": run.scheme.describe(), "config": run.cfg.name,
                "ema": run.ema is not None, **run.provenance}
        try:
            save_weights(run.acc.unwrap_model(run.model).state_dict(), run.dir.best, meta, ema_state(run))
        except Exception as e:
            failure = e
    all_ranks_wrote(run.acc, failure, f"the best weights {run.dir.best}", run.dir.checkpoints)


def checkpoint(run: Run, epoch_end: bool = False) -> Path:
    """Start a checkpoint on all ranks (collective), with the loader's own position where it has one: the
    state is captured now and written on a thread (train.async_checkpoint=false: written before going on).
    The last step's flags are read first, so a diverged step is never checkpointed."""
    t = time.time()
    settle(run)
    record_segment(run)
    loader = run.train_loader
    extra = {files.LOADER_STATE: loader.state_dict()} if loader.keeps_position else None
    final = run.writer.begin(run.state, extra, ema_state(run))
    if not run.cfg.train.async_checkpoint:
        run.writer.wait()
    run.clock.checkpointed(time.time() - t, epoch_end)
    return final


def ema_state(run: Run) -> dict | None:
    """The averaged model's weights (what evaluate, predict and export load by default), or None."""
    return run.ema.module.state_dict() if run.ema is not None else None


def events_not_written(run: Run) -> NotWritten:
    """The error for a failed TensorBoard write (a full disk), naming what a rerun resumes from."""
    failure = run.tb.failure
    reason = "failed on rank 0" if failure is None else write_reason(failure, run.dir.path)
    return NotWritten.naming_last(f"TensorBoard events to {run.dir.tb}", reason, run.dir.checkpoints)


def record_segment(run: Run) -> None:
    """This process's part of the run, as far as it went: the last of `state.segments` (checkpoints carry
    it, so a resumed run keeps the earlier segments' time and images)."""
    seg = run.state.segments[-1]
    seg.update(end=datetime.now().isoformat(timespec="seconds"), last_step=run.state.step,
               steps=run.state.step - seg["first_step"], images=run.clock.images,
               seconds=round(time.time() - run.clock.process_start, 3))


def run_summary(run: Run, timing: dict, trackers: dict) -> RunSummary:
    """The run's record as far as this process took it: every segment, whole-run totals, the best and the
    last validation's scores, the timing and the provenance."""
    st, scheme, proc = run.state, run.scheme, run.process
    s = proc.last_scores
    seconds = sum(g["seconds"] for g in st.segments)
    images = sum(g["images"] for g in st.segments)
    return RunSummary(
        name=run.cfg.name, steps=st.step, epochs=st.epoch, best_score=st.best_score,
        best_score_name=headline_name(scheme) if s else None, best_epoch=st.best_epoch,
        best_step=st.best_step, best=st.best_scores, final_miou=s["miou"] if s else None,
        final_pixels=s["pixels"] if s else None,
        final_iou={scheme.class_names[c]: v for c, v in s["iou"].items()} if s else {}, seconds=seconds,
        img_per_s=images / max(seconds, 1e-9), processes=run.acc.num_processes, preempted=proc.preempted,
        interrupted=proc.interrupted, finished=not proc.preempted and st.step >= run.max_steps,
        history=st.history, segments=st.segments, timing=timing,
        streams=[{**rec, "images": n} for rec, n in zip(st.streams, stream_images(run))],
        sampling=sampling_summary(run), trackers=trackers,
    ).with_provenance(run.provenance)


def finish(run: Run) -> RunSummary:
    """Wait for the checkpoint in flight, write summary.json (runs/summary.RunSummary), and print the best
    validation's table on rank 0."""
    run.writer.wait()
    record_segment(run)
    st, scheme = run.state, run.scheme
    timing = run.clock.summary()
    for k, v in timing.items():
        if isinstance(v, float):
            run.tb.add_scalar(f"timing/{k}", v, st.step)
    if st.best_score >= 0:
        run.trackers.log("best", {"best/score": st.best_score, "best/epoch": st.best_epoch,
                                  "best/step": st.best_step}, st.step)
    summary = run_summary(run, timing, run.trackers.finish())
    if run.acc.is_main_process:
        summary.write(run.dir.summary)
        b = st.best_scores
        if b and not summary.preempted:
            names = list(b["iou"])
            print(format_table({"iou": dict(enumerate(b["iou"].values())), "miou": b["miou"],
                                "pixel_acc": b["pixel_acc"]}, names, b.get("category_iou")))
            score = percent(st.best_score, unit="%")
            best = f"{headline_name(scheme)} {score} (epoch {st.best_epoch}: the table)"
            print(f"steps {st.step}  epochs {st.epoch}  best {best}  time {duration(summary.seconds)}  "
                  f"processes {run.acc.num_processes}  -> {run.dir.path}")
    run.tb.close()
    if run.tb.failure is not None:
        raise events_not_written(run)
    return summary


def train(cfg: Config, acc) -> RunSummary | None:
    """Run (or resume) training to max_steps, holding the run folder's lease; returns the summary (None:
    the run had finished earlier, nothing was done)."""
    lease: Lease | None = take_lease(cfg, acc)
    try:
        try:
            run = setup(cfg, acc, lease)
        except FinishedEarlier as done:
            if acc.is_main_process:
                print(done, flush=True)
            return None
        st = run.state
        proc = run.process
        while st.step < run.max_steps and not proc.preempted:
            train_one_epoch(run)
            if proc.preempted:
                break
            settle(run)
            if proc.stop_asked:  # the epoch's last step asked for a stop
                stop_here(run)
                break
            if st.batch_in_epoch >= len(run.train_loader):  # the epoch is complete
                st.epoch += 1
                st.batch_in_epoch = 0
                report_corrupt(run)
                if st.epoch % cfg.train.val_every == 0 or st.step >= run.max_steps:
                    validate(run)
                checkpoint(run, epoch_end=True)
            elif st.step >= run.max_steps:  # stopped inside an epoch by max_steps
                validate(run)
                checkpoint(run)
        run.log.close()
        if not proc.preempted and proc.last_scores is None:
            validate(run)
        return finish(run)
    finally:
        if lease is not None:
            lease.release()
