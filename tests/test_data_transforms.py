"""The CPU augmentation path: crop-before-resize equals resize-then-crop (masks exactly, images to a fraction
of a grey level), DCT-scaled JPEG decode where the window is downscaled 2x or more, uint8 out of the workers
and the unchanged batch contract on the device. Class-aware crops (data.cat_max_ratio): the kept try is the
first that passes on the final mask, else the last; off, every byte is what it was before them."""

import hashlib
import io
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from distseg.config import DataCfg, load_config
from distseg.data.torch_loader import sample_params, transform_sample
from distseg.data.transforms import (
    AugParams,
    augment_pil,
    augment_tensor,
    choose_crop,
    crop_tries,
    decode_pil,
    draft_factor,
    draw_params,
    mean_fill,
    nearest_window,
    to_device,
    window,
    window_counts,
)
from distseg.errors import UserError
from distseg.labels import IGNORE

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


@pytest.fixture(scope="module")
def scene(synth_root):
    """A synthetic 512x256 camera image (as JPEG q95 bytes and decoded) and its trainId mask."""
    from distseg.labels import get_scheme
    from distseg.shards.cityscapes import find_pairs

    pair = find_pairs(synth_root, "train")[0]
    rgb = Image.open(pair.image).convert("RGB").resize((1024, 512), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=95)
    mask = get_scheme("trainid").remap(np.asarray(Image.open(pair.label).resize((1024, 512),
                                                                                Image.Resampling.NEAREST)))
    return buf.getvalue(), mask


def reference(data: bytes, mask: np.ndarray, p: AugParams, crop, fill):
    """Resize-then-crop of the whole image (PIL's antialiased bilinear) and mask (pixel-centred nearest,
    torch's nearest-exact), then pad and flip: what crop-first must reproduce."""
    im, _ = decode_pil(data)
    h, w = mask.shape
    nh, nw = max(1, round(h * p.scale)), max(1, round(w * p.scale))
    img = np.asarray(im.resize((nw, nh), Image.Resampling.BILINEAR))
    m = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(nh, nw),
                                        mode="nearest-exact")[0, 0].byte().numpy()
    ch, cw = crop
    y0, x0 = int(p.cy * max(0, nh - ch)), int(p.cx * max(0, nw - cw))
    img, m = img[y0:y0 + ch, x0:x0 + cw], m[y0:y0 + ch, x0:x0 + cw]
    out, mo = np.empty((ch, cw, 3), np.uint8), np.full((ch, cw), 255, np.uint8)
    out[:] = fill
    out[:img.shape[0], :img.shape[1]], mo[:m.shape[0], :m.shape[1]] = img, m
    return (out[:, ::-1], mo[:, ::-1]) if p.flip else (out, mo)


def test_crop_first_equals_resize_then_crop(scene):
    data, mask = scene
    fill = mean_fill(MEAN)
    for i in range(24):  # the default scale range and beyond it, with and without padding and flip
        p = draw_params(0, 0, i, (0.35, 2.0), True, 0.0)
        crop = (256, 512)
        img, m = augment_pil(data, mask, p, crop, fill)
        if draft_factor(window(*mask.shape, p, crop), mask.shape[1]) > 1:
            continue  # DCT-scaled decode: its own test
        ref_img, ref_m = reference(data, mask, p, crop, fill)
        assert img.shape == (256, 512, 3) and m.shape == (256, 512) and img.dtype == torch.uint8
        assert np.array_equal(m.numpy(), ref_m), (i, p.scale)  # masks: exactly equal
        inner = np.zeros(m.shape, bool)
        inner[4:-4, 4:-4] = True  # away from the window's borders
        d = np.abs(img.numpy().astype(float) - ref_img.astype(float))[inner]
        assert d.mean() <= 1.0, (i, p.scale, d.mean())


