import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distseg.data.sampler import EpochBatchSampler
from distseg.data.transforms import augment_pil, augment_tensor, draw_params, mean_fill
from distseg.inference.metrics import ConfusionMatrix
from distseg.models.losses import SegLoss, dice_loss
from distseg.models.unet import UNet


@pytest.mark.parametrize("n,b,world", [(14, 4, 1), (14, 2, 2), (5, 2, 2), (16, 4, 2), (7, 3, 3), (1, 4, 2)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_sampler_equal_batches_and_each_sample_once(n, b, world, shuffle):
    for epoch in (0, 1):
        seen, lengths = [], set()
        for rank in range(world):
            s = EpochBatchSampler(n, b, world, rank, shuffle=shuffle, seed=5)
            s.set_epoch(epoch)
            batches = list(s)
            lengths.add(len(batches))
            assert all(len(bt) == b for bt in batches)
            seen += [i for bt in batches for i, e, v in bt if v]
        assert len(lengths) == 1
        assert sorted(seen) == list(range(n))


def test_sampler_shuffles_by_epoch_and_skips():
    s = EpochBatchSampler(20, 2, 2, 1, shuffle=True, seed=1)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert [i for bt in e0 for i, *_ in bt] != [i for bt in e1 for i, *_ in bt]
    s.set_epoch(0, skip_batches=3)
    assert list(s) == e0[3:]
    # the global batch does not depend on how it is split: 1 x 4 == 2 x 2
    one = EpochBatchSampler(20, 4, 1, 0, shuffle=True, seed=1)
    two = [EpochBatchSampler(20, 2, 2, r, shuffle=True, seed=1) for r in range(2)]
    for j, bt in enumerate(one):
        assert [i for i, *_ in bt] == [i for r in range(2) for i, *_ in list(two[r])[j]]


def test_confusion_matrix_scores():
    cm = ConfusionMatrix(3)
    t = torch.tensor([0, 0, 1, 1, 2, 255, 2])
    p = torch.tensor([0, 1, 1, 1, 0, 2, 7])  # 7: a prediction outside the classes -> a miss only
    cm.update(p, t)
    s = cm.scores()
    assert s["iou"][0] == pytest.approx(1 / 3)  # tp 1, fn 1, fp 1
    assert s["iou"][1] == pytest.approx(2 / 3)  # tp 2, fp 1
    assert s["iou"][2] == 0.0
    assert s["pixels"] == 6
    assert s["miou"] == pytest.approx((1 / 3 + 2 / 3 + 0) / 3)
    empty = ConfusionMatrix(4)
    empty.update(torch.tensor([0]), torch.tensor([0]))
    assert math.isnan(empty.scores()["iou"][3]) and empty.scores()["miou"] == 1.0


def test_losses():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 8, 8)
    target = torch.randint(0, 4, (2, 8, 8))
    target[0, :2] = 255
    loss = SegLoss(ce=1.0)
    assert loss(logits,
                target).item() == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item(),
                                                rel=1e-5)
    perfect = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float() * 50
    assert dice_loss(perfect, target).item() < 1e-3
    assert dice_loss(-perfect, target).item() > 0.9
    b = SegLoss(ce=0, bce=1.0)
    bt = (target % 2) * (target != 255) + 255 * (target == 255)
    one = logits[:, :1]
    ref = F.binary_cross_entropy_with_logits(one[:, 0][bt != 255], bt[bt != 255].float())
    assert b(one, bt).item() == pytest.approx(ref.item(), rel=1e-5)


def test_unet_shapes_and_odd_sizes():
    m = UNet(3, 5, base=8, depth=3, norm="group")
    assert m(torch.randn(2, 3, 64, 96)).shape == (2, 5, 64, 96)
    assert m(torch.randn(1, 3, 37, 51)).shape == (1, 5, 37, 51)
    seed = UNet(3, 19, base=64, depth=4)
    assert 30e6 < sum(p.numel() for p in seed.parameters()) < 32e6  # the seed's 31M-parameter U-Net


