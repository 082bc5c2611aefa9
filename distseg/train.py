"""Training entry: `accelerate launch distseg/train.py --config configs/X.yaml [section.key=value ...]`.

Also importable (`distseg.train.main(argv)`) and run by `distseg train`. Accelerate owns devices, DDP,
mixed precision and checkpoint state; this loop owns sample-exact data, global loss normalisation,
gradient accumulation, poly LR, atomic checkpoints with mid-epoch resume, TensorBoard and the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

if __package__ in (None, ""):  # started as a script: make the package importable by absolute name
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from distseg.errors import UserError, describe_os_error

EXIT_PREEMPTED = 75  # checkpoint written on SIGUSR1/SIGTERM: requeue me
EXIT_DIVERGED = 3


class Diverged(UserError):
    pass


def lr_at(step: int, cfg, max_steps: int) -> float:
    base, s = cfg.optim.lr, cfg.sched
    if s.warmup_steps and step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    span = max(1, max_steps - s.warmup_steps)
    frac = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + (base - s.min_lr) * (1 - frac) ** s.power


def build_optimizer(cfg, params, on_cuda: bool):
    o = cfg.optim
    fused = on_cuda if o.fused == "auto" else o.fused == "true"
    if fused and not on_cuda:
        raise UserError("optim.fused=true needs CUDA")
    kw = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **kw)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **kw)


def targets(batch: dict) -> torch.Tensor:
    """The batch's masks with padded (invalid) samples set to ignore: they count in no loss or metric."""
    m = batch["mask"]
    return torch.where(batch["valid"].view(-1, 1, 1), m, torch.full_like(m, 255))


@torch.no_grad()
def run_validation(model, loader, accelerator, scheme, cfg, n_images: int = 0):
    """Sample-exact validation: padded samples are masked out, the confusion matrix summed over ranks."""
    from distseg.metrics import ConfusionMatrix
    from distseg.models.unet import predict_classes

    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(scheme.num_classes, accelerator.device)
    examples = []
    loader.set_epoch(0)
    for b in loader:
        x = b["image"]
        if accelerator.device.type == "cuda" and cfg.model.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with accelerator.autocast():
            logits = model(x)
        if logits.shape[-2:] != b["mask"].shape[-2:]:
            logits = F.interpolate(logits.float(), size=b["mask"].shape[-2:], mode="bilinear", align_corners=False)
        pred = predict_classes(logits)
        mask = targets(b)
        cm.update(pred, mask)
        for i in range(len(pred)):
            if len(examples) < n_images and bool(b["valid"][i]):
                img = b["image"][i : i + 1].float()
                if img.shape[-2:] != mask.shape[-2:]:  # data.val_scale: show the input at label size
                    img = F.interpolate(img, size=mask.shape[-2:], mode="bilinear", align_corners=False)
                examples.append((img[0].cpu(), b["mask"][i].cpu(), pred[i].cpu()))
    cm.reduce(accelerator)
    model.train(was_training)
    return cm, examples


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="distseg train", description=__doc__.splitlines()[0])
    ap.add_argument("--config", "-c", default=None, help="YAML config (configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="section.key=value, e.g. train.epochs=5 data.batch_size=4")
    return ap.parse_args(argv)


class StopFlag:
    """A request to checkpoint and exit with EXIT_PREEMPTED, acted on at the next optimizer step by all
    ranks together: SIGUSR1/SIGTERM to a rank, or the file named by $DISTSEG_STOP_FILE appearing (what
    slurm/train.sh creates when Slurm warns its batch shell before the time limit)."""

    def __init__(self):
        self._signalled = False
        self.file = os.environ.get("DISTSEG_STOP_FILE") or None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)

    def _handler(self, signum, _frame):
        if self._signalled and signum == signal.SIGTERM:  # asked twice (e.g. a launcher tearing down): go now
            raise SystemExit(128 + signum)
        self._signalled = True

    @property
    def set(self) -> bool:
        return self._signalled or (self.file is not None and os.path.exists(self.file))


