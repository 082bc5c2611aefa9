"""`distseg bench train`: training-step img/s, TFLOP/s, MFU and data-wait per encoder and per
precision/layout/compile variant."""

from __future__ import annotations

import copy
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from distseg.bench.common import device_name, endless, measure, table
from distseg.data.loader import make_loader
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models import build_model, out_channels
from distseg.models.optim import build_optimizer

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


DECODER_WIDTH = 32  # the decoder width of the encoder configs in configs/ (resnet, convnext, efficientnet)


def time_variant(cfg, nc: int, variant: str, device, loader, steps: int, warmup: int) -> tuple[float, float]:
    """(img/s, share of the time spent waiting for data) of `steps` optimizer steps of one variant."""
    prec, tf32, cl, comp = VARIANTS[variant]
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.manual_seed(0)
    model = build_model(cfg, nc).to(device)
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, model.parameters(), device.type == "cuda")
    fwd = torch.compile(model) if comp else model
    h, w = cfg.data.crop if cfg.data.crop else (512, 1024)
    batch = {"image": torch.randn(cfg.data.batch_size, 3, h, w, device=device),
             "mask": torch.randint(0, nc, (cfg.data.batch_size, h, w), device=device)}
    wait = 0.0

    def step():
        nonlocal wait, batch
        if loader is not None:
            t = time.perf_counter()
            batch = next(loader)
            wait += time.perf_counter() - t
        x = batch["image"].contiguous(memory_format=torch.channels_last) if cl else batch["image"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
            out = fwd(x)
        torch.nn.functional.cross_entropy(out.float(), batch["mask"], ignore_index=255).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    wait = 0.0
    with measure() as m:
        for _ in range(steps):
            step()
    return steps * cfg.data.batch_size / m["wall"], wait / m["wall"]


def bench_train(cfg, variants: list[str], steps: int, warmup: int, real_loader: bool,
                encoders: list[str] | None = None) -> str:
    """One row per encoder and variant: img/s, TFLOP/s, MFU against the measured matmul peak, data wait,
    speed-up over fp32. Encoders other than the config's get the configs' decoder width (32) and no
    pretrained weights (speed does not depend on them)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    for v in variants:
        if v not in VARIANTS:
            raise UserError(f"unknown variant {v!r}: use {', '.join(VARIANTS)}")
    scheme = get_scheme(cfg.data.scheme)
    nc = out_channels(cfg, scheme.num_classes)
    h, w = cfg.data.crop if cfg.data.crop else (512, 1024)
    peak = matmul_peak_tflops(device)
    loader = endless(make_loader(cfg, cfg.data.train_split, scheme, True, device)) if real_loader else None
    rows = []
    for enc in encoders or [cfg.model.encoder]:
        ecfg = copy.deepcopy(cfg)
        if enc != cfg.model.encoder:
            ecfg.model.encoder, ecfg.model.base = enc, DECODER_WIDTH
        ecfg.model.pretrained = "none"
        model = build_model(ecfg, nc).to(device)
        fl = flops_per_image(model, (3, h, w), nc, device)
        size = f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M, {fl / 1e9:.0f} GFLOP"
        fp32_ips = None
        for v in variants:
            if device.type != "cuda" and VARIANTS[v][0] == "bf16" and VARIANTS[v][3]:
                rows.append([enc, size, v, "skipped on CPU", "", "", "", ""])
                continue
            ips, wait = time_variant(ecfg, nc, v, device, loader, steps, warmup)
            fp32_ips = ips if v == "fp32" else fp32_ips
            rows.append([enc, size, v, ips, ips * fl / 1e12, 100 * ips * fl / 1e12 / peak, 100 * wait,
                         f"{ips / fp32_ips:.2f}x" if fp32_ips else "-"])
    head = (f"training step, {w}x{h}, batch {cfg.data.batch_size}, "
            f"{'real shard loader' if real_loader else 'synthetic input'}, {device_name()}; "
            f"unet: base {cfg.model.base} depth {cfg.model.depth}, encoders: decoder width "
            f"{cfg.model.base if encoders is None else DECODER_WIDTH}; FLOPs fwd+bwd per image; MFU against "
            f"a measured bf16 matmul peak of {peak:.1f} TFLOP/s")
    cols = ["model", "params, FLOP/img", "variant", "img/s", "TFLOP/s", "MFU %", "data wait %", "vs fp32"]
    return head + "\n\n" + table(cols, rows)
