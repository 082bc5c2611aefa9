"""`distseg bench index`: the sample index at a scale the disk need not hold. Fake `.idx` files (no images:
offsets and sizes only, 20-character keys) stand in for a split of N samples; the table shows the index's
bytes per sample, the time to open it and look up 10^4 random samples (cold: built from the .idx files;
warm: mapped from the node-local file), each DataLoader worker's private memory growth (USS: private clean +
dirty pages) after an epoch of lookups, with the shared mapping counted once, and how long the workers take
to serve their first lookup. DALI's reader keeps its own index of the same files: its memory is a row of its
own. The per-sample class counts file (labelid's 34 classes, random sparse counts) has rows of its own: its
bytes per sample, the time to map it and count the images per class, and to sum it into trainid's classes."""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from distseg.bench.common import table
from distseg.data.sampler import ClassPool, EpochBatchSampler, RareClassSampler, StreamSampler
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.shards.class_counts import images_per_class, in_scheme, open_split_counts, write_split
from distseg.shards.sample_index import identity, node_folder, read_index_file, sample_index

PER_SHARD = 100
MEMBERS = (("jpg", 180_000), ("mask.png", 9_000), ("json", 200))  # a Cityscapes-like sample's files


def uss_kib() -> int:
    """This process's private memory (clean + dirty pages), from /proc/self/smaps_rollup."""
    fields = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":"):
                fields[parts[0][:-1]] = int(parts[1]) if parts[1].isdigit() else 0
    return fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)


def fake_split(folder: Path, samples: int, dali: bool) -> dict:
    """A manifest and .idx files for `samples` samples in shards of PER_SHARD (sparse tars for DALI)."""
    shards, k = [], 0
    for s in range(0, samples, PER_SHARD):
        n = min(PER_SHARD, samples - s)
        rows, off = [], 0
        for j in range(n):
            key = f"city_{s + j:09d}_{j:06d}"[:20]
            row = []
            for ext, size in MEMBERS:
                off += 512
                row += [ext, str(off), str(size), f"{key}.{ext}"]
                off += (size + 511) // 512 * 512
            rows.append(" ".join(row))
        name = f"train-{k:06d}"
        (folder / f"{name}.idx").write_text(f"v1.2 {n}\n" + "\n".join(rows) + "\n")
        if dali:
            with open(folder / f"{name}.tar", "wb") as f:
                f.truncate(off + 1024)
        shards.append({"name": f"{name}.tar", "index": f"{name}.idx", "count": n, "bytes": off + 1024,
                       "sha256": f"{k:064x}"})
        k += 1
    return {"split": "train", "image_ext": "jpg", "mask_ext": "mask.png", "total": samples, "shards": shards,
            "_base": str(folder),
            "_path": str(folder / "train.json"), "_remote": False}


def open_and_look_up(man: dict, cache: Path, lookups: int = 10_000) -> tuple[float, object]:
    """Seconds to open the index (building its node-local file if absent) and look up `lookups` samples."""
    folder = Path(man["_base"])

    def entries():
        for sh in man["shards"]:
            yield sh["name"], read_index_file((folder / sh["index"]).read_text())
    t = time.perf_counter()
    index = sample_index(man, entries, node_folder(str(cache)))
    rng = np.random.default_rng(0)
    for i in rng.integers(0, len(index), lookups).tolist():
        index.key(i)
        index.member(i, "image")
    return time.perf_counter() - t, index


