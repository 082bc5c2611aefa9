"""The CPU augmentation path: crop-before-resize equals resize-then-crop (masks exactly, images to a fraction
of a grey level), DCT-scaled JPEG decode where the window is downscaled 2x or more, uint8 out of the workers
and the unchanged batch contract on the device."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from distseg.data.transforms import (
    AugParams,
    augment_pil,
    augment_tensor,
    decode_pil,
    draft_factor,
    draw_params,
    mean_fill,
    to_device,
    window,
)

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
        image, mask = unpack(raw["pixels"], raw["size"], nhwc=False)
        assert raw["pixels"].dtype == torch.uint8 and image.shape[1] == 3 and image.shape[0] == mask.shape[0]
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
