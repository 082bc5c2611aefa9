"""Where shards live: a local folder or any fsspec URL (s3:// through s3fs, http(s)://, file://, gs:// with
gcsfs installed, ...). Storage knows URLs and bytes, never samples.

- Reads and writes go through fsspec; S3 endpoints and credentials come from the standard places
  (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles), so MinIO, Ceph and R2 work as AWS does.
- Transient faults (5xx, throttling, connection resets) are retried with exponential backoff a bounded
  number of times; a missing object, denied access or an endpoint that never answers is one `error:` line
  naming the URL (credentials and signatures removed: `redact`).
- `ShardCache` keeps whole shards on node-local disk: a download goes to a temp name while its sha256 is
  computed, is checked against the manifest, and only then renamed into place, so a killed download
  never leaves a file that looks complete. Cache names derive from a hash of the URL, never from names
  read from storage. One download per node: ranks and loader workers take a per-shard file lock. Least
  recently used shards are evicted above `max_bytes`. Hand-written around fsspec because these are the
  guarantees (verified before use, exactly one download, atomic) the training loop relies on.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from distseg.errors import UserError
from distseg.urls import redact

CHUNK = 4 << 20
ENTRY = re.compile(r"[0-9a-f]{40}(\.\w{1,7})?")  # a cache entry's name: a hash of its URL and its suffix
_TRANSIENT_STATUS = {408, 425, 429, 500, 502, 503, 504}


class StorageError(UserError):
    """Storage that cannot be read or written: one line naming the (redacted) URL. Callers tell the kinds
    apart by type (they pickle with their type: a DataLoader worker's error reaches the main process as
    itself)."""


class NotFound(StorageError):
    """The object or file does not exist (404, FileNotFoundError): permanent, not retried."""


class Denied(StorageError):
    """Access refused (401/403, other 4xx, PermissionError): the credentials or the policy, not retried."""


class Unreachable(StorageError):
    """Transient faults (5xx, throttling, resets, timeouts) that outlasted every retry."""


class ChecksumError(StorageError):
    """Bytes that do not match the manifest's sha256."""


def filesystem(url: str):
    """(fsspec filesystem, path within it) for a URL; a clear line when its backend is not installed."""
    import fsspec

    try:
        if urlsplit(url).scheme in ("s3", "s3a"):
            # one request per try: our bounded retries are the only ones (botocore and s3fs would each retry
            # again underneath, turning 5 tries against a wrong endpoint into minutes)
            fs, path = fsspec.core.url_to_fs(url, config_kwargs={"retries": {"max_attempts": 1},
                                                                 "connect_timeout": 10, "read_timeout": 60})
            fs.retries = 1
            return fs, path
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as e:
        scheme = urlsplit(url).scheme
        extra = ' (pip install "distseg[storage]")' if scheme in ("s3", "gs", "gcs", "http", "https") else ""
        raise StorageError(f"cannot open {redact(url)}: no filesystem for {scheme}:// ({e}){extra}") from None


def _status(e: BaseException) -> int | None:
    for attr in ("status", "status_code", "code"):
        v = getattr(e, attr, None)
        if isinstance(v, int):
            return v
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        return resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None


def classify(e: BaseException) -> str:
    """'missing', 'denied' (permanent) or 'transient' (worth another try)."""
    status = _status(e)
    if isinstance(e, FileNotFoundError) or status == 404:
        return "missing"
    if isinstance(e, PermissionError) or status in (401, 403):
        return "denied"
    if status is not None and 400 <= status < 500 and status not in _TRANSIENT_STATUS:
        return "denied"
    return "transient"


def retrying(fn, what: str, tries: int = 5, delay: float = 0.2):
    """Call fn(); retry transient failures with exponential backoff, up to `tries` calls in all."""
    for attempt in range(1, tries + 1):
        try:
            return fn()
        except StorageError:
            raise
        except Exception as e:
            kind = classify(e)
            if kind == "missing":
                raise NotFound(f"not found: {redact(what)}") from None
            s3 = urlsplit(what).scheme in ("s3", "s3a")
            if kind == "denied":
                hint = ("the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE) and the bucket policy" if s3
                        else "the credentials the server expects")
                raise Denied(f"access denied to {redact(what)} ({_short(e)}): check {hint}") from None
            if attempt == tries:
                hint = "the URL and the endpoint (AWS_ENDPOINT_URL)" if s3 else "the URL and the server"
                raise Unreachable(f"cannot read {redact(what)} after {tries} tries ({_short(e)}): check "
                                   f"{hint}") from None
            time.sleep(delay * 2 ** (attempt - 1))


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"https?://\S+", lambda m: redact(m.group(0)), text)[:200]


def read_bytes(url: str, tries: int = 5) -> bytes:
    """A whole (small) object, e.g. a manifest."""
    fs, path = filesystem(url)
    return retrying(lambda: fs.cat_file(path), url, tries)


