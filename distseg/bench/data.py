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



def _epoch_timing(cfg, split: str, scheme, n_batches: int, device) -> dict:
    """img/s from building the loader to the last batch (start-up and verification included), and the bytes
    the cache gained (every process's downloads: DataLoader workers fetch shards too)."""
    from pathlib import Path

    def cached() -> int:
        d = Path(cfg.data.cache_dir) if cfg.data.cache_dir else None
        return sum(f.stat().st_size for f in d.glob("*.*") if f.suffix in (".tar",
                                                                           ".idx")) if d and d.is_dir() else 0
    before = cached()
    with measure() as m:
        loader = make_loader(cfg, split, scheme, True, device)
        r = _time_batches(endless(loader), n_batches, cfg.data.batch_size, warmup=0)
    r["img_s"] = r["batches"] * cfg.data.batch_size / m["wall"]
    r["downloaded"] = cached() - before
    return r


def bench_storage(cfg, url: str, split: str, n_batches: int, repeats: int = 3) -> str:
    """The torch loader on local shards vs the same shards at `url`, cold cache (a fresh cache for every
    repeat, downloads included) and warm cache (already filled): median img/s of `repeats` runs each."""
    import tempfile

    scheme = get_scheme(cfg.data.scheme)
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    local_man = load_manifest(cfg.data.shards, split)
    remote = with_data(cfg, shards=url)
    rows = []
    with tempfile.TemporaryDirectory(prefix="distseg-bench-cache-") as tmp:
        runs = {"local shards": [], "remote, cold cache": [], "remote, warm cache": []}
        for r in range(repeats):
            runs["local shards"].append(_epoch_timing(cfg, split, scheme, n_batches, device))
            cold = with_data(remote, cache_dir=f"{tmp}/cold-{r}")
            runs["remote, cold cache"].append(_epoch_timing(cold, split, scheme, n_batches, device))
            warm = with_data(remote, cache_dir=f"{tmp}/warm")
            if r == 0:  # fill the warm cache once, untimed
                make_loader(warm, split, scheme, True, device).files.all_tars()
            runs["remote, warm cache"].append(_epoch_timing(warm, split, scheme, n_batches, device))
        local = float(np.median([x["img_s"] for x in runs["local shards"]]))
        for name, xs in runs.items():
            ips = float(np.median([x["img_s"] for x in xs]))
            mb = float(np.median([x["downloaded"] for x in xs])) / 1e6
            rows.append([name, ips, f"{100 * ips / local:.1f}%", mb])
    head = (f"storage: torch loader over {n_batches} batches of {cfg.data.batch_size}, "
            f"{cfg.data.num_workers} "
            f"workers, median of {repeats}; local {local_man['_path']} vs {url} "
            f"({local_man['bytes'] / 1e6:.1f} "
            "MB of shards)")
    return head + "\n\n" + table(["shards", "img/s", "vs local", "MB downloaded per run"], rows)


def shuffle_report(man: dict, batch_size: int, worlds: tuple[int, ...] = (1, 2, 4, 8), seed: int = 0,
                   window: int = 4) -> str:
    """Per shuffle and world size: shard bytes each rank reads per epoch (what it downloads with a cache that
    holds its window), and how far apart samples stored next to each other land in the epoch's step order
    (median distance as a share of a rank's epoch: about 0.29 for a uniform shuffle, near 0 for none)."""
    from distseg.data.sampler import EpochBatchSampler, ShardWindowSampler

    sizes = [sh["count"] for sh in man["shards"]]
    nbytes = [sh["bytes"] for sh in man["shards"]]
    shard_of = np.repeat(np.arange(len(sizes)), sizes)
    n = len(shard_of)
    rows = []
    for world in worlds:
        if world > n:
            continue
        for mode in ("global", "shards"):
            steps = np.zeros(n)
            per_rank = []
            for rank in range(world):
                s = (EpochBatchSampler(n, batch_size, world, rank, shuffle=True,
                                       seed=seed) if mode == "global"
                     else ShardWindowSampler(sizes, batch_size, world, rank, seed, window))
                batches = s.batches()
                slots = max(1, len(batches) * batch_size)
                for j, bt in enumerate(batches):
                    for k, (i, _, v) in enumerate(bt):
                        if v:  # where in this rank's epoch the sample is read, as a share of it
                            steps[i] = (j * batch_size + k) / slots
                per_rank.append(sum(nbytes[k] for k in {shard_of[i] for bt in batches for i, _, _ in bt}))
            spread = float(np.median(np.abs(np.diff(steps))))
            rows.append([mode, world, float(np.mean(per_rank)) / 1e6,
                         f"{100 * np.mean(per_rank) / sum(nbytes):.0f}%",
                         f"{spread:.3f}"])
    head = (f"shuffle: {man['_path']}, {n} samples in {len(sizes)} shards, batch {batch_size} per rank, "
            f"data.shuffle_window {window}")
    return head + "\n\n" + table(["data.shuffle", "ranks", "MB read per rank per epoch", "share of the data",
                                  "neighbour spread"], rows)
