"""Torch DataLoader over the WebDataset shards, with random access through the shards' index files.

Random access (the approach of `wids`) lets the sampler decide exactly which sample each rank gets, so
epochs are sample-exact and a resumed run skips consumed batches without decoding them. Shards come
verified from `ShardFiles` (local, or a node-local cache of remote shards, prefetched in read order). JPEG
is decoded in CPU workers, or on the GPU with torchvision's nvJPEG when data.decode resolves to gpu. A
sample that fails to decode is one error naming shard and key, or (data.on_corrupt=skip) a padding sample
flagged invalid and counted, so batches stay equal across ranks.
"""

from __future__ import annotations

import functools
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from distseg.config import DataCfg
from distseg.data.batch import Batch
from distseg.data.hand_off import loader_worker_init, worker_context
from distseg.data.parts import PARTS, LoaderParts
from distseg.data.sampler import EpochBatchSampler, RareClassSampler, ShardWindowSampler, StreamSampler
from distseg.data.streams import Sources, rare_draws, rare_pools
from distseg.data.transforms import (
    AugParams,
    Crop,
    augment_crop,
    augment_tensor,
    choose_crop,
    draw_params,
    mean_fill,
    normalize,
    to_device,
)
from distseg.errors import UserError, describe_os_error
from distseg.labels import IGNORE
from distseg.processes import usable_workers
from distseg.shards.shard_reader import decode_mask, decode_rgb
from distseg.shards.split import OpenSplit


class ShardDataset(Dataset):
    """Item (index, epoch, valid) -> uint8 image and mask of the (augmented) sample, or, for GPU decode, the
    JPEG bytes, the mask and the sample's augmentation (`sample_params`: the crop is chosen here, on the
    mask, so the main process, which feeds the GPU, does no more for data.cat_max_ratio)."""

    def __init__(self, samples: Sources, data: DataCfg, seed: int, train: bool, gpu_decode: bool):
        self.s, self.data, self.seed, self.train, self.gpu_decode = samples, data, seed, train, gpu_decode
        self.profile = False  # time the parts of the work (data/parts.py), in whichever process runs it

    def __len__(self) -> int:
        return len(self.s)

    def __getitem__(self, item):
        """One sample; a user error on the way (a shard that fails its checksum, cannot be downloaded or
        read) comes back as data, {"error": the exception}, raised in the main process as itself: a worker's
        own exception would reach the user wrapped in torch's worker traceback."""
        i, epoch, valid, *stream = item  # (index, augmentation key, valid[, `BatchStream` number])
        PARTS.on = self.profile  # per item: a later loader of this process (0 workers) times nothing
        t = PARTS.mark()
        try:
            out = {"key": self.s.key(i), "index": i, "epoch": epoch, "valid": valid, "corrupt": False,
                   "stream": stream[0] if stream else 0}
            mask_bytes, raw = self.s.read(i, "mask"), self.s.read(i, "image")
            t = PARTS.add("reads", t)
        except UserError as e:
            return {"error": e}
        except OSError as e:  # the shard vanished or its disk failed after the checks
            return {"error": UserError(f"cannot read sample {i} of shard {self.s.shard_name(i)}: "
                                       f"{describe_os_error(e)}")}
        try:
            mask = decode_mask(mask_bytes, self.s.lut(i))
            if self.gpu_decode:
                p = sample_params(self.data, self.seed, epoch, i, mask.numpy()) if self.train else None
                out.update(jpeg=torch.frombuffer(bytearray(raw), dtype=torch.uint8), mask_u8=mask, params=p)
                return out
            t, decoded = PARTS.add("decode", t), PARTS.get("decode")
            img, m = crop_sample(raw, mask, self.data, self.seed, self.train, epoch, i)
            PARTS.add("transform", t, inner=PARTS.get("decode") - decoded)  # the image's decode apart
        except (OSError, SyntaxError, RuntimeError, ValueError) as e:  # PIL's and torchvision's decode errors
            return self._corrupt(out, i, e)
        PARTS.images += 1
        out.update(image=img, mask=m, size=tuple(m.shape))
        return out

    def _corrupt(self, out: dict, i: int, e: Exception) -> dict:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        what = f"sample {self.s.key(i)} in shard {self.s.shard_name(i)} cannot be decoded ({reason})"
        if self.data.on_corrupt != "skip":
            return {"error": UserError(f"{what}: re-shard it, or set data.on_corrupt=skip to train without "
                                       "it")}
        h, w = self.data.crop if self.data.crop and self.train else \
            json.loads(self.s.read(i, "json"))["size"][::-1]
        mask = torch.full((h, w), IGNORE, dtype=torch.uint8)
        out.update(valid=False, corrupt=True)
        if self.gpu_decode:  # keep the batch's form; _decode_on_gpu pads it
            out.update(jpeg=None, mask_u8=mask, params=None)
        else:
            fill = torch.tensor(mean_fill(self.data.mean), dtype=torch.uint8).view(1, 1, 3)
            out.update(image=fill.expand(h, w, 3), mask=mask, size=(h, w))
        return out


