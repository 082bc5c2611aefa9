"""`distseg bench train`: the training step's img/s, TFLOP/s and MFU, per encoder, per precision / layout /
compile variant and per feed, every row timed by one harness so that rows compare:

- each row warms up, then runs at least `min_steps` steps or `min_seconds` seconds (whichever comes first),
  timed from a synchronised start to a synchronised end; the loader rows run on one DataLoader iterator
  across epoch boundaries (the torch loader's stream, DALI's own), so no boundary restarts a pipeline;
- `plain`: the same U-Net in plain PyTorch (fused AdamW on CUDA, input already in the model's layout, mean
  cross-entropy, no distseg code in the step), the reference the other rows are held against;
- feeds: synthetic tensors, the torch loader with CPU or nvJPEG decode, DALI; "÷ synthetic" sets each fed
  row against the same variant on synthetic input. On CUDA the GPU's idle time between steps (CUDA events,
  distseg/training/timing.py) is reported beside the data wait the CPU measures;
- `--profile` adds the top operators by their own device time (torch.profiler) for each variant.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from distseg.bench.common import device_name, endless, table, with_data
from distseg.data.dali_loader import dali_available
from distseg.data.loader import make_loader
from distseg.errors import UserError
from distseg.labels import IGNORE, get_scheme
from distseg.models import build_model, out_channels
from distseg.models.losses import build_loss
from distseg.models.optim import build_optimizer
from distseg.training.timing import GpuIdle

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


def matmul_peak_tflops(device, dtype=torch.bfloat16, n: int = 8192, reps: int = 20) -> float:
    """Measured dense matmul throughput: the reference for MFU (no vendor peak number is assumed)."""
    if device.type != "cuda":
        n, reps = 2048, 5
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def sync(device) -> None:
    """Wait for the device's queued work (the harness's start and end marks)."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_step(cfg, nc: int, variant: str, device):
    """The model and one training step of a variant: distseg's loss normalisation, optimizer and
    autocast, or for `plain*` the textbook loop. Returns (step(batch), model)."""
    prec, tf32, cl, mode = VARIANTS[variant]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = build_model(cfg, nc).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    fwd = torch.compile(model, mode=None if mode == "default" else mode) if mode else model
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16")
    if variant.startswith("plain"):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type == "cuda")

        def plain(batch):
            with bf16:
                out = fwd(batch["image"])
            F.cross_entropy(out.float(), batch["mask"], ignore_index=IGNORE).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return plain, model
    opt = build_optimizer(cfg, model.parameters(), device.type == "cuda")
    cfg = copy.deepcopy(cfg)
    cfg.loss.class_weights = "none"  # weights need the split's pixel counts; the speed does not
    loss_fn = build_loss(cfg, get_scheme(cfg.data.scheme), {}, device)

    def step(batch):
        x = batch["image"]
        if cl:
            x = x.contiguous(memory_format=torch.channels_last)  # a no-op for a channels_last batch
        with bf16:
            out = fwd(x)
        pix, count = loss_fn.pixel_sum(out, batch["mask"])
        (pix / count.clamp(min=1) + loss_fn.mean_terms(out, batch["mask"])).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step, model


def synthetic_batches(cfg, nc: int, device, channels_last: bool):
    """The same batch forever: random normalised images (in the model's layout) and masks."""
    h, w = cfg.data.crop if cfg.data.crop else (512, 1024)
    x = torch.randn(cfg.data.batch_size, 3, h, w, device=device)
    batch = {"image": x.contiguous(memory_format=torch.channels_last) if channels_last else x,
             "mask": torch.randint(0, nc, (cfg.data.batch_size, h, w), device=device)}
    while True:
        yield batch


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


def time_variant(cfg, nc: int, variant: str, device, loader, steps: int, warmup: int,
                 min_seconds: float = 0.0) -> tuple[float, float]:
    """(img/s, data wait share) of one variant on synthetic input (`loader` None) or a loader's batches."""
    step, _ = make_step(cfg, nc, variant, device)
    batches = loader if loader is not None else synthetic_batches(cfg, nc, device, VARIANTS[variant][2])
    r = time_row(step, batches, device, warmup, steps, min_seconds or float("inf"))
    return r["img_s"], r["wait"]


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


