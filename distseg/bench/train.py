"""`distseg bench train`: the training step's img/s, TFLOP/s and MFU, per encoder, per precision / layout /
compile variant and per feed, every row timed by one harness so that rows compare:

- each row warms up, then runs at least `min_steps` steps or `min_seconds` seconds (whichever comes first),
  timed from a synchronised start to a synchronised end; the loader rows run on one DataLoader iterator
  across epoch boundaries (the torch loader's stream, DALI's own), so no boundary restarts a pipeline;
- the distseg rows run the training loop's own `train_step` on a `Run` built as training builds it
  (distseg/bench/step.py), the rows of each precision in their own process (Accelerate fixes mixed
  precision once per process);
- `plain`: the same U-Net in plain PyTorch (fused AdamW on CUDA, input already in the model's layout, mean
  cross-entropy, no distseg code in the step), the reference the other rows are held against;
- feeds: synthetic tensors, the torch loader with CPU or nvJPEG decode, DALI; "÷ synthetic" sets each fed
  row against the same variant on synthetic input. On CUDA the GPU's idle time between steps (CUDA events,
  distseg/training/timing.py) is reported beside the data wait the CPU measures;
- `--profile` adds the top operators by their own device time (torch.profiler) for each variant;
- `--launch-bound STEPS` adds the real step against the plain loop on a tiny U-Net and crop, ms and aten
  operators per step: the CPU measure of the step's host overhead (`step.launch_bound`).
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from distseg.bench.common import device_name, table
from distseg.bench.step import FEEDS, LAUNCH_BOUND, LAUNCH_ROUNDS, VARIANTS, in_own_process
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models import build_model, out_channels

DECODER_WIDTH = 32  # the decoder width of the encoder configs in configs/ (resnet, convnext, efficientnet)


def flops_per_image(model, shape, num_classes: int, device) -> float:
    """fwd+bwd FLOPs for one image, counted by torch's FlopCounterMode (2 per multiply-add)."""
    x = torch.randn(1, *shape, device=device)
    y = torch.randint(0, num_classes, (1, *shape[1:]), device=device)
    with FlopCounterMode(display=False) as fc:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


PEAK_BUDGET_S = 0.4  # a CPU's matmul peak, per dtype: well under a second whatever the instruction set


def grown_matmul_rate(dtype, budget_s: float, max_n: int = 2048, clock=time.perf_counter,
                      matmul=torch.matmul) -> tuple[float, int]:
    """(FLOP/s, n) of the fastest n x n product on the CPU, n growing from 64 while the next size (8x the
    work, run twice: warm-up and timed) still fits `budget_s`. A fixed size cannot serve every CPU: a 2048²
    bf16 product takes 0.03 s where bf16 is native and a minute where it is emulated (~0.3 GFLOP/s).
    `clock` and `matmul` are seams for tests."""
    spent, n, best, best_n = 0.0, 64, 0.0, 64
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        t = clock()
        matmul(a, b)
        warm = clock() - t
        t = clock()
        matmul(a, b)
        took = max(clock() - t, 1e-9)
        spent += warm + took
        rate = 2 * n ** 3 / took
        if rate > best:
            best, best_n = rate, n
        if n >= max_n or spent + 16 * took > budget_s:
            return best, best_n
        n *= 2


def cuda_matmul_rate(dtype, n: int = 8192, reps: int = 20) -> tuple[float, int]:
    """(FLOP/s, n) of dense n x n products on the GPU (under a second on a data-centre GPU)."""
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(2):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t), n


