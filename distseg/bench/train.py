"""`distseg bench train`: training-step img/s, TFLOP/s, MFU and data-wait per precision/layout/compile
variant."""

from __future__ import annotations

import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from distseg.bench.common import device_name, endless, measure, table
from distseg.data.loader import make_loader
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models.unet import build_model, out_channels
from distseg.optim import build_optimizer

VARIANTS = {  # name: (precision, tf32, channels_last, compile)
    "fp32": ("no", False, False, False),
    "tf32": ("no", True, False, False),
    "bf16": ("bf16", True, False, False),
    "bf16+cl": ("bf16", True, True, False),
    "bf16+cl+compile": ("bf16", True, True, True),
}


def flops_per_image(model, shape, num_classes: int, device) -> float:
    """fwd+bwd FLOPs for one image, counted by torch's FlopCounterMode (2 per multiply-add)."""
    x = torch.randn(1, *shape, device=device)
    y = torch.randint(0, num_classes, (1, *shape[1:]), device=device)
    with FlopCounterMode(display=False) as fc:
        loss = torch.nn.functional.cross_entropy(model(x), y)
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def bench_train(cfg, variants: list[str], steps: int, warmup: int, real_loader: bool) -> str:
    """One row per variant: img/s, TFLOP/s, MFU against the measured matmul peak, data wait, speed-up."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    scheme = get_scheme(cfg.data.scheme)
    nc = out_channels(cfg, scheme.num_classes)
    h, w = cfg.data.crop if cfg.data.crop else (512, 1024)
    bs = cfg.data.batch_size
    base = build_model(cfg, nc).to(device)
    fl = flops_per_image(base, (3, h, w), nc, device)
    peak = matmul_peak_tflops(device)
    loader = None
    if real_loader:
        loader = endless(make_loader(cfg, cfg.data.train_split, scheme, True, device))
    rows, fp32_ips = [], None
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
        prec, tf32, cl, comp = VARIANTS[v]
        if device.type != "cuda" and (prec == "bf16" and comp):
            rows.append([v, "skipped on CPU", "", "", "", ""])
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.manual_seed(0)
        model = build_model(cfg, nc).to(device)
        if cl:
            model = model.to(memory_format=torch.channels_last)
        opt = build_optimizer(cfg, model.parameters(), device.type == "cuda")
        fwd = torch.compile(model) if comp else model
        if loader is None:
            x = torch.randn(bs, 3, h, w, device=device)
            y = torch.randint(0, nc, (bs, h, w), device=device)
        wait = 0.0

        def step():
            nonlocal wait, x, y
            if loader is not None:
                t = time.perf_counter()
                b = next(loader)
                x, y = b["image"], b["mask"]
                wait += time.perf_counter() - t
            xx = x.contiguous(memory_format=torch.channels_last) if cl else x
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                out = fwd(xx)
            loss = torch.nn.functional.cross_entropy(out.float(), y, ignore_index=255)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(warmup):
            step()
        wait = 0.0
        with measure() as m:
            for _ in range(steps):
                step()
        ips = steps * bs / m["wall"]
        tflops = ips * fl / 1e12
        fp32_ips = ips if v == "fp32" else fp32_ips
        rows.append([v, ips, tflops, 100 * tflops / peak, 100 * wait / m["wall"],
                     f"{ips / fp32_ips:.2f}x" if fp32_ips else "-"])
    dev = device_name()
    head = (f"training step, U-Net base {cfg.model.base} depth {cfg.model.depth}, {w}x{h}, batch {bs}, "
            f"{fl / 1e12:.3f} TFLOP/image fwd+bwd, "
            f"{'real shard loader' if real_loader else 'synthetic input'}, "
            f"{dev}; MFU against a measured bf16 matmul peak of "
            f"{peak:.1f} TFLOP/s")
    return head + "\n\n" + table(["variant", "img/s", "TFLOP/s", "MFU %", "data wait %", "vs fp32"], rows)
