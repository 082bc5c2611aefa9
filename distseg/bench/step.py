"""The steps `distseg bench train` times, and the processes they run in.

- the distseg rows run the training loop's own `train_step` (distseg/training/loop.py) on a real `Run`, built
  by training's own `build_run` (distseg/training/setup.py) in a throwaway run folder, fed batches shaped like
  the loader's (distseg/data/batch.py): autocast through Accelerate, the flags all-reduce and host flags,
  the clocks, per-group lr, clipping and EMA as the config has them, each step's flags read one step late as
  the loop reads them;
- `plain*` rows: the textbook loop in plain PyTorch, the reference the distseg rows are held against;
- Accelerate fixes mixed precision once per process, so the rows of each precision are measured in their own
  process (`in_own_process`: `python -m distseg.bench.step JOB RESULT`, a pickled call and its pickled
  outcome); the launch-bound row (`launch_bound`) runs in one too.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import distseg
from distseg.bench.common import endless, with_data
from distseg.data.batch import Batch
from distseg.data.dali_loader import dali_available
from distseg.data.loader import make_loader
from distseg.errors import UserError
from distseg.files import atomic_write_bytes
from distseg.labels import IGNORE, get_scheme
from distseg.models import build_model
from distseg.runs.checkpoint import RunState
from distseg.training import loop
from distseg.training.run import Run
from distseg.training.setup import backends, build_run
from distseg.training.timing import GpuIdle, RunClock

VARIANTS = {  # name: (precision, tf32, channels_last, torch.compile mode or None)
    "fp32": ("no", False, False, None),
    "tf32": ("no", True, False, None),
    "bf16": ("bf16", True, False, None),
    "bf16+cl": ("bf16", True, True, None),
    "bf16+cl+compile": ("bf16", True, True, "default"),
    "bf16+cl+compile-max": ("bf16", True, True, "max-autotune-no-cudagraphs"),
    "bf16+cl+cudagraphs": ("bf16", True, True, "reduce-overhead"),
    "plain": ("bf16", True, True, None),  # bf16 + channels_last, in plain PyTorch
    "plain+compile": ("bf16", True, True, "default"),
}
FEEDS = {"synthetic": "synthetic tensors", "torch-cpu": "torch loader, CPU decode",
         "torch-gpu": "torch loader, nvJPEG", "dali": "DALI"}


def sync(device) -> None:
    """Wait for the device's queued work (the harness's start and end marks)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def loader_batch(cfg, nc: int, device, channels_last: bool) -> Batch:
    """One batch as the torch loader delivers it (data/batch.py's contract): normalised random images (in the
    model's layout), int64 masks, keys, and every sample valid and decoded."""
    h, w = cfg.data.crop if cfg.data.crop else (512, 1024)
    n = cfg.data.batch_size
    x = torch.randn(n, 3, h, w, device=device)
    return {"image": x.contiguous(memory_format=torch.channels_last) if channels_last else x,
            "mask": torch.randint(0, nc, (n, h, w), device=device),
            "key": [f"synthetic_{i}" for i in range(n)],
            "valid": torch.ones(n, dtype=torch.bool, device=device),
            "corrupt": torch.zeros(n, dtype=torch.bool, device=device)}


def synthetic_batches(cfg, nc: int, device, channels_last: bool):
    """The same loader-shaped batch forever."""
    batch = loader_batch(cfg, nc, device, channels_last)
    while True:
        yield batch


