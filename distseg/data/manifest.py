"""The per-split manifest (<split>.json) that describes a set of shards, and the checks readers make."""

from __future__ import annotations

import json
import os
from pathlib import Path

from distseg.errors import UserError
from distseg.files import sha256_file
from distseg.labels import Scheme

MANIFEST_VERSION = 1


def manifest_path(shards: str | os.PathLike, split: str) -> Path:
    """Accept either the shard folder (+ split) or the manifest file itself."""
    p = Path(shards)
    return p if p.suffix == ".json" else p / f"{split}.json"


def load_manifest(shards: str | os.PathLike, split: str = "train", verify: bool = False) -> dict:
    """Read and check a manifest; every shard it lists must be on disk (sha256 checked if `verify`)."""
    path = manifest_path(shards, split)
    if not path.is_file():
        state = path.with_suffix(".state.json")
        if state.exists():
            hint = f" (an unfinished run left {state.name}: rerun `distseg shard` to finish)"
        elif (path.parent / "config.yaml").is_file() or (path.parent / "checkpoints").is_dir():
            hint = (f": {path.parent} is a training run folder, not a shard folder (its shards are the "
                    "config.yaml's data.shards)")
        else:
            hint = f" (run `distseg shard --split {split} --out {path.parent}`)"
        raise UserError(f"no manifest {path}{hint}")
    try:
        man = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"unreadable manifest {path}: {e}") from None
    if not isinstance(man, dict) or man.get("version") != MANIFEST_VERSION or "shards" not in man:
        raise UserError(f"{path} is not a distseg manifest (version {MANIFEST_VERSION})")
    man["_dir"] = str(path.parent)
    man["_path"] = str(path)
    for sh in man["shards"]:
        tar = path.parent / sh["name"]
        if not tar.is_file():
            raise UserError(f"shard listed in {path} is missing: {tar}")
        if tar.stat().st_size != sh["bytes"]:
            raise UserError(f"shard {tar} has {tar.stat().st_size} bytes, the manifest says {sh['bytes']}: "
                            "it was changed or truncated; re-shard")
        if verify and sha256_file(tar) != sh["sha256"]:
            raise UserError(f"shard {tar} fails its sha256 check: re-shard")
    return man


def shard_paths(man: dict) -> list[Path]:
    """Paths of the manifest's shard tars, in manifest order."""
    return [Path(man["_dir"]) / sh["name"] for sh in man["shards"]]


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
