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


class DirectQueue(queues.Queue):
    """A multiprocessing Queue whose `put` in any process but the one that made it pickles the object and
    writes it to the pipe at once, on the caller's thread, under the queue's write lock: the same bytes
    multiprocessing's feeder thread would write, in the same order. Such a put waits while the pipe is full
    until the main process reads; a worker waiting so when the main process shuts the loader down costs
    torch's 5 s join timeout, then SIGTERM. The loader uses it only where what names a batch is under
    ~700 bytes (its pixels travel in shared memory) and torch keeps at most prefetch_factor (4) batches per
    worker in flight, well within a 64 KiB pipe. An object that cannot be pickled raises in the caller (the
    worker exits, which the main process reports) where a feeder thread only prints it and the main process
    waits for a batch that never comes. In the making process (the main one: torch puts its shutdown
    sentinel from there) `put` is multiprocessing's own, which never blocks."""

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
            with self._wlock:  # a Lock wherever workers fork (None only on Windows)
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
    on Linux), else None (torch's own). The start method is read without fixing it (the first of
    `get_all_start_methods` is the default), so a later `set_start_method` still works."""
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method != "fork":
        return None
    return DirectForkContext()


def loader_worker_init(worker_id: int = 0, band: int = 0) -> None:
    """A torch loader worker's start: `processes.worker_init` (it dies with the training process), and PIL's
    encoder block (`ImageFile.MAXBLOCK`) raised to `band` bytes, a training crop's band (h x w), in the worker
    only, a process distseg owns. `Image.tobytes` encodes in blocks of max(MAXBLOCK, 4 x width) bytes and
    joins them, a second copy of the pixels; with the block a band's size, each of `Crop.write`'s three
    bands is one block, which the join returns as it is (the collate ~0.04 ms less per 512x256 crop). Sized
    to the band, not larger: each call allocates a whole block, and a block of a few MiB where the band
    needs less was up to 5x slower in a process whose allocator had not yet raised its mmap threshold."""
    worker_init(worker_id)
    ImageFile.MAXBLOCK = max(ImageFile.MAXBLOCK, band)