@pytest.mark.parametrize("path", ["pil", "tensor"])
def test_joint_augmentation_keeps_image_and_mask_aligned(path):
    import io

    from PIL import Image

    rng = np.random.default_rng(0)
    pal = rng.integers(0, 256, (5, 3)).astype(np.uint8)
    mask = np.zeros((96, 160), np.uint8)
    for k in range(1, 5):  # blocks of classes
        y, x = rng.integers(0, 70), rng.integers(0, 130)
        mask[y:y + 26, x:x + 30] = k
    buf = io.BytesIO()
    Image.fromarray(pal[mask]).save(buf, "PNG")
    mean, std = [0.5] * 3, [0.25] * 3
    flips = set()
    for i in range(12):
        p = draw_params(0, 0, i, (0.6, 1.6), True, 0.0)
        flips.add(p.flip)
        if path == "pil":
            img, m = augment_pil(buf.getvalue(), mask, p, (64, 96), mean_fill(mean))
            rgb, m = img.permute(2, 0, 1).float(), m.long()
        else:
            img = torch.from_numpy(pal[mask]).permute(2, 0, 1)
            x, m = augment_tensor(img, torch.from_numpy(mask), p, (64, 96), mean, std)
            rgb = (x * 0.25 + 0.5) * 255
        assert rgb.shape == (3, 64, 96) and m.shape == (64, 96)
        valid = m != 255
        # the colour under each mask pixel must be that class's colour (edges may blur)
        d = ((rgb.permute(1, 2, 0)[valid][:, None, :] - torch.from_numpy(pal).float()[None]) ** 2).sum(-1)
        agree = (d.argmin(1) == m[valid]).float().mean()
        assert agree > 0.97, (i, agree)
    assert flips == {True, False}
    # same (seed, epoch, index) -> same parameters; another epoch -> others
    assert draw_params(0, 0, 3, (0.5, 2), True, 0.2) == draw_params(0, 0, 3, (0.5, 2), True, 0.2)
    assert draw_params(0, 0, 3, (0.5, 2), True, 0.2) != draw_params(0, 1, 3, (0.5, 2), True, 0.2)


def test_config_errors(tmp_path):
    from distseg.config import load_config
    from distseg.errors import UserError

    cfg = load_config(None, ["train.epochs=3", "data.crop=[64,128]", "model.norm=group"])
    assert cfg.train.epochs == 3 and cfg.data.crop == [64, 128] and cfg.model.norm == "group"
    for ov, msg in [("train.epoch=3", "unknown key train.epoch"),
                    ("train.epochs=abc", "train.epochs must be int"),
                    ("model.norm=layer", "model.norm must be one of"), ("data.batch_size=0", "at least 1"),
                    ("trainepochs", "bad override")]:
        with pytest.raises(UserError, match=msg):
            load_config(None, [ov])
    with pytest.raises(UserError, match="config file not found"):
        load_config(tmp_path / "none.yaml")


@pytest.mark.parametrize("world,b", [(1, 4), (2, 3), (3, 2), (4, 1)])
def test_shard_window_sampler_exactly_once_equal_batches_and_shard_share(world, b):
    from distseg.data.sampler import ShardWindowSampler

    sizes = [5, 4, 5, 3, 5, 4, 2, 5]
    shard_of = [k for k, n in enumerate(sizes) for _ in range(n)]
    orders = []
    for epoch in (0, 1):
        seen, lengths = [], set()
        for rank in range(world):
            s = ShardWindowSampler(sizes, b, world, rank, seed=3, window=2)
            s.set_epoch(epoch)
            batches = list(s)
            lengths.add(len(batches))
            assert all(len(bt) == b for bt in batches)
            seen += [i for bt in batches for i, e, v in bt if v and e == epoch]
            touched = {shard_of[i] for bt in batches for i, _, _ in bt}
            assert touched == set(s.shard_order())
            assert len(touched) <= math.ceil(len(sizes) / world) + 1  # its share, plus a boundary shard
            first_window = {shard_of[i] for bt in batches for i, _, v in bt if v}
            if rank == 0:
                orders.append([i for bt in batches for i, _, _ in bt])
            # resume mid-epoch: the same batches continue
            s2 = ShardWindowSampler(sizes, b, world, rank, seed=3, window=2)
            s2.set_epoch(epoch, skip_batches=1)
            assert list(s2) == batches[1:]
            assert first_window
        assert len(lengths) == 1 and sorted(seen) == list(range(sum(sizes)))
    assert orders[0] != orders[1]  # reshuffled per epoch


def test_shard_window_shuffles_within_windows_only():
    from distseg.data.sampler import ShardWindowSampler

    sizes = [4] * 6
    s = ShardWindowSampler(sizes, 4, 1, 0, seed=0, window=2)
    order = [i for bt in s for i, _, _ in bt]
    shards = [i // 4 for i in order]
    for w in range(0, 24, 8):  # each run of 8 samples (2 shards) comes from exactly 2 shards
        assert len(set(shards[w:w + 8])) == 2
    assert order != sorted(order)
