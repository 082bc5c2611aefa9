"""`distseg shard`: pack a Cityscapes split into WebDataset tars + manifest + DALI index.

Samples are shuffled by seed, encoded in parallel (order kept, so any --workers gives the same bytes),
and written by one writer. A shard appears under its final name only when complete (temp + rename);
a small state file lists finished shards so that a rerun after a crash resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from dataclasses import asdict, dataclass, replace
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image

from distseg.errors import UserError, naming
from distseg.files import atomic_write_text, sha256_file
from distseg.labels import Scheme, get_scheme
from distseg.shards import class_counts
from distseg.shards.cityscapes import Pair, check_labels, find_pairs, resolve_root
from distseg.shards.codec import CODECS, IMAGE_LEVEL, encode_array, encode_png, member_names
from distseg.shards.manifest import build_manifest, counts_fields, load_manifest
from distseg.shards.shard_outputs import LocalOutput, open_output

IMAGE_EXTS = ("jpg", "png")


def default_image_format(split: str) -> str:
    """PNG for val: it is small, and lossless val shards let validation during training, `distseg evaluate`
    and `distseg predict` (which read the source PNGs) see identical pixels and report identical numbers.
    JPEG elsewhere: ~5x smaller, ~3x faster to decode on a CPU and decodable on the GPU."""
    return "png" if split == "val" else "jpg"


@dataclass(frozen=True)
class ShardOptions:
    """Settings that define a set of shards (recorded in the manifest's params)."""
    split: str
    scheme: str = "trainid"
    image_format: str = ""  # "" = default_image_format(split)
    quality: int = 95
    resize: tuple[int, int] | None = None  # (W, H)
    maxcount: int = 100
    maxsize: int = 1 << 30
    seed: int = 0
    lossless: str = "png"  # masks and lossless images: png | zstd (distseg/shards/codec.py)
    labels: str = "fine"  # fine (gtFine) | coarse (gtCoarse): the ground truth the masks come from


@dataclass
class Encoded:
    """One sample ready to be written: its files, class histogram and source size."""
    key: str
    files: list[tuple[str, bytes]]
    hist: np.ndarray
    source_bytes: int
    size: str = ""  # the stored image's WIDTHxHEIGHT


# --- encoding (runs in worker processes) -------------------------------------------------------

_ENC: tuple[ShardOptions, Scheme] | None = None


def _init_worker(opts: ShardOptions, scheme: Scheme) -> None:
    global _ENC
    import signal

    # the parent owns cleanup: workers die plainly on TERM (pool.terminate) and leave Ctrl-C to it
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _ENC = (opts, scheme)


def _open(path: Path, what: str) -> Image.Image:
    try:
        im = Image.open(path)
        im.load()
        return im
    except Exception as e:  # PIL raises many types for a damaged file
        raise UserError(f"corrupt or unreadable {what} {path}: {e}") from None


def encode_pair(pair: Pair, opts: ShardOptions | None = None, scheme: Scheme | None = None) -> Encoded:
    """Decode, check, resize, remap and re-encode one sample."""
    if opts is None:
        opts, scheme = _ENC
    img = _open(pair.image, "image")
    lab = _open(pair.label, "label")
    if lab.mode not in ("L", "P"):
        raise UserError(f"label {pair.label} is not an 8-bit single-channel labelIds PNG (mode {lab.mode})")
    if img.size != lab.size:
        raise UserError(f"size mismatch: image {pair.image} is {img.size[0]}x{img.size[1]}, "
                        f"label is {lab.size[0]}x{lab.size[1]}")
    src_size = img.size
    img = img.convert("RGB")
    if opts.resize and opts.resize != img.size:
        img = img.resize(opts.resize, Image.Resampling.BILINEAR)
        lab = lab.resize(opts.resize, Image.Resampling.NEAREST)
    mask = scheme.remap(np.asarray(lab, dtype=np.uint8))
    image_ext, mask_ext = member_names(opts.image_format, opts.lossless)
    if image_ext == "jpg":
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=opts.quality, subsampling="4:2:0", optimize=False)
        image = buf.getvalue()
    else:
        pixels = np.asarray(img)
        image = encode_array(pixels, IMAGE_LEVEL) if opts.lossless == "zstd" else encode_png(pixels, "RGB")
    mask_bytes = encode_array(mask) if opts.lossless == "zstd" else encode_png(mask, "L")
    meta = {"key": pair.key, "city": pair.city, "source_size": list(src_size), "size": list(img.size),
            "scheme": scheme.name, "image": f"{pair.city}/{pair.image.name}"}
    files = [(f"{pair.key}.{image_ext}", image), (f"{pair.key}.{mask_ext}", mask_bytes),
             (f"{pair.key}.json", json.dumps(meta, sort_keys=True).encode())]
    src = pair.image.stat().st_size + pair.label.stat().st_size
    return Encoded(pair.key, files, np.bincount(mask.ravel(), minlength=256).astype(np.int64), src,
                   f"{img.size[0]}x{img.size[1]}")


