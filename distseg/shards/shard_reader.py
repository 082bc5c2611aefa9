"""Reading shards by random access: the verified local file of each shard (`ShardFiles`, checked once per
node through `Stamps`, with a background `Prefetcher` for remote shards), the samples of a manifest by index
(`ShardSamples`, over the compact per-node `SampleIndex`) and the decoders of their members. Shared by the
torch loader, the report and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from distseg.config import DataCfg
from distseg.errors import UserError
from distseg.files import atomic_write_text, sha256_file
from distseg.shards.class_counts import split_name
from distseg.shards.codec import decode_array, is_array
from distseg.shards.manifest import shard_url
from distseg.shards.sample_index import node_folder, read_index_file, sample_index, scan_tar
from distseg.shards.storage import ChecksumError, ShardCache
from distseg.units import parse_bytes
from distseg.urls import join, redact


class Stamps:
    """Which local shard files a process of this node has hashed, so that each shard is hashed once per node
    rather than once per rank and DataLoader worker. A stamp is a small JSON file in the node-local folder
    recording the file's device, inode, size, mtime_ns, ctime_ns and the sha256 it matched; a process that
    finds a stamp equal to the file's `stat` trusts it. The first process to see a shard takes its file lock
    (released by the kernel if that process dies), hashes it and writes the stamp; the others wait on the
    lock and then read the stamp. A change that keeps size and both times, or bit rot after stamping, is not
    caught: `data.verify=always` and `distseg inspect --verify` hash again."""

    def __init__(self, folder: Path | None):
        self.folder = folder / "stamps" if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, path: Path) -> Path:
        return self.folder / f"{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]}.json"

    @staticmethod
    def _facts(path: Path, sha256: str) -> dict:
        st = path.stat()
        return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                "ctime_ns": st.st_ctime_ns, "sha256": sha256}

    def _stamped(self, path: Path, sha256: str) -> bool:
        try:
            return json.loads(self._path(path).read_text()) == self._facts(path, sha256)
        except (OSError, ValueError):
            return False

    def record(self, path: Path, sha256: str) -> None:
        """`path` was just checked to hash to `sha256` (a verified download, a hash)."""
        if self.folder is not None:
            atomic_write_text(self._path(path), json.dumps(self._facts(path, sha256)))

    def check(self, path: Path, sha256: str) -> bool:
        """Whether `path` hashes to `sha256`: from a matching stamp, else hashed here (once per node)."""
        if self.folder is None:
            return sha256_file(path) == sha256
        if self._stamped(path, sha256):
            return True
        with FileLock(str(self._path(path)) + ".lock"):
            if self._stamped(path, sha256):
                return True
            if sha256_file(path) != sha256:
                return False
            self.record(path, sha256)
            return True


class ShardFiles:
    """The verified local file of each shard of a manifest: the shard itself when local, a node-local cache
    copy (data.cache_dir) when remote. A shard is checked against its sha256 before a process first reads
    it: once per node through `Stamps` (data.verify=node), or by every process (data.verify=always). A
    damaged cache copy is downloaded once more, a damaged local shard is an error."""

    def __init__(self, man: dict, cache_dir: str | None = None, cache_size: int = 0, tries: int = 5,
                 verify: str = "node"):
        self.man = man
        if man["_remote"] and not cache_dir:
            raise UserError(f"data.shards is remote ({redact(man['_base'])}): set data.cache_dir to a "
                            "folder on node-local disk for the shard cache")
        self.cache = ShardCache(cache_dir, cache_size, tries) if man["_remote"] else None
        self.node_dir = node_folder(cache_dir)  # the sample index and the stamps live here
        self.stamps = Stamps(self.node_dir if verify == "node" else None)
        self._verified: set[int] = set()
        self._pid = os.getpid()

    @classmethod
    def of(cls, man: dict, data: DataCfg) -> ShardFiles:
        """The shard files of a manifest with the `data` settings (cache, its size, retries, verification)."""
        return cls(man, data.cache_dir or None, parse_bytes(data.cache_size), data.retries, data.verify)

    def __len__(self) -> int:
        return len(self.man["shards"])

    def _fetch(self, i: int) -> Path:
        sh = self.man["shards"][i]
        return self.cache.fetch(shard_url(self.man, i), sh["sha256"],
                                verified=lambda p: self.stamps.record(p, sh["sha256"]))

    def tar(self, i: int) -> Path:
        """Shard i's tar as a verified local file (downloaded into the cache if remote)."""
        if self._pid != os.getpid():  # a new process (DataLoader worker): check again before reading
            self._verified, self._pid = set(), os.getpid()
        sh = self.man["shards"][i]
        path = Path(self.man["_base"]) / sh["name"] if self.cache is None else self._fetch(i)
        if i not in self._verified:
            if not self.stamps.check(path, sh["sha256"]):
                if self.cache is None:
                    raise ChecksumError(f"shard {path} fails its sha256 check: it changed since it was "
                                        "written; re-shard")
                self.cache.discard(shard_url(self.man, i))
                path = self._fetch(i)
                if sha256_file(path) != sh["sha256"]:
                    raise ChecksumError(f"cache copy of shard {sh['name']} in {self.cache.dir} keeps failing "
                                        "its sha256 check: is the cache disk healthy?")
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

    def counts_file(self) -> Path:
        """The split's class counts file (`class_counts`) as a verified local file: checked against the
        manifest's sha256 as a shard is (once per node with data.verify=node), downloaded into the cache
        with the manifest for remote shards (never derived from the tars)."""
        record = self.man["class_counts"]
        name, sha = split_name(self.man["split"]), record["sha256"]
        if self.cache is None:
            path = Path(self.man["_base"]) / name
            if not path.is_file():
                raise UserError(f"class counts {path}, listed in {self.man['_path']}, are missing: rerun "
                                "`distseg shard` with the same settings")
            if not self.stamps.check(path, sha):
                raise ChecksumError(f"class counts {path} fail their sha256 check (changed since they were "
                                    "written): delete them and rerun `distseg shard` with the same settings")
            return path
        url = join(self.man["_base"], name)
        path = self.cache.fetch(url, sha, verified=lambda p: self.stamps.record(p, sha))
        if not self.stamps.check(path, sha):  # a cache copy damaged since its download: once more
            self.cache.discard(url)
            path = self.cache.fetch(url, sha, verified=lambda p: self.stamps.record(p, sha))
        return path

    def all_tars(self) -> list[Path]:
        """Every shard, verified and local (DALI reads whole shards by path)."""
        return [self.tar(i) for i in range(len(self))]

    def prefetcher(self, order: list[int], ahead: int) -> Prefetcher | None:
        """A background downloader of the shards in `order`, kept `ahead` shards beyond the reader."""
        if self.cache is None or not order:
            return None
        return Prefetcher(self, order, ahead)

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
        while True:
            with self.cv:
                while not self.stopped and self.done >= min(len(self.order), self.pos + self.ahead + 1):
                    self.cv.wait()
                if self.stopped or self.done >= len(self.order):
                    return
                i = self.order[self.done]
            try:
                self.files._fetch(i)
            except Exception:  # the reader fetches (and reports) it itself when it needs it
                return
            self.done += 1