def batch_buffer(n: int, size: tuple[int, int]) -> torch.Tensor:
    """An uninitialised uint8 N x 4HW batch: in shared memory inside a DataLoader worker (`shared_bytes`),
    in ordinary memory elsewhere."""
    numel = n * 4 * size[0] * size[1]
    if get_worker_info() is None:
        return torch.empty(n, numel // n, dtype=torch.uint8)
    return batch_rows(shared_bytes(numel), n, size)


def batch_rows(buf: torch.Tensor, n: int, size: tuple[int, int]) -> torch.Tensor:
    """The N x 4HW rows of a batch at the start of a flat uint8 buffer (a pooled one holds a marker byte
    after them, and may be larger)."""
    h, w = size
    return buf[:n * 4 * h * w].view(n, 4 * h * w)


FREE, BUSY = 1, 0  # the last byte of a pooled buffer: the main process is done with it, or not


def shared_bytes(numel: int) -> torch.Tensor:
    """An uninitialised uint8 tensor in shared memory (as torch's own default_collate allocates its batches
    in a worker, so that the main process maps it without a copy)."""
    elem = torch.empty(0, dtype=torch.uint8)
    return elem.new(elem._typed_storage()._new_shared(numel, device="cpu"))


@dataclass
class Slot:
    """A pooled buffer and its marker byte (numpy's view of the buffer: one byte read or written without a
    tensor op); the stream of the batch that last took it; whether the main process has it mapped for
    sure, and whether that batch carries it (its crossing: the main process has it once it gets the
    batch)."""

    buf: torch.Tensor
    marker: np.ndarray
    stream: int
    mapped: bool = False
    carried: bool = True


class BufferPool:
    """A DataLoader worker's shared-memory batch buffers, reused (the torch loader on the CPU: no pinned
    copy in between, the main process reads them itself). A new shared buffer costs ~0.5 ms per MB to
    create and as much again in page faults when first written, and crosses to the main process as a
    file descriptor over a socket, a connection per batch: with a batch of 4 crops of 512x256, ~1 ms per
    image of the worker's time beyond decode and transform (`distseg bench data --profile`). A pooled
    buffer crosses once; later batches name it by number, the main process keeps it mapped
    (`TorchLoader._pixels`) and, once a batch is converted (copied out), marks its buffer free in its last
    byte. The batches still in flight when the main process starts another stream (`BatchStream`) are
    dropped, never converted: when the first batch of a later stream comes, the buffers an earlier one
    holds are free again (the DataLoader hands out a new stream's indices only once every worker has sent
    what it had), and one whose dropped batch was the first to carry it is sent again; a batch taken from
    the DataLoader itself, never converted, so holds its buffer only until the next stream. Past `LIMIT`
    buffers a batch gets a buffer of its own, as without the pool."""

    LIMIT = 8  # the prefetched batches (4), the one the main process converts, the one being filled, spares

    def __init__(self):
        self.slots: list[Slot] = []
        self.stream = 0  # the latest stream a batch came from

    def take(self, numel: int, stream: int = 0) -> tuple[torch.Tensor, int, bool]:
        """(a buffer of `numel` bytes and a marker byte, its number (-1: not pooled), whether the main
        process has it already) for a batch of `stream`, marked taken."""
        if stream > self.stream:
            self._release(stream)
        free = None
        for k, slot in enumerate(self.slots):
            if slot.marker[-1] == FREE:
                if slot.buf.numel() == numel + 1:
                    slot.mapped |= slot.carried  # freed by the main process, which got it
                    slot.marker[-1], slot.stream, slot.carried = BUSY, stream, not slot.mapped
                    return slot.buf, k, slot.mapped
                free = k if free is None else free  # free, of another size: replaced below
        buf = shared_bytes(numel + 1)
        slot = Slot(buf, buf.numpy(), stream)
        slot.marker[-1] = BUSY
        if free is None and len(self.slots) < self.LIMIT:
            free = len(self.slots)
            self.slots.append(slot)
        elif free is not None:
            self.slots[free] = slot
        return buf, -1 if free is None else free, False

    def _release(self, stream: int) -> None:
        """The first batch of `stream` came: free the buffers of the earlier streams' dropped batches."""
        for slot in self.slots:
            if slot.marker[-1] == BUSY and slot.stream < stream:
                slot.marker[-1], slot.carried = FREE, False  # a dropped crossing: sent again when taken
        self.stream = stream


POOL = BufferPool()  # this worker's


def pack(out: torch.Tensor, image: torch.Tensor | Crop, mask: torch.Tensor, nhwc: bool) -> None:
    """Write a sample's image (a `Crop`, or a uint8 H x W x 3 tensor) and H x W mask into its row of a batch
    buffer: the image's pixels (3 x H x W, or H x W x 3 with `nhwc`: the transpose happens here, in the
    worker), then the mask's. A batch is one tensor, so one file descriptor crosses from the worker to the
    main process instead of two (each crossing is a socket connection and a handshake); `unpack` takes it
    apart as views."""
    h, w = mask.shape
    row = out.numpy()  # numpy from here: a tensor op costs ~10 us before it copies a byte
    pixels = row[:3 * h * w].reshape((h, w, 3) if nhwc else (3, h, w))
    if isinstance(image, Crop):
        image.write(pixels, nhwc)
    elif nhwc:
        np.copyto(pixels, image.numpy())
    else:  # numpy's transposing copy: half the time of torch's for uint8
        np.copyto(pixels, image.numpy().transpose(2, 0, 1))
    np.copyto(row[3 * h * w:].reshape(h, w), mask.numpy())


def unpack(pixels: torch.Tensor, size: tuple[int, int], nhwc: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of `pack`ed samples (N x 4HW) -> images (N x 3 x H x W, or N x H x W x 3) and masks
    (N x H x W), views of it."""
    (h, w), n = size, pixels.shape[0]
    image = pixels[:, :3 * h * w].view(n, h, w, 3) if nhwc else pixels[:, :3 * h * w].view(n, 3, h, w)
    return image, pixels[:, 3 * h * w:].view(n, h, w)


def sample_params(d: DataCfg, seed: int, epoch: int, index: int, mask: np.ndarray) -> AugParams:
    """A training sample's augmentation, the same for both paths: drawn from (seed, epoch, index), with the
    crop data.cat_max_ratio keeps on the sample's uint8 mask."""
    p = draw_params(seed, epoch, index, tuple(d.scale), d.flip, d.color)
    return choose_crop(mask, p, d.crop, d.cat_max_ratio, (seed, epoch, index))


def crop_sample(raw: bytes, mask: torch.Tensor, d: DataCfg, seed: int, train: bool, epoch: int, index: int
                ) -> tuple[Crop | torch.Tensor, torch.Tensor]:
    """Encoded image + uint8 mask -> the image as the worker keeps it until the collate packs it, and the
    uint8 mask: the training augmentation's `Crop` (`sample_params`), or for validation the image as it is,
    uint8 H x W x 3."""
    if train:
        m = mask.numpy()
        img, out = augment_crop(raw, m, sample_params(d, seed, epoch, index, m), d.crop, mean_fill(d.mean))
        return img, torch.from_numpy(out)
    t = PARTS.mark()
    image = decode_rgb(raw).permute(1, 2, 0)  # H x W x 3, as the training path
    PARTS.add("decode", t)
    return image, mask


def transform_sample(raw: bytes, mask: torch.Tensor, d: DataCfg, seed: int, train: bool, epoch: int,
                     index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`crop_sample` as tensors: uint8 H x W x 3 image and uint8 mask."""
    img, m = crop_sample(raw, mask, d, seed, train, epoch, index)
    return (torch.from_numpy(img.hwc()) if isinstance(img, Crop) else img), m


def collate(items: list[dict], nhwc: bool = False, pooled: bool = False) -> dict:
    """Pack a batch's images and masks into one buffer (`pack`), in shared memory when in a worker; with
    `pooled`, a buffer of the worker's `BufferPool`, named in "buffer" as (worker pid, number) and sent
    only when the main process does not have it yet. GPU-decode batches keep lists of JPEG bytes. An error
    travels as data."""
    errors = [it["error"] for it in items if "error" in it]
    if errors:
        return {"error": errors[0]}
    t = PARTS.mark()
    # small values as lists: every tensor a worker sends costs a file descriptor passed over a socket
    out = {"key": [it["key"] for it in items], "index": [it["index"] for it in items],
           "valid": [it["valid"] for it in items], "corrupt": [it["corrupt"] for it in items]}
    if "mask_u8" in items[0]:
        for k in ("jpeg", "mask_u8", "params"):
            out[k] = [it[k] for it in items]
        return with_parts(out, t)
    shapes = {it["size"] for it in items}
    if len(shapes) > 1:
        return {"error": UserError(f"images of different sizes in one batch ({sorted(shapes)}): set "
                                   "data.crop or re-shard with --resize")}
    out["size"] = items[0]["size"]
    n, (h, w) = len(items), out["size"]
    if pooled and get_worker_info() is not None:
        buf, k, known = POOL.take(n * 4 * h * w, items[0]["stream"])
        out["buffer"] = (os.getpid(), k)
        if not known:
            out["pixels"] = buf
        rows = batch_rows(buf, n, out["size"])
    else:
        rows = out["pixels"] = batch_buffer(n, out["size"])
    for row, it in zip(rows, items):
        pack(row, it["image"], it["mask"], nhwc)
    return with_parts(out, t)


def with_parts(batch: dict, since: float) -> dict:
    """The collated batch; while the parts are timed (data/parts.py), with the collate's time added and this
    process's sums so far (`PARTS.snapshot`) in it, under "parts"."""
    if PARTS.on:
        PARTS.add("collate", since)
        batch["parts"] = PARTS.snapshot()
    return batch


class BatchStream:
    """The DataLoader's batch sampler: the batches of consecutive epochs, without end, from a position. The
    workers decode up to `prefetch_factor` x workers batches ahead of the loop, across an epoch's end too, so
    the next epoch starts from a full pipeline rather than an empty one. Each iteration (a DataLoader
    iterator) is a stream, numbered in its items, so a worker knows when the batches of an earlier one were
    dropped (`BufferPool`)."""

    def __init__(self, sampler):
        self.sampler, self.epoch, self.j = sampler, 0, 0
        self.streams = 0  # iterations begun

    def start(self, epoch: int, j: int) -> None:
        """Where the next iteration begins (a resume, or a request the running stream does not match)."""
        self.epoch, self.j = epoch, j

    def __iter__(self):
        stream, self.streams = self.streams, self.streams + 1
        while True:
            while self.j < len(self.sampler):
                batch = self.sampler.batch(self.j, self.epoch)
                self.j += 1
                yield [(*item, stream) for item in batch]
            self.epoch, self.j = self.epoch + 1, 0


class TorchLoader:
    """A `batch.Loader` of `Batch`es on `device`; `set_epoch(e, skip)` before each epoch. One DataLoader
    iterator runs on from epoch to epoch (`BatchStream`): iterating the next epoch continues it; asking for
    another position starts it afresh there. Its position is the sampler's, a pure function of (seed, epoch,
    layout): it keeps none of its own, so a run resumes from `RunState` at any process count."""

    keeps_position = False

    def __init__(self, d: DataCfg, seed: int, split: OpenSplit | list[OpenSplit], train: bool,
                 device: torch.device, world: int, rank: int, channels_last: bool = False,
                 shares: list[int] | None = None):
        """`split`, or with data.streams the streams' splits and their `shares` of an epoch."""
        self.data, self.seed, self.train, self.device = d, seed, train, torch.device(device)
        splits = split if isinstance(split, list) else [split]
        self.split, self.man, self.shares = splits[0], splits[0].manifest, shares
        self.samples = Sources(splits, d)
        self.stream_sizes = self.samples.sizes() if shares is not None else None
        self.files = self.samples.single.files if self.samples.single is not None else None
        want = d.decode
        self.gpu_decode = (self.device.type == "cuda" and want in ("gpu", "auto")
                           and all(sp.manifest["image_ext"] == "jpg" for sp in splits))
        self.channels_last = self.device.type == "cuda" and channels_last
        if want == "gpu" and not self.gpu_decode:
            raise UserError("data.decode=gpu needs CUDA and JPEG shards")
        bs = d.batch_size if train else d.val_batch_size
        repeat = d.repeat if train else 1
        if train and d.sampling == "rare":
            draws = shares if shares is not None else [rare_draws(d, len(self.samples), None)]
            self.sampler = RareClassSampler(rare_pools(splits, d), self.samples.sizes(), draws, bs, world,
                                            rank, seed)
        elif shares is not None:
            self.sampler = StreamSampler(self.samples.sizes(), shares, bs, world, rank, seed)
        elif train and d.shuffle == "shards":
            self.sampler = ShardWindowSampler([sh["count"] for sh in self.man["shards"]], bs, world, rank,
                                              seed, d.shuffle_window, repeat)
        else:
            self.sampler = EpochBatchSampler(len(self.samples), bs, world, rank, shuffle=train,
                                             seed=seed, repeat=repeat)
        ds = ShardDataset(self.samples, d, seed, train, self.gpu_decode)
        nw = usable_workers(d.num_workers, "data.num_workers")
        self.inflight = 4 * nw if nw > 0 else 1  # batches the DataLoader decodes ahead of the loop
        self.stream = BatchStream(self.sampler)
        band = d.crop[0] * d.crop[1] if train and d.crop else 0  # a training crop's band, in bytes
        self.dl = DataLoader(ds, batch_sampler=self.stream, num_workers=nw,
                             collate_fn=functools.partial(collate, nhwc=self.channels_last,
                                                          pooled=self.device.type == "cpu"),
                             pin_memory=self.device.type == "cuda", persistent_workers=nw > 0,
                             prefetch_factor=4 if nw > 0 else None,
                             worker_init_fn=functools.partial(loader_worker_init, band=band),
                             multiprocessing_context=None if self.gpu_decode or nw == 0 else worker_context())
        self._it = None  # the running DataLoader iterator
        self._next: tuple[int, int] | None = None  # (epoch, batch) it delivers next
        self.starts = 0  # how often the stream was (re)started: once per run when nothing moves it
        self.parts: LoaderParts | None = None  # `profile_parts`
        self.buffers: dict[tuple[int, int], torch.Tensor] = {}  # the workers' pooled buffers, mapped here

    def profile_parts(self) -> LoaderParts:
        """Time the parts of the work (data/parts.py), in the workers and here, from the first iteration on
        (the workers get the dataset, and its setting, when the stream starts)."""
        if self._it is not None:
            raise RuntimeError("profile_parts before the loader is first iterated")
        self.dl.dataset.profile = True
        self.parts = LoaderParts()
        return self.parts

    @property
    def num_samples(self) -> int:
        """Samples in the split (padding excluded); with streams, in all of them."""
        return len(self.samples)

    def stream_images(self, epochs: int, batches: int) -> list[int] | None:
        """With data.streams: each stream's samples trained on after `epochs` epochs and `batches` batches
        of the next (all processes; a pure function of the position)."""
        return self.sampler.seen(epochs, batches) if self.shares is not None else None

    def drawable_classes(self) -> list[int]:
        """With data.sampling=rare: the classes some stream can draw (a sample holds them above
        data.rare_min_pixels), in the scheme's order; empty otherwise."""
        if not isinstance(self.sampler, RareClassSampler):
            return []
        return sorted({int(c) for pool in self.sampler.pools for c in pool.classes})

    def class_draws(self, epochs: int, batches: int) -> list[int] | None:
        """With data.sampling=rare: draws per class of the scheme after `epochs` epochs and `batches` batches
        of the next (all processes; a pure function of the position)."""
        if not isinstance(self.sampler, RareClassSampler):
            return None
        return self.sampler.draws(epochs, batches, self.split.scheme.num_classes)

    def class_pixels(self) -> np.ndarray:
        """Labelled pixels per class for the loss weights (with streams, weighted by their shares)."""
        return self.samples.class_pixels(self.shares)

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch and how many of its batches this rank already consumed."""
        self.sampler.set_epoch(epoch, skip_batches)

    def __len__(self) -> int:
        return len(self.sampler)

    def _shard_schedule(self) -> tuple[list[int], list[int]]:
        """This rank's shards in first-read order for the rest of the epoch, and for each remaining batch
        how many of them it has reached."""
        idx = self.sampler.rows()[0][self.sampler.skip * self.sampler.b:]
        shards = self.samples.single.index.shard[idx]
        order, first = np.unique(shards, return_index=True)
        by_first = np.argsort(first)
        new_at = np.zeros(len(shards), np.int64)
        new_at[first] = 1  # a shard read for the first time at this slot
        if not len(shards):
            return [], []
        per_batch = np.add.reduceat(new_at, np.arange(0, len(shards), self.sampler.b))
        return order[by_first].tolist(), np.cumsum(per_batch).tolist()

    def _iterator(self):
        """The running DataLoader iterator if it is at the requested position (any epoch will do when every
        epoch has the same batches), else one started there."""
        epoch, skip = self.sampler.epoch, self.sampler.skip
        at = self._next
        moved = at is None or at[1] != skip or (at[0] != epoch and not self.sampler.epoch_free)
        if self._it is None or moved:
            self.stream.start(epoch, skip)
            self._it = iter(self.dl)
            self.starts += 1
        return self._it

    def __iter__(self):
        it, epoch, skip = self._iterator(), self.sampler.epoch, self.sampler.skip
        prefetch, reached = None, []
        if self.files is not None and self.files.cache is not None:
            order, reached = self._shard_schedule()
            prefetch = self.files.prefetcher(order, self.data.prefetch_shards)
        try:
            for j in range(skip, len(self.sampler)):
                try:
                    b = self._next_batch(it)
                except BaseException:
                    self._it = None  # a worker failed or was stopped: start afresh next time
                    raise
                self._next = (epoch, j + 1) if j + 1 < len(self.sampler) else (epoch + 1, 0)
                if "error" in b:
                    self._it = None
                    raise b["error"]
                if prefetch is not None:  # the workers are `inflight` batches ahead of this loop
                    prefetch.advance(reached[min(j - skip + self.inflight, len(reached) - 1)])
                yield self._finish(b)
        finally:
            if prefetch is not None:
                prefetch.stop()

    def _next_batch(self, it) -> dict:
        """The DataLoader's next batch; while the parts are timed, the wait for it and its worker's
        snapshot recorded."""
        if self.parts is None:
            return next(it)
        t, c = time.perf_counter(), time.thread_time()
        b = next(it)
        self.parts.received(b.pop("parts", None), time.perf_counter() - t, time.thread_time() - c)
        return b

    def _finish(self, b: dict) -> Batch:
        """A `Batch` from a collated one: uint8 from the workers -> normalised float (channels_last on CUDA
        when the model uses it) and int64 masks on the device, converted after the copy."""
        c = time.thread_time() if self.parts is not None else 0.0
        out = self._convert(b)
        if self.parts is not None:
            self.parts.finished(time.thread_time() - c, len(out["key"]))
        return out

    def _convert(self, b: dict) -> Batch:
        """`_finish`'s conversion."""
        nb = self.device.type == "cuda"
        if "jpeg" in b:
            self._decode_on_gpu(b)
        else:
            d = self.data
            pixels, pooled = self._pixels(b)
            image, mask = unpack(pixels, b.pop("size"), self.channels_last)
            b["image"] = to_device(image, self.device, d.mean, d.std, nhwc=self.channels_last)
            b["mask"] = mask.long()
            if pooled is not None:  # copied out above: the worker may fill it again
                pooled[-1] = FREE
        for k in ("valid", "corrupt"):  # pinned first on CUDA: a pageable copy would wait for the device
            v = torch.tensor(b[k])
            b[k] = v.pin_memory().to(self.device, non_blocking=True) if nb else v
        return b

    def _pixels(self, b: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The batch's N x 4HW pixels on the device, and the pooled buffer (`BufferPool`) holding them
        (None when the batch has a buffer of its own): a pooled buffer comes once and is kept mapped here
        under its worker's pid and number."""
        ref = b.pop("buffer", None)
        if ref is None:
            return b.pop("pixels").to(self.device, non_blocking=self.device.type == "cuda"), None
        buf = b.pop("pixels", None)
        if buf is None:
            buf = self.buffers[ref]
        elif ref[1] >= 0:
            self.buffers[ref] = buf
        return batch_rows(buf, len(b["key"]), b["size"]), buf

    def _decode_on_gpu(self, b: dict) -> None:
        """nvJPEG decode of the batch (one call), then the same transforms as the CPU path, on the GPU."""
        from torchvision.io import decode_jpeg

        jpegs, masks, params = b.pop("jpeg"), b.pop("mask_u8"), b.pop("params")
        good = [k for k, bad in enumerate(b["corrupt"]) if not bad]
        try:
            decoded = dict(zip(good, decode_jpeg([jpegs[k] for k in good], device=self.device)))
        except RuntimeError:  # find the damaged one(s)
            decoded = {}
            for k in good:
                try:
                    decoded[k] = decode_jpeg(jpegs[k], device=self.device)
                except RuntimeError as e:
                    i = int(b["index"][k])
                    what = (f"sample {self.samples.key(i)} in shard {self.samples.shard_name(i)} cannot be "
                            f"decoded ({str(e).splitlines()[0]})")
                    if self.data.on_corrupt != "skip":
                        raise UserError(f"{what}: re-shard it, or set data.on_corrupt=skip") from None
                    b["corrupt"][k], b["valid"][k] = True, False
        pairs = []
        for k, m in enumerate(masks):
            m = m.to(self.device, non_blocking=True)
            if k not in decoded:  # padding for a corrupt sample: nothing in it counts
                h, w = self.data.crop if self.data.crop and self.train else m.shape
                pairs.append((torch.zeros(3, h, w, device=self.device),
                              torch.full((h, w), IGNORE, device=self.device, dtype=torch.long)))
                continue
            pairs.append(self._gpu_transform(decoded[k], m, params[k]))
        b["image"] = torch.stack([p[0] for p in pairs])
        b["mask"] = torch.stack([p[1] for p in pairs])
        if self.channels_last:
            b["image"] = b["image"].contiguous(memory_format=torch.channels_last)

    def _gpu_transform(self, img: torch.Tensor, mask: torch.Tensor, p: AugParams | None):
        """One decoded sample on the device: augmented by the parameters its worker chose
        (`sample_params`), or for validation (None) normalised as it is."""
        d = self.data
        if p is not None:
            return augment_tensor(img, mask, p, d.crop, d.mean, d.std)
        return normalize(img, d.mean, d.std), mask.long()
