"""Files written whole or not at all: a reader (or a rerun after a crash) never sees half a file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distseg.errors import naming


def temp_sibling(path: Path) -> Path:
    """A hidden temp name next to `path`, unique to this process and thread: two writers of one file (a
    prefetch thread and the main thread stamping the same shard) each rename their own whole file, and the
    last rename wins, instead of one renaming the other's half-written temp away."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}-{threading.get_ident()}")


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """Write `chunks` one after another via a temp name in the same folder, fsync, then rename over `path`
    (chunks: a large file is not joined into one bytes object first)."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with naming(path), open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temp name in the same folder, fsync, then rename over `path`."""
    atomic_write_chunks(path, [data])


def atomic_write_text(path: Path, text: str) -> None:
    """Text version of `atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def json_safe(obj: Any) -> Any:
    """NaN and infinities -> None (JSON null), recursively: Python's json would write invalid `NaN`."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    """Valid JSON (NaN written as null), atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=1, allow_nan=False) + "\n")


def atomic_save_png(image, path: Path) -> None:
    """Save a PIL image as PNG via a temp name and rename."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        with naming(path):
            image.save(tmp, format="PNG")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
