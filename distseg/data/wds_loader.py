"""Torch DataLoader over the WebDataset shards, with random access through the shards' index files.

Random access (the approach of `wids`) lets the sampler decide exactly which sample each rank gets,
so epochs are sample-exact and a resumed run skips consumed batches without decoding them. JPEG is
decoded in CPU workers, or on the GPU with torchvision's nvJPEG when data.decode resolves to gpu.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from distseg.data.manifest import load_manifest, shard_paths
from distseg.data.sampler import EpochBatchSampler
from distseg.data.transforms import augment, draw_params, prepare_val
from distseg.errors import UserError


def read_index(tar: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample, from the DALI .idx beside the tar or by scanning the tar."""
    idx = tar.with_suffix(".idx")
    out = []
    if idx.is_file():
        lines = idx.read_text().splitlines()
        for line in lines[1:]:
            f = line.split()
            comps = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
            out.append((f[3].split(".", 1)[0], comps))
        return out
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = (m.offset_data, m.size)
    return out


class ShardSamples:
    """All samples of a manifest, readable by index (file handles reopened per process)."""

    def __init__(self, man: dict):
        self.image_ext = man["image_ext"]
        self.entries: list[tuple[Path, str, dict]] = []
        for tar in shard_paths(man):
            for key, comps in read_index(tar):
                if self.image_ext not in comps or "mask.png" not in comps:
                    raise UserError(f"sample {key} in {tar} lacks .{self.image_ext} or .mask.png")
                self.entries.append((tar, key, comps))
        if len(self.entries) != man["total"]:
            raise UserError(f"{man['_path']} lists {man['total']} samples but the shards hold "
                            f"{len(self.entries)}")
        self._files: dict[Path, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        """The sample key of index i."""
        return self.entries[i][1]

    def read(self, i: int, ext: str) -> bytes:
        """The bytes of one member (`ext`) of sample i, read by offset."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        tar, _, comps = self.entries[i]
        f = self._files.get(tar)
        if f is None:
            f = self._files[tar] = open(tar, "rb")
        off, size = comps[ext]
        f.seek(off)
        return f.read(size)


def decode_mask(data: bytes, lut: torch.Tensor | None) -> torch.Tensor:
    """PNG bytes -> uint8 H x W mask, remapped through `lut` when given."""
    from torchvision.io import ImageReadMode, decode_png

    m = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY)[0]
    return lut[m.long()].to(torch.uint8) if lut is not None else m


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 3 x H x W."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)


class ShardDataset(Dataset):
    """Item (index, epoch, valid) -> decoded, augmented sample (or raw JPEG bytes for GPU decode)."""
    def __init__(self, samples: ShardSamples, cfg, train: bool, lut: np.ndarray | None, gpu_decode: bool):
        self.s, self.cfg, self.train, self.gpu_decode = samples, cfg, train, gpu_decode
        self.lut = torch.from_numpy(lut.astype(np.int64)) if lut is not None else None

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, item):
        i, epoch, valid = item
        mask = decode_mask(self.s.read(i, "mask.png"), self.lut)
        raw = self.s.read(i, self.s.image_ext)
        out = {"key": self.s.key(i), "index": i, "epoch": epoch, "valid": valid}
        if self.gpu_decode:
            out.update(jpeg=torch.frombuffer(bytearray(raw), dtype=torch.uint8), mask_u8=mask)
            return out
        img, m = transform_sample(decode_rgb(raw), mask, self.cfg, self.train, epoch, i)
        out.update(image=img, mask=m)
        return out


def transform_sample(img, mask, cfg, train: bool, epoch: int, index: int):
    """Training augmentation (parameters from seed, epoch, index) or validation normalisation."""
    d = cfg.data
    if train:
        p = draw_params(cfg.train.seed, epoch, index, tuple(d.scale), d.flip, d.color)
        return augment(img, mask, p, d.crop, d.mean, d.std)
    return prepare_val(img, mask, d.mean, d.std)


def collate(items: list[dict]) -> dict:
    """Stack a batch; GPU-decode batches keep lists of JPEG bytes."""
    out = {"key": [it["key"] for it in items], "index": torch.tensor([it["index"] for it in items]),
           "valid": torch.tensor([it["valid"] for it in items])}
    if "jpeg" in items[0]:
        out["jpeg"] = [it["jpeg"] for it in items]
        out["mask_u8"] = [it["mask_u8"] for it in items]
        out["epoch"] = [it["epoch"] for it in items]
        return out
    shapes = {tuple(it["image"].shape) for it in items}
    if len(shapes) > 1:
        raise UserError(f"images of different sizes in one batch ({sorted(shapes)}): set data.crop or "
                        "re-shard with --resize")
    out["image"] = torch.stack([it["image"] for it in items])
    out["mask"] = torch.stack([it["mask"] for it in items])
    return out


class TorchLoader:
    """Iterable of batches in the common contract, on `device`; `set_epoch(e, skip)` before each epoch."""

    def __init__(self, cfg, split: str, train: bool, device: torch.device, world: int, rank: int,
                 lut: np.ndarray | None, man: dict | None = None):
        self.cfg, self.train, self.device = cfg, train, torch.device(device)
        self.man = man or load_manifest(cfg.data.shards, split)
        self.samples = ShardSamples(self.man)
        want = cfg.data.decode
        self.gpu_decode = (self.device.type == "cuda" and self.man["image_ext"] == "jpg"
                           and want in ("gpu", "auto"))
        if want == "gpu" and not self.gpu_decode:
            raise UserError("data.decode=gpu needs CUDA and JPEG shards")
        bs = cfg.data.batch_size if train else cfg.data.val_batch_size
        self.sampler = EpochBatchSampler(len(self.samples), bs, world, rank, shuffle=train,
                                         seed=cfg.train.seed)
        ds = ShardDataset(self.samples, cfg, train, lut, self.gpu_decode)
        nw = cfg.data.num_workers
        self.dl = DataLoader(ds, batch_sampler=self.sampler, num_workers=nw, collate_fn=collate,
                             pin_memory=self.device.type == "cuda", persistent_workers=nw > 0,
                             prefetch_factor=4 if nw > 0 else None)

    @property
    def num_samples(self) -> int:
        """Samples in the split (padding excluded)."""
        return len(self.samples)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch and how many of its batches this rank already consumed."""
        self.sampler.set_epoch(epoch, skip_batches)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for b in self.dl:
            yield self._finish(b)

    def _finish(self, b: dict) -> dict:
        nb = self.device.type == "cuda"
        if "jpeg" in b:
            from torchvision.io import decode_jpeg

            imgs = decode_jpeg(b.pop("jpeg"), device=self.device)
            pairs = [transform_sample(im, m.to(self.device, non_blocking=nb), self.cfg, self.train, e, int(i))
                     for im, m, e, i in zip(imgs, b.pop("mask_u8"), b.pop("epoch"), b["index"])]
            b["image"] = torch.stack([p[0] for p in pairs])
            b["mask"] = torch.stack([p[1] for p in pairs])
        else:
            b["image"] = b["image"].to(self.device, non_blocking=nb)
            b["mask"] = b["mask"].to(self.device, non_blocking=nb)
        b["valid"] = b["valid"].to(self.device, non_blocking=nb)
        return b