def _encode_worker(pair: Pair) -> Encoded:
    return encode_pair(pair)


# --- writing --------------------------------------------------------------------------------------

class ShardWriter:
    """A reproducible tar (mtime 0, uid 0) written under a temp name, with the DALI index and the samples'
    class counts (`num_classes` of the stored scheme) built alongside."""

    def __init__(self, path: Path, num_classes: int):
        self.path, self.num_classes = path, num_classes
        self.tmp = path.with_name(path.name + ".tmp")
        self.f = open(self.tmp, "wb")
        self.tar = tarfile.open(fileobj=self.f, mode="w", format=tarfile.USTAR_FORMAT)
        self.index: list[list] = []
        self.keys: list[str] = []
        self.hist = np.zeros(256, np.int64)
        self.counts: list[np.ndarray] = []
        self.sizes: dict[str, int] = {}
        self.size = 0

    def add(self, enc: Encoded) -> None:
        """Append one sample's files and record their offsets for the index."""
        entry = []
        for name, data in enc.files:
            ti = tarfile.TarInfo(name)
            ti.size, ti.mtime, ti.mode, ti.uid, ti.gid, ti.uname, ti.gname = len(data), 0, 0o644, 0, 0, "", ""
            header = len(ti.tobuf(tarfile.USTAR_FORMAT, self.tar.encoding, self.tar.errors))
            entry += [name.split(".", 1)[1], self.tar.offset + header, len(data), name]
            with naming(self.path):
                self.tar.addfile(ti, io.BytesIO(data))
        self.index.append(entry)
        self.keys.append(enc.key)
        self.hist += enc.hist
        self.counts.append(class_counts.row(enc.hist, self.num_classes))
        self.sizes[enc.size] = self.sizes.get(enc.size, 0) + 1
        self.size = self.tar.offset

    def finish(self) -> dict:
        """Close, fsync, write the index and the counts, then rename: the .tar name exists only for a
        complete shard, and its index and counts exist before it."""
        with naming(self.path):
            self.tar.close()
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        idx = self.path.with_suffix(".idx")
        rows = "".join(" ".join(map(str, e)) + "\n" for e in self.index)
        index_text = f"v1.2 {len(self.index)}\n" + rows
        atomic_write_text(idx, index_text)
        counts_sha = class_counts.save_shard(self.path.with_name(class_counts.shard_name(self.path.name)),
                                             self.counts, self.num_classes)
        digest = sha256_file(self.tmp)
        self.tmp.replace(self.path)
        return {"name": self.path.name, "index": idx.name, "count": len(self.keys),
                "bytes": self.path.stat().st_size, "sha256": digest,
                "index_sha256": hashlib.sha256(index_text.encode()).hexdigest(),
                "keys_sha": keys_sha(self.keys), "counts_sha256": counts_sha,
                "hist": self.hist.tolist(), "sizes": self.sizes}

    def abort(self) -> None:
        """Close and remove the temp file (nothing under the final name). Called while an error propagates:
        a close that fails too (a full disk flushing its buffer) must not replace that error."""
        try:
            self.f.close()
        except OSError:
            pass
        finally:
            self.tmp.unlink(missing_ok=True)


