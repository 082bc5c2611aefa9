"""How a torch loader worker hands its batches to the main process, and the PIL setting its collate packs
with: the DataLoader's multiprocessing context (`worker_context`) and its worker start (`loader_worker_init`).

`multiprocessing.Queue.put` appends the object to a buffer and wakes a feeder thread that pickles it and
writes the pipe. In a DataLoader worker that is a thread wake-up and a GIL hand-over per batch: ~0.05 ms of
the worker's CPU per image with batches of 4 (`distseg bench data --profile`, the hand-off), a tenth of
what the worker spends beyond decode and transform. `DirectQueue` pickles and writes on the caller's thread
instead. Hand-written because neither torch nor multiprocessing offers a queue without the feeder thread
that the DataLoader can read with a timeout (SimpleQueue has no timed get)."""

from __future__ import annotations

import multiprocessing
import os
import queue
from multiprocessing import context as mp_context
from multiprocessing import queues
from multiprocessing.reduction import ForkingPickler

from PIL import ImageFile

from distseg.processes import worker_init

# ImageFile.MAXBLOCK: Image.tobytes encodes in blocks of this size and joins them, a second copy of the
# pixels; with a block as large as a band (a 2048x1024 band is 2 MiB) there is one block, which the join
# returns as it is. A crop's three bands cost ~0.04 ms less per image in the collate (`Crop.write`).
PIL_BLOCK = 1 << 22


class DirectQueue(queues.Queue):
    """A multiprocessing Queue whose `put` in any process but the one that made it pickles the object and
    writes it to the pipe at once, on the caller's thread, under the queue's write lock: the same bytes
    multiprocessing's feeder thread would write, in the same order. A worker's put waits while the pipe is
    full (the main process reads it); the loader uses it only where a batch is a few hundred bytes (its
    pixels travel in shared memory), so a put never waits long and no worker is left blocked at shutdown.
    An object that cannot be pickled raises in the caller rather than in a feeder thread that only prints
    it. In the making process (the main one; torch puts its shutdown sentinel from there) `put` is
    multiprocessing's own, which never blocks."""

    def put(self, obj, block: bool = True, timeout: float | None = None) -> None:
        """Send `obj` (pickled here, outside the making process), or raise queue.Full after `timeout`."""
        if self._opid == os.getpid():
            return super().put(obj, block, timeout)
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")
        if not self._sem.acquire(block, timeout):
            raise queue.Full
        try:
            data = ForkingPickler.dumps(obj)
            if self._wlock is None:  # Windows: multiprocessing writes without the lock there too
                self._writer.send_bytes(data)
            else:
                with self._wlock:
                    self._writer.send_bytes(data)
        except BaseException:
            self._sem.release()
            raise


class DirectForkContext(getattr(mp_context, "ForkContext", mp_context.BaseContext)):
    """The fork start method, its queues `DirectQueue`s: the DataLoader makes its index queues and its result
    queue with `Queue()`."""

    def Queue(self, maxsize: int = 0) -> DirectQueue:  # noqa: N802 (multiprocessing's name)
        """A `DirectQueue` of this context."""
        return DirectQueue(maxsize, ctx=self)


def worker_context() -> DirectForkContext | None:
    """The DataLoader's multiprocessing context: `DirectForkContext` where workers start by fork (the default
    on Linux), else None (torch's own)."""
    if multiprocessing.get_start_method() != "fork":
        return None
    return DirectForkContext()


def loader_worker_init(worker_id: int = 0) -> None:
    """A torch loader worker's start: `processes.worker_init` (it dies with the training process), and PIL's
    encoder block raised to `PIL_BLOCK` for the collate's `tobytes` (set in the worker, a process distseg
    owns, never in the user's)."""
    worker_init(worker_id)
    ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, PIL_BLOCK)