class ShardSamples:
    """All samples of a manifest, readable by index through the compact per-node `SampleIndex` (file
    handles are reopened per process)."""

    def __init__(self, man: dict, files: ShardFiles, log=print):
        self.image_ext, self.files, self.man = man["image_ext"], files, man
        self.index = sample_index(man, self._entries, files.node_dir, log)
        self._handles: dict[int, object] = {}
        self._pid = None

    def _entries(self):
        """Each shard's (name, entries), from its .idx file, or from the tar itself without one."""
        for k, sh in enumerate(self.man["shards"]):
            idx = self.files.index(k)
            yield sh["name"], read_index_file(idx.read_text()) if idx else scan_tar(self.files.tar(k))

    def __len__(self) -> int:
        return len(self.index)

    def key(self, i: int) -> str:
        """The sample key of index i."""
        return self.index.key(i)

    def shard(self, i: int) -> int:
        """Index (in the manifest) of the shard holding sample i."""
        return int(self.index.shard[i])

    def shard_name(self, i: int) -> str:
        """File name of the shard holding sample i."""
        return self.man["shards"][self.shard(i)]["name"]

    def read(self, i: int, member: str) -> bytes:
        """The bytes of sample i's `member` (image, mask or json), read by offset from its verified shard."""
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        k = self.shard(i)
        f = self._handles.get(k)
        if f is None:
            f = self._handles[k] = open(self.files.tar(k), "rb")
        off, size = self.index.member(i, member)
        f.seek(off)
        return f.read(size)


def decode_mask(data: bytes, lut: np.ndarray | None) -> torch.Tensor:
    """PNG or zstd bytes -> uint8 H x W mask, remapped through a 256-entry `lut` when given (a uint8 table
    lookup)."""
    if is_array(data):
        m = torch.from_numpy(decode_array(data))
    else:
        from torchvision.io import ImageReadMode, decode_png

        m = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.GRAY)[0]
    return torch.from_numpy(np.take(lut, m.numpy())) if lut is not None else m


def decode_rgb(data: bytes) -> torch.Tensor:
    """Image bytes (JPEG, PNG, zstd) -> uint8 3 x H x W."""
    if is_array(data):
        return torch.from_numpy(decode_array(data)).permute(2, 0, 1)
    from torchvision.io import ImageReadMode, decode_image

    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB)
