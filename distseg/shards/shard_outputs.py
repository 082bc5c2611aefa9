"""Where `distseg shard` writes: a local folder (shards appear under their final name when complete) or a
remote URL (shards staged locally, uploaded one by one, the manifest last). Both answer the same questions,
so the writer in shard.py does not know which it has.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from distseg.files import atomic_write_json
from distseg.shards import class_counts, storage
from distseg.shards.storage import NotFound
from distseg.urls import is_remote, join, local_path, redact


class LocalOutput:
    """Shards written in place: a shard is complete when its final name exists (temp + rename)."""

    def __init__(self, out: str | os.PathLike):
        self.dir = local_path(out)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.where = self.dir, str(self.dir)

    def read_json(self, name: str) -> dict | None:
        """A JSON file of the output, None if absent, {"params": None} if unreadable."""
        p = self.dir / name
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return {"params": None}

    def size(self, name: str) -> int | None:
        """Size of a finished file, None if absent."""
        p = self.dir / name
        return p.stat().st_size if p.is_file() else None

    def commit(self, shard: dict) -> None:
        """A finished shard is already in place."""

    def local_copy(self, name: str) -> Path | None:
        """A file of the output as a local path (here: the file itself), None if absent."""
        p = self.dir / name
        return p if p.is_file() else None

    def release(self, path: Path | None) -> None:
        """Done with a `local_copy` (here: nothing to remove)."""

    def put(self, name: str) -> None:
        """A file written into `workdir` is in place (here: it already is)."""

    def write_json(self, name: str, obj) -> None:
        """Write a JSON file atomically."""
        atomic_write_json(self.dir / name, obj)

    def remove(self, name: str) -> None:
        """Delete a file if present."""
        (self.dir / name).unlink(missing_ok=True)

    def remove_all(self, names: list[str]) -> None:
        """Delete files if present."""
        for name in names:
            self.remove(name)

    def remove_split(self, split: str) -> None:
        """Delete every shard, index, counts file, temp file, manifest and state of a split."""
        for pattern in (f"{split}-*.tar", f"{split}-*.idx", f"{split}-*.counts.npy", f"{split}-*.tar.tmp"):
            for p in list(self.dir.glob(pattern)):
                p.unlink()
        for name in (f"{split}.json", f"{split}.state.json", f"{split}.counts.npy"):
            self.remove(name)

    def close(self) -> None:
        """Nothing to clean up."""


class RemoteOutput(LocalOutput):
    """Shards written to a local staging folder, then uploaded one by one (tar, index, counts, then the state
    that lists it); the split's counts file and then the manifest are uploaded last, so a reader never sees a
    manifest naming a missing file. An object appears only when its upload completes, so a rerun after an
    interruption keeps exactly the shards the remote state lists and finds intact."""

    def __init__(self, url: str, tries: int = 5):
        self.url, self.tries = url.rstrip("/"), tries
        self.workdir = Path(tempfile.mkdtemp(prefix="distseg-shard-"))
        self.where = redact(url)
        self.fs, self.path = storage.filesystem(self.url)

    def read_json(self, name: str) -> dict | None:
        """A JSON object of the output, None if absent, {"params": None} if unreadable."""
        try:
            return json.loads(storage.read_bytes(join(self.url, name), self.tries))
        except NotFound:
            return None
        except json.JSONDecodeError:
            return {"params": None}

    def size(self, name: str) -> int | None:
        """Size of an uploaded object, None if absent."""
        return storage.object_size(join(self.url, name), self.tries)

    def commit(self, shard: dict) -> None:
        """Upload a finished shard, its index and its counts, then drop the local copies of the first two
        (the counts stay staged for the split's counts file)."""
        counts = class_counts.shard_name(shard["name"])
        for name in (shard["name"], shard["index"], counts):
            storage.upload(self.workdir / name, join(self.url, name), self.tries)
            if name != counts:
                (self.workdir / name).unlink()

    def local_copy(self, name: str) -> Path | None:
        """The staged copy of an object, downloaded into the staging folder if it is not there (a shard of
        an earlier, interrupted run); None if absent."""
        p = self.workdir / name
        if not p.is_file():
            try:
                storage.download(join(self.url, name), p, tries=self.tries)
            except NotFound:
                return None
        return p

    def release(self, path: Path | None) -> None:
        """Drop a staged copy."""
        if path is not None:
            path.unlink(missing_ok=True)

    def put(self, name: str) -> None:
        """Upload a file written into the staging folder, then drop it."""
        storage.upload(self.workdir / name, join(self.url, name), self.tries)
        (self.workdir / name).unlink()

    def write_json(self, name: str, obj) -> None:
        """Upload a JSON object (written whole, so readers never see half of it)."""
        atomic_write_json(self.workdir / name, obj)
        storage.upload(self.workdir / name, join(self.url, name), self.tries)
        (self.workdir / name).unlink()

    def remove(self, name: str) -> None:
        """Delete an object if present."""
        storage.retrying(lambda: self.fs.rm(f"{self.path}/{name}") if self.fs.exists(f"{self.path}/{name}")
                         else None, join(self.url, name), self.tries)

    def remove_all(self, names: list[str]) -> None:
        """Delete objects, in as few requests as the store allows (S3 deletes up to 1000 keys in one);
        absent ones are no error."""
        paths = [f"{self.path}/{name}" for name in names]
        try:
            storage.retrying(lambda: self.fs.rm(paths), self.url, self.tries)
        except NotFound:  # some were never uploaded: one by one
            for name in names:
                self.remove(name)

    def remove_split(self, split: str) -> None:
        """Delete every object of a split."""
        for p in storage.retrying(lambda: self.fs.glob(f"{self.path}/{split}-*"), self.url, self.tries):
            storage.retrying(lambda p=p: self.fs.rm(p), self.url, self.tries)
        for name in (f"{split}.json", f"{split}.state.json", f"{split}.counts.npy"):
            self.remove(name)

    def close(self) -> None:
        """Remove the staging folder."""
        shutil.rmtree(self.workdir, ignore_errors=True)


def open_output(out: str | os.PathLike) -> LocalOutput:
    """A local folder (or file:// URL) or a remote URL to upload to."""
    return RemoteOutput(str(out)) if is_remote(str(out)) else LocalOutput(out)
