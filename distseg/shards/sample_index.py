"""The samples of a split, compact: where each sample's image, mask and metadata lie in which shard, and its
key, as a few numpy arrays (36 bytes per sample plus the key's bytes) instead of Python objects per sample.

Built once per node from the shards' `.idx` files (or by scanning the tars when a shard has none) and stored
as one file in a node-local folder (`data.cache_dir`, else a per-user temporary folder), named after the
manifest's identity, written under a temp name and renamed, under a file lock so the processes of a node
build it once. Every process memory-maps it: the pages are shared by the ranks and DataLoader workers of a
node, and a lookup creates no Python object per sample. Written by hand because no library keeps a random-
access index this small, shared this way (MosaicML streaming's per-node shared index is the model).

File layout (little-endian): 64-byte header (magic, sample count, key bytes, member count), then `shard`
uint32[n], `blocks` uint32[n, 3] (data offset / 512 of the image, mask and json members: tar members start
on 512-byte blocks, so 2 TB shards fit), `sizes` uint32[n, 3], `key_end` uint64[n] and the keys' bytes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tarfile
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from distseg.errors import UserError
from distseg.files import atomic_write_chunks

MAGIC = b"DSIDX001"
HEADER = struct.Struct("<8sQQQ32x")  # magic, samples, key bytes, members per sample
MEMBERS = ("image", "mask", "json")
BLOCK = 512


def read_index_file(text: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {ext: (offset, size)}) per sample of a DALI .idx file's text."""
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        comps = {f[i]: (int(f[i + 1]), int(f[i + 2])) for i in range(0, len(f), 4)}
        out.append((f[3].split(".", 1)[0], comps))
    return out


def scan_tar(tar: Path) -> list[tuple[str, dict[str, tuple[int, int]]]]:
    """The same entries as `read_index_file`, by reading a tar's headers (a shard without .idx)."""
    out: list[tuple[str, dict]] = []
    with tarfile.open(tar) as t:
        for m in t.getmembers():
            if not m.isfile():
                continue
            key, ext = m.name.split(".", 1)
            if not out or out[-1][0] != key:
                out.append((key, {}))
            out[-1][1][ext] = (m.offset_data, m.size)
    return out


