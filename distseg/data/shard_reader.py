"""Reading shards by random access: the verified local file of each shard (`ShardFiles`, with a background
`Prefetcher` for remote shards), the samples of a manifest by index (`ShardSamples`, from the shards' `.idx`
files) and the decoders of their members. Shared by the torch loader, the report and the benchmarks.

Every process checks a shard's sha256 against the manifest before its first read.
"""

from __future__ import annotations

import os
import tarfile
import threading
from pathlib import Path

import numpy as np
import torch

from distseg.data.manifest import shard_url
from distseg.data.storage import ShardCache
from distseg.errors import UserError
from distseg.files import sha256_file
from distseg.urls import redact


class ShardFiles:
    """The verified local file of each shard of a manifest: the shard itself when local, a node-local cache
    copy (data.cache_dir) when remote. Each process checks each shard's sha256 before its first read; a
    damaged cache copy is downloaded once more, a damaged local shard is an error."""

    def __init__(self, man: dict, cache_dir: str | None = None, cache_size: int = 0, tries: int = 5):
        self.man = man
        if man["_remote"] and not cache_dir:
            raise UserError(f"data.shards is remote ({redact(man['_base'])}): set data.cache_dir to a "
                            "folder on "
                            "node-local disk for the shard cache")
        self.cache = ShardCache(cache_dir, cache_size, tries) if man["_remote"] else None
        self._verified: set[int] = set()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.man["shards"])

    def tar(self, i: int) -> Path:
        """Shard i's tar as a verified local file (downloaded into the cache if remote)."""
        if self._pid != os.getpid():  # a new process (DataLoader worker): verify again before reading
            self._verified, self._pid = set(), os.getpid()
        sh = self.man["shards"][i]
        if self.cache is None:
            path = Path(self.man["_base"]) / sh["name"]
        else:
            path = self.cache.fetch(shard_url(self.man, i), sh["sha256"])
        if i not in self._verified:
            if sha256_file(path) != sh["sha256"]:
                if self.cache is None:
                    raise UserError(f"shard {path} fails its sha256 check: it changed since it was written; "
                                    "re-shard")
                self.cache.discard(shard_url(self.man, i))
                path = self.cache.fetch(shard_url(self.man, i), sh["sha256"])
                if sha256_file(path) != sh["sha256"]:
                    raise UserError(f"cache copy of shard {sh['name']} in {self.cache.dir} keeps failing its "
                                    "sha256 check: is the cache disk healthy?")
            self._verified.add(i)
        return path

    def index(self, i: int) -> Path | None:
        """Shard i's index file (DALI, random access), local or cached; checked if the manifest has a hash."""
        sh = self.man["shards"][i]
        if not sh.get("index"):
            return None
        if self.cache is None:
            p = Path(self.man["_base"]) / sh["index"]
            return p if p.is_file() else None
        return self.cache.fetch(shard_url(self.man, i, "index"), sh.get("index_sha256"))

    def all_tars(self) -> list[Path]:
        """Every shard, verified and local (DALI reads whole shards by path)."""
        return [self.tar(i) for i in range(len(self))]

    def prefetcher(self, order: list[int], ahead: int) -> Prefetcher | None:
        """A background downloader of the shards in `order`, kept `ahead` shards beyond the reader."""
        if self.cache is None or not order:
            return None
        return Prefetcher(self, order, ahead)

    @property
    def downloaded_bytes(self) -> int:
        """Bytes this process downloaded into the cache."""
        return self.cache.downloaded if self.cache else 0


class Prefetcher:
    """Downloads the shards of one epoch in read order on a thread, never more than `ahead` shards beyond
    the position the reader reported (`advance`), so a size-limited cache is not filled with shards that
    push out the ones still being read."""

    def __init__(self, files: ShardFiles, order: list[int], ahead: int):
        self.files, self.order, self.ahead = files, order, max(1, ahead)
        self.pos, self.done = 0, 0
        self.cv = threading.Condition()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="shard-prefetch", daemon=True)
        self.thread.start()

    def advance(self, pos: int) -> None:
        """The reader is at position `pos` of `order`."""
        with self.cv:
            self.pos = max(self.pos, pos)
            self.cv.notify()

    def stop(self) -> None:
        """End the thread (at the end of an epoch) and wait for it: a download in progress completes, so
        nothing writes into the cache after the reader is done with it (the cache may be removed next)."""
        with self.cv:
            self.stopped = True
            self.cv.notify()
        if self.thread is not threading.current_thread():
            self.thread.join()

    def _run(self) -> None:
        cache, man = self.files.cache, self.files.man
        while True:
            with self.cv:
                while not self.stopped and self.done >= min(len(self.order), self.pos + self.ahead + 1):
                    self.cv.wait()
                if self.stopped or self.done >= len(self.order):
                    return
                i = self.order[self.done]
            try:
                cache.fetch(shard_url(man, i), man["shards"][i]["sha256"])
            except Exception:  # the reader fetches (and reports) it itself when it needs it
                return
            self.done += 1


def read_index(idx: Path | None, tar: Path | None) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample, from a DALI .idx file or by scanning the tar."""
    out = []
    if idx is not None:
        for line in idx.read_text().splitlines()[1:]:
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

    def __init__(self, man: dict, files: ShardFiles):
        self.image_ext, self.files = man["image_ext"], files
        self.entries: list[tuple[int, str, dict]] = []  # (shard index, key, {ext: (offset, size)})
        for k, sh in enumerate(man["shards"]):
            idx = files.index(k)
            for key, comps in read_index(idx, None if idx else files.tar(k)):
                if self.image_ext not in comps or "mask.png" not in comps:
                    raise UserError(f"sample {key} in {sh['name']} lacks .{self.image_ext} or .mask.png")
                self.entries.append((k, key, comps))
        if len(self.entries) != man["total"]:
            raise UserError(f"{man['_path']} lists {man['total']} samples but the shards hold "
                            f"{len(self.entries)}")
        self._handles: dict[Path, object] = {}
        self._pid = None

    def __len__(self) -> int:
        return len(self.entries)

    def key(self, i: int) -> str:
        """The sample key of index i."""
        return self.entries[i][1]

    def shard(self, i: int) -> int:
        """Index (in the manifest) of the shard holding sample i."""
        return self.entries[i][0]

    def shard_name(self, i: int) -> str:
        """File name of the shard holding sample i."""
        return self.files.man["shards"][self.entries[i][0]]["name"]

    def read(self, i: int, ext: str) -> bytes:
        """The bytes of one member (`ext`) of sample i, read by offset from its verified shard."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        k, _, comps = self.entries[i]
        tar = self.files.tar(k)
        f = self._handles.get(tar)
        if f is None:
            f = self._handles[tar] = open(tar, "rb")
        off, size = comps[ext]
        f.seek(off)
        return f.read(size)


def decode_mask(data: bytes, lut: np.ndarray | None) -> torch.Tensor:
    """PNG bytes -> uint8 H x W mask, remapped through a 256-entry `lut` when given (a uint8 table lookup)."""
    from torchvision.io import ImageReadMode, decode_png

    m = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY)[0]
    return torch.from_numpy(np.take(lut, m.numpy())) if lut is not None else m


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes -> uint8 3 x H x W."""
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