class Peaks:
    """The matmul peak each row's MFU is held against, measured here on first use (no vendor number is
    assumed) and kept for the other rows.

    On CUDA every row is held against the bf16 tensor-core peak, the GPU's best and the usual reference for
    MFU. On a CPU a row is held against a peak in its own dtype (fp32 or bf16), measured within
    PEAK_BUDGET_S, and only the dtypes of the rows that run are measured. An MFU above 100% means the row
    outran the measured peak (a CPU's convolutions can beat its small matmuls), so it is printed as "-":
    such a peak says nothing about the row."""

    def __init__(self, device, budget_s: float = PEAK_BUDGET_S, **seams):
        self.device, self.budget_s, self.seams = device, budget_s, seams
        self.measured: dict[torch.dtype, tuple[float, int]] = {}  # dtype: (TFLOP/s, matrix size)

    def dtype_of(self, variant: str) -> torch.dtype:
        """The dtype whose peak the variant's row is held against."""
        if self.device.type == "cuda" or VARIANTS[variant][0] == "bf16":
            return torch.bfloat16
        return torch.float32

    def tflops(self, variant: str) -> float:
        """The peak for the variant's row, in TFLOP/s."""
        dtype = self.dtype_of(variant)
        if dtype not in self.measured:
            rate, n = cuda_matmul_rate(dtype) if self.device.type == "cuda" else \
                grown_matmul_rate(dtype, self.budget_s, **self.seams)
            self.measured[dtype] = (rate / 1e12, n)
        return self.measured[dtype][0]

    def mfu(self, variant: str, tflops: float) -> str:
        """The row's MFU in percent, or "-" where the row outran the peak."""
        share = 100 * tflops / self.tflops(variant)
        return f"{share:.2f}" if share <= 100 else "-"

    def describe(self) -> str:
        """The peaks measured, for the table's heading."""
        if not self.measured:
            return "no row timed, no matmul peak measured"
        each = ", ".join(f"{DTYPE_NAMES[d]} {t:.3g} TFLOP/s ({n}x{n})" for d, (t, n) in self.measured.items())
        if self.device.type == "cuda":
            return f"MFU against the measured bf16 matmul peak: {each}"
        return f"MFU against a measured matmul peak in each row's dtype: {each}; \"-\" where a row outran it"


DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def time_variant(cfg, nc: int, variant: str, device, feed: str | None, steps: int, warmup: int,
                 min_seconds: float = 0.0) -> tuple[float, float]:
    """(img/s, data wait share) of one variant on synthetic input (`feed` None) or a feed of FEEDS, measured
    in its own process as `bench train` measures its rows (`device` is the one that process picks)."""
    feed = feed or "synthetic"
    got = in_own_process("measure_rows", f"the {variant} step", cfg, nc, [(variant, feed)], warmup, steps,
                         min_seconds or float("inf"), False)[variant, feed]
    if isinstance(got, str):
        raise UserError(f"{variant} on {FEEDS[feed]}: {got}")
    return got["img_s"], got["wait"]


