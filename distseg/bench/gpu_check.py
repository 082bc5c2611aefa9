"""`distseg bench gpu-check` (what `tools/gpu-check.sh` runs): one command for whoever holds a GPU. It needs
no network: it prints the machine (GPU, driver, torch, DALI), makes its own Cityscapes-size synthetic data
and shards in the background while the first phases run (reused while they are still there), and runs the
phases asked for, each timed, into one Markdown report:

- tests: `pytest -m gpu` (every CUDA path; with --dry-run only collected);
- step: `bench train` variants on synthetic input against the plain-PyTorch loop (MFU beside them);
- loader: `bench train` bf16+cl fed synthetic tensors, the torch loader (CPU decode, nvJPEG) and DALI;
- data: `bench data`, every pipeline (DALI's CPU mode and its GPU row);
- eval: `bench eval`, every inference mode at 2048x1024;
- train: `bench e2e` (a whole run: 96 images x data.repeat, 2 epochs, one validation), then evaluate,
  predict and export of that run, each timed;
- tune: `distseg tune` on the synthetic shards with the check's settings (3 minutes on a GPU, also the
  decode), then `bench e2e --tuned`: the config's and the tuned.yaml's whole runs side by side.

Without --phases: on a GPU the quick set (tests, step, loader: the others are further calls on the same
machine); with --dry-run every phase, on the CPU with tiny sizes (GPU rows say "skipped: no CUDA"), so that a
test keeps this command from rotting.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from distseg.config import dump_config, load_config
from distseg.data.dali_loader import dali_missing
from distseg.files import atomic_write_text

PHASES = ("tests", "step", "loader", "data", "eval", "train", "tune")
QUICK = ("tests", "step", "loader")
REPO = Path(__file__).resolve().parents[2]


def default_phases(dry: bool) -> tuple[str, ...]:
    """The phases run without --phases: every one on a dry run, the quick set on a GPU."""
    return PHASES if dry else QUICK


class Sizes:
    """What the phases run on: Cityscapes-size on a GPU, tiny for --dry-run."""

    def __init__(self, dry: bool):
        self.dry = dry
        self.image = "256x128" if dry else "2048x1024"
        self.train, self.val = (8, 4) if dry else (96, 96)
        self.repeat, self.epochs = (1, 2) if dry else (31, 2)
        model = ["model.base=8", "model.depth=2", "model.norm=group"] if dry else []
        crop = "data.crop=[64,128]" if dry else "data.crop=[512,1024]"
        batch = "data.batch_size=2" if dry else "data.batch_size=8"
        workers = "data.num_workers=1" if dry else f"data.num_workers={min(8, os.cpu_count() or 1)}"
        precision = "train.mixed_precision=no" if dry else "train.mixed_precision=bf16"
        self.settings = [*model, crop, batch, workers, precision, "data.val_batch_size=2"]
        self.steps = ["--min-steps", "2", "--min-seconds", "2", "--warmup", "1"] if dry else \
            ["--min-steps", "200", "--min-seconds", "20", "--warmup", "5"]


def environment() -> str:
    """The machine, as a Markdown list."""
    cuda = torch.cuda.is_available()
    driver = "-"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=30).stdout.strip() or "-"
    except (OSError, subprocess.TimeoutExpired):
        pass
    dali = dali_missing()
    if dali is None:
        import nvidia.dali

        dali = nvidia.dali.__version__
    lines = [f"GPU: {torch.cuda.get_device_name() if cuda else 'none (no CUDA)'}", f"nvidia-smi: {driver}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version() if cuda else '-'})", f"DALI: {dali}",
             f"Python {platform.python_version()}, {os.cpu_count()} CPU cores, {platform.platform()}"]
    return "\n".join(f"- {line}" for line in lines)


def distseg(*args, timeout: int = 3600) -> str:
    """`python -m distseg ARGS` in a child process (a whole process, as a user runs it); its output, or one
    error naming the command."""
    p = subprocess.run([sys.executable, "-m", "distseg", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"distseg {' '.join(map(str, args[:2]))} failed ({p.returncode}): {last}")
    return p.stdout


class Data:
    """The synthetic tree and its shards, made on a thread (the first phases need none of it)."""

    def __init__(self, folder: Path, sizes: Sizes):
        self.folder, self.sizes, self.error = folder, sizes, None
        self.shards = folder / f"shards-{sizes.image}"
        self.root = folder / f"cityscapes-{sizes.image}"
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._make, daemon=True)
        self.thread.start()

    def _make(self) -> None:
        t = time.time()
        try:
            n = self.sizes
            workers = str(max(1, min(16, os.cpu_count() or 1)))
            if not (self.shards / "val.json").is_file():
                distseg("synth", "--out", self.root, "--train", n.train, "--val", n.val, "--size", n.image,
                        "--workers", workers)
                for split in ("train", "val"):
                    distseg("shard", "--split", split, "--root", self.root, "--out", self.shards, "--workers",
                            workers, "--maxcount", 16, "--overwrite")
        except Exception as e:  # reported by the phases that need the data
            self.error = e
        self.seconds = time.time() - t

    def ready(self) -> Path:
        """The shard folder, once made."""
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"could not make the synthetic data: {self.error}")
        return self.shards


@dataclass
class Check:
    """What every phase gets: the sizes, the data (made in the background), the working folder, and `bench`,
    which runs `distseg bench ARGS` in this process and returns what it printed (given by the command, which
    owns the bench commands) or raises RuntimeError with the command's one error line."""

    sizes: Sizes
    data: Data | None
    folder: Path
    bench: Callable[..., str]


