"""The per-split manifest (<split>.json) that describes a set of shards, the checks readers make, and
`ShardFiles`: the verified local file of each shard, wherever the shards are stored.

Nothing read from storage is trusted: shard and index names must be plain names matching the manifest's
own pattern (`<split>-NNNNNN.tar`), so a hostile or broken manifest cannot point a reader outside its
folder or cache; every process checks a shard's sha256 against the manifest before its first read.
"""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

from distseg.data.storage import (
    ShardCache,
    StorageError,
    is_remote,
    join,
    local_path,
    read_bytes,
    redact,
    sha256_remote,
)
from distseg.errors import UserError
from distseg.files import sha256_file
from distseg.labels import Scheme

MANIFEST_VERSION = 1


def manifest_location(shards: str | os.PathLike, split: str) -> str:
    """Accept either the shard folder or URL (+ split) or the manifest file itself."""
    s = str(shards)
    return s if s.endswith(".json") else join(s, f"{split}.json")


def _missing_hint(loc: str, split: str) -> str:
    if is_remote(loc):
        return f" (run `distseg shard --split {split} --out {redact(loc.rsplit('/', 1)[0])}`)"
    path = local_path(loc)
    state = path.with_suffix(".state.json")
    if state.exists():
        return f" (an unfinished run left {state.name}: rerun `distseg shard` to finish)"
    if (path.parent / "config.yaml").is_file() or (path.parent / "checkpoints").is_dir():
        return (f": {path.parent} is a training run folder, not a shard folder (its shards are the "
                "config.yaml's data.shards)")
    return f" (run `distseg shard --split {split} --out {path.parent}`)"


def read_manifest_text(loc: str, split: str) -> str:
    """The manifest's text from a local path or URL, or one error line with the way out."""
    if is_remote(loc):
        try:
            return read_bytes(loc).decode()
        except StorageError as e:
            if str(e).startswith("not found"):
                raise UserError(f"no manifest {redact(loc)}{_missing_hint(loc, split)}") from None
            raise
    path = local_path(loc)
    if not path.is_file():
        raise UserError(f"no manifest {path}{_missing_hint(loc, split)}")
    try:
        return path.read_text()
    except OSError as e:
        raise UserError(f"unreadable manifest {path}: {e}") from None


def check_names(man: dict, where: str) -> None:
    """Shard and index names must be plain `<split>-NNNNNN.tar|.idx` names: never a path."""
    split = man.get("split")
    if not isinstance(split, str) or not re.fullmatch(r"[A-Za-z0-9_]+", split):
        raise UserError(f"{where}: invalid split name {split!r}")
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.(tar|idx)")
    for sh in man["shards"]:
        for key in ("name", "index"):
            name = sh.get(key)
            if key == "index" and name is None:
                continue
            if not isinstance(name, str) or not pattern.fullmatch(name):
                raise UserError(f"{where}: invalid shard {key} {name!r} (expected {split}-NNNNNN.tar/.idx): "
                                "the manifest is damaged or not from distseg")


def load_manifest(shards: str | os.PathLike, split: str = "train", verify: bool = False) -> dict:
    """Read and check a manifest. Local shards must all be on disk with their recorded sizes; with `verify`
    every shard's sha256 is checked (remote shards are streamed, not cached)."""
    loc = manifest_location(shards, split)
    text = read_manifest_text(loc, split)
    where = redact(loc)
    try:
        man = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"unreadable manifest {where}: {e}") from None
    if not isinstance(man, dict) or man.get("version") != MANIFEST_VERSION \
            or not isinstance(man.get("shards"), list):
        raise UserError(f"{where} is not a distseg manifest (version {MANIFEST_VERSION})")
    check_names(man, where)
    remote = is_remote(loc)
    man["_base"] = loc.rsplit("/", 1)[0] if remote else str(local_path(loc).parent)
    man["_path"] = where
    man["_remote"] = remote
    if not remote:
        for sh in man["shards"]:
            tar = Path(man["_base"]) / sh["name"]
            if not tar.is_file():
                raise UserError(f"shard listed in {where} is missing: {tar}")
            if tar.stat().st_size != sh["bytes"]:
                raise UserError(f"shard {tar} has {tar.stat().st_size} bytes, the manifest says "
                                f"{sh['bytes']}: "
                                "it was changed or truncated; re-shard")
    if verify:
        for i, sh in enumerate(man["shards"]):
            digest = sha256_remote(shard_url(man,
                                             i)) if remote else sha256_file(Path(man["_base"]) / sh["name"])
            if digest != sh["sha256"]:
                raise UserError(f"shard {redact(shard_url(man, i))} fails its sha256 check: re-shard")
    return man


def shard_url(man: dict, i: int, key: str = "name") -> str:
    """Location (URL or path) of shard i's tar (key="name") or index (key="index")."""
    return join(man["_base"], man["shards"][i][key])


def check_scheme(man: dict, scheme: Scheme) -> bool:
    """True when the loader must remap (labelid shards, other scheme); raise when the scheme cannot match."""
    have = man["scheme"]
    if have["fingerprint"] == scheme.fingerprint():
        return False
    if have["name"] == "labelid":
        return True
    raise UserError(f"{man['_path']} was sharded with scheme {have['name']!r} but the config asks for "
                    f"{scheme.name!r}: set data.scheme={have['name']} or re-shard with --scheme "
                    f"{scheme.name} (or shard once with --scheme labelid to remap at load time)")


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