class SyntheticLoader:
    """The loader of the bench's `Run`: one synthetic batch (`loader_batch`), uniform class pixels (the speed
    does not depend on the loss weights); the bench feeds the step itself, so nothing iterates it."""

    keeps_position, shares, stream_sizes = False, None, None

    def __init__(self, batch: Batch, nc: int):
        self.batch, self.nc = batch, nc

    @property
    def num_samples(self) -> int:
        """The batch's samples."""
        return len(self.batch["key"])

    def __len__(self) -> int:
        return 1

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Every epoch is the one batch."""

    def __iter__(self):
        yield self.batch

    def class_pixels(self) -> np.ndarray:
        """Uniform: one pixel per class."""
        return np.ones(self.nc)


def variant_config(cfg, variant: str):
    """The config a distseg row trains with: the variant's precision, layout and compile setting, no
    trackers, no pretrained weights (speed does not depend on them)."""
    prec, _, cl, mode = VARIANTS[variant]
    c = copy.deepcopy(cfg)
    c.train.mixed_precision, c.model.channels_last, c.model.compile = prec, cl, mode == "default"
    c.model.pretrained, c.train.trackers, c.train.init_from = "none", [], ""
    c.train.progress, c.train.resume, c.name = "false", "fresh", "bench"
    return c


def bench_run(cfg, acc, folder: Path, nc: int, variant: str = "fp32") -> Run:
    """The `Run` a new training run of `cfg` (as `variant_config` makes it) would step, built by training's
    own `build_run` in `folder` (a throwaway run folder); torch.compile modes other than the default, which
    no config setting selects, are applied to its prepared model."""
    c = variant_config(cfg, variant)
    c.output_dir = str(folder)
    _, tf32, _, mode = VARIANTS[variant]
    backends(c, acc)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    on_cuda = acc.device.type == "cuda"
    loader = SyntheticLoader(loader_batch(c, nc, acc.device, on_cuda and c.model.channels_last), nc)
    clock = RunClock(on_cuda, acc.num_processes)
    run, _ = build_run(c, acc, loader, loader, RunState(config=c.name), max(c.train.max_steps, 10**6), clock)
    if mode not in (None, "default"):
        run = dataclasses.replace(run, model=torch.compile(run.model, mode=mode))
    return run


def real_step(run: Run):
    """One optimizer step as the training loop takes it: `loop.train_step` on the batch, its flags held and
    the previous step's read (the loop's one-step-late read, without its logging)."""
    def step(batch: Batch):
        flags = loop.train_step(run, [batch])
        run.state.step += 1
        run.process.late.swap(flags, run.state.step, 1)
    return step


def plain_step(cfg, nc: int, variant: str, device):
    """The textbook loop of a `plain*` variant (fused AdamW on CUDA, mean cross-entropy, autocast, the
    model in its layout, no distseg code in the step). Returns (step(batch), model)."""
    prec, tf32, cl, mode = VARIANTS[variant]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = build_model(cfg, nc).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model, mode=None if mode == "default" else mode) if mode else model
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")

    def plain(batch):
        with bf16:
            out = fwd(batch["image"])
        F.cross_entropy(out.float(), batch["mask"], ignore_index=IGNORE).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return plain, model


def time_row(step, batches, device, warmup: int, min_steps: int, min_seconds: float) -> dict:
    """img/s of `step` over `batches`: after `warmup` steps, until `min_steps` steps or `min_seconds` seconds
    (whichever first), from a synchronised start to a synchronised end; the data wait (CPU) and the GPU's
    idle time between steps (CUDA) in that window."""
    for _ in range(warmup):
        step(next(batches))
    idle = GpuIdle(device.type == "cuda")
    sync(device)
    t0 = time.perf_counter()
    wait, n, images = 0.0, 0, 0
    while n < min_steps and time.perf_counter() - t0 < min_seconds:
        t = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - t
        idle.step_begins()
        step(batch)
        idle.step_ends()
        n, images = n + 1, images + batch["image"].shape[0]
    sync(device)
    wall = time.perf_counter() - t0
    idle.collect()
    return {"img_s": images / wall, "steps": n, "wait": wait / wall,
            "idle": idle.idle / wall if idle.enabled else None}


def profile_top(step, batches, device, steps: int = 5, top: int = 12) -> list[list]:
    """The operators with the most self time (device time on CUDA) over `steps` steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step(next(batches))
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)[:top]
    total = sum(getattr(e, key, 0) for e in prof.key_averages()) or 1
    return [[e.key[:70], getattr(e, key, 0) / 1000 / steps, f"{100 * getattr(e, key, 0) / total:.1f}%"]
            for e in events]


def feed_batches(cfg, feed: str, nc: int, device, channels_last: bool):
    """The batches of a feed, endless; or why the feed cannot run here."""
    if feed == "synthetic":
        return synthetic_batches(cfg, nc, device, channels_last)
    if feed == "torch-gpu" and device.type != "cuda":
        return "skipped: no CUDA"
    if feed == "dali" and not dali_available():
        return 'skipped: DALI not installed (pip install "distseg[dali]")'
    c = with_data(cfg, loader="dali" if feed == "dali" else "torch",
                  decode="gpu" if feed == "torch-gpu" else "cpu")
    c.model.channels_last = channels_last
    return endless(make_loader(c, c.data.train_split, get_scheme(c.data.scheme), True, device))