def test_reduced_jpeg_decode_where_the_window_is_downscaled_twice(scene):
    data, mask = scene
    p = AugParams(0.4, 0.3, 0.6, False, 1.0, 1.0, 1.0)
    win = window(*mask.shape, p, (128, 256))
    assert draft_factor(win, mask.shape[1]) == 2
    im, f = decode_pil(data, win)
    assert im.size == (512, 256) and f == 0.5  # decoded at half size by the JPEG decoder's DCT scaling
    img, m = augment_pil(data, mask, p, (128, 256), mean_fill(MEAN))
    ref, ref_m = reference(data, mask, p, (128, 256), mean_fill(MEAN))
    assert (m.numpy() == ref_m).mean() > 0.99
    assert np.abs(img.numpy().astype(float) - ref.astype(float))[4:-4, 4:-4].mean() < 3.0
    # the default scale range [0.5, 2.0] reaches 2x downscaling only at its very end
    shares = [draft_factor(window(1024, 2048, draw_params(0, 0, i, (0.5, 2.0), True, 0.2), (512, 1024)),
                           2048) > 1
              for i in range(2000)]
    assert sum(shares) / len(shares) < 0.01


def test_workers_send_uint8_and_the_device_gets_the_normalised_contract(shards):
    from distseg.config import load_config
    from distseg.data.torch_loader import TorchLoader, unpack
    from distseg.labels import get_scheme
    from distseg.shards.split import open_split

    cfg = load_config(None,
                      [f"data.shards={shards}", "data.batch_size=3", "data.num_workers=1",
                       "data.crop=[64,96]"])
    for train in (True, False):
        opened = open_split(shards, "train" if train else "val", get_scheme("trainid"))
        loader = TorchLoader(cfg.data, cfg.train.seed, opened, train, "cpu", 1, 0)
        raw = next(iter(loader.dl))  # what the workers send: uint8 pixels, already N x 3 x H x W for the CPU
        pixels = loader._pixels(raw)[0]  # on the CPU, in a buffer of the worker's pool
        # copied out, as the loader does: the pool reuses the buffer of a batch the loader never converted
        # once the next stream (the loader's own, below) starts
        image, mask = (t.clone() for t in unpack(pixels, raw["size"], nhwc=False))
        assert pixels.dtype == torch.uint8 and image.shape[1] == 3 and image.shape[0] == mask.shape[0]
        loader.set_epoch(0)
        b = next(iter(loader))  # what the loop gets
        assert b["image"].dtype == torch.float32 and b["image"].shape[1] == 3
        assert b["mask"].dtype == torch.int64
        expect = (image.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) \
            / torch.tensor(STD).view(1, 3, 1, 1)
        torch.testing.assert_close(b["image"], expect, rtol=1e-5, atol=1e-5)


def test_padding_normalises_to_about_zero():
    pixel = torch.tensor(mean_fill(MEAN), dtype=torch.uint8).view(1, 1, 1, 3)
    x = to_device(pixel, "cpu", MEAN, STD, nhwc=True)
    assert x.abs().max() < 0.01


