"""DALI loader in CPU mode (device_id=None): sample-exact epochs, same sample set as the torch loader,
aligned image/mask under augmentation, mid-epoch resume from DALI's checkpoint."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("nvidia.dali", reason='DALI is not installed: pip install "distseg[dali]"')

from conftest import split_keys  # noqa: E402
from distseg.config import load_config  # noqa: E402
from distseg.data.dali_loader import DaliLoader  # noqa: E402
from distseg.data.torch_loader import TorchLoader  # noqa: E402
from distseg.labels import get_scheme  # noqa: E402
from distseg.shards.split import open_split  # noqa: E402

TRAINID = get_scheme("trainid")


def cfg_for(shards, **kw):
    o = {"data.shards": shards, "data.batch_size": 3, "data.val_batch_size": 2, "data.num_workers": 1,
         "data.crop": "[96,160]", "data.scale": "[0.7,1.4]", "data.color": 0.0}
    o.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def epoch_keys(loader, epoch):
    loader.set_epoch(epoch)
    keys, n = [], 0
    for b in loader:
        n += 1
        keys += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
    return keys, n


@pytest.mark.parametrize("world,bs,repeat", [(1, 4, 1), (2, 3, 1), (3, 2, 1), (2, 3, 2)])
def test_dali_epochs_are_sample_exact_and_match_torch_loader(shards, world, bs, repeat):
    cfg = cfg_for(shards, **{"data.batch_size": bs, "data.repeat": repeat})
    opened = open_split(shards, "train", TRAINID)
    every = sorted(split_keys(shards) * repeat)
    seed = cfg.train.seed
    dali = [DaliLoader(cfg.data, seed, opened, True, "cpu", world, r) for r in range(world)]
    torch_l = [TorchLoader(cfg.data, seed, opened, True, "cpu", world, r) for r in range(world)]
    for epoch in range(2):
        for loaders in (dali, torch_l):
            got, lens = [], set()
            for L in loaders:
                keys, n = epoch_keys(L, epoch)
                assert n == len(L)
                lens.add(n)
                got += keys
            assert len(lens) == 1, "every rank must get the same number of batches"
            assert sorted(got) == every, "each sample exactly once per pass"


def test_dali_val_counts_each_image_once(shards):
    cfg = cfg_for(shards)
    opened = open_split(shards, "val", TRAINID)
    loaders = [DaliLoader(cfg.data, cfg.train.seed, opened, False, "cpu", 2, r) for r in range(2)]
    for _ in range(3):  # every validation pass, not just the first
        got = []
        for L in loaders:
            L.set_epoch(0)
            for b in L:
                assert b["image"].shape[1:] == (3, 128, 256) and b["mask"].shape[1:] == (128, 256)
                got += [k for k, v in zip(b["key"], b["valid"].tolist()) if v]
        assert sorted(got) == sorted(split_keys(shards, "val"))


@pytest.fixture(scope="module")
def coded_shards(synth_root, tmp_path_factory):
    """A tree whose images paint each class in its own colour: alignment is then visible per pixel."""
    from distseg.labels import get_scheme
    from distseg.shards.shard import ShardOptions, run_shard

    root = tmp_path_factory.mktemp("coded")
    shutil.copytree(synth_root / "gtFine", root / "gtFine")
    scheme = get_scheme("trainid")
    pal = np.array([[(37 * i) % 256, (91 * i + 60) % 256, (151 * i + 120) % 256] for i in range(256)],
                   np.uint8)
    for lab in (root / "gtFine" / "train").glob("*/*_labelIds.png"):
        name = lab.name.replace("_gtFine_labelIds", "_leftImg8bit")
        img_path = root / "leftImg8bit" / "train" / lab.parent.name / name
        img_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pal[scheme.remap(np.asarray(Image.open(lab)))]).save(img_path)
    out = root / "shards"
    run_shard(root, out, ShardOptions(split="train", maxcount=5, quality=98), progress=False,
              log=lambda *a: None)
    return out, pal


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_augmented_image_and_mask_stay_aligned(coded_shards, kind):
    out, pal = coded_shards
    cfg = cfg_for(out, **{"data.batch_size": 4})
    opened = open_split(out, "train", TRAINID)
    L = (DaliLoader if kind == "dali" else TorchLoader)(cfg.data, 0, opened, True, "cpu", 1, 0)
    mean, std = torch.tensor(cfg.data.mean).view(3, 1, 1), torch.tensor(cfg.data.std).view(3, 1, 1)
    colours = torch.from_numpy(pal[:19]).float()
    flipped_somewhere = False
    for epoch in range(2):
        L.set_epoch(epoch)
        for b in L:
            for img, m in zip(b["image"], b["mask"]):
                rgb = (img * std + mean) * 255
                # judge interior pixels (3x3 neighbourhood of one class): edges blur under resize and JPEG
                mf = m.float()[None, None]
                pool = torch.nn.functional.max_pool2d
                same = (pool(mf, 3, 1, 1) == -pool(-mf, 3, 1, 1))[0, 0]
                valid = (m != 255) & same
                d = ((rgb.permute(1, 2, 0)[valid][:, None, :] - colours[None]) ** 2).sum(-1)
                agree = (d.argmin(1) == m[valid]).float().mean().item()
                assert agree > 0.98, agree
                flipped_somewhere |= bool(valid.any())
    assert flipped_somewhere


@pytest.mark.parametrize("kind", ["dali", "torch"])
def test_both_loaders_pad_a_small_image_as_the_table_says(shards, kind):
    """distseg/data/transforms.py: a scaled image smaller than the crop sits at the top left (top right once
    flipped), the padding is the mean colour (0 normalised) with ignored masks, and both flips occur."""
    cfg = cfg_for(shards, **{"data.scale": "[0.5,0.5]", "data.crop": "[96,192]", "data.batch_size": 7})
    opened = open_split(shards, "train", TRAINID)
    L = (DaliLoader if kind == "dali" else TorchLoader)(cfg.data, 0, opened, True, "cpu", 1, 0)
    sides = set()
    for b in L:  # 256x128 sources at scale 0.5: 128x64 inside a 192x96 crop
        for img, m in zip(b["image"], b["mask"]):
            assert (m[64:] == 255).all() and img[:, 64:].abs().max() < 0.03
            left = (m[:, :64] == 255).all()
            assert left or (m[:, 128:] == 255).all()
            pad = img[:, :, :64] if left else img[:, :, 128:]
            assert pad.abs().max() < 0.03 and (m[:64, 64:128] != 255).any()
            sides.add(bool(left))
    assert sides == {True, False}


def test_dali_resume_mid_epoch_continues_exactly(shards):
    cfg = cfg_for(shards)
    opened = open_split(shards, "train", TRAINID)
    a = DaliLoader(cfg.data, cfg.train.seed, opened, True, "cpu", 2, 1)
    epoch_keys(a, 0)
    a.set_epoch(1)
    it = iter(a)
    first = [next(it)["key"] for _ in range(2)]
    state = a.state_dict()
    rest = [(b["key"], b["valid"].tolist(), b["image"].sum().item()) for b in it]
    b = DaliLoader(cfg.data, cfg.train.seed, opened, True, "cpu", 2, 1)
    b.load_state_dict(state)
    b.set_epoch(1, skip_batches=2)
    again = [(x["key"], x["valid"].tolist(), x["image"].sum().item()) for x in b]
    assert again == rest and len(first) == 2
    keys_epoch1 = [k for ks in first for k in ks] + [k for ks, v, _ in rest for k, ok in zip(ks, v) if ok]
    assert len(keys_epoch1) == len(set(keys_epoch1))


@pytest.mark.slow
def test_training_with_dali_loader_two_processes(shards, tmp_path):
    from conftest import base_overrides, run_train, val_pixels

    run_train(base_overrides(shards, tmp_path, "dali", **{"data.loader": "dali", "data.batch_size": 2}),
              procs=2)
    s = json.loads((tmp_path / "dali" / "summary.json").read_text())
    assert s["processes"] == 2 and s["steps"] == 8
    assert s["final_pixels"] == val_pixels(shards)


@pytest.mark.gpu
def test_dali_mixed_decode_matches_the_cpu_pipeline_on_the_train_jpeg_shards(shards):
    cfg = cfg_for(shards, **{"data.val_batch_size": 4})
    opened = open_split(shards, "train", TRAINID)
    assert opened.manifest["image_ext"] == "jpg"  # nvJPEG's path: the train shards (val is lossless PNG)
    cpu = next(iter(DaliLoader(cfg.data, 0, opened, False, "cpu", 1, 0)))
    gpu = next(iter(DaliLoader(cfg.data, 0, opened, False, "cuda:0", 1, 0)))
    assert gpu["image"].is_cuda and cpu["key"] == gpu["key"]
    torch.testing.assert_close(gpu["mask"].cpu(), cpu["mask"])
    grey = (gpu["image"].cpu() - cpu["image"]) * torch.tensor(cfg.data.std).view(1, 3, 1, 1) * 255
    assert grey.abs().mean() < 2 and grey.abs().max() < 40  # nvJPEG vs libjpeg-turbo: rounding, edges