PARAM_DEFAULTS = {"lossless": "png", "labels": "fine"}  # options added later: a params without one had this


def _params(opts: ShardOptions, scheme: Scheme, root: Path, pairs: list[Pair]) -> dict:
    keys = hashlib.sha256("\n".join(p.key for p in pairs).encode()).hexdigest()[:16]
    d = asdict(opts)
    for k, default in PARAM_DEFAULTS.items():  # left out: shards written before the option keep their params
        if d[k] == default:
            del d[k]
    d["resize"] = list(opts.resize) if opts.resize else None
    d.update(scheme_fingerprint=scheme.fingerprint(), source=str(root.resolve()), n_source=len(pairs),
             keys_sha=keys)
    return d


_FLAGS = {"scheme": "--scheme", "image_format": "--image-format", "quality": "--quality",
          "resize": "--resize", "maxcount": "--maxcount", "maxsize": "--maxsize", "seed": "--seed",
          "source": "--root", "lossless": "--lossless", "labels": "--labels",
          "scheme_fingerprint": "the scheme's definition", "n_source": "the number of source images",
          "keys_sha": "the source images"}


def params_diff(old: dict | None, new: dict) -> str:
    """What differs between two shard parameter sets, as the user would name it: `--quality 95 -> 90`."""
    if not isinstance(old, dict):
        return "the earlier run's state is unreadable"
    def show(v):
        return "x".join(map(str, v)) if isinstance(v, list) else str(v)

    out = []
    for k in [*new, *(k for k in PARAM_DEFAULTS if k in old and k not in new)]:
        was, v = old.get(k, PARAM_DEFAULTS.get(k)), new.get(k, PARAM_DEFAULTS.get(k))
        if was != v:
            if k in ("scheme_fingerprint", "keys_sha", "n_source"):
                out.append(f"{_FLAGS[k]} changed")
            else:
                out.append(f"{_FLAGS.get(k, k)} {show(was)} -> {show(v)}")
    return "; ".join(out) or "settings changed"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_options(opts: ShardOptions, workers: int, log) -> ShardOptions:
    """Validated options with the default image format filled in."""
    if not opts.image_format:
        opts = replace(opts, image_format=default_image_format(opts.split))
    elif opts.split == "val" and opts.image_format == "jpg":
        log(f"note: val images as JPEG q{opts.quality}: validation during training will score re-encoded "
            "pixels and differ slightly from `distseg evaluate`, which reads the source PNGs")
    if opts.image_format not in IMAGE_EXTS:
        raise UserError(f"--image-format must be one of {', '.join(IMAGE_EXTS)}")
    if opts.lossless not in CODECS:
        raise UserError(f"--lossless must be one of {', '.join(CODECS)}")
    check_labels(opts.split, opts.labels, ": pass --labels coarse")
    if not 1 <= opts.quality <= 100:
        raise UserError("--quality must be in 1..100")
    if opts.maxcount < 1 or opts.maxsize < 1:
        raise UserError("--maxcount and --maxsize must be positive")
    if workers < 1:
        raise UserError("--workers must be at least 1")
    return opts


def earlier_run(output: LocalOutput, split: str, params: dict, overwrite: bool) -> dict | None:
    """The state (or manifest) of an earlier run into this output with the same settings, or None.
    Other settings: refused naming what differs, or removed with --overwrite."""
    old = output.read_json(f"{split}.json") or output.read_json(f"{split}.state.json")
    if old is not None and old.get("params") != params:
        if not overwrite:
            was = old.get("params")
            labels = isinstance(was, dict) and was.get("labels", "fine") != params.get("labels", "fine")
            separate = " (coarse and fine shards of a split live in separate folders)" if labels else ""
            raise UserError(f"{output.where} already holds {split!r} shards made with other settings or data "
                            f"({params_diff(was, params)}): pass --overwrite to replace them, "
                            f"or choose another --out{separate}")
        output.remove_split(split)
        return None
    return old