def accelerator(precision: str):
    """This process's Accelerator, at the precision of its rows (Accelerate fixes it once per process)."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)


def measure_rows(cfg, nc: int, jobs: list[tuple[str, str]], warmup: int, min_steps: int, min_seconds: float,
                 profile: bool) -> dict:
    """The figures of (variant, feed) rows of one precision, in this process: {(variant, feed): time_row's
    dict or why it was skipped, (variant, "profile"): profile_top's rows}."""
    precisions = {VARIANTS[v][0] for v, _ in jobs if not v.startswith("plain")}
    if len(precisions) > 1:
        raise ValueError(f"rows of one precision per process, got {sorted(precisions)}")
    acc = accelerator(precisions.pop()) if precisions else None
    device = acc.device if acc else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    out = {}
    with tempfile.TemporaryDirectory(prefix="distseg-bench-train-") as tmp:
        for k, (v, feed) in enumerate(jobs):
            batches = feed_batches(cfg, feed, nc, device, VARIANTS[v][2])
            if isinstance(batches, str):
                out[v, feed] = batches
                continue
            step = plain_step(cfg, nc, v, device)[0] if v.startswith("plain") else \
                real_step(bench_run(cfg, acc, Path(tmp) / str(k), nc, v))
            out[v, feed] = time_row(step, batches, device, warmup, min_steps, min_seconds)
            if profile and feed == "synthetic":
                out[v, "profile"] = profile_top(step, batches, device)
    return out


class OpCounter(TorchDispatchMode):
    """Counts the aten operators run under it. A dispatch mode sees each operator once, below autograd, so the
    forward's, the backward's and the optimizer's count alike; the profiler's aten events nest instead
    (aten::conv2d holds aten::convolution holds ...), which would count one call several times."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def ops_per_step(step, batch, steps: int = 3) -> float:
    """Aten operators per call of `step` (counted apart from the timed steps: counting slows them)."""
    with OpCounter() as c:
        for _ in range(steps):
            step(batch)
    return c.ops / steps


LAUNCH_BOUND = {"model.encoder": "unet", "model.base": 4, "model.depth": 2, "data.batch_size": 2,
                "data.crop": [32, 32]}  # a step of well under a millisecond of arithmetic per operator


LAUNCH_ROUNDS = 10


def launch_bound(cfg, nc: int, steps: int, rounds: int = LAUNCH_ROUNDS) -> dict:
    """ms and aten operators per step of the real step (the config's loss, optimizer, EMA, clipping, at fp32)
    and of the plain loop (at fp32) on a tiny U-Net and crop, where the host's work per operator dominates:
    the CPU measure of the step's overhead (`alternating`)."""
    c = copy.deepcopy(cfg)
    for key, value in LAUNCH_BOUND.items():
        section, name = key.split(".")
        setattr(getattr(c, section), name, value)
    c.model.pretrained = "none"
    c.optim.encoder_lr_mult, c.optim.layer_decay, c.optim.no_decay_names = 1.0, 1.0, []
    acc = accelerator("no")
    batch = loader_batch(c, nc, acc.device, False)
    with tempfile.TemporaryDirectory(prefix="distseg-bench-launch-") as tmp:
        both = {"plain": plain_step(variant_config(c, "fp32"), nc, "fp32", acc.device)[0],
                "real": real_step(bench_run(c, acc, Path(tmp), nc, "fp32"))}
        out = alternating(both, batch, acc.device, max(1, steps // rounds), rounds)
        for name, step in both.items():
            out[name]["ops"] = ops_per_step(step, batch)
    return out


def alternating(steps: dict, batch, device, per_round: int, rounds: int) -> dict:
    """{name: {"ms", "cpu_ms", "steps"}} of each step function, the functions taking turns for `rounds`
    rounds of `per_round` steps, so that a neighbour's load on a shared machine falls on all of them alike:
    the median round's wall time per step, and its CPU time (this process's: on a busy machine the wall
    time also counts the moments the process waited for a core; on the CPU the step runs in this
    process)."""
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        for _ in range(3):
            step(batch)
    for _ in range(rounds):
        for name, step in steps.items():
            sync(device)
            t, c = time.perf_counter(), time.process_time()
            for _ in range(per_round):
                step(batch)
            sync(device)
            wall[name].append(1000 * (time.perf_counter() - t) / per_round)
            cpu[name].append(1000 * (time.process_time() - c) / per_round)
    return {k: {"ms": statistics.median(wall[k]), "cpu_ms": statistics.median(cpu[k]),
                "steps": per_round * rounds} for k in steps}


JOBS = {"measure_rows": measure_rows, "launch_bound": launch_bound}


def in_own_process(job: str, what: str, *args):
    """`JOBS[job](*args)` in a new Python process (running this distseg), its result returned here; a
    UserError there is raised here as itself, a crash as a UserError naming `what` and its last line."""
    with tempfile.TemporaryDirectory(prefix="distseg-bench-job-") as tmp:
        ask, answer = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        ask.write_bytes(pickle.dumps((job, args)))
        here = str(Path(distseg.__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=path)
        p = subprocess.run([sys.executable, "-m", "distseg.bench.step", str(ask), str(answer)],
                           capture_output=True, text=True, env=env)
        if not answer.is_file():
            last = next((line for line in reversed(p.stderr.splitlines()) if line.strip()), "no message")
            raise UserError(f"the process measuring {what} failed (exit status {p.returncode}): {last}")
        ok, value = pickle.loads(answer.read_bytes())
    if not ok:
        raise value
    return value


def child_main(ask: str, answer: str) -> None:
    """The process `in_own_process` starts: run the job, write (True, result) or (False, its UserError)."""
    job, args = pickle.loads(Path(ask).read_bytes())
    try:
        result = (True, JOBS[job](*args))
    except UserError as e:
        result = (False, UserError(str(e)))
    atomic_write_bytes(Path(answer), pickle.dumps(result))


if __name__ == "__main__":
    child_main(*sys.argv[1:3])