def train(cfg, accelerator) -> dict:
    from tqdm import tqdm

    from distseg.checkpoint import latest_checkpoint, load_weights, read_state, save_checkpoint, save_weights
    from distseg.config import dump_config
    from distseg.data.loader import build_loader
    from distseg.labels import get_scheme
    from distseg.losses import SegLoss
    from distseg.data.manifest import atomic_write_text
    from distseg.metrics import format_table
    from distseg.models.unet import build_model, out_channels
    from distseg.tb import denormalize, make_writer, panel

    acc = accelerator
    main_proc = acc.is_main_process
    run_dir = cfg.run_dir
    ckpt_dir = run_dir / "checkpoints"
    stop = StopFlag()
    scheme = get_scheme(cfg.data.scheme)
    on_cuda = acc.device.type == "cuda"
    if on_cuda:  # fixed input shapes (crops): let cuDNN pick the fastest kernels; TF32 for fp32 matmuls
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", dump_config(cfg))
    train_loader = build_loader(cfg, cfg.data.train_split, acc, scheme, train=True)
    val_loader = build_loader(cfg, cfg.data.val_split, acc, scheme, train=False)

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes))
    resume_from = None
    if cfg.train.resume == "auto":
        resume_from = latest_checkpoint(ckpt_dir)
    elif cfg.train.resume != "never":
        resume_from = Path(cfg.train.resume)
        read_state(resume_from)
    if cfg.train.init_from and resume_from is None:
        sd = load_weights(cfg.train.init_from)
        own = model.state_dict()
        keep = {k: v for k, v in sd.items() if k in own and own[k].shape == v.shape
                and not (cfg.train.reset_head and k.startswith("head."))}
        if not any(k.startswith("down.") for k in keep):
            raise UserError(f"{cfg.train.init_from} does not fit this model (model.base / model.depth differ?)")
        model.load_state_dict(keep, strict=False)
        acc.print(f"initialised {len(keep)}/{len(own)} tensors from {cfg.train.init_from}"
                  f"{' (new head)' if cfg.train.reset_head else ''}")
    if cfg.model.norm == "sync_batch" and acc.num_processes > 1 and on_cuda:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if on_cuda and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, model.parameters(), on_cuda)
    model, optimizer = acc.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    loss_fn = SegLoss(cfg.loss.ce, cfg.loss.dice, cfg.loss.bce)

    batches_per_epoch = len(train_loader)
    accum = cfg.train.grad_accum
    steps_per_epoch = math.ceil(batches_per_epoch / accum)
    max_steps = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_miou": -1.0, "samples": 0}
    world = acc.num_processes
    if resume_from is not None:
        acc.load_state(str(resume_from))
        state.update(read_state(resume_from))
        loader_state = resume_from / f"loader_state_{acc.process_index}"
        if hasattr(train_loader, "load_state_dict"):
            if loader_state.is_file() and state.get("world", world) == world:
                train_loader.load_state_dict(loader_state.read_bytes())
            elif state["batch_in_epoch"]:
                raise UserError(f"{resume_from} was written with another loader or process count; the DALI reader "
                                "position cannot be restored mid-epoch (resume from an epoch-end checkpoint)")
        acc.print(f"resumed from {resume_from} (step {state['step']}, epoch {state['epoch']}, "
                  f"batch {state['batch_in_epoch']})")

    tb = make_writer(run_dir / "tb", main_proc)
    bar = tqdm(total=max_steps, initial=state["step"], desc=cfg.name, unit="step", mininterval=2,
               disable=not (main_proc and cfg.train.progress), dynamic_ncols=True)
    log = bar.write if not bar.disable else acc.print
    acc.print(f"training {cfg.name}: {train_loader.num_samples} train / {val_loader.num_samples} val samples, "
              f"{world} process(es) on {acc.device.type}, {batches_per_epoch} batches/epoch/process, "
              f"{max_steps} steps, mixed precision {acc.mixed_precision}")
    last_scores, t_start, samples_run = None, time.time(), 0
    win = {"t": time.time(), "wait": 0.0, "imgs": 0}
    preempted = False

    def checkpoint():
        extra = {"loader_state": train_loader.state_dict()} if hasattr(train_loader, "state_dict") else None
        return save_checkpoint(acc, ckpt_dir, dict(state, config=cfg.name, world=world), cfg.train.keep_last, extra)

    def validate():
        nonlocal last_scores
        cm, examples = run_validation(model, val_loader, acc, scheme, cfg, cfg.train.tb_images if main_proc else 0)
        scores = cm.scores(scheme.eval_classes)
        last_scores = scores
        tb.add_scalar("val/mIoU", scores["miou"], state["step"])
        tb.add_scalar("val/pixel_acc", scores["pixel_acc"], state["step"])
        for c, v in scores["iou"].items():
            if not math.isnan(v):
                tb.add_scalar(f"val_iou/{scheme.class_names[c]}", v, state["step"])
        pal = scheme.palette()
        for i, (img, gt, pred) in enumerate(examples):
            tb.add_image(f"val/example_{i}", panel(denormalize(img, cfg.data.mean, cfg.data.std),
                                                    gt.numpy().astype("uint8"), pred.numpy().astype("uint8"), pal),
                         state["step"], dataformats="HWC")
        log(f"epoch {state['epoch']} step {state['step']}: val mIoU {100 * scores['miou']:.2f} "
            f"pixel acc {100 * scores['pixel_acc']:.2f} ({scores['pixels']} px)")
        if scores["miou"] > state["best_miou"]:
            state["best_miou"] = scores["miou"]
            if main_proc:
                save_weights(acc.unwrap_model(model).state_dict(), run_dir / "best",
                             {"step": state["step"], "epoch": state["epoch"], "miou": scores["miou"],
                              "scheme": scheme.describe(), "config": cfg.name})
        acc.wait_for_everyone()

    model.train()
    while state["step"] < max_steps and not preempted:
        epoch = state["epoch"]
        train_loader.set_epoch(epoch, state["batch_in_epoch"])
        it = iter(train_loader)
        micro = state["batch_in_epoch"]
        acc_sum = torch.zeros(3, device=acc.device)  # pixel loss sum, valid pixels, images (this step)
        while micro < batches_per_epoch:
            # one optimizer step's micro-batches, fetched first: the loss is normalised by the labelled
            # pixels of the whole accumulation group on all ranks, so grad_accum and world size do not
            # change the gradient
            group_len = min(accum, batches_per_epoch - micro)
            t0 = time.time()
            group = [b for b in (next(it, None) for _ in range(group_len)) if b is not None]
            win["wait"] += time.time() - t0
            if not group:
                break
            masks = [targets(b) for b in group]
            n_locals = [(m != 255).sum().float() for m in masks]
            n_global = torch.stack(n_locals).sum()
            if world > 1:
                n_global = acc.reduce(n_global, reduction="sum")
            for k, (b, mask) in enumerate(zip(group, masks)):
                x = b["image"]
                if on_cuda and cfg.model.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                last_micro = k == len(group) - 1
                with (nullcontext() if last_micro or world == 1 else acc.no_sync(model)):
                    with acc.autocast():
                        logits = model(x)
                    pix = loss_fn.pixel_sum(logits, mask)
                    loss = pix * world / n_global.clamp(min=1) + loss_fn.mean_terms(logits, mask) / len(group)
                    acc.backward(loss)
                acc_sum += torch.stack([pix.detach().float(), n_locals[k], b["valid"].sum().float()])
            micro += len(group)
            flags = torch.cat([acc_sum, torch.tensor([float(not torch.isfinite(acc_sum[0])), float(stop.set)],
                                                     device=acc.device)])
            if world > 1:
                flags = acc.reduce(flags, reduction="sum")
            if flags[3] > 0:
                last = latest_checkpoint(ckpt_dir)
                raise Diverged(f"loss is not finite at step {state['step'] + 1} (epoch {epoch}): training stopped; "
                               f"last good checkpoint: {last or 'none'}. Lower optim.lr, add train.clip_grad, "
                               "or use train.mixed_precision=bf16 instead of fp16")
            lr = lr_at(state["step"], cfg, max_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            if cfg.train.clip_grad > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.train.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            state["batch_in_epoch"] = micro
            state["samples"] += int(flags[2])
            samples_run += int(flags[2])
            win["imgs"] += int(flags[2])
            acc_sum.zero_()
            bar.update(1)
            step_loss = float(flags[0] / flags[1].clamp(min=1))
            if state["step"] % cfg.train.log_every == 0 or state["step"] == max_steps:
                dt = time.time() - win["t"]
                ips, wait = win["imgs"] / max(dt, 1e-9), win["wait"] / max(dt, 1e-9)
                tb.add_scalar("train/loss", step_loss, state["step"])
                tb.add_scalar("train/lr", lr, state["step"])
                tb.add_scalar("perf/img_per_s", ips, state["step"])
                tb.add_scalar("perf/data_wait_frac", wait, state["step"])
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", ips=f"{ips:.1f}")
                if bar.disable:
                    log(f"step {state['step']}/{max_steps} epoch {epoch} loss {step_loss:.4f} lr {lr:.2e} "
                        f"{ips:.1f} img/s data-wait {100 * wait:.0f}%")
                win.update(t=time.time(), wait=0.0, imgs=0)
            if flags[4] > 0:
                log(f"stop requested: checkpointing at step {state['step']}")
                ck = checkpoint()
                if main_proc and stop.file:  # tells slurm/train.sh the checkpoint is complete: requeue
                    atomic_write_text(Path(stop.file + ".done"), f"{ck}\n")
                preempted = True
                break
            if state["step"] >= max_steps:
                break
            if cfg.train.ckpt_every and state["step"] % cfg.train.ckpt_every == 0 and micro < batches_per_epoch:
                checkpoint()
        if preempted:
            break
        if micro >= batches_per_epoch:  # epoch finished
            state["epoch"] += 1
            state["batch_in_epoch"] = 0
            if state["epoch"] % cfg.train.val_every == 0 or state["step"] >= max_steps:
                validate()
            checkpoint()
        elif state["step"] >= max_steps:  # stopped inside an epoch by max_steps
            validate()
            checkpoint()
    bar.close()
    if not preempted and last_scores is None:
        validate()
    elapsed = time.time() - t_start
    summary = {"name": cfg.name, "steps": state["step"], "epochs": state["epoch"], "best_miou": state["best_miou"],
               "final_miou": last_scores["miou"] if last_scores else None,
               "final_pixels": last_scores["pixels"] if last_scores else None, "seconds": elapsed,
               "img_per_s": samples_run / elapsed, "processes": world,
               "preempted": preempted, "final_iou": {scheme.class_names[c]: v for c, v in last_scores["iou"].items()}
               if last_scores else {}}
    if main_proc:
        atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        if last_scores and not preempted:
            print(format_table(last_scores, scheme.class_names))
            print(f"steps {state['step']}  epochs {state['epoch']}  best mIoU {100 * state['best_miou']:.2f}  "
                  f"time {elapsed:.0f}s  processes {world}  -> {run_dir}")
    tb.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from distseg.config import load_config

    code = 0
    acc = None
    try:
        args = parse_args(argv)
        cfg = load_config(args.config, args.overrides)
        acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
        set_seed(cfg.train.seed)
        summary = train(cfg, acc)
        code = EXIT_PREEMPTED if summary["preempted"] else 0
    except Diverged as e:
        print(f"error: {e}", file=sys.stderr)
        code = EXIT_DIVERGED
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
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
