"""Per-sample class counts: each sample's pixels of every class of the shards' stored scheme, so that a
sampler can tell which classes an image holds without decoding its mask.

A split's counts are one `.npy` file beside its manifest (`<split>.counts.npy`): uint32 rows, one per sample
in the order of the sample index (shard order, then order in the shard), one column per class of the stored
scheme (IGNORE and values outside the scheme are not classes). NumPy's own format, so `np.load(mmap_mode="r")`
maps it and every process of a node shares its pages; the manifest records its dtype, shape and sha256.
While `distseg shard` runs, each finished shard's rows are a small `<split>-NNNNNN.counts.npy` beside it
(what a resumed run keeps, like the shard itself); the split's file is assembled from them at the end and
they are removed. A shard without one (written before counts were recorded) has its masks decoded instead.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from distseg.errors import UserError
from distseg.files import atomic_write_bytes, atomic_write_chunks
from distseg.shards.codec import decode_array, is_array

DTYPE = np.dtype("<u4")  # one class's pixels in one sample: 2 x 10^6 at 2048x1024, up to 4 x 10^9 fit
CHUNK = 1 << 16  # rows per step when a whole file is read or summed


def split_name(split: str) -> str:
    """The split's counts file, beside its manifest."""
    return f"{split}.counts.npy"


def shard_name(tar_name: str) -> str:
    """A finished shard's counts file while `distseg shard` runs: `train-000003.tar` ->
    `train-000003.counts.npy` (derived from the shard's checked name, never read from storage)."""
    return tar_name.removesuffix(".tar") + ".counts.npy"


def row(hist: np.ndarray, num_classes: int) -> np.ndarray:
    """One sample's counts from the 256-bin histogram of its stored mask: the scheme's classes only."""
    return np.asarray(hist[:num_classes], DTYPE)


def npy_bytes(rows: np.ndarray) -> bytes:
    """An array as the bytes of an .npy file (NumPy's header, then the C-ordered rows)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(rows, DTYPE), allow_pickle=False)
    return buf.getvalue()


def save_shard(path: Path, rows: list[np.ndarray], num_classes: int) -> str:
    """A shard's rows as an .npy file, written whole or not at all; returns its sha256."""
    data = npy_bytes(np.array(rows, DTYPE).reshape(-1, num_classes))
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def load_shard(path: Path | None, sha256: str | None, count: int, num_classes: int) -> np.ndarray | None:
    """A finished shard's rows from its file, or None when there is none or it is not the file the run's
    state recorded (then the caller decodes the shard's masks)."""
    if path is None or sha256 is None:
        return None
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        return None
    rows = np.load(io.BytesIO(data), allow_pickle=False)
    return rows if rows.shape == (count, num_classes) and rows.dtype == DTYPE else None


def from_tar(tar: Path, mask_ext: str, num_classes: int) -> np.ndarray:
    """A finished shard's rows by decoding its masks (PNG or zstd), in the order of its samples."""
    from PIL import Image

    rows = []
    with tarfile.open(tar) as t:
        for m in t:
            if m.isfile() and m.name.split(".", 1)[-1] == mask_ext:
                data = t.extractfile(m).read()
                mask = decode_array(data) if is_array(data) else np.asarray(Image.open(io.BytesIO(data)))
                rows.append(row(np.bincount(mask.ravel(), minlength=256), num_classes))
    return np.array(rows, DTYPE).reshape(-1, num_classes)


def write_split(path: Path, parts: Iterable[np.ndarray], total: int, num_classes: int
                ) -> tuple[dict, np.ndarray]:
    """The split's file from each shard's rows in shard order, streamed (never the whole array in memory)
    through a temp name; returns its manifest record and the number of samples holding each class. The
    header is NumPy's own (`write_array_header_1_0`, as `np.save` writes it)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": DTYPE.str, "fortran_order": False,
                                                  "shape": (total, num_classes)})
    digest, present, seen = hashlib.sha256(header.getvalue()), np.zeros(num_classes, np.int64), [0]

    def chunks():
        yield header.getvalue()
        for rows in parts:
            rows = np.ascontiguousarray(rows, DTYPE).reshape(-1, num_classes)
            present[:] += (rows > 0).sum(0)
            seen[0] += len(rows)
            data = rows.tobytes()
            digest.update(data)
            yield data
        if seen[0] != total:  # the shards hold other samples than the manifest counts: never written
            raise UserError(f"{path}: the shards hold {seen[0]} samples, the manifest {total}: re-shard")
    atomic_write_chunks(path, chunks())
    record = {"name": path.name, "dtype": DTYPE.str, "shape": [total, num_classes],
              "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
    return record, present


def open_split_counts(path: Path, record: dict, where: str) -> np.ndarray:
    """The split's counts memory-mapped read-only, checked against the manifest's record (`where`)."""
    try:
        counts = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable class counts {path} ({e}): rerun `distseg shard` with the same "
                        "settings") from None
    if counts.dtype.str != record.get("dtype") or list(counts.shape) != list(record.get("shape", [])):
        raise UserError(f"class counts {path} hold {counts.dtype.str} {list(counts.shape)}, {where} says "
                        f"{record.get('dtype')} {record.get('shape')}: re-shard")
    return counts


def in_scheme(stored: np.ndarray, lut: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of labelid shards summed into another scheme's classes through its table (`lut`: labelId ->
    class); labels the scheme drops count nowhere. Read in blocks of rows, so a mapped file is read once."""
    groups = [np.flatnonzero(lut[:stored.shape[1]] == c) for c in range(num_classes)]
    out = np.zeros((len(stored), num_classes), DTYPE)
    for a in range(0, len(stored), CHUNK):
        block = np.asarray(stored[a:a + CHUNK])
        for c, cols in enumerate(groups):
            if len(cols):
                out[a:a + CHUNK, c] = block[:, cols].sum(1, dtype=DTYPE)
    return out


def images_per_class(counts: np.ndarray) -> np.ndarray:
    """How many samples hold each class (int64), in blocks of rows."""
    present = np.zeros(counts.shape[1], np.int64)
    for a in range(0, len(counts), CHUNK):
        present += (np.asarray(counts[a:a + CHUNK]) > 0).sum(0)
    return present