def phase_tests(c: Check) -> str:
    """pytest -m gpu (collected only on a dry run: no nested test run)."""
    args = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "-rs"]
    if c.sizes.dry:
        args.append("--collect-only")
    p = subprocess.run(args + ["tests"], capture_output=True, text=True, cwd=REPO)
    tail = [line for line in p.stdout.splitlines() if line.strip()][-12:]
    return f"`{' '.join(args[2:])} tests` exit status {p.returncode}\n\n```\n" + "\n".join(tail) + "\n```"


def phase_step(c: Check) -> str:
    """bench train on synthetic input: distseg's variants against the plain loop."""
    if c.sizes.dry:  # bf16 rows at 64x32: a few seconds also where a CPU emulates bf16 (~0.3 GFLOP/s)
        return c.bench("train", "--variants", "plain,fp32,bf16+cl", *c.sizes.steps, *c.sizes.settings,
                       "data.crop=[32,64]")
    variants = "plain,bf16+cl,plain+compile,bf16+cl+compile,bf16+cl+compile-max,bf16+cl+cudagraphs"
    return c.bench("train", "--variants", variants, *c.sizes.steps, *c.sizes.settings)


def phase_loader(c: Check) -> str:
    """bench train bf16+cl fed by every feed (÷ synthetic)."""
    variant = "fp32" if c.sizes.dry else "bf16+cl"
    return c.bench("train", "--variants", variant, "--feeds", "synthetic,torch-cpu,torch-gpu,dali",
                   *c.sizes.steps, *c.sizes.settings, f"data.shards={c.data.ready()}")


def phase_data(c: Check) -> str:
    """bench data: every pipeline, DALI's CPU and GPU rows included."""
    batches = "3" if c.sizes.dry else "20"
    return c.bench("data", "--root", c.data.root, "--batches", batches, *c.sizes.settings,
                   f"data.shards={c.data.ready()}")


def phase_eval(c: Check) -> str:
    """bench eval: whole / slide / flip / multi-scale, in the precision the check's runs train in."""
    size = ["--size", "256x128", "--crop", "128x64", "--stride", "85x43", "--images", "1"] if c.sizes.dry \
        else ["--images", "8"]
    kept = [s for s in c.sizes.settings if s.startswith(("model.", "train.mixed_precision="))]
    return c.bench("eval", *size, *kept)


