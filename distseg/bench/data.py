"""`distseg bench data`: the data pipelines side by side (img/s, CPU cores busy, img/s per busy core)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from distseg.bench.common import endless, measure, table, with_data
from distseg.data.cityscapes import find_pairs, resolve_root
from distseg.data.dali_loader import dali_available
from distseg.data.loader import make_loader
from distseg.data.manifest import load_manifest
from distseg.data.wds_loader import transform_sample
from distseg.errors import UserError
from distseg.labels import get_scheme


class RawPngDataset(torch.utils.data.Dataset):
    """The seed's way: PNG image + labelIds PNG from the Cityscapes folder, remapped in the worker."""

    def __init__(self, pairs, cfg, lut):
        self.pairs, self.cfg, self.lut = pairs, cfg, lut

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
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
    """One row per pipeline: img/s, CPU cores busy, img/s per busy core."""
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
            c = with_data(cfg, loader="torch", decode="cpu" if mode == "torch-cpu" else "gpu")
            L = make_loader(c, split, scheme, True, device)
            r = _time_batches(endless(L), n_batches, bs)
            name = "torch loader, CPU decode" if mode == "torch-cpu" else "torch loader, GPU decode (nvJPEG)"
            del L
        elif mode == "dali":
            if not dali_available():
                rows.append(["DALI", "skipped: DALI not installed", "", ""])
                continue
            L = make_loader(with_data(cfg, loader="dali"), split, scheme, True, device)
            r = _time_batches(endless(L), n_batches, bs)
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

