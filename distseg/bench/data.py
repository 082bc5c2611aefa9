"""`distseg bench data`: the data pipelines side by side (img/s, CPU cores busy, img/s per busy core); with
`--profile`, where the torch loader's CPU time goes per image, in its workers and in the main process
(data/parts.py)."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np
import torch
from torchvision import tv_tensors

from distseg.bench.common import endless, measure, table, with_data
from distseg.data.dali_loader import dali_available
from distseg.data.loader import make_loader
from distseg.data.torch_loader import crop_sample
from distseg.data.transforms import decode_pil, draft_factor, draw_params, window
from distseg.errors import UserError
from distseg.labels import IGNORE, get_scheme
from distseg.shards.cityscapes import find_pairs, resolve_root
from distseg.shards.manifest import load_manifest
from distseg.shards.shard_reader import ShardSamples, decode_mask, decode_rgb
from distseg.shards.split import OpenSplit, open_split


class DecodeOnly(torch.utils.data.Dataset):
    """The floor a loader is measured against: decode the full-size image and mask of each shard sample with
    the loader's own decoders, nothing else."""

    def __init__(self, samples: ShardSamples, lut):
        self.s, self.lut = samples, lut

    def __len__(self):
        return len(self.s)

    def __getitem__(self, i):
        i = i % len(self.s)
        img, _ = decode_pil(self.s.read(i, "image"))
        img.load()
        mask = decode_mask(self.s.read(i, "mask"), self.lut)
        return {"image": torch.zeros(1), "mask": mask[:1, :1]}


class TransformOnly(torch.utils.data.Dataset):
    """What a loader cannot do without: the training transform alone (decode, crop, resize, jitter, flip of
    image and mask, `crop_sample`: the worker's own, its pixels left for the collate to pack), on sample
    bytes read into memory beforehand."""

    def __init__(self, samples: ShardSamples, lut, data, seed: int, count: int):
        self.lut, self.data, self.seed = lut, data, seed
        self.raw = [(samples.read(i, "image"), samples.read(i, "mask"))
                    for i in range(min(count, len(samples)))]

    def __len__(self):
        return len(self.raw)

    def __getitem__(self, i):
        i = i % len(self.raw)
        image, mask = self.raw[i]
        img, m = crop_sample(image, decode_mask(mask, self.lut), self.data, self.seed, True, 0, i)
        return {"image": torch.zeros(1), "mask": m[:1, :1]}


class TorchvisionReference(torch.utils.data.Dataset):
    """The peer a user would otherwise pick: torchvision's references/segmentation pipeline (transforms v2:
    RandomResize of the short side, RandomCrop with padding, RandomHorizontalFlip, ToDtype, Normalize), on
    the Cityscapes PNG folder or on the same JPEG shards."""

    def __init__(self, cfg, lut, pairs=None, samples: ShardSamples | None = None):
        from torchvision.transforms import v2

        self.pairs, self.samples, self.lut = pairs, samples, lut
        d = cfg.data
        short = self._short_side()
        self.tf = v2.Compose([
            v2.RandomResize(int(d.scale[0] * short), int(d.scale[1] * short) + 1),
            v2.RandomCrop(tuple(d.crop), pad_if_needed=True,
                          fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE}),
            v2.RandomHorizontalFlip(0.5 if d.flip else 0.0),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(d.mean, d.std)])

    def _short_side(self) -> int:
        img, _ = self._read(0)
        return min(img.shape[-2:])

    def __len__(self):
        return len(self.pairs) if self.pairs is not None else len(self.samples)

    def _read(self, i):
        from torchvision.io import ImageReadMode, decode_image, decode_png, read_file

        if self.pairs is not None:
            p = self.pairs[i % len(self.pairs)]
            img = decode_image(read_file(str(p.image)), ImageReadMode.RGB)
            mask = decode_png(read_file(str(p.label)), ImageReadMode.GRAY)[0]
            return img, torch.from_numpy(np.take(self.lut.astype(np.uint8), mask.numpy()))
        i = i % len(self.samples)
        return decode_rgb(self.samples.read(i, "image")), \
            decode_mask(self.samples.read(i, "mask"), self.lut)

    def __getitem__(self, i):
        img, mask = self._read(i)
        x, m = self.tf(tv_tensors.Image(img), tv_tensors.Mask(mask))
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
    if hasattr(it, "close"):  # run the loader's `finally` now: its prefetcher stops before the cache goes
        it.close()
    return {"img_s": done * batch_size / m["wall"], "cores": m["cores"], "batches": done}


