"""A loader worker's hand-off (data/hand_off.py): its batches cross to the main process without
multiprocessing's feeder thread, in order and whole, across epochs of persistent workers and after an epoch
broken off; a worker's exception still reaches the main process; a put that cannot be pickled raises where
it was made, and the queue goes on; the process that made the queue keeps multiprocessing's own put; the
worker start sizes PIL's encoder block to the crop's band, in the worker only (the pixels are the same:
tests/test_data_loader.py compares pooled workers with a loader without workers)."""

import functools
import pickle
import threading

import pytest
from PIL import ImageFile
from torch.utils.data import DataLoader, Dataset

from distseg.data.hand_off import DirectForkContext, DirectQueue, loader_worker_init, worker_context

pytestmark = pytest.mark.skipif(worker_context() is None, reason="loader workers do not start by fork here")
BAND = 256 * 512


class Threads(Dataset):
    """Item i: i, the threads alive in the worker when it is made, and the worker's PIL block; item `fail`
    raises."""

    def __init__(self, fail: int = -1):
        self.fail = fail

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == self.fail:
            raise ValueError(f"item {i} cannot be made")
        return i, sorted(t.name for t in threading.enumerate()), ImageFile.MAXBLOCK


def loader(context, **kw):
    return DataLoader(Threads(kw.pop("fail", -1)), batch_size=None, num_workers=1,
                      multiprocessing_context=context,
                      worker_init_fn=functools.partial(loader_worker_init, band=BAND), **kw)


def test_a_workers_batches_cross_without_a_feeder_thread_in_order():
    assert isinstance(worker_context(), DirectForkContext)
    direct, default = list(loader(worker_context())), list(loader(None))
    assert [i for i, _, _ in direct] == [i for i, _, _ in default] == list(range(6))
    # multiprocessing's queue starts its feeder at the worker's first put: the check can see one
    assert any("QueueFeederThread" in names for _, names, _ in default[1:])
    assert not any("QueueFeederThread" in names for _, names, _ in direct)
    assert all(block == BAND for _, _, block in direct)
    assert ImageFile.MAXBLOCK < BAND  # set in the workers, not in this process


def test_persistent_workers_cross_every_epoch_also_after_one_broken_off():
    dl = loader(worker_context(), persistent_workers=True)
    for _ in zip(range(2), dl):  # broken off after two items
        pass
    assert [[i for i, _, _ in dl] for _ in range(3)] == [list(range(6))] * 3


def test_a_workers_exception_reaches_the_main_process():
    with pytest.raises(ValueError, match="item 2 cannot be made"):
        list(loader(worker_context(), fail=2))


def put_unpicklable_then_good(q: DirectQueue, said: DirectQueue) -> None:
    try:
        q.put(lambda: None)
    except (pickle.PicklingError, AttributeError) as e:
        said.put(f"raised {type(e).__name__}")
    q.put("good")


def test_an_unpicklable_put_raises_in_the_worker_and_the_queue_goes_on():
    ctx = worker_context()
    q, said = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=put_unpicklable_then_good, args=(q, said))
    p.start()
    assert said.get(timeout=60).startswith("raised ")
    assert q.get(timeout=60) == "good"  # the semaphore given back, the pipe whole
    p.join(60)
    assert p.exitcode == 0


def test_the_process_that_made_the_queue_puts_through_multiprocessings_feeder():
    q = worker_context().Queue()
    q.put({"a": 1})
    assert q._thread is not None  # multiprocessing's own put: it never blocks the main process
    assert q.get(timeout=60) == {"a": 1}
    q.close()
    q.join_thread()