def kept_shards(output: LocalOutput, old: dict | None, order: list[Pair]) -> list[dict]:
    """Finished shards of an interrupted run that are intact and hold the expected samples."""
    done, start = [], 0
    for sh in (old or {}).get("shards", []):
        expected = keys_sha([p.key for p in order[start:start + sh["count"]]])
        written = sh.get("keys_sha") or keys_sha(sh.get("keys", []))  # state files of version 1 list keys
        if output.size(sh["name"]) != sh["bytes"] or written != expected:
            break
        done.append(sh)
        start += sh["count"]
    return done


def keys_sha(keys: list[str]) -> str:
    """A shard's sample keys, in order, as a short hash: what a rerun compares to keep a finished shard."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:16]


def write_shards(output: LocalOutput, todo: list[Pair], done: list[dict], opts: ShardOptions, scheme: Scheme,
                 workers: int, save_state, bar) -> None:
    """Encode `todo` in order (in `workers` processes) into shards after `done`; commit each when full."""
    throttle = float(os.environ.get("DISTSEG_SHARD_THROTTLE", "0") or 0)
    writer: ShardWriter | None = None
    pool = None

    def finish():
        done.append(writer.finish())
        output.commit(done[-1])
        save_state()

    try:
        if workers > 1 and len(todo) > 1:
            pool = get_context("spawn" if os.environ.get("DISTSEG_SPAWN") else "fork").Pool(
                workers, initializer=_init_worker, initargs=(opts, scheme))
            stream = pool.imap(_encode_worker, todo, chunksize=1)
        else:
            stream = (encode_pair(p, opts, scheme) for p in todo)
        for enc in stream:
            size = sum(512 + (len(d) + 511) // 512 * 512 for _, d in enc.files)
            if writer is not None and (len(writer.keys) >= opts.maxcount
                                       or writer.size + size > opts.maxsize):
                finish()
                writer = None
            if writer is None:
                writer = ShardWriter(output.workdir / f"{opts.split}-{len(done):06d}.tar",
                                     scheme.num_classes)
            writer.add(enc)
            bar.update(1)
            if throttle:  # test hook: slow the writer down so a test can kill it mid-run
                time.sleep(throttle)
        if writer is not None:
            finish()
            writer = None
    except BaseException:
        if writer is not None:
            writer.abort()
        # a signal inside ShardWriter() after it opened its file leaves `writer` unset: no temp file stays
        for stale in output.workdir.glob(f"{opts.split}-*.tar.tmp"):
            stale.unlink(missing_ok=True)
        if pool is not None:
            pool.terminate()
        save_state()
        raise
    finally:
        if pool is not None:
            pool.close()
            pool.join()


def shard_counts(output: LocalOutput, sh: dict, num_classes: int, mask_ext: str) -> np.ndarray:
    """A finished shard's class counts: from its counts file when it is the one the run recorded, else
    (a shard written before counts were recorded) by decoding the masks of its tar."""
    path = output.local_copy(class_counts.shard_name(sh["name"]))
    try:
        rows = class_counts.load_shard(path, sh.get("counts_sha256"), sh["count"], num_classes)
    finally:
        output.release(path)
    if rows is None:
        tar = output.local_copy(sh["name"])
        try:
            rows = class_counts.from_tar(tar, mask_ext, num_classes)
        finally:
            output.release(tar)
    return rows


def split_counts(output: LocalOutput, split: str, shards: list[dict], num_classes: int, mask_ext: str
                 ) -> tuple[dict, np.ndarray]:
    """Write (and upload, for a URL) the split's counts file from its finished shards, in their order;
    returns its manifest record and the number of samples holding each class."""
    path = output.workdir / class_counts.split_name(split)
    parts = (shard_counts(output, sh, num_classes, mask_ext) for sh in shards)
    counts = class_counts.write_split(path, parts, sum(sh["count"] for sh in shards), num_classes)
    output.put(path.name)
    return counts


def add_counts(output: LocalOutput, man: dict, scheme: Scheme, log) -> dict:
    """Give an up-to-date split made before per-sample class counts were recorded (or whose counts file is
    gone) its counts, from the masks in its shards; the shards and the rest of the manifest stay."""
    log(f"{man['_path']}: adding the per-sample class counts (decoding the masks of "
        f"{_plural(len(man['shards']), 'shard')})")
    record, present = split_counts(output, man["split"], man["shards"], scheme.num_classes, man["mask_ext"])
    name = f"{man['split']}.json"
    output.write_json(name, {**output.read_json(name), **counts_fields(record, present, scheme)})
    return load_manifest(man["_base"], man["split"])


def counts_intact(output: LocalOutput, man: dict) -> bool:
    """Whether the manifest records class counts and their file is there with its recorded size."""
    record = man.get("class_counts")
    name = class_counts.split_name(man["split"])
    return isinstance(record, dict) and output.size(name) == record.get("bytes")


def run_shard(root: str | os.PathLike | None, out: str | os.PathLike, opts: ShardOptions, workers: int = 1,
              overwrite: bool = False, progress: bool = True, log=print) -> dict:
    """Shard one split into a folder or URL; returns the manifest. Resumes an interrupted run with the same
    settings."""
    from tqdm import tqdm

    opts = check_options(opts, workers, log)
    scheme = get_scheme(opts.scheme)
    root = resolve_root(root)
    pairs = find_pairs(root, opts.split, opts.labels)
    params = _params(opts, scheme, root, pairs)
    output = open_output(out)
    man_name, state_name = f"{opts.split}.json", f"{opts.split}.state.json"
    try:
        old = earlier_run(output, opts.split, params, overwrite)
        if old is not None and output.read_json(man_name) is not None:
            man = load_manifest(out, opts.split)
            if not counts_intact(output, man):
                man = add_counts(output, man, scheme, log)
            log(f"{man['_path']} is up to date ({_plural(man['total'], 'sample')} in "
                f"{_plural(len(man['shards']), 'shard')}); nothing to do")
            return man
        order = [pairs[i] for i in np.random.default_rng(opts.seed).permutation(len(pairs))]
        done = kept_shards(output, old, order)
        for stale in output.workdir.glob(f"{opts.split}-*.tar.tmp"):
            stale.unlink()
        start = sum(sh["count"] for sh in done)
        if done:
            log(f"resuming: {_plural(len(done), 'finished shard')} ({_plural(start, 'sample')}) kept")

        def save_state():
            output.write_json(state_name, {"params": params, "shards": done})

        save_state()
        t0 = time.time()
        with tqdm(total=len(pairs), initial=start, desc=f"shard {opts.split}", unit="img",
                  disable=not progress) as bar:
            write_shards(output, order[start:], done, opts, scheme, workers, save_state, bar)
        rate = (len(pairs) - start) / max(time.time() - t0, 1e-9)
        source_bytes = sum(p.image.stat().st_size + p.label.stat().st_size for p in pairs)
        counts = split_counts(output, opts.split, done, scheme.num_classes,
                              member_names(opts.image_format, opts.lossless)[1])
        man = build_manifest(params, scheme, source_bytes, done, counts)
        output.write_json(man_name, man)  # last: every shard it names, and the counts, are in place
        output.remove(state_name)
        output.remove_all([class_counts.shard_name(sh["name"]) for sh in done])  # now in the split's file
    finally:
        output.close()
    log(f"wrote {output.where}/{man_name}: {_plural(man['total'], 'sample')} in "
        f"{_plural(len(done), 'shard')}, "
        f"{man['bytes'] / 1e6:.1f} MB ({man['bytes'] / max(man['source_bytes'], 1):.2f}x the source PNGs); "
        f"{rate:.1f} img/s with {workers} worker(s), {rate / max(1, min(workers, os.cpu_count() or 1)):.1f} "
        "img/s per core")
    return load_manifest(out, opts.split)