class SampleIndex:
    """Sample i: its shard, the (offset, size) of its members and its key, from numpy arrays."""

    def __init__(self, shard: np.ndarray, blocks: np.ndarray, sizes: np.ndarray, key_end: np.ndarray,
                 keys: np.ndarray, path: Path | None = None):
        self.shard, self.blocks, self.sizes, self.key_end, self.keys = shard, blocks, sizes, key_end, keys
        self.path = path  # the mapped file (None: built in this process's memory)

    def __len__(self) -> int:
        return len(self.shard)

    def key(self, i: int) -> str:
        """The key of sample i."""
        start = int(self.key_end[i - 1]) if i else 0
        return bytes(self.keys[start:int(self.key_end[i])]).decode()

    def member(self, i: int, which: str) -> tuple[int, int]:
        """(offset, size) in its shard of sample i's `which` member: image, mask or json."""
        m = MEMBERS.index(which)
        return int(self.blocks[i, m]) * BLOCK, int(self.sizes[i, m])

    def all_keys(self) -> list[str]:
        """Every key, in index order (tests and tools; the loaders look keys up one at a time)."""
        blob, ends = bytes(self.keys), self.key_end.tolist()
        return [blob[a:b].decode() for a, b in zip([0, *ends[:-1]], ends)]

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays (what the file holds besides its header)."""
        return sum(a.nbytes for a in (self.shard, self.blocks, self.sizes, self.key_end, self.keys))

    def __getstate__(self):  # a spawned worker maps the same file rather than receiving a copy
        return {"path": self.path} if self.path else self.__dict__

    def __setstate__(self, state):
        self.__dict__.update(open_index(state["path"]).__dict__ if "shard" not in state else state)


def build(entries_per_shard, image_ext: str, mask_ext: str, where: str) -> SampleIndex:
    """The arrays from each shard's entries (lists from `read_index_file` or `scan_tar`, in shard order)."""
    shard, blocks, sizes, keys = [], [], [], []
    exts = (image_ext, mask_ext, "json")
    for k, (name, entries) in enumerate(entries_per_shard):
        for key, comps in entries:
            if image_ext not in comps or mask_ext not in comps:
                raise UserError(f"sample {key} in {name} lacks .{image_ext} or .{mask_ext}")
            offs = [comps.get(e, (0, 0)) for e in exts]
            if any(off % BLOCK for off, _ in offs):
                raise UserError(f"sample {key} in {name}: a member does not start on a tar block: {where} "
                                "is not an index of this shard; re-shard")
            shard.append(k)
            blocks.append([off // BLOCK for off, _ in offs])
            sizes.append([size for _, size in offs])
            keys.append(key.encode())
    key_end = np.cumsum([len(k) for k in keys], dtype=np.uint64) if keys else np.zeros(0, np.uint64)
    return SampleIndex(np.array(shard, np.uint32), np.array(blocks, np.uint32).reshape(-1, 3),
                       np.array(sizes, np.uint32).reshape(-1, 3), key_end,
                       np.frombuffer(b"".join(keys), np.uint8))


def write_index(index: SampleIndex, path: Path) -> None:
    """The index as one file, under a temp name, then renamed."""
    arrays = (index.shard, index.blocks, index.sizes, index.key_end, index.keys)
    atomic_write_chunks(path, [HEADER.pack(MAGIC, len(index), len(index.keys), len(MEMBERS)),
                               *(np.ascontiguousarray(a).tobytes() for a in arrays)])


def open_index(path: Path) -> SampleIndex:
    """Memory-map an index file (read-only, shared with every process of the node that maps it)."""
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    magic, n, nkeys, members = HEADER.unpack_from(mm, 0)
    if magic != MAGIC or members != len(MEMBERS):
        raise UserError(f"{path} is not a distseg sample index (or of another version): remove it")
    arrays, off = [], HEADER.size
    for dtype, count, shape in ((np.uint32, n, (n,)), (np.uint32, n * 3, (n, 3)), (np.uint32, n * 3, (n, 3)),
                                (np.uint64, n, (n,)), (np.uint8, nkeys, (nkeys,))):
        arrays.append(np.frombuffer(mm, dtype, count, off).reshape(shape))
        off += count * np.dtype(dtype).itemsize
    return SampleIndex(*arrays, path=path)


def identity(man: dict) -> str:
    """What makes two manifests' samples the same: their shards' names, hashes and counts."""
    h = hashlib.sha256()
    for sh in man["shards"]:
        h.update(f"{sh['name']} {sh['sha256']} {sh.get('index_sha256', '')} {sh['count']}\n".encode())
    return h.hexdigest()[:20]


def node_folder(cache_dir: str | None) -> Path | None:
    """A writable node-local folder for the index and shard stamps: `data.cache_dir`, else a per-user
    temporary folder; None when neither can be written."""
    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / f"distseg-{os.getuid()}"
    try:
        base.mkdir(parents=True, exist_ok=True)
        probe = base / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return base
    except OSError:
        return None


def sample_index(man: dict, entries, folder: Path | None, log=print) -> SampleIndex:
    """The split's index: mapped from its file in the node-local `folder` (built there first if no process
    of this node has), or built in this process's memory when there is no such folder (`node_folder` found
    none writable). `entries` yields each shard's (name, entries) when the index has to be built."""
    if folder is None:
        log("note: no writable node-local folder for the sample index (set data.cache_dir): each process "
            "builds its own in memory")
        index = build(entries(), man["image_ext"], man["mask_ext"], man["_path"])
    else:
        path = folder / f"{man['split']}-{identity(man)}.dsidx"
        if not path.is_file():
            with FileLock(str(path) + ".lock"):
                if not path.is_file():  # another process of the node may have built it while we waited
                    write_index(build(entries(), man["image_ext"], man["mask_ext"], man["_path"]), path)
        index = open_index(path)
    if len(index) != man["total"]:
        raise UserError(f"{man['_path']} lists {man['total']} samples but the shards hold {len(index)}")
    return index