def bench_train(cfg, variants: list[str], warmup: int, min_steps: int, min_seconds: float,
                feeds: list[str] | None = None, encoders: list[str] | None = None,
                profile: bool = False) -> str:
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
    peak = matmul_peak_tflops(device)
    rows, profiles = [], []
    for enc in encoders or [cfg.model.encoder]:
        ecfg = copy.deepcopy(cfg)
        if enc != cfg.model.encoder:
            ecfg.model.encoder, ecfg.model.base = enc, DECODER_WIDTH
        ecfg.model.pretrained = "none"
        model = build_model(ecfg, nc).to(device)
        fl = flops_per_image(model, (3, h, w), nc, device)
        size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {fl / 1e9:.0f} GFLOP"
        rows += rows_of(ecfg, enc, size, fl, peak, nc, device, variants, feeds or ["synthetic"], warmup,
                        min_steps, min_seconds, profiles if profile else None)
    head = (f"training step, {w}x{h}, batch {cfg.data.batch_size}, {device_name()}; each row: {warmup} "
            f"warm-up steps, then {min_steps} steps or {min_seconds:g} s; unet: base {cfg.model.base} depth "
            f"{cfg.model.depth}, encoders: decoder width "
            f"{cfg.model.base if encoders is None else DECODER_WIDTH}; FLOPs fwd+bwd per image; MFU against "
            f"a measured bf16 matmul peak of {peak:.1f} TFLOP/s")
    wait = "GPU idle %" if device.type == "cuda" else "data wait %"
    cols = ["model", "params, FLOP/img", "variant", "feed", "img/s", "÷ synthetic", "TFLOP/s", "MFU %", wait,
            "vs fp32", "vs plain"]
    out = head + "\n\n" + table(cols, rows)
    for name, top in profiles:
        out += f"\n\nprofile of {name}: operators by self {'device' if device.type == 'cuda' else 'CPU'} " \
               f"time per step\n\n" + table(["operator", "ms per step", "share"], top)
    return out


def rows_of(cfg, enc: str, size: str, fl: float, peak: float, nc: int, device, variants, feeds, warmup,
            min_steps, min_seconds, profiles) -> list[list]:
    """The rows of one encoder: every variant on every feed, then set against synthetic input, fp32 and the
    plain-PyTorch row (of the same compile setting)."""
    measured = []
    for v in variants:
        if device.type != "cuda" and VARIANTS[v][3]:
            measured.append((v, "-", "skipped: compile runs on CUDA here"))
            continue
        for feed in feeds:
            batches = feed_batches(cfg, feed, nc, device, VARIANTS[v][2])
            if isinstance(batches, str):
                measured.append((v, FEEDS[feed], batches))
                continue
            step, _ = make_step(cfg, nc, v, device)
            measured.append((v, FEEDS[feed], time_row(step, batches, device, warmup, min_steps, min_seconds)))
            if profiles is not None and feed == "synthetic":
                profiles.append((f"{enc} {v}", profile_top(step, batches, device)))
    synthetic = {v: r["img_s"] for v, f, r in measured if f == FEEDS["synthetic"] and isinstance(r, dict)}
    rows = []
    for v, feed, r in measured:
        if isinstance(r, str):
            rows.append([enc, size, v, feed, r, "", "", "", "", "", ""])
            continue
        ips, base = r["img_s"], synthetic.get(v)
        plain = synthetic.get("plain+compile" if VARIANTS[v][3] else "plain")
        share = r["idle"] if r["idle"] is not None else r["wait"]
        rows.append([enc, size, v, feed, ips, f"{ips / base:.2f}x" if base else "-", ips * fl / 1e12,
                     f"{100 * ips * fl / 1e12 / peak:.2f}", f"{100 * share:.1f}",
                     f"{ips / synthetic['fp32']:.2f}x" if "fp32" in synthetic else "-",
                     f"{ips / plain:.2f}x" if plain else "-"])
    return rows