def bench_train(cfg, variants: list[str], warmup: int, min_steps: int, min_seconds: float,
                feeds: list[str] | None = None, encoders: list[str] | None = None,
                profile: bool = False, launch_steps: int = 0) -> str:
    """One row per encoder, variant and feed: img/s, ÷ synthetic, TFLOP/s, MFU against the measured matmul
    peak, data wait or GPU idle, speed over fp32 and over `plain`. Encoders other than the config's get the
    configs' decoder width (32) and no pretrained weights (speed does not depend on them)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    for f in feeds or ["synthetic"]:
        if f not in FEEDS:
            raise UserError(f"unknown feed {f!r}: use {', '.join(FEEDS)}")
    nc = out_channels(cfg, get_scheme(cfg.data.scheme).num_classes)
    h, w = cfg.data.crop if cfg.data.crop else (512, 1024)
    peaks = Peaks(device)
    rows, profiles = [], []
    for enc in encoders or [cfg.model.encoder]:
        ecfg = copy.deepcopy(cfg)
        if enc != cfg.model.encoder:
            ecfg.model.encoder, ecfg.model.base = enc, DECODER_WIDTH
        ecfg.model.pretrained = "none"
        if enc == "unet":  # the encoder's lr settings of an encoder config do not apply to the plain U-Net
            ecfg.optim.encoder_lr_mult, ecfg.optim.layer_decay, ecfg.optim.no_decay_names = 1.0, 1.0, []
        model = build_model(ecfg, nc).to(device)
        fl = flops_per_image(model, (3, h, w), nc, device)
        size = f"{count(sum(p.numel() for p in model.parameters()))}, {count(fl, 'FLOP')}"
        rows += rows_of(ecfg, enc, size, fl, peaks, nc, device, variants, feeds or ["synthetic"], warmup,
                        min_steps, min_seconds, profiles if profile else None)
    head = (f"training step, {w}x{h}, batch {cfg.data.batch_size}, {device_name()}; each row: {warmup} "
            f"warm-up steps, then {min_steps} steps or {min_seconds:g} s; unet: base {cfg.model.base} depth "
            f"{cfg.model.depth}, encoders: decoder width "
            f"{cfg.model.base if encoders is None else DECODER_WIDTH}; FLOPs fwd+bwd per image; "
            f"{peaks.describe()}; distseg rows: the training loop's train_step, one process per precision")
    wait = "GPU idle %" if device.type == "cuda" else "data wait %"
    cols = ["model", "params, FLOP/img", "variant", "feed", "img/s", "÷ synthetic", "TFLOP/s", "MFU %", wait,
            "vs fp32", "vs plain"]
    out = head + "\n\n" + table(cols, rows)
    for name, top in profiles:
        out += f"\n\nprofile of {name}: operators by self {'device' if device.type == 'cuda' else 'CPU'} " \
               f"time per step\n\n" + table(["operator", "ms per step", "share"], top)
    if launch_steps:
        out += "\n\n" + launch_bound_table(cfg, nc, launch_steps)
    return out


def launch_bound_table(cfg, nc: int, steps: int) -> str:
    """The launch-bound rows (`step.launch_bound`, in their own process): the real step against the plain
    loop, ms (wall and CPU) and aten operators per step and their ratios (targets: at most 1.05x and
    1.10x)."""
    r = in_own_process("launch_bound", "the launch-bound rows", cfg, nc, steps)
    plain, real = r["plain"], r["real"]
    rows = [[name, x["ms"], x["cpu_ms"], x["ops"], f"{x['ms'] / plain['ms']:.2f}x",
             f"{x['cpu_ms'] / plain['cpu_ms']:.2f}x", f"{x['ops'] / plain['ops']:.2f}x"]
            for name, x in (("plain PyTorch loop", plain), ("distseg: the training loop's train_step", real))]
    h, w = LAUNCH_BOUND["data.crop"]
    head = (f"launch-bound step: unet base {LAUNCH_BOUND['model.base']} depth {LAUNCH_BOUND['model.depth']}, "
            f"{w}x{h}, batch {LAUNCH_BOUND['data.batch_size']}, fp32, {device_name()}; {real['steps']} steps "
            f"each, the two taking turns in {LAUNCH_ROUNDS} rounds (ms per step: the median round's, wall "
            "and this process's CPU time); aten operators per step counted below autograd (a dispatch "
            "mode); the host's cost per step: the real step should stay within 1.05x the plain loop's time "
            "and 1.10x its operators")
    return head + "\n\n" + table(["step", "ms per step", "CPU ms per step", "aten ops per step",
                                   "time vs plain", "CPU time vs plain", "ops vs plain"], rows)


def count(v: float, unit: str = "") -> str:
    """A count with its SI prefix, so that a tiny test model reads as such: 31.0M, 578.0 GFLOP, 12.3 kFLOP."""
    sep = " " if unit else ""
    for div, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if v >= div:
            return f"{v / div:.1f}{sep}{prefix}{unit}"
    return f"{v:.0f}{sep}{unit}"


def rows_of(cfg, enc: str, size: str, fl: float, peaks: Peaks, nc: int, device, variants, feeds, warmup,
            min_steps, min_seconds, profiles) -> list[list]:
    """The rows of one encoder: every variant on every feed, measured in one process per precision, then set
    against synthetic input, fp32 and the plain-PyTorch row (of the same compile setting)."""
    skipped = {v for v in variants if device.type != "cuda" and VARIANTS[v][3]}
    by_precision: dict[str, list[tuple[str, str]]] = {}
    for v in variants:
        if v not in skipped:
            peaks.tflops(v)  # measured before any row's process or loader workers compete for the cores
            by_precision.setdefault(VARIANTS[v][0], []).extend((v, f) for f in feeds)
    got = {}
    for prec, jobs in by_precision.items():
        got.update(in_own_process("measure_rows", f"the {prec} rows of {enc}", cfg, nc, jobs, warmup,
                                  min_steps, min_seconds, profiles is not None))
    measured = []
    for v in variants:
        if v in skipped:
            measured.append((v, "-", "skipped: compile runs on CUDA here"))
            continue
        measured += [(v, FEEDS[f], got[v, f]) for f in feeds]
        if (v, "profile") in got:
            profiles.append((f"{enc} {v}", got[v, "profile"]))
    synthetic = {v: r["img_s"] for v, f, r in measured if f == FEEDS["synthetic"] and isinstance(r, dict)}
    rows = []
    for v, feed, r in measured:
        if isinstance(r, str):
            rows.append([enc, size, v, feed, r, "", "", "", "", "", ""])
            continue
        ips, base = r["img_s"], synthetic.get(v)
        plain = synthetic.get("plain+compile" if VARIANTS[v][3] else "plain")
        share = r["idle"] if r["idle"] is not None else r["wait"]
        tflops = ips * fl / 1e12
        rows.append([enc, size, v, feed, ips, f"{ips / base:.2f}x" if base else "-",
                     f"{tflops:.1f}" if tflops >= 10 else f"{tflops:.3g}",
                     peaks.mfu(v, tflops), f"{100 * share:.1f}",
                     f"{ips / synthetic['fp32']:.2f}x" if "fp32" in synthetic else "-",
                     f"{ips / plain:.2f}x" if plain else "-"])
    return rows