def object_size(url: str, tries: int = 5) -> int | None:
    """Size of an object, or None when it does not exist."""
    fs, path = filesystem(url)
    try:
        return retrying(lambda: fs.size(path), url, tries)
    except NotFound:
        return None


def sha256_remote(url: str, tries: int = 5) -> str:
    """sha256 of a remote object, streamed (nothing written)."""
    fs, path = filesystem(url)

    def digest():
        h = hashlib.sha256()
        with fs.open(path, "rb", block_size=CHUNK) as f:
            for block in iter(lambda: f.read(CHUNK), b""):
                h.update(block)
        return h.hexdigest()
    return retrying(digest, url, tries)


def upload(local: Path, url: str, tries: int = 5) -> None:
    """Copy a finished local file to `url` (readers see it only once complete: object stores commit a
    whole object at the end of the upload), then check its size."""
    fs, path = filesystem(url)
    retrying(lambda: fs.put_file(str(local), path), url, tries)
    size = retrying(lambda: fs.size(path), url, tries)
    if size != local.stat().st_size:
        raise StorageError(f"upload of {redact(url)} ended with {size} bytes, expected "
                           f"{local.stat().st_size}")


def download(url: str, dest: Path, sha256: str | None = None, tries: int = 5) -> None:
    """Stream `url` into dest via a temp name, hashing on the way; rename only when the hash matches."""
    fs, path = filesystem(url)
    tmp = dest.with_name(f"{dest.name}.part-{os.getpid()}-{threading.get_ident()}")

    def attempt():
        h = hashlib.sha256()
        try:
            with fs.open(path, "rb", block_size=CHUNK) as src, open(tmp, "wb") as out:
                for block in iter(lambda: src.read(CHUNK), b""):
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return h.hexdigest()

    digest = retrying(attempt, url, tries)
    if sha256 is not None and digest != sha256:
        tmp.unlink(missing_ok=True)
        raise ChecksumError(f"{redact(url)} fails its sha256 check (got {digest[:12]}, the manifest says "
                            f"{sha256[:12]})")
    tmp.replace(dest)


class ShardCache:
    """Node-local copies of remote files, verified before use; see the module docstring."""

    def __init__(self, cache_dir: str | os.PathLike, max_bytes: int = 0, tries: int = 5):
        self.dir = Path(cache_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.tries = max_bytes, tries
        self.downloaded = 0  # bytes this process downloaded
        self._sweep_stale_parts()

    def path_for(self, url: str) -> Path:
        """The cache file of a URL: a hash of the URL (no name from storage ever becomes a path)."""
        digest = hashlib.sha256(url.encode()).hexdigest()[:40]
        return self.dir / f"{digest}{Path(urlsplit(url).path).suffix[:8]}"

    def fetch(self, url: str, sha256: str | None, verified=None) -> Path:
        """The verified local copy of `url`, downloading it if no rank of this node has yet; `verified(path)`
        is called after a download whose sha256 matched (the shard stamps record it)."""
        dest = self.path_for(url)
        if not dest.is_file():
            with FileLock(str(dest) + ".lock"):
                if not dest.is_file():  # another rank or worker may have fetched it while we waited
                    try:
                        download(url, dest, sha256, self.tries)
                    except ChecksumError:  # a damaged transfer: once more, then give up
                        download(url, dest, sha256, self.tries)
                    self.downloaded += dest.stat().st_size
                    if verified is not None and sha256 is not None:
                        verified(dest)
                    self.evict(keep=dest)
        self._used(dest)
        return dest

    @staticmethod
    def _used(entry: Path) -> None:
        """Mark an entry recently used on a companion file: the entry's own times stay as its stamp saw
        them."""
        Path(f"{entry}.used").touch()

    def discard(self, url: str) -> None:
        """Remove a cache entry found damaged, so the next fetch downloads it again."""
        with FileLock(str(self.path_for(url)) + ".lock"):
            self.path_for(url).unlink(missing_ok=True)

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used entries until the cache fits in max_bytes (0 = no limit)."""
        if not self.max_bytes:
            return
        with FileLock(str(self.dir / ".evict.lock")):
            files = [p for p in self.dir.iterdir() if ENTRY.fullmatch(p.name) and p.is_file()]
            total = sum(p.stat().st_size for p in files)
            for p in sorted(files, key=self._last_used):
                if total <= self.max_bytes:
                    break
                if p != keep:
                    total -= p.stat().st_size
                    p.unlink(missing_ok=True)
                    Path(f"{p}.used").unlink(missing_ok=True)

    @staticmethod
    def _last_used(entry: Path) -> float:
        try:
            return Path(f"{entry}.used").stat().st_mtime
        except OSError:
            return entry.stat().st_mtime

    def _sweep_stale_parts(self) -> None:
        """Temp files of downloads whose process is gone (killed midway) are never used: remove them."""
        for p in self.dir.glob("*.part-*"):
            pid = p.name.split(".part-", 1)[1].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                p.unlink(missing_ok=True)