def _dataset_loader(ds, bs: int, nw: int, n: int, cuda: bool):
    sampler = torch.utils.data.RandomSampler(ds, replacement=True, num_samples=n)
    dl = torch.utils.data.DataLoader(ds, batch_size=bs, sampler=sampler, num_workers=nw, pin_memory=cuda,
                                     persistent_workers=False)
    for b in dl:
        yield {k: v.to("cuda", non_blocking=True) if cuda else v for k, v in b.items()}


MODES = {"decode": "decode only: full image + mask, the loader's decoders (1 process)",
         "transform": "training transform alone: bytes in memory -> augmented crop (1 process)",
         "torch-cpu": "torch loader, CPU decode", "torch-gpu": "torch loader, GPU decode (nvJPEG)",
         "dali": "DALI, CPU mode (device_id=None)",
         "dali-gpu": "DALI, mixed (GPU) decode + GPU augmentation",
         "tv-png": "torchvision reference, PNG folder",
         "tv-jpg": "torchvision reference, same JPEG shards"}


class Variant(NamedTuple):
    """A row's change to the data settings: `--modes torch-cpu+cat` times the torch loader with it, beside
    `torch-cpu` as configured, on the same shards."""

    label: str  # what the row's name adds
    data: dict  # data.* settings of the row
    modes: tuple[str, ...]  # the pipelines it applies to (those whose rows read these settings)


# One entry per variant. Rare-class sampling changes which samples the loader reads (the shards need their
# per-sample class counts); a low pixel minimum lets the synthetic data's small rare objects count.
DATA_VARIANTS = {
    "cat": Variant("class-aware crops, data.cat_max_ratio=0.75", {"cat_max_ratio": 0.75},
                   ("transform", "torch-cpu", "torch-gpu")),
    "rare": Variant("rare-class sampling, data.sampling=rare", {"sampling": "rare", "rare_min_pixels": 50},
                    ("torch-cpu", "torch-gpu")),
}


def parse_mode(mode: str) -> tuple[str, Variant | None]:
    """A row's pipeline and variant: `PIPELINE` runs as configured, `PIPELINE+VARIANT` with the variant's
    data settings."""
    base, _, name = mode.partition("+")
    variant = DATA_VARIANTS.get(name)
    if base not in MODES or (name and (variant is None or base not in variant.modes)):
        extra = "; ".join(f"+{k} after {', '.join(v.modes)}" for k, v in DATA_VARIANTS.items())
        raise UserError(f"unknown mode {mode!r}: use {', '.join(MODES)} ({extra})")
    return base, variant


def row_name(mode: str) -> str:
    """What a row is called in the table."""
    base, variant = parse_mode(mode)
    return f"{MODES[base]}, {variant.label}" if variant else MODES[base]


def reduced_decode_share(cfg, opened: OpenSplit, epochs: int = 4) -> float:
    """Share of training samples whose crop window is downscaled 2x or more (decoded at reduced size), over a
    few epochs of this split's sample sizes and the configured scale range."""
    man = opened.manifest
    if man["image_ext"] != "jpg" or not cfg.data.crop:
        return 0.0
    samples = opened.samples(cfg.data)
    w, h = json.loads(samples.read(0, "json"))["size"]  # the shards' image size (all alike in Cityscapes)
    n = hits = 0
    for e in range(epochs):
        for i in range(man["total"]):
            p = draw_params(cfg.train.seed, e, i, tuple(cfg.data.scale), cfg.data.flip, cfg.data.color)
            hits += draft_factor(window(h, w, p, cfg.data.crop), w) > 1
            n += 1
    return hits / max(n, 1)


