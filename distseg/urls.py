"""Locations as text: a local path or a URL (`s3://`, `https://`, `file://`, any fsspec scheme), joined and
redacted the same way everywhere. Pure string functions: reading and writing live in shards/storage.py."""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit


def is_url(location: str | os.PathLike) -> bool:
    """Whether `location` is a URL (scheme://...) rather than a local path."""
    return isinstance(location, str) and re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", location) is not None


def is_remote(location: str | os.PathLike) -> bool:
    """A URL that is not a local file: needs a download (and a cache) before random access."""
    return is_url(location) and urlsplit(str(location)).scheme not in ("file", "local")


def local_path(location: str | os.PathLike) -> Path:
    """A local folder or file:// URL as a Path."""
    s = str(location)
    return Path(urlsplit(s).path) if is_url(s) else Path(s)


def join(base: str | os.PathLike, name: str) -> str:
    """base/name for URLs and paths alike."""
    return f"{str(base).rstrip('/')}/{name}" if is_url(base) else str(Path(base) / name)


def redact(location: str | os.PathLike) -> str:
    """A URL safe for logs, errors and saved configs: no password, no query string (signed URLs)."""
    s = str(location)
    if not is_url(s):
        return s
    u = urlsplit(s)
    netloc = u.netloc
    if "@" in netloc:
        user, host = netloc.rsplit("@", 1)
        netloc = f"{user.split(':', 1)[0]}:***@{host}" if ":" in user else f"***@{host}"
    return urlunsplit((u.scheme, netloc, u.path, "***" if u.query else "", ""))
