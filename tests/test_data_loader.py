"""The torch loader across epochs: one DataLoader iterator runs on from an epoch into the next (its workers
decode the next epoch's first batches while the loop finishes the current one), with exactly the batches a
fresh start at that epoch gives; another position starts afresh; a repeated split draws each pass's
augmentation from its own key; zstd shards give what PNG shards give; class-aware crops resume with the same
crops and are the same on the nvJPEG path; DALI refuses them in one line."""

import pytest
import torch

from conftest import split_keys
from distseg.config import DataCfg, load_config
from distseg.data.dali_loader import DaliLoader, dali_available, unsupported
from distseg.data.hand_off import DirectForkContext
from distseg.data.torch_loader import ShardDataset, TorchLoader, collate
from distseg.data.transforms import draw_params
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.shards.split import open_split

TRAINID = get_scheme("trainid")


def loader(shards, **kw):
    o = {"data.shards": shards, "data.batch_size": 3, "data.num_workers": 1, "data.crop": "[64,96]"}
    o.update(kw)
    cfg = load_config(None, [f"{k}={v}" for k, v in o.items()])
    return TorchLoader(cfg.data, 0, open_split(shards, "train", TRAINID), True, "cpu", 1, 0)


def epoch(L, e, skip=0):
    L.set_epoch(e, skip)
    return [(b["key"], b["image"]) for b in L]


def same(a, b):
    assert [k for k, _ in a] == [k for k, _ in b]
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a, b))


def test_the_next_epoch_continues_the_running_iterator_with_a_fresh_starts_batches(shards):
    L = loader(shards)
    e0 = epoch(L, 0)
    e1 = epoch(L, 1)
    assert L.starts == 1  # no restart at the epoch boundary
    same(e1, epoch(loader(shards), 1))
    # a position the running iterator is not at (a resume mid-epoch) starts afresh, with the same batches
    L.set_epoch(0, 2)
    rest = [(b["key"], b["image"]) for b in L]
    assert L.starts == 2
    same(rest, e0[2:])


def test_an_interrupted_epoch_continues_where_the_loop_left_it(shards):
    L = loader(shards)
    L.set_epoch(0)
    first = []
    for b in L:  # the loop stops after two batches (max_steps, a stop request), then asks for the rest
        first.append((b["key"], b["image"]))
        if len(first) == 2:
            break
    rest = epoch(L, 0, 2)
    assert L.starts == 1
    same(first + rest, epoch(loader(shards), 0))


def test_a_repeated_split_is_k_passes_each_augmented_by_its_own_key(shards):
    L = loader(shards, **{"data.repeat": 2, "data.batch_size": 2})
    assert len(L) == 2 * len(loader(shards, **{"data.batch_size": 2}))
    L.set_epoch(0)
    keys, images = [], {}
    for b in L:
        for k, img, v in zip(b["key"], b["image"], b["valid"].tolist()):
            if v:
                keys.append(k)
                images.setdefault(k, []).append(img)
    every = split_keys(shards)
    assert sorted(keys) == sorted(every * 2)
    assert all(not torch.equal(*images[k]) for k in every)  # the two passes augment differently


