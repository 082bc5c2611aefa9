"""DALI loader: fn.readers.webdataset over the shards, JPEG decoded on the GPU (`mixed`) or the CPU
(device_id=None, for CPU-only machines and CI), the same joint augmentations as the torch loader with one
set of random nodes feeding both image and mask, and the common batch contract.

Sample-exact by rank: DALI splits the samples into num_shards contiguous ranges; pad_last_batch pads
every rank to the same number of batches by repeating its last sample. Those repeats are marked
valid=False (position in the epoch >= this rank's range), so they count nowhere. shuffle_after_epoch
reshuffles the order between epochs with the same seed on every rank (the shards are already sample-
shuffled when written). Mid-epoch resume uses DALI's own checkpoint of reader position and RNG state.
"""

from __future__ import annotations

import functools
import gc
import math
import os

import numpy as np
import torch

from distseg.config import DataCfg
from distseg.errors import UserError, missing_extra
from distseg.labels import IGNORE
from distseg.shards.shard_reader import ShardFiles
from distseg.shards.split import OpenSplit
from distseg.units import parse_bytes

INFO_BYTES = 512


def dali_missing() -> str | None:
    """Why nvidia.dali does not import here (with the extra to install), or None when it does."""
    try:
        import nvidia.dali  # noqa: F401

        return None
    except ImportError as e:
        return missing_extra(e) or f"cannot import DALI ({e})"


@functools.cache
def collect_before_fork() -> None:
    """Registered once: collect garbage before this process forks (DataLoader workers, shard pools). A DALI
    pipeline that became garbage must be finalised in the process that built it: a forked child that collects
    it waits forever in its shutdown, for threads that do not exist in the child."""
    os.register_at_fork(before=gc.collect)


def unsupported(d: DataCfg, train: bool) -> str | None:
    """The one line refusing what the DALI graph does not implement of these settings, or None. Class-aware
    crops count each tried window's labels and choose on the counts: a data-dependent loop that DALI's random
    nodes do not express (a python_function node could, holding the GIL in every pipeline thread)."""
    if train and d.cat_max_ratio > 0:
        return (f"data.cat_max_ratio={d.cat_max_ratio} (class-aware crops) is implemented by the torch "
                "loader only: set data.loader=torch, or data.cat_max_ratio=0 to train with DALI")
    if train and d.sampling == "rare":  # DALI's reader owns its order: no draw with replacement
        return ("data.sampling=rare draws every slot into one global order through the torch loader: set "
                "data.loader=torch, or data.sampling=uniform to train with DALI")
    return None


def dali_available() -> bool:
    """Whether nvidia.dali imports here."""
    return dali_missing() is None


