"""Errors a user can act on: UserError, which the CLI prints as one line on stderr, and the helpers that
turn a failed write (full disk, quota) or a missing optional package into such a line."""

import errno
import os
from contextlib import contextmanager


class UserError(Exception):
    """Bad input, bad config or a missing file: reported as one line, exit status 2, no traceback."""

    collective = False  # True: every rank raises it alike (a reduced flag, a broadcast): rank 0 reports it


def write_reason(e: BaseException, where=None) -> str:
    """Why a write failed, in a few words. safetensors and torch's stream writer report a full disk as
    their own exception types ("unexpected pos 41216 vs 41104"): for those, a small probe write into
    `where` (a folder) finds out whether the filesystem is full or over quota."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return os.strerror(e.errno)
    for needle in ("No space left on device", "Disk quota exceeded"):
        if needle in str(e):
            return needle
    if where is not None and not isinstance(e, OSError):
        full = _full(where)
        if full:
            return full
    text = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    return e.strerror if isinstance(e, OSError) and e.strerror else text[:200]


def _full(folder) -> str | None:
    """The errno message if writing 64 KiB into `folder` fails for lack of space or quota, else None."""
    probe = os.path.join(folder, f".distseg-space-probe-{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return os.strerror(err.errno) if err.errno in (errno.ENOSPC, errno.EDQUOT) else None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass
    return None


def describe_os_error(e: OSError) -> str:
    """An OSError as one line naming the file (unwritable output, full disk, ...)."""
    return f"{e.strerror or e}{': ' + str(e.filename) if e.filename else ''}"


@contextmanager
def naming(path):
    """Put `path` into an OSError that lacks a file name: write() and close() report a full disk without
    one, and the user must learn which file could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise


# optional dependencies: top-level module -> (what to call it, the distseg extra that installs it)
EXTRAS = {"nvidia": ("DALI", "dali"), "matplotlib": ("matplotlib", "report"), "onnx": ("onnx", "export"),
          "onnxscript": ("onnxscript", "export"), "onnxruntime": ("onnxruntime", "export"),
          "s3fs": ("s3fs", "storage"), "aiohttp": ("aiohttp", "storage"), "gcsfs": ("gcsfs", "storage"),
          "timm": ("timm", "timm")}


def missing_extra(e: ImportError) -> str | None:
    """'needs matplotlib: pip install "distseg[report]"' when `e` is an optional dependency missing,
    else None (a broken install: let the ImportError show)."""
    name = (getattr(e, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    what, extra = EXTRAS[name]
    hint = ' (CUDA 13: "distseg[dali-cu13]")' if extra == "dali" else ""
    return f'needs {what}: pip install "distseg[{extra}]"{hint}'