def time_pipeline(mode: str, cfg, root, opened: OpenSplit, n_batches: int) -> dict | str:
    """One row's figures ({"img_s", "cores"}) over `n_batches` batches, or why it was skipped; `mode` is a
    pipeline, or a pipeline+variant (`parse_mode`)."""
    mode, variant = parse_mode(mode)
    cfg = with_data(cfg, **variant.data) if variant else cfg
    split, scheme, lut = opened.split, opened.scheme, opened.lut
    bs, nw, cuda = cfg.data.batch_size, cfg.data.num_workers, torch.cuda.is_available()
    if mode in ("torch-gpu", "dali-gpu") and not cuda:
        return "skipped: no CUDA"
    if mode.startswith("dali") and not dali_available():
        return "skipped: DALI not installed (pip install \"distseg[dali]\")"
    if mode in ("torch-cpu", "torch-gpu", "dali", "dali-gpu"):
        c = with_data(cfg, loader="dali" if mode.startswith("dali") else "torch",
                      decode="gpu" if mode == "torch-gpu" else "cpu")
        where = "cpu" if mode == "dali" or not cuda else "cuda:0"  # DALI's CPU mode on any machine
        return _time_batches(endless(make_loader(c, split, scheme, True, where)), n_batches, bs)
    samples = opened.samples(cfg.data)
    need = (n_batches + 2) * bs
    if mode == "decode":  # one process: its rate is a rate per core
        ds, workers = DecodeOnly(samples, lut), 0
    elif mode == "transform":
        ds, workers = TransformOnly(samples, lut, cfg.data, cfg.train.seed, need), 0
    elif mode == "tv-png":  # label ids from the folder: the scheme's whole remap
        ds, workers = TorchvisionReference(cfg, scheme.lut, pairs=find_pairs(resolve_root(root), split)), nw
    else:  # shard masks: remap labelid shards only
        shard_lut = lut if lut is not None else np.arange(256)
        ds, workers = TorchvisionReference(cfg, shard_lut, samples=samples), nw
    r = _time_batches(_dataset_loader(ds, bs, workers, need, cuda), n_batches, bs)
    if mode in ("decode", "transform"):
        r["cores"] = 1.0  # one process: one core by construction (jiffies are too coarse)
    return r


def compare_pipelines(results: dict) -> tuple[list, dict]:
    """Table rows and JSON of the pipelines' figures, each per busy core against decode-only's and
    transform-only's, and a variant's img/s against its pipeline's as configured (when both ran)."""
    def rate(name):
        r = results.get(name)
        return r["img_s"] / max(r["cores"], 1e-9) if isinstance(r, dict) else None

    def vs_plain(mode, r):
        plain = results.get(parse_mode(mode)[0])
        return r["img_s"] / plain["img_s"] if "+" in mode and isinstance(plain, dict) else None
    base_rate, transform_rate = rate("decode"), rate("transform")
    rows, out = [], {}
    for mode, r in results.items():
        if isinstance(r, str):
            rows.append([row_name(mode), r, "", "", "", "", ""])
            out[mode] = {"skipped": r}
            continue
        per_core, plain = rate(mode), vs_plain(mode, r)
        ratio = per_core / base_rate if base_rate else None
        vs_transform = per_core / transform_rate if transform_rate else None
        rows.append([row_name(mode), r["img_s"], r["cores"], per_core, f"{ratio:.2f}x" if ratio else "-",
                     f"{vs_transform:.2f}x" if vs_transform else "-", f"{plain:.2f}x" if plain else "-"])
        out[mode] = {"img_s": r["img_s"], "cores_busy": r["cores"], "img_s_per_busy_core": per_core,
                     "vs_decode_only": ratio, "vs_transform_only": vs_transform, "vs_without_variant": plain}
    return rows, out