def test_zstd_val_shards_give_the_png_shards_batches(synth_root, shards, tmp_path):
    from distseg.shards.shard import ShardOptions, run_shard

    run_shard(synth_root, tmp_path, ShardOptions(split="val", maxcount=2, lossless="zstd"), progress=False,
              log=lambda *a: None)
    cfg = load_config(None, ["data.val_batch_size=2", "data.num_workers=0"])
    got = [TorchLoader(cfg.data, 0, open_split(folder, "val", TRAINID), False, "cpu", 1, 0)
           for folder in (shards, tmp_path)]
    for a, b in zip(*got):
        assert a["key"] == b["key"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    if dali_available():
        with pytest.raises(UserError, match="data.loader=dali decodes JPEG and PNG members"):
            DaliLoader(cfg.data, 0, open_split(tmp_path, "val", TRAINID), False, "cpu", 1, 0)


CAT = {"data.crop": "[32,64]", "data.cat_max_ratio": 0.6, "data.num_workers": 0}


def masks(L, e=0, skip=0):
    L.set_epoch(e, skip)
    return [(b["key"], b["mask"]) for b in L]


def test_class_aware_crops_resume_with_the_same_crops(shards):
    e0 = masks(loader(shards, **CAT))
    same(masks(loader(shards, **CAT), 0, 2), e0[2:])  # a resume after two batches, in a new process
    plain = masks(loader(shards, **{**CAT, "data.cat_max_ratio": 0}))
    assert not all(torch.equal(a, b) for (_, a), (_, b) in zip(e0, plain))  # some crops moved


def test_the_nvjpeg_path_takes_the_cpu_paths_class_aware_crops(shards):
    """The nvJPEG path's own code on the CPU (its worker items, collate, `_decode_on_gpu` with torchvision
    decoding on the CPU): each sample's mask is the CPU path's, and the crops moved."""
    L = loader(shards, **CAT)
    items = [(i, 1, True) for i in range(6)]
    gpu = [ShardDataset(L.samples, L.data, 0, True, gpu_decode=True)[it] for it in items]
    moved = sum(g["params"] != draw_params(0, 1, g["index"], tuple(L.data.scale), L.data.flip, L.data.color)
                for g in gpu)
    b = collate(gpu)
    L._decode_on_gpu(b)
    for k, it in enumerate(items):
        assert torch.equal(b["mask"][k], L.dl.dataset[it]["mask"].long()), k
    assert moved


def test_dali_refuses_class_aware_crops_in_one_line(shards):
    why = unsupported(DataCfg(cat_max_ratio=0.75), train=True)
    assert "data.cat_max_ratio" in why and "data.loader=torch" in why and "\n" not in why
    assert unsupported(DataCfg(cat_max_ratio=0.75), train=False) is None  # validation crops nothing
    assert unsupported(DataCfg(), train=True) is None
    if dali_available():  # the loader asks before it builds anything
        cfg = load_config(None, [f"data.shards={shards}", "data.loader=dali", "data.cat_max_ratio=0.75"])
        with pytest.raises(UserError, match="data.cat_max_ratio=0.75"):
            DaliLoader(cfg.data, 0, open_split(shards, "train", TRAINID), True, "cpu", 1, 0)


@pytest.mark.gpu
def test_class_aware_crops_are_the_cpu_decodes_on_the_gpu(shards):
    cfg = load_config(None, [f"data.shards={shards}", "data.batch_size=4", "data.num_workers=1",
                             "data.crop=[32,64]", "data.cat_max_ratio=0.6"])
    opened = open_split(shards, "train", TRAINID)
    cpu, gpu = (TorchLoader(cfg.data, 0, opened, True, device, 1, 0) for device in ("cpu", "cuda"))
    assert gpu.gpu_decode
    for (keys, a), (gpu_keys, b) in zip(masks(cpu), masks(gpu)):
        assert keys == gpu_keys and torch.equal(a, b.cpu())


@pytest.mark.gpu
def test_torch_loader_nvjpeg_matches_cpu_decode_on_the_train_jpeg_shards(shards):
    cfg = load_config(None, [f"data.shards={shards}", "data.val_batch_size=4", "data.num_workers=1"])
    opened = open_split(shards, "train", TRAINID)
    cpu = next(iter(TorchLoader(cfg.data, 0, opened, False, "cpu", 1, 0)))
    gpu_loader = TorchLoader(cfg.data, 0, opened, False, "cuda", 1, 0)
    assert gpu_loader.gpu_decode
    gpu = next(iter(gpu_loader))
    assert gpu["image"].is_cuda and cpu["key"] == gpu["key"]
    torch.testing.assert_close(gpu["mask"].cpu(), cpu["mask"])
    grey = (gpu["image"].cpu() - cpu["image"]) * torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    assert grey.abs().mean() < 2 and grey.abs().max() < 40  # a few grey levels, more at sharp edges


def test_pooled_worker_buffers_give_the_batches_of_a_loader_without_workers(shards):
    """On the CPU a worker reuses its shared batch buffers once the main process has copied a batch out:
    more batches than the pool holds, the images and masks of a loader without workers, each epoch."""
    from distseg.data.torch_loader import BufferPool

    pooled, plain = loader(shards, **{"data.batch_size": 2}), loader(shards, **{"data.batch_size": 2,
                                                                             "data.num_workers": 0})
    seen = 0
    for e in range(3):
        pooled.set_epoch(e)
        plain.set_epoch(e)
        for a, b in zip(pooled, plain, strict=True):
            assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
            assert torch.equal(a["mask"], b["mask"])
            seen += 1
    assert seen > BufferPool.LIMIT and 0 < len(pooled.buffers) <= BufferPool.LIMIT  # buffers came back
    assert not plain.buffers  # in the main process: ordinary memory, nothing pooled
    assert isinstance(pooled.dl.multiprocessing_context, DirectForkContext)  # its batches crossed directly


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_batchs_pixels_are_the_transforms_crops_padded_flipped_and_laid_out(shards, channels_last):
    """The collate writes each crop straight from PIL into its batch row: the uint8 pixels a worker sends
    are `transform_sample`'s images (pinned by tests/test_data_transforms.py), transposed to 3 x H x W
    unless channels_last, with crops padded (the scaled image smaller than the crop), flipped or both."""
    from distseg.data.torch_loader import transform_sample, unpack
    from distseg.data.transforms import window
    from distseg.shards.shard_reader import decode_mask

    L = loader(shards, **{"data.batch_size": 2, "data.crop": "[100,200]", "data.scale": "[0.4,1.4]"})
    L.channels_last = channels_last  # as on CUDA with model.channels_last (the same collate, on the CPU)
    L.dl.collate_fn.keywords["nhwc"] = channels_last
    kinds = set()
    for _, raw in zip(range(len(L)), L.dl):
        image, mask = unpack(L._pixels(raw)[0], raw["size"], nhwc=channels_last)
        for k, i in enumerate(raw["index"]):
            source = decode_mask(L.samples.read(i, "mask"), L.samples.lut(i))
            want, m = transform_sample(L.samples.read(i, "image"), source, L.data, 0, True, 0, i)
            assert torch.equal(image[k], want if channels_last else want.permute(2, 0, 1))
            assert torch.equal(mask[k], m)
            p = draw_params(0, 0, i, tuple(L.data.scale), L.data.flip, L.data.color)
            kinds.add((window(*source.shape, p, L.data.crop).valid != tuple(L.data.crop), p.flip))
    assert kinds == {(False, False), (False, True), (True, False), (True, True)}


def test_streams_broken_off_mid_epoch_leave_the_pool_its_buffers(shards):
    """Each restart of the stream drops the batches in flight (4 with one worker), never converted, so their
    buffers were never marked free: after a few restarts, a worker's pool held nothing but them. The first
    batch of a new stream frees them; a full epoch then comes in pooled buffers only, with the batches of
    a loader without workers."""
    L = loader(shards, **{"data.batch_size": 2})
    for e in range(3):  # the loop stops after a batch, then asks for another epoch: a new stream
        L.set_epoch(e)
        next(iter(L))
    assert L.starts == 3
    refs, pixels = [], L._pixels
    L._pixels = lambda b: (refs.append(b["buffer"]), pixels(b))[1]
    plain = loader(shards, **{"data.batch_size": 2, "data.num_workers": 0})
    L.set_epoch(3)
    plain.set_epoch(3)
    for a, b in zip(L, plain, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"])
        assert torch.equal(a["mask"], b["mask"])
    assert len(refs) == len(L) and all(k >= 0 for _, k in refs)  # none a buffer of its own
