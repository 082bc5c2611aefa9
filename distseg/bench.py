"""`distseg bench data|train|shard`: throughput measurements, printed as Markdown tables.

Speed is shown here, never asserted in tests. CPU use is read from /proc/stat (whole machine, in cores),
so DataLoader worker processes and DALI threads are counted alike.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager

import numpy as np
import torch

from distseg.errors import UserError


def _busy_jiffies() -> int:
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + (v[7] if len(v) > 7 else 0)


@contextmanager
def measure():
    """Yields a dict filled on exit with wall seconds and CPU cores busy (machine-wide)."""
    out = {}
    j0, t0 = _busy_jiffies(), time.perf_counter()
    yield out
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    out["wall"] = time.perf_counter() - t0
    out["cores"] = (_busy_jiffies() - j0) / os.sysconf("SC_CLK_TCK") / max(out["wall"], 1e-9)


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return (f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}") if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


# --- data ------------------------------------------------------------------------------------------

class RawPngDataset(torch.utils.data.Dataset):
    """The seed's way: PNG image + labelIds PNG from the Cityscapes folder, remapped in the worker."""

    def __init__(self, pairs, cfg, lut):
        self.pairs, self.cfg, self.lut = pairs, cfg, lut

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        from PIL import Image

        from distseg.data.wds_loader import transform_sample

        p = self.pairs[i % len(self.pairs)]
        img = torch.from_numpy(np.array(Image.open(p.image).convert("RGB"))).permute(2, 0, 1)
        mask = torch.from_numpy(self.lut[np.asarray(Image.open(p.label))])
        x, m = transform_sample(img, mask, self.cfg, True, 0, i)
        return {"image": x, "mask": m}


def _time_batches(iterable, n_batches: int, batch_size: int, warmup: int = 2) -> dict:
    it = iter(iterable)
    for _ in range(warmup):
        next(it)
    done = 0
    with measure() as m:
        for _ in range(n_batches):
            b = next(it, None)
            if b is None:
                break
            if b["image"].is_cuda:
                b["image"].sum().item()
            done += 1
    return {"img_s": done * batch_size / m["wall"], "cores": m["cores"], "batches": done}


def bench_data(cfg, root, split: str, n_batches: int, modes: list[str]) -> str:
    from distseg.data.cityscapes import find_pairs, resolve_root
    from distseg.data.dali_loader import dali_available
    from distseg.data.loader import make_loader
    from distseg.data.manifest import load_manifest
    from distseg.labels import get_scheme

    scheme = get_scheme(cfg.data.scheme)
    man = load_manifest(cfg.data.shards, split)
    bs, nw = cfg.data.batch_size, cfg.data.num_workers
    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    need = (n_batches + 2) * bs
    rows = []
    for mode in modes:
        if mode == "png":
            pairs = find_pairs(resolve_root(root), split)
            ds = RawPngDataset(pairs, cfg, scheme.lut)
            sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=need)
            dl = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=nw,
                                             persistent_workers=False, pin_memory=cuda)

            def moved(dl=dl):
                for b in dl:
                    yield {k: v.to("cuda", non_blocking=True) if cuda else v for k, v in b.items()}

            r = _time_batches(moved(), n_batches, bs)
            name = "raw Cityscapes PNG folder (seed)"
        elif mode in ("torch-cpu", "torch-gpu"):
            if mode == "torch-gpu" and not cuda:
                rows.append(["torch loader, GPU decode (nvJPEG)", "skipped: no CUDA", "", ""])
                continue
            c = _with(cfg, loader="torch", decode="cpu" if mode == "torch-cpu" else "gpu")
            L = make_loader(c, split, scheme, True, device)
            r = _time_batches(_epochs(L), n_batches, bs)
            name = "torch loader, CPU decode" if mode == "torch-cpu" else "torch loader, GPU decode (nvJPEG)"
            del L
        elif mode == "dali":
            if not dali_available():
                rows.append(["DALI", "skipped: DALI not installed", "", ""])
                continue
            L = make_loader(_with(cfg, loader="dali"), split, scheme, True, device)
            r = _time_batches(_epochs(L), n_batches, bs)
            name = "DALI, mixed (GPU) decode" if cuda else "DALI, CPU mode (device_id=None)"
            del L
        else:
            raise UserError(f"unknown mode {mode!r}: use png, torch-cpu, torch-gpu, dali")
        rows.append([name, r["img_s"], r["cores"], r["img_s"] / max(r["cores"], 1e-9)])
    crop = "x".join(map(str, cfg.data.crop[::-1])) if cfg.data.crop else "full"
    head = (f"data pipelines, {split} split of {man['_path']} ({man['total']} samples), batch {bs}, "
            f"{nw} workers/threads, crop {crop}, {n_batches} batches each, "
            f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'no GPU'}, {os.cpu_count()} CPU cores")
    return head + "\n\n" + table(["pipeline", "img/s", "CPU cores busy", "img/s per busy core"], rows)


def _with(cfg, **data_kw):
    import copy

    c = copy.deepcopy(cfg)
    for k, v in data_kw.items():
        setattr(c.data, k, v)
    return c


def _epochs(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


# --- train -----------------------------------------------------------------------------------------

VARIANTS = {  # name: (precision, tf32, channels_last, compile)
    "fp32": ("no", False, False, False),
    "tf32": ("no", True, False, False),
    "bf16": ("bf16", True, False, False),
    "bf16+cl": ("bf16", True, True, False),
    "bf16+cl+compile": ("bf16", True, True, True),
}


def flops_per_image(model, shape, num_classes: int, device) -> float:
    """fwd+bwd FLOPs for one image, counted by torch's FlopCounterMode (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

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
    from distseg.labels import get_scheme
    from distseg.models.unet import build_model, out_channels
    from distseg.train import build_optimizer

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
        from distseg.data.loader import make_loader

        loader = _epochs(make_loader(cfg, cfg.data.train_split, scheme, True, device))
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
    dev = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    head = (f"training step, U-Net base {cfg.model.base} depth {cfg.model.depth}, {w}x{h}, batch {bs}, "
            f"{fl / 1e12:.3f} TFLOP/image fwd+bwd, {'real shard loader' if real_loader else 'synthetic input'}, "
            f"{dev}; MFU against a measured bf16 matmul peak of "
            f"{peak:.1f} TFLOP/s")
    return head + "\n\n" + table(["variant", "img/s", "TFLOP/s", "MFU %", "data wait %", "vs fp32"], rows)


# --- shard -----------------------------------------------------------------------------------------

def bench_shard(root, split: str, workers: int, limit: int) -> str:
    from distseg.data.cityscapes import find_pairs, resolve_root
    from distseg.data.shard import ShardOptions, encode_pair
    from distseg.labels import get_scheme

    pairs = find_pairs(resolve_root(root), split)[:limit]
    scheme = get_scheme("trainid")
    rows = []
    src = sum(p.image.stat().st_size + p.label.stat().st_size for p in pairs)
    for fmt in ("png", "jpg"):
        opts = ShardOptions(split=split, image_format=fmt)
        with measure() as m:
            size = sum(sum(len(d) for _, d in encode_pair(p, opts, scheme).files) for p in pairs)
        rows.append([f"{fmt}{' q95' if fmt == 'jpg' else ''}", len(pairs) / m["wall"], size / src])
    return (f"shard encoding (decode PNG, remap, encode), one core, {len(pairs)} {split} images\n\n"
            + table(["image format", "img/s per core", "bytes vs raw PNG"], [[r[0], r[1], f"{r[2]:.2f}x"] for r in rows]))