def bench_data(cfg, root, split: str, n_batches: int, modes: list[str], as_json: bool = False,
               profile: bool = False) -> str:
    """One row per pipeline over the same images: img/s, CPU cores busy, img/s per busy core, and that
    per-core rate as a share of decode-only's; a variant's row also as a share of its pipeline's img/s.
    `profile`: the torch loader's CPU time per image by part after them (`loader_parts`)."""
    for mode in modes:  # an unknown one before any is timed
        parse_mode(mode)
    opened = open_split(cfg.data.shards, split, get_scheme(cfg.data.scheme))
    man = opened.manifest
    results = {mode: time_pipeline(mode, cfg, root, opened, n_batches) for mode in modes}
    rows, out = compare_pipelines(results)
    parts = loader_parts(cfg, split, opened.scheme, n_batches) if profile else None
    transform = results.get("transform")
    transform_ms = 1000 / transform["img_s"] if isinstance(transform, dict) else None
    cuda = torch.cuda.is_available()
    crop = "x".join(map(str, cfg.data.crop[::-1])) if cfg.data.crop else "full"
    reduced = reduced_decode_share(cfg, opened)
    head = (f"data pipelines, {split} split of {man['_path']} ({man['total']} samples, {man['image_ext']}), "
            f"batch {cfg.data.batch_size}, {cfg.data.num_workers} workers/threads, crop {crop}, scale "
            f"{cfg.data.scale}, {n_batches} batches each, "
            f"{'GPU ' + torch.cuda.get_device_name() if cuda else 'no GPU'}, {os.cpu_count()} CPU cores; "
            f"reduced (DCT) JPEG decode for {100 * reduced:.1f}% of samples at data.scale={cfg.data.scale}")
    if as_json:
        return json.dumps({"setup": head, "reduced_decode_share": reduced, "pipelines": out,
                           **({"profile": parts} if parts else {})}, indent=1)
    text = head + "\n\n" + table(["pipeline", "img/s", "CPU cores busy", "img/s per busy core",
                                   "per core vs decode only", "per core vs transform only",
                                   "img/s vs without the variant"], rows)
    return text + ("\n\n" + parts_table(cfg, parts, transform_ms) if parts else "")


PART_NAMES = {"reads": "member reads (index lookup, seek, read)", "decode": "decode: image and mask",
              "transform": "transform: crop, resize, jitter, flip",
              "collate": "collate: pack into one buffer",
              "hand-off": "hand-off to the main process (the worker's CPU time outside its parts)",
              "total": "total (the worker's CPU time)", "wait": "wait for the next batch (wall time)",
              "receive": "receive a batch (CPU time in the wait)",
              "finish": "finish: unpack, normalise, masks to int64"}


def loader_parts(cfg, split: str, scheme, n_batches: int, warmup: int = 2) -> dict:
    """The torch loader (CPU decode) with its parts timed (`TorchLoader.profile_parts`) over `n_batches`
    batches after `warmup`: ms of CPU time per image in the workers and in the main process, img/s."""
    c = with_data(cfg, loader="torch", decode="cpu")
    loader = make_loader(c, split, scheme, True, "cuda:0" if torch.cuda.is_available() else "cpu")
    parts = loader.profile_parts()
    batches = endless(loader)
    for _ in range(warmup):
        next(batches)
    parts.restart()
    with measure() as m:
        for _ in range(n_batches):
            next(batches)
    batches.close()
    return {**parts.breakdown(), "img_s": n_batches * c.data.batch_size / m["wall"], "cores": m["cores"]}


def parts_table(cfg, r: dict, transform_ms: float | None) -> str:
    """`loader_parts`' figures as a table, with the workers' cost beyond decode and transform (the issue's
    goal: at most 0.5 ms per image) and, when it ran, the transform-only row's time per image beside."""
    w, main = r["worker"], r["main"]
    beyond = w["total"] - w["decode"] - w["transform"]
    rows = [["worker", PART_NAMES[k], w[k]] for k in ("reads", "decode", "transform", "collate", "hand-off",
                                                         "total")]
    rows.append(["worker", "beyond decode and transform (reads, collate, hand-off)", beyond])
    if transform_ms:
        rows.append(["reference", "transform-only row, wall time: decode + transform in one process",
                     transform_ms])
    rows += [["main", PART_NAMES[k], main[k]] for k in ("wait", "receive", "finish")]
    head = (f"torch loader, CPU time per image by part (--profile): {cfg.data.num_workers} workers, "
            f"{w['images']} images in the workers' window, {main['images']} in the main process's, "
            f"{r['img_s']:.1f} img/s on {r['cores']:.2f} busy cores; CPU time of the thread doing each part "
            "(the hand-off: the rest of the worker process's CPU time)"
            + ("; with 0 workers the parts run in the main process, and its rest is counted as the hand-off"
               if not cfg.data.num_workers else ""))
    return head + "\n\n" + table(["process", "part", "ms per image"], rows)


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