class DaliLoader:
    """DALI pipeline + iterator: a `batch.Loader` whose reader keeps its own position, yielding `Batch`es."""

    keeps_position = True
    shares = stream_sizes = None  # data.streams is the torch loader's

    def __init__(self, d: DataCfg, seed: int, split: OpenSplit, train: bool, device, world: int, rank: int):
        man = split.manifest
        refused = unsupported(d, train)
        if refused:
            raise UserError(refused)
        missing = dali_missing()
        if missing:
            raise UserError(f"data.loader=dali {missing}")
        collect_before_fork()
        if man["mask_ext"] != "mask.png" or man["image_ext"] not in ("jpg", "png"):
            raise UserError(f"{man['_path']}: data.loader=dali decodes JPEG and PNG members; these shards "
                            "hold zstd arrays (distseg shard --lossless zstd): use data.loader=torch, or "
                            "re-shard with --lossless png")
        self.data, self.seed, self.train, self.split, self.man = d, seed, train, split, man
        self.device = torch.device(device)
        self.gpu = self.device.type == "cuda"
        self.world, self.rank = world, rank
        self.lut = split.lut
        self.n = man["total"]
        self.batch_size = d.batch_size if train else d.val_batch_size
        self.repeat = d.repeat if train else 1
        if self.n < world:
            raise UserError(f"{man['_path']}: {self.n} samples cannot be split over {world} processes")
        # DALI's shard of rank r: samples [n*r//world, n*(r+1)//world)
        self.shard_len = self.n * (rank + 1) // world - self.n * rank // world
        self.max_shard = max(self.n * (r + 1) // world - self.n * r // world for r in range(world))
        self._batch = 0
        self.files = ShardFiles.of(man, d)
        limit, total = parse_bytes(d.cache_size), sum(sh["bytes"] for sh in man["shards"])
        if man["_remote"] and limit and limit < total:
            raise UserError(f"data.loader=dali reads every shard of {man['split']} from the cache: "
                            f"data.cache_size ({d.cache_size}) must hold {total / 2**30:.2f} GiB (or use "
                            "data.loader=torch with data.shuffle=shards)")
        if train and d.shuffle == "shards" and rank == 0:
            print("note: data.loader=dali shuffles with its own reader (shard ranges per rank, reshuffled "
                  "each epoch); data.shuffle=shards applies to the torch loader", flush=True)
        self.tars = [str(p) for p in self.files.all_tars()]  # verified, downloaded if remote
        self.idx = [str(self.files.index(i) or "") for i in range(len(self.files))]
        if not all(self.idx):
            raise UserError(f"{man['_path']}: data.loader=dali needs the shards' .idx files")
        self._build(None)

    # -- pipeline ---------------------------------------------------------------------------------
    def _build(self, checkpoint: bytes | None) -> None:
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        d, seed = self.data, self.seed
        tars, idx = self.tars, self.idx
        train, gpu = self.train, self.gpu
        mean = [255 * m for m in d.mean]
        std = [255 * s for s in d.std]
        lut = self.lut

        @pipeline_def(batch_size=self.batch_size, num_threads=max(1, d.num_workers),
                      device_id=self.device.index or 0 if gpu else None, seed=seed + 1,
                      enable_checkpointing=True, prefetch_queue_depth=2)
        def pipe():
            # JPEG decodes on the GPU in `mixed` mode; PNG (lossless val shards) on the CPU inside it
            jpg, mask = fn.readers.webdataset(
                paths=tars, index_paths=idx, ext=[self.man["image_ext"], self.man["mask_ext"]],
                shard_id=self.rank, num_shards=self.world,
                pad_last_batch=True, name="Reader",
                # training: one global reshuffle per epoch, shard ranges fixed; validation: no shuffle, and
                # stick_to_shard, or DALI would move each rank to the next shard every epoch
                **(dict(shuffle_after_epoch=True, shuffle_after_epoch_seed=seed) if train
                   else dict(stick_to_shard=True)))
            info = fn.pad(fn.get_property(jpg, key="source_info"), fill_value=0, shape=[INFO_BYTES])
            img = fn.decoders.image(jpg, device="mixed" if gpu else "cpu", output_type=types.RGB)
            m = fn.decoders.image(mask, device="cpu", output_type=types.GRAY)
            if lut is not None:
                keys = list(range(256))
                m = fn.lookup_table(m, keys=keys, values=[int(v) for v in lut], default_value=IGNORE,
                                    dtype=types.UINT8)
            if gpu:
                m = m.gpu()
            img, m = augment(img, m, jpg, d, mean, std) if train else normalize_val(img, m, mean, std)
            return img, m, info

        self.pipe = pipe(checkpoint=checkpoint) if checkpoint else pipe()
        self.pipe.build()
        self.it = DALIGenericIterator([self.pipe], ["image", "mask", "info"], reader_name="Reader",
                                      last_batch_policy=LastBatchPolicy.FILL, auto_reset=True)

    # -- batch.Loader ----------------------------------------------------
    @property
    def num_samples(self) -> int:
        """Samples in the split (padding excluded)."""
        return self.n

    def stream_images(self, epochs: int, batches: int) -> None:
        """data.streams is the torch loader's."""
        return None

    def class_draws(self, epochs: int, batches: int) -> None:
        """data.sampling=rare is the torch loader's."""
        return None

    def class_pixels(self) -> np.ndarray:
        """Labelled pixels per class of the split, for the loss weights."""
        return self.split.class_pixels()

    @property
    def per_pass(self) -> int:
        """Batches of one pass over the split (a DALI epoch)."""
        return math.ceil(self.max_shard / self.batch_size)

    def __len__(self) -> int:
        return self.per_pass * self.repeat

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """DALI keeps its own epoch order; `skip_batches` is the position a restored checkpoint resumes at."""
        self._batch = skip_batches

    def state_dict(self) -> bytes:
        """DALI's own checkpoint of reader position and random state."""
        return self.it.checkpoints()[0]

    def load_state_dict(self, state: bytes) -> None:
        """Rebuild the pipeline from a `state_dict` checkpoint."""
        self._build(state)

    def __iter__(self):
        """The rest of the epoch: `repeat` DALI epochs (each reshuffled by the reader), from the position
        `set_epoch` gave."""
        while self._batch < len(self):
            for out in self.it:  # one pass; auto_reset makes the next iteration the next pass
                o = out[0]
                n = o["image"].shape[0]
                pos = (self._batch % self.per_pass) * self.batch_size + torch.arange(n)
                self._batch += 1
                info = o["info"].cpu().numpy().astype(np.uint8)
                keys = [bytes(row).rstrip(b"\0").decode().rsplit(":", 1)[-1].split(".", 1)[0] for row in info]
                valid = (pos < self.shard_len).to(self.device)
                yield {"image": o["image"].to(self.device), "mask": o["mask"][:, 0].long().to(self.device),
                       "key": keys, "valid": valid, "corrupt": torch.zeros_like(valid)}
        self._batch = 0


def augment(img, m, encoded, d, mean: list[float], std: list[float]):
    """The training augmentation as DALI graph nodes (the table in distseg/data/transforms.py): scale, crop
    with padding, colour jitter, flip, normalise. One set of random nodes feeds image and mask, so the mask
    follows the image exactly. `encoded` is the undecoded image (its shape is peeked, not decoded)."""
    from nvidia.dali import fn, types

    hw = fn.cast(fn.peek_image_shape(encoded)[0:2], dtype=types.FLOAT)
    # a fixed scale (data.scale=[s,s]) is a constant: DALI refuses an empty range
    s = fn.random.uniform(range=list(d.scale)) if d.scale[0] < d.scale[1] else float(d.scale[0])
    size = hw * s
    img = fn.resize(img, size=size, interp_type=types.INTERP_LINEAR, antialias=False)
    m = fn.resize(m, size=size, interp_type=types.INTERP_NN)
    flip = fn.random.coin_flip(probability=0.5 if d.flip else 0.0)
    cx, cy = fn.random.uniform(range=[0.0, 1.0]), fn.random.uniform(range=[0.0, 1.0])
    if d.crop:  # crop first, so colour and normalisation touch only the crop
        # a scaled image smaller than the crop sits at the top left: padding bottom and right
        cy = cy * fn.cast(size[0] >= d.crop[0], dtype=types.FLOAT)
        cx = cx * fn.cast(size[1] >= d.crop[1], dtype=types.FLOAT)
        img = fn.crop(img, crop=list(d.crop), crop_pos_x=cx, crop_pos_y=cy,
                      out_of_bounds_policy="pad", fill_values=mean)  # pads to 0 after normalising
        m = fn.crop(m, crop=list(d.crop), crop_pos_x=cx, crop_pos_y=cy,
                    out_of_bounds_policy="pad", fill_values=IGNORE)
    if d.color > 0:
        rng = [1 - d.color, 1 + d.color]
        img = fn.color_twist(img, brightness=fn.random.uniform(range=rng),
                             contrast=fn.random.uniform(range=rng),
                             saturation=fn.random.uniform(range=rng))
    img = fn.crop_mirror_normalize(img, mirror=flip, mean=mean, std=std, dtype=types.FLOAT,
                                   output_layout="CHW")
    m = fn.crop_mirror_normalize(m, mirror=flip, mean=[0.0], std=[1.0], dtype=types.UINT8,
                                 output_layout="CHW")
    return img, m


def normalize_val(img, m, mean: list[float], std: list[float]):
    """Validation: normalise the image, the mask channel-first; nothing random."""
    from nvidia.dali import fn, types

    img = fn.crop_mirror_normalize(img, mean=mean, std=std, dtype=types.FLOAT, output_layout="CHW")
    m = fn.transpose(m, perm=[2, 0, 1])
    return img, m