class Chunks(torch.utils.data.Dataset):
    """Item j: look up every sample of the j-th chunk of an epoch's order; report this worker's USS growth
    since its first item and when it served its first lookup."""

    def __init__(self, index, order: np.ndarray, chunk: int):
        self.index, self.order, self.chunk = index, order, chunk
        self.start: tuple[float, int] | None = None

    def __len__(self):
        return -(-len(self.order) // self.chunk)

    def __getitem__(self, j):
        if self.start is None:
            self.start = (time.time(), uss_kib())
        for i in self.order[j * self.chunk:(j + 1) * self.chunk].tolist():
            self.index.key(i)
            self.index.member(i, "image")
        info = torch.utils.data.get_worker_info()
        return {"worker": info.id if info else 0, "first": self.start[0], "growth": uss_kib() - self.start[1]}


def workers_epoch(index, workers: int) -> tuple[list[float], list[float]]:
    """Each worker's USS growth (MiB) over an epoch of lookups, and its first lookup's delay (s) after the
    loader was created."""
    order = EpochBatchSampler(len(index), 1, shuffle=True).order()[0]
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # more workers than cores: asked
    dl = torch.utils.data.DataLoader(Chunks(index, order, 10_000), batch_size=None, num_workers=workers,
                                     shuffle=False)
    t0 = time.time()
    growth, first = {}, {}
    for item in dl:
        w = int(item["worker"])
        growth[w] = max(growth.get(w, 0), int(item["growth"]))
        first[w] = min(first.get(w, float("inf")), float(item["first"]) - t0)
    return [growth[w] / 1024 for w in sorted(growth)], [first[w] for w in sorted(first)]


def sampler_epoch(n: int, world: int = 64, batch: int = 8) -> tuple[float, float]:
    """Seconds and MiB of arrays for one rank's epoch order of `n` samples among `world` ranks."""
    s = EpochBatchSampler(n, batch, world, world - 1, shuffle=True)
    t = time.perf_counter()
    rows = s.rows()
    s.batch(len(s) - 1)
    return time.perf_counter() - t, sum(a.nbytes for a in rows) / 2**20


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def fake_class_counts(n: int, classes: int = 19) -> np.ndarray:
    """Per-sample pixel counts as Cityscapes has them: about half the classes in every image, and the rare
    ones (the last five) in 1-5% of the images."""
    rng = np.random.default_rng(0)
    share = np.r_[np.full(classes - 5, 0.5), np.linspace(0.01, 0.05, 5)]
    has = rng.random((n, classes), np.float32) < share
    return np.where(has, rng.integers(1, 200_000, (n, classes), dtype=np.uint32), 0).astype(np.uint32)


def _plan_in_child(conn, n: int, kind: str) -> None:
    EpochBatchSampler(1000, 8, 64, 63, shuffle=True).order()  # first use of torch's and numpy's generators
    StreamSampler([750, 250], [750, 250], 8, 64, 63).order()
    counts = fake_class_counts(n) if kind == "rare" else None  # the shards' memory-mapped file: not counted
    with open("/proc/self/clear_refs", "w") as f:  # the peak (VmHWM) from here: start-up left out
        f.write("5")
    before = _vm_kib("VmRSS")
    t = time.perf_counter()
    if kind == "streams":  # two streams, 3:1: the first one pass per epoch, the second 4x larger, sub-sampled
        first = max(1, n * 3 // 4)
        StreamSampler([first, 4 * (n - first) + 1], [first, n - first], 8, 64, 63).order()
    elif kind == "rare":  # the classes' sample lists once per run, then each epoch's draws
        pool = ClassPool.of(counts, 0.01, 3000)
        built = time.perf_counter()
        RareClassSampler([pool], [n], [n], 8, 64, 63).order()
        conn.send((time.perf_counter() - built, (_vm_kib("VmHWM") - before) / 1024, built - t))
        return
    else:
        EpochBatchSampler(n, 8, 64, 63, shuffle=True).order()
    conn.send((time.perf_counter() - t, (_vm_kib("VmHWM") - before) / 1024, 0.0))


def plan_epoch(n: int, kind: str) -> tuple[float, float, float]:
    """Seconds and peak memory growth (MiB) of planning an epoch's global order of n samples (`kind`: one
    split, two streams, rare-class draws; for these also the seconds of building their class pools once), in
    a fresh child process, so that its peak resident memory (VmHWM) is this planning's alone (a forked child
    would reuse pages the parent's allocator already holds)."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_plan_in_child, args=(child, n, kind))
    proc.start()
    child.close()  # the child's end: a child that dies closes the pipe, and recv raises instead of waiting
    try:
        out = parent.recv()
    except EOFError:
        raise UserError(f"planning an epoch of {n:,} samples failed in its process (exit status "
                        f"{proc.join() or proc.exitcode})") from None
    proc.join()
    return out


def class_counts(folder: Path, samples: int, classes: int = 34) -> tuple[float, float, float]:
    """Bytes per sample of a split's class counts file (written as `distseg shard` writes it, from shards of
    PER_SHARD), and the seconds to map it and count the images per class, and to sum it into trainid."""
    rng = np.random.default_rng(0)

    def parts():  # ~30% of the classes in each sample
        for a in range(0, samples, PER_SHARD):
            n = min(PER_SHARD, samples - a)
            yield (rng.random((n, classes)) < 0.3) * rng.integers(1, 50_000, (n, classes))
    path = folder / "train.counts.npy"
    record, _ = write_split(path, parts(), samples, classes)
    t = time.perf_counter()
    images_per_class(open_split_counts(path, record, str(path)))
    mapped = time.perf_counter() - t
    t = time.perf_counter()
    in_scheme(open_split_counts(path, record, str(path)), get_scheme("trainid").lut, 19)
    return path.stat().st_size / samples, mapped, time.perf_counter() - t


def dali_memory(man: dict) -> float | str:
    """MiB this process gains when a DALI webdataset reader over the same .idx files is built and yields a
    batch (its own index of every sample), or why it was not measured."""
    try:
        from nvidia.dali import fn, pipeline_def
    except ImportError:
        return "skipped: DALI not installed"
    folder = Path(man["_base"])

    @pipeline_def(batch_size=8, num_threads=2, device_id=None)
    def pipe():
        return fn.readers.webdataset(paths=[str(folder / sh["name"]) for sh in man["shards"]],
                                     index_paths=[str(folder / sh["index"]) for sh in man["shards"]],
                                     ext=["json"], name="Reader")
    before = uss_kib()
    p = pipe()
    p.build()
    p.run()
    return (uss_kib() - before) / 1024


def bench_index(samples: int, workers: int = 8, dali: bool = True) -> str:
    """The table for a split of `samples` fake samples."""
    with tempfile.TemporaryDirectory(prefix="distseg-bench-index-") as tmp:
        folder, cache = Path(tmp) / "shards", Path(tmp) / "node"
        folder.mkdir()
        t = time.perf_counter()
        man = fake_split(folder, samples, dali)
        made = time.perf_counter() - t
        cold, _ = open_and_look_up(man, cache)
        warm, index = open_and_look_up(man, cache)
        size = (node_folder(str(cache)) / f"train-{identity(man)}.dsidx").stat().st_size
        per_sample = size / samples
        growth, first = workers_epoch(index, workers)
        order_s, order_mib = sampler_epoch(samples)
        plans = [plan_epoch(samples, kind) for kind in ("one", "streams", "rare")]
        dali_mib = dali_memory(man) if dali else "skipped (--no-dali)"
        counts_b, counts_open, counts_sum = class_counts(Path(tmp), samples)
    rows = [["index file on disk", f"{per_sample:.1f} B/sample ({per_sample - 20:.1f} + a 20-byte key)"],
            ["open + 10^4 random lookups, cold (built from the .idx files)", f"{cold:.3f} s"],
            ["open + 10^4 random lookups, from the node-local file", f"{warm:.3f} s"],
            [f"private memory growth per worker over an epoch ({workers} workers)",
             f"max {max(growth):.2f} MiB, mean {np.mean(growth):.2f} MiB"],
            ["the shared mapping (counted once, for every process of the node)",
             f"{size / 2**20:.1f} MiB"],
            ["until every worker served its first lookup (from the loader's creation)",
             f"{max(first):.2f} s"],
            ["one rank's epoch order among 64 ranks (global shuffle, batch 8)",
             f"{order_s:.3f} s, {order_mib:.2f} MiB of arrays"],
            *[[f"planning an epoch's global order, {what}",
               f"{t:.3f} s, peak {mib:.1f} MiB ({mib * 2**20 / samples:.1f} B/sample)"
               + (f"; its class pools once per run: {pools:.3f} s" if pools else "")]
              for what, (t, mib, pools) in zip(("one split", "two streams 3:1 (data.streams)",
                                                "rare-class draws (data.sampling=rare, 19 classes)"), plans)],
            ["DALI webdataset reader over the same .idx files: its own memory",
             dali_mib if isinstance(dali_mib, str) else f"{dali_mib:.1f} MiB"],
            ["class counts file on disk (labelid: 34 classes of uint32)",
             f"{counts_b:.1f} B/sample (trainid's 19: 76, binary: 8)"],
            ["class counts: map + images per class; summed into trainid",
             f"{counts_open:.3f} s; {counts_sum:.3f} s"]]
    head = (f"sample index: {samples:,} fake samples in {len(man['shards']):,} shards of {PER_SHARD} "
            f"(.idx files made in {made:.1f} s), {os.cpu_count()} CPU cores")
    return head + "\n\n" + table(["measure", "value"], rows)
