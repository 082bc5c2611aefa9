"""One owner per run folder: a lease file beside it, safe on filesystems shared by many nodes.

Written by hand because no library gives these guarantees over NFS: `flock`/`fcntl` locks are not
honoured by every NFS client and vanish silently when a node dies, so the lock is a file created with an
atomic `link()` (which NFS honours; its reply is checked through the link count, as NFS may report a
success as a failure on retransmission) and taken over with an atomic `rename()`. The file says who holds
it (host, pid, the process start time, Slurm job id, start date) and rank 0 refreshes its mtime every
HEARTBEAT_S seconds. A lease is stale, and taken over with a warning, when

- it belongs to the same Slurm job (`SLURM_JOB_ID`): a requeued job takes over its own lease at once;
- its holder ran on this host and that process is gone (pid absent, or reused by another process);
- its heartbeat is older than STALE_AFTER_S, measured against the file server's clock (a holder on a node
  that died, or was cut off).

The lease lives beside the run folder (`RunDir.lease`: `<output_dir>/.<name>.lease`), not in it, so that
moving an old run aside (train.resume=fresh) does not move the lock with it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from distseg.errors import UserError
from distseg.runs.run_dir import RunDir

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats


class RunLocked(UserError):
    """Another live process owns the run folder (every rank raises it: the trainer broadcasts rank 0's
    answer)."""

    collective = True


def _start_time(pid: int) -> str:
    """The kernel's start time of `pid` (clock ticks since boot), '' when there is no such process or it has
    ended: a pid alone may have been reused by an unrelated process, and a holder killed with its launcher
    stays a zombie (state Z, or X while it is reaped) until whoever inherited it reaps it."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


@dataclass
class Holder:
    """Who holds a lease; what the lease file stores (JSON)."""

    host: str
    pid: int
    start: str  # /proc/<pid>/stat start time: tells a live holder from a reused pid
    job: str  # SLURM_JOB_ID, '' outside Slurm
    started: str  # when it was taken, for the people reading the error
    token: str  # unique per acquisition: whose lease a file is, after renames

    @classmethod
    def me(cls) -> Holder:
        """This process."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, _start_time(pid), os.environ.get("SLURM_JOB_ID", ""),
                   datetime.now().isoformat(timespec="seconds"), uuid.uuid4().hex)

    @classmethod
    def unknown(cls) -> Holder:
        """A lease that cannot be read (or vanished): judged by its age alone."""
        return cls("?", -1, "", "", "?", "")

    def describe(self) -> str:
        """For messages: 'pid 123 on node7 (Slurm job 42), started 2026-11-26T10:00:00'."""
        job = f" (Slurm job {self.job})" if self.job else ""
        return f"pid {self.pid} on {self.host}{job}, started {self.started}"


def _read(path: Path) -> Holder | None:
    try:
        return Holder(**json.loads(path.read_text()))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):  # unreadable or foreign
        return Holder.unknown()


def _create(path: Path, me: Holder) -> bool:
    """Write the lease under a private name, then link it to `path`: False if a lease already exists."""
    tmp = path.with_name(f"{path.name}.{me.token}.tmp")
    with open(tmp, "w") as f:
        json.dump(asdict(me), f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # NFS may report a link that succeeded as failed: the link count tells
        return os.stat(tmp).st_nlink == 2
    finally:
        tmp.unlink(missing_ok=True)


def _age(path: Path) -> float:
    """Seconds since the lease's last heartbeat, by the clock of the server that stores it."""
    probe = path.with_name(f"{path.name}.{uuid.uuid4().hex}.now")
    probe.touch()
    try:
        return probe.stat().st_mtime - path.stat().st_mtime
    finally:
        probe.unlink(missing_ok=True)


def stale_reason(path: Path, other: Holder, me: Holder) -> str | None:
    """Why the lease held by `other` may be taken over by `me`, or None while its holder is alive."""
    if other.job and other.job == me.job:
        return f"the same Slurm job {me.job}, requeued"
    if other.host == me.host and other.pid > 0:
        now = _start_time(other.pid)
        if not now or now != other.start:
            return f"its process {other.pid} is gone"
        if other.pid == me.pid:
            return "held by this same process"
    age = _age(path)
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (limit {STALE_AFTER_S:.0f} s)"
    return None


class Lease:
    """A held lease: a heartbeat thread keeps it fresh; `release` removes it if it is still ours."""

    def __init__(self, path: Path, me: Holder, made: list[Path]):
        self.path, self.me, self.made = path, me, made
        self.lost_to: Holder | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="run-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            now = _read(self.path)
            if now is None or now.token != self.me.token:
                self.lost_to = now or Holder.unknown()
                return
            try:
                os.utime(self.path)
            except OSError:  # a full or briefly unreachable filesystem: try again at the next beat
                pass

    def release(self) -> None:
        """Stop the heartbeat; remove the lease unless another process has taken it over meanwhile, and the
        folders made for it if they stayed empty (a start that failed on its inputs leaves nothing)."""
        self._stop.set()
        now = _read(self.path)
        if now is not None and now.token == self.me.token:
            self.path.unlink(missing_ok=True)
        for d in self.made:  # innermost first; stops at the first folder that holds something
            try:
                d.rmdir()
            except OSError:
                break


def acquire(run: RunDir, log=print) -> Lease:
    """Take the lease of a run folder (creating its parent folder), or raise RunLocked naming the holder."""
    run_dir, path = run.path, run.lease
    made = [d for d in [path.parent, *path.parent.parents] if not d.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    me = Holder.me()
    for _ in range(5):
        if _create(path, me):
            return Lease(path, me, made)
        other = _read(path)
        if other is None:  # released between our link and our read
            continue
        why = stale_reason(path, other, me)
        if why is None:
            raise RunLocked(f"{run_dir} is in use by {other.describe()} (lease {path}): wait for that run "
                            "to end or stop it, or choose another name=...")
        grave = path.with_name(f"{path.name}.{me.token}.stale")
        try:
            os.rename(path, grave)  # atomic: of several processes taking over, one moves this lease
        except FileNotFoundError:
            continue
        moved = _read(grave)
        if moved is not None and moved.token != other.token:  # a fresh lease arrived meanwhile: put it back
            try:
                os.link(grave, path)
            except FileExistsError:
                pass
        else:
            log(f"warning: taking over the lease of {run_dir} from {other.describe()}: {why}")
        grave.unlink(missing_ok=True)
    raise RunLocked(f"{run_dir}: could not take its lease {path} (other processes keep taking it)")