def phase_train(c: Check) -> str:
    """bench e2e (a whole run, kept), then evaluate, predict and export of it, each timed."""
    sizes, data, folder = c.sizes, c.data, c.folder
    run = folder / "e2e-run"
    shutil.rmtree(run, ignore_errors=True)
    out = c.bench("e2e", "--keep", run, "--steps", "3" if sizes.dry else "50", *sizes.settings,
                f"data.shards={data.ready()}", f"data.repeat={sizes.repeat}", f"train.epochs={sizes.epochs}",
                f"train.val_every={sizes.epochs}")
    timed = []
    for name, args in (("evaluate", ["evaluate", "--run", run / "e2e", "--root", data.root]),
                       ("predict", ["predict", "--run", run / "e2e", "--out", folder / "predictions",
                                    "--root", data.root, "--split", "val"]),
                       ("export", ["export", "--run", run / "e2e", "--format", "pt2", "--out",
                                   folder / "model.pt2"])):
        t = time.time()
        distseg(*args)
        timed.append(f"| {name} | {time.time() - t:.1f} |")
    return out + "\n\n| the run's flows, whole process | seconds |\n|---|---|\n" + "\n".join(timed)


def phase_tune(c: Check) -> str:
    """distseg tune on the synthetic shards (the check's settings, written as base.yaml), then base.yaml
    against its tuned.yaml as whole runs (bench e2e --tuned), no setting given to both."""
    sizes, data, folder = c.sizes, c.data, c.folder
    base, tuned = folder / "base.yaml", folder / "tuned.yaml"
    run = [*sizes.settings, f"data.shards={data.ready()}", f"data.repeat={sizes.repeat}",
           f"train.epochs={sizes.epochs}", f"train.val_every={sizes.epochs}"]
    # the check's settings written as a config: both whole runs get no setting on the command line, so none
    # can replace the tuned run's choice (bench e2e --tuned refuses those)
    atomic_write_text(base, dump_config(load_config(None, run)))
    budget = ["--budget", "20s", "--search", "workers", "--steps", "3"] if sizes.dry else \
        ["--budget", "3m", "--decode"]
    out = distseg("tune", *budget, "-c", base, "--out", tuned)
    kept = ("|", "noise", "budget", "not tried", "choice")
    table = [line for line in out.splitlines() if line.startswith(kept)]
    side = c.bench("e2e", "-c", base, "--tuned", tuned)
    return "`distseg tune " + " ".join(budget) + "`\n\n" + "\n".join(table) + "\n\n" + side


def gpu_check(phases: list[str], out: Path, dry: bool, folder: Path, bench: Callable[..., str],
              log=print) -> Path:
    """Run the phases; write and return the report. `bench` runs one `distseg bench` command (Check)."""
    sizes = Sizes(dry)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = Data(folder, sizes) if set(phases) & {"loader", "data", "train", "tune"} else None
    parts, times = [f"# GPU check {time.strftime('%Y-%m-%d %H:%M')}{' (dry run, CPU)' if dry else ''}",
                    environment()], []
    log(parts[1])
    runners = {"tests": phase_tests, "step": phase_step, "loader": phase_loader, "data": phase_data,
               "eval": phase_eval, "train": phase_train, "tune": phase_tune}
    check = Check(sizes, data, folder, bench)
    for name in phases:
        t = time.time()
        try:
            body = runners[name](check)
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            body = f"FAILED: {e}"
        seconds = time.time() - t
        times.append((name, seconds))
        log(f"phase {name}: {seconds:.1f} s")
        parts.append(f"## {name} ({seconds:.1f} s)\n\n{body}")
    if data is not None:
        parts.append(f"synthetic data: {sizes.train} train / {sizes.val} val at {sizes.image}, made in "
                     f"{data.seconds:.1f} s (in the background; 0 when reused)")
    rows = "\n".join(f"| {n} | {s:.1f} |" for n, s in times)
    total = f"| all | {time.time() - t0:.1f} |"
    parts.append(f"## phase times\n\n| phase | seconds |\n|---|---|\n{rows}\n{total}")
    out.write_text("\n\n".join(parts) + "\n")
    (folder / "last.json").write_text(json.dumps({"phases": dict(times), "dry_run": dry}))
    return out