@pytest.mark.parametrize("index", range(8))
def test_cpu_and_gpu_paths_agree_for_the_same_parameters(scene, index):
    """The table in distseg/data/transforms.py, implemented twice: the CPU workers' uint8 path and the nvJPEG
    path's float path (run here on the CPU) give images within a few grey levels and equal masks."""
    from distseg.data.transforms import augment_tensor

    data, mask = scene
    p = draw_params(11, 0, index, (0.5, 1.5), True, 0.3)
    crop = (384, 640)
    img, m = augment_pil(data, mask, p, crop, mean_fill(MEAN))
    decoded = torch.from_numpy(np.array(decode_pil(data)[0])).permute(2, 0, 1)
    x, mt = augment_tensor(decoded, torch.from_numpy(mask), p, crop, MEAN, STD)
    rgb = (x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    diff = (rgb.permute(1, 2, 0) - img.float()).abs()
    assert torch.equal(mt, m.long()), (index, (mt != m.long()).float().mean())
    # uint8 rounding after each of PIL's steps against float throughout: about a grey level on average
    assert diff.mean() < 2 and diff.max() <= 5, (index, diff.mean(), diff.max())


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


def pinned_sample():
    """A 96 x 160 PNG of noisy colour blocks, its pixels and its mask (some pixels unlabelled): the input
    whose augmented bytes were pinned before class-aware crops existed."""
    rng = np.random.default_rng(2024)
    mask = np.zeros((96, 160), np.uint8)
    for k in range(1, 6):
        y, x = rng.integers(0, 70), rng.integers(0, 130)
        mask[y:y + 26, x:x + 30] = k
    mask[rng.random(mask.shape) < 0.02] = IGNORE
    pal = rng.integers(0, 256, (256, 3))
    img = np.clip(pal[mask] + rng.integers(-20, 21, (96, 160, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "PNG")
    return buf.getvalue(), img, mask


# sha256 (first 16 hex digits) of samples 0-3 at seed 5, epoch 1, computed at commit c90fff4: the CPU path's
# image + mask bytes, the tensor path's mask bytes
PINNED = [("654457a62c33d224", "0d1a202bf9b0c779"), ("05264083f897f2a3", "5b58d9884e10397b"),
          ("83290afbd534abc8", "a0da968b893be440"), ("e0edf44f0122fac6", "09f7ca707d2fc522")]


def sha(*arrays) -> str:
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]


def test_cat_max_ratio_0_augments_every_byte_as_before():
    raw, img, mask = pinned_sample()
    d = DataCfg(crop=[64, 96], scale=[0.5, 2.0], color=0.3, flip=True)
    assert d.cat_max_ratio == 0  # the default
    for i, (cpu, tensor) in enumerate(PINNED):
        a, m = transform_sample(raw, torch.from_numpy(mask), d, 5, True, 1, i)
        assert sha(a.numpy(), m.numpy()) == cpu, i
        p = sample_params(d, 5, 1, i, mask)
        assert p == draw_params(5, 1, i, tuple(d.scale), d.flip, d.color)
        _, mt = augment_tensor(torch.from_numpy(img).permute(2, 0, 1), torch.from_numpy(mask), p, d.crop,
                               d.mean, d.std)
        assert sha(mt.numpy()) == tensor, i


def dominated(h: int = 128, w: int = 512):
    """A scene most of whose crops one class dominates: class 0 everywhere but the right eighth (class 1
    above, 2 below) and the left quarter, unlabelled (a try must not count it as a class). Each label its
    own colour: PNG bytes, pixels, mask."""
    mask = np.zeros((h, w), np.uint8)
    mask[:, :w // 4] = IGNORE
    mask[:h // 2, w * 7 // 8:] = 1
    mask[h // 2:, w * 7 // 8:] = 2
    pal = np.zeros((256, 3), np.uint8)
    pal[:3] = [(128, 64, 128), (220, 20, 60), (0, 0, 142)]
    buf = io.BytesIO()
    Image.fromarray(pal[mask]).save(buf, "PNG")
    return buf.getvalue(), pal[mask], mask


def final_mask(mask: np.ndarray, p: AugParams, crop) -> np.ndarray:
    """The crop's mask as resize-then-crop gives it (torch's nearest-exact over the whole mask)."""
    h, w = mask.shape
    nh, nw = max(1, round(h * p.scale)), max(1, round(w * p.scale))
    m = torch.nn.functional.interpolate(torch.from_numpy(mask)[None, None].float(), size=(nh, nw),
                                        mode="nearest-exact")[0, 0].byte().numpy()
    y0, x0 = int(p.cy * max(0, nh - crop[0])), int(p.cx * max(0, nw - crop[1]))
    return m[y0:y0 + crop[0], x0:x0 + crop[1]]


def passes(m: np.ndarray, ratio: float) -> bool:
    """The rule, written apart from the code's: 2+ classes among the labelled pixels, none at `ratio`."""
    labels, counts = np.unique(m[m != IGNORE], return_counts=True)
    return len(labels) > 1 and counts.max() / counts.sum() < ratio


def test_the_kept_crop_is_the_first_try_that_passes_else_the_last():
    data, _, mask = dominated()
    crop, fill, seen = (64, 128), mean_fill(MEAN), set()
    for i in range(40):
        p = draw_params(3, 2, i, (0.75, 1.5), True, 0.0)
        tries = [replace(p, cy=float(cy), cx=float(cx)) for cy, cx in [(p.cy, p.cx), *crop_tries(3, 2, i)]]
        ok = [passes(final_mask(mask, q, crop), 0.75) for q in tries]
        kept = choose_crop(mask, p, crop, 0.75, (3, 2, i))
        assert len(tries) == 10 and kept == (tries[ok.index(True)] if any(ok) else tries[-1]), (i, ok)
        _, m = augment_pil(data, mask, kept, crop, fill)
        assert passes(m.numpy(), 0.75) == any(ok), i  # the crop trained on passes whenever one try can
        seen.add("first" if ok[0] else "later" if any(ok) else "none")
    assert seen == {"first", "later", "none"}  # every branch of the rule was taken


def test_window_counts_are_the_final_masks_counts():
    """Counted on the source pixels with how often nearest reads each: what counting the resized window
    gives, at down- and upscales, odd sizes, windows smaller and larger than the image."""
    rng = np.random.default_rng(1)
    for k in range(60):
        mask = rng.integers(0, 4, (int(rng.integers(3, 90)), int(rng.integers(3, 130)))).astype(np.uint8)
        mask[rng.random(mask.shape) < 0.1] = IGNORE
        p = draw_params(1, 0, k, (0.3, 3.1), True, 0.0)
        win = window(*mask.shape, p, (int(rng.integers(1, 120)), int(rng.integers(1, 160))))
        want = np.bincount(nearest_window(mask, win).ravel(), minlength=256)
        assert np.array_equal(window_counts(mask, win).numpy(), want), (k, p.scale)


def test_the_tries_come_from_the_samples_key_and_leave_its_other_draws_alone():
    _, _, mask = dominated()
    tries = crop_tries(0, 1, 2)
    assert tries.shape == (9, 2) and np.array_equal(tries, crop_tries(0, 1, 2))  # a resume draws them again
    assert not np.array_equal(tries, crop_tries(0, 2, 2)) and not np.array_equal(tries, crop_tries(0, 1, 3))
    d = DataCfg(crop=[64, 128], scale=[0.75, 1.5], cat_max_ratio=0.75)
    moved = 0
    for i in range(12):
        p, kept = draw_params(0, 1, i, (0.75, 1.5), True, 0.2), sample_params(d, 0, 1, i, mask)
        assert kept == sample_params(d, 0, 1, i, mask)
        assert replace(kept, cy=p.cy, cx=p.cx) == p  # only the crop offsets may change
        moved += kept != p
    assert moved


@pytest.mark.parametrize("index", range(4))
def test_cpu_and_tensor_paths_take_the_same_class_aware_crop(index):
    data, rgb, mask = dominated()
    d = DataCfg(crop=[64, 128], scale=[0.75, 1.5], color=0.2, cat_max_ratio=0.75, mean=MEAN, std=STD)
    p = sample_params(d, 7, 0, index, mask)
    _, m = augment_pil(data, mask, p, d.crop, mean_fill(MEAN))
    img = torch.from_numpy(rgb).permute(2, 0, 1)
    _, mt = augment_tensor(img, torch.from_numpy(mask), p, d.crop, MEAN, STD)
    assert torch.equal(mt, m.long())


def test_cat_max_ratio_settings_outside_0_and_0_to_1_with_a_crop_are_refused_in_one_line():
    assert load_config(None, ["data.cat_max_ratio=0.75"]).data.cat_max_ratio == 0.75
    for bad in (["data.cat_max_ratio=1"], ["data.cat_max_ratio=-0.1"],
                ["data.cat_max_ratio=0.5", "data.crop=[]"]):
        with pytest.raises(UserError) as e:
            load_config(None, bad)
        assert "data.cat_max_ratio" in str(e.value) and "\n" not in str(e.value)
