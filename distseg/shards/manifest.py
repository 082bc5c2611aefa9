"""The per-split manifest (<split>.json) that describes a set of shards: how the writer builds it, how readers
load and check it.

Nothing read from storage is trusted: shard and index names must be plain names matching the manifest's
own pattern (`<split>-NNNNNN.tar`), and the class counts file is `<split>.counts.npy`, so a hostile or broken
manifest cannot point a reader outside its folder or cache.

`class_counts` (absent in manifests written before per-sample counts were recorded; no version change, as
readers of version 2 ignore it) describes the counts file: name, dtype, shape, bytes, sha256;
`class_images` is how many samples hold each class.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np

from distseg import __version__, run_files
from distseg.errors import UserError
from distseg.files import sha256_file
from distseg.labels import IGNORE, Scheme
from distseg.shards.class_counts import split_name
from distseg.shards.codec import member_names
from distseg.shards.storage import NotFound, read_bytes, sha256_remote
from distseg.urls import is_remote, join, local_path, redact

MANIFEST_VERSION = 2  # 2: sample keys live in the shards' indexes (version 1 listed them here), still read
READABLE = (1, 2)


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
    if run_files.looks_like_run(path.parent):
        return (f": {path.parent} is a training run folder, not a shard folder (its shards are the "
                "config.yaml's data.shards)")
    return f" (run `distseg shard --split {split} --out {path.parent}`)"


def read_manifest_text(loc: str, split: str) -> str:
    """The manifest's text from a local path or URL, or one error line with the way out."""
    if is_remote(loc):
        try:
            return read_bytes(loc).decode()
        except NotFound:
            raise UserError(f"no manifest {redact(loc)}{_missing_hint(loc, split)}") from None
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
    counts = man.get("class_counts")
    if counts is not None and (not isinstance(counts, dict) or counts.get("name") != split_name(split)):
        name = counts.get("name") if isinstance(counts, dict) else counts
        raise UserError(f"{where}: invalid class counts {name!r} (expected {split_name(split)}): the "
                        "manifest is damaged or not from distseg")


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
    if not isinstance(man, dict) or man.get("version") not in READABLE \
            or not isinstance(man.get("shards"), list):
        version = man.get("version") if isinstance(man, dict) else None
        if isinstance(version, int) and version > MANIFEST_VERSION:
            raise UserError(f"{where} is a version-{version} manifest, newer than this distseg reads "
                            f"({MANIFEST_VERSION}): upgrade distseg, or re-shard with this one")
        raise UserError(f"{where} is not a distseg manifest (version {', '.join(map(str, READABLE))})")
    check_names(man, where)
    man.setdefault("mask_ext", "mask.png")
    man.setdefault("labels", "fine")  # manifests written before coarse shards are all fine
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
        verify_files(man)
    return man


def verify_files(man: dict) -> None:
    """Every shard's sha256, and the class counts file's when there is one (remote files are streamed)."""
    for i, sh in enumerate(man["shards"]):
        digest = sha256_remote(shard_url(man, i)) if man["_remote"] else sha256_file(Path(man["_base"]) /
                                                                                   sh["name"])
        if digest != sh["sha256"]:
            raise UserError(f"shard {redact(shard_url(man, i))} fails its sha256 check: re-shard")
    if "class_counts" in man:
        url = join(man["_base"], split_name(man["split"]))
        try:
            digest = sha256_remote(url) if man["_remote"] else sha256_file(local_path(url))
        except (NotFound, FileNotFoundError):
            digest = "missing"
        if digest != man["class_counts"]["sha256"]:
            what = "are missing: rerun" if digest == "missing" else \
                "fail their sha256 check: delete them and rerun"
            raise UserError(f"class counts {redact(url)} {what} `distseg shard` with the same settings")


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


def counts_fields(record: dict, present: np.ndarray, scheme: Scheme) -> dict:
    """The manifest's class counts entries: the counts file's record and the samples holding each class."""
    return {"class_counts": record,
            "class_images": {name: int(present[i]) for i, name in enumerate(scheme.class_names)}}


def build_manifest(params: dict, scheme: Scheme, source_bytes: int, done: list[dict],
                   counts: tuple[dict, np.ndarray]) -> dict:
    """The <split>.json manifest of finished shards; `params` are the shard options that made them, `counts`
    the class counts file's record and the samples holding each class (`class_counts.write_split`)."""
    hist = np.sum([np.array(sh["hist"], np.int64) for sh in done], axis=0)
    sizes: dict[str, int] = {}
    for sh in done:
        for wxh, n in sh.get("sizes", {}).items():
            sizes[wxh] = sizes.get(wxh, 0) + n
    image_ext, mask_ext = member_names(params["image_format"], params.get("lossless", "png"))
    return {
        "version": MANIFEST_VERSION, "tool": f"distseg {__version__}", "split": params["split"],
        "labels": params.get("labels", "fine"),  # the ground truth: fine (gtFine) or coarse (gtCoarse)
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "params": params,
        "scheme": scheme.describe(), "image_ext": image_ext, "mask_ext": mask_ext,
        "total": sum(sh["count"] for sh in done), "bytes": sum(sh["bytes"] for sh in done),
        "source_bytes": source_bytes,
        "class_pixels": {name: int(hist[i]) for i, name in enumerate(scheme.class_names)},
        "ignore_pixels": int(hist[IGNORE]),
        "image_sizes": dict(sorted(sizes.items(), key=lambda kv: -kv[1])),  # WIDTHxHEIGHT: images, most first
        **counts_fields(*counts, scheme),
        "shards": [{k: v for k, v in sh.items() if k not in ("hist", "sizes", "counts_sha256")}
                   for sh in done],
    }
