"""The training augmentation, stated once. Three implementations follow this table: `augment_crop` (torch
loader, CPU workers; `augment_pil` as tensors), `augment_tensor` (torch loader, nvJPEG on the GPU) and the
DALI graph (distseg/data/dali_loader.py). Validation images are not augmented.

| # | step      | drawn per sample              | image                             | mask              |
|---|-----------|-------------------------------|-----------------------------------|-------------------|
| 1 | rescale   | s ~ U(data.scale)             | x s, bilinear, antialiased        | x s, nearest      |
| 2 | crop      | cy, cx ~ U(0, 1); 9 more with | data.crop at c * (scaled - crop)  | the same window   |
|   |           | data.cat_max_ratio            | (the kept try, see below)         |                   |
| 3 | pad       | -                             | bottom and right, the mean colour | labels.IGNORE     |
| 4 | colour    | b, c, s ~ U(1 -+ data.color)  | brightness, contrast, saturation  | -                 |
| 5 | flip      | p = 0.5 if data.flip          | horizontal                        | horizontal        |
| 6 | normalise | -                             | (x / 255 - data.mean) / data.std  | int64             |

Sizes round half to even (round(h * s)); a crop offset is int(c * room), 0 where the scaled image is smaller
than the crop. Colour, in this order, on values clipped to [0, 255]: brightness x * b; contrast
(x - m) * c + m with m the image's mean grey; saturation (x - g) * s + g with g each pixel's grey (ITU-R 601
luma). The mean colour normalises to 0. After a flip the padding sits on the left.

Class-aware crops (data.cat_max_ratio = r > 0, as mmsegmentation's RandomCrop): up to 10 crop offsets are
tried, the sample's own (cy, cx) first, then 9 more pairs from their own generator stream of the same key
(`crop_tries`), so the table's other draws are those of r = 0. A try passes when the labels of the final mask
in its window (after the nearest rescale; labels.IGNORE left out) hold more than one class and the largest
count is below r x their total; the first that passes is kept, else the last. The augmentation then runs
with the kept offsets (`choose_crop`): both torch paths take the same window. r = 0 draws and checks
nothing.

What agreement means (tests/test_data_transforms.py, tests/test_data_dali.py):
- the torch paths draw their parameters from (seed, epoch, sample index) alone (`draw_params`) and, with
  data.cat_max_ratio, the sample's own mask (`choose_crop`, in the loader's workers for both paths), so a
  sample gets the same augmentation on any rank, worker or device, and a resume the same crops; for the
  same parameters their images agree within a few grey levels (the CPU path works on uint8 between steps
  and resizes only the crop window, the GPU path works in float) and their masks are equal;
- DALI draws the same distributions from its own generator (seeded by train.seed), in the same order, one
  random node feeding image and mask, and resizes the image without antialiasing: its samples follow the
  table, not the torch paths' exact draws; it refuses data.cat_max_ratio (`dali_loader.unsupported`).

The CPU path works in source coordinates: the crop window of the scaled image is mapped back to a
(fractional) box of the source image, and only that box is resized, with PIL's antialiased bilinear filter,
whose float `box` argument keeps the sampling grid of resize-then-crop exactly (a test compares the two); a
JPEG whose window is downscaled 2x or more is decoded at reduced size by the decoder's DCT scaling (PIL
`draft`). Everything stays uint8 (PIL's ImageEnhance for the colour jitter) until the loader converts,
normalises and lays out the batch on the device (`to_device`), so workers and the host->device copy move a
quarter of the bytes of float.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from distseg.data.parts import PARTS
from distseg.labels import IGNORE
from distseg.shards.codec import decode_array, is_array


@dataclass(frozen=True)
class AugParams:
    """One sample's augmentation, drawn by `draw_params`."""

    scale: float
    cy: float  # crop offset as a fraction of the free room
    cx: float
    flip: bool
    brightness: float
    contrast: float
    saturation: float


def draw_params(seed: int, epoch: int, index: int, scale: tuple[float, float], flip: bool,
                color: float) -> AugParams:
    """The augmentation of one sample: a function of (seed, epoch, index) only."""
    rng = np.random.default_rng([seed, epoch, index, 7])
    u = rng.random(7)  # always 7 draws, in a fixed order
    s = scale[0] + (scale[1] - scale[0]) * u[0]
    jit = [1.0 + color * (2 * v - 1) for v in u[4:7]]
    return AugParams(float(s), float(u[1]), float(u[2]), bool(flip and u[3] < 0.5), *map(float, jit))


@dataclass(frozen=True)
class Window:
    """A crop of the source scaled to (nh, nw): its offset (y0, x0) and valid size (h, w) there, the crop's
    size `out` (the rest is padding), and the source size."""

    y0: int
    x0: int
    valid: tuple[int, int]
    out: tuple[int, int]
    scaled: tuple[int, int]
    source: tuple[int, int]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of the window in source pixels (fractional)."""
        (nh, nw), (h, w), (vh, vw) = self.scaled, self.source, self.valid
        return (self.x0 * w / nw, self.y0 * h / nh, (self.x0 + vw) * w / nw, (self.y0 + vh) * h / nh)


def window(h: int, w: int, p: AugParams, crop) -> Window:
    """The crop window for an h x w source: the scaled size, offsets and padding of resize-then-crop."""
    nh, nw = max(1, round(h * p.scale)), max(1, round(w * p.scale))
    ch, cw = crop if crop else (nh, nw)
    y0, x0 = int(p.cy * max(0, nh - ch)), int(p.cx * max(0, nw - cw))
    return Window(y0, x0, (min(ch, nh - y0), min(cw, nw - x0)), (ch, cw), (nh, nw), (h, w))


def draft_factor(win: Window, w: int) -> int:
    """1, 2, 4 or 8: how much smaller the JPEG may be decoded while the window is still downscaled."""
    s = win.valid[1] / max(win.box[2] - win.box[0], 1e-9)
    r = 1
    while r < 8 and s * r * 2 <= 1.0:
        r *= 2
    return r


def decode_pil(data: bytes, win: Window | None = None) -> tuple[Image.Image, float]:
    """Decode an image (RGB); with a window downscaled 2x or more, a JPEG at reduced size. Returns the image
    and the factor its pixels are smaller than the source's."""
    if is_array(data):  # zstd pixels: nothing to scale at decode time
        return Image.fromarray(decode_array(data)), 1.0
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    if win is not None and im.format == "JPEG":
        r = draft_factor(win, w)
        if r > 1:
            im.draft("RGB", (math.ceil(w / r), math.ceil(h / r)))
    im = im.convert("RGB") if im.mode != "RGB" else im
    im.load()
    return im, im.size[0] / w


def nearest_index(start: int, n: int, size: int, scaled: int) -> np.ndarray:
    """The source rows (or columns) pixel-centred nearest reads for scaled positions start..start+n-1,
    computed as torch's nearest-exact computes them (float32 source coordinates)."""
    scale = np.float64(np.float32(size) / np.float32(scaled))  # ATen: a float scale, a double product
    src = ((np.arange(start, start + n) + 0.5) * scale).astype(np.float32)  # ... rounded by floorf
    return np.minimum(np.floor(src).astype(np.int64), size - 1)


def nearest_window(mask: np.ndarray, win: Window) -> np.ndarray:
    """The mask's window at the output size by pixel-centred nearest neighbour (`nearest_index`), so the
    pixels are exactly those of resizing the whole mask and cropping. Rows, then columns: two cheap
    gathers."""
    (nh, nw), (h, w), (vh, vw) = win.scaled, win.source, win.valid
    rows = np.take(mask, nearest_index(win.y0, vh, h, nh), axis=0)
    return np.take(rows, nearest_index(win.x0, vw, w, nw), axis=1)


def repeats(index: np.ndarray) -> list[tuple[np.ndarray, int]]:
    """A non-decreasing index's distinct values grouped by how often each occurs: [(values, times)]."""
    starts = np.flatnonzero(np.diff(index, prepend=-1))
    times = np.diff(starts, append=len(index))
    if (times == times[0]).all():
        return [(index[starts], int(times[0]))]  # a downscale reads each source row once
    return [(index[starts[times == t]], int(t)) for t in np.unique(times)]


def window_counts(mask: np.ndarray, win: Window) -> torch.Tensor:
    """Pixels per label (256) of the mask's window at the output size: exactly those of `nearest_window`,
    counted on the source pixels nearest reads, each once, times how often it is read (the rows and columns
    read equally often make one block), so an upscaled window counts 1/s^2 of its pixels (a quarter of
    them at s = 2; 25% less time than counting the window on the default scale range). torch's bincount
    reads uint8 as it is (numpy's converts it to int64 first: 1.5x slower on a street scene)."""
    (nh, nw), (h, w), (vh, vw) = win.scaled, win.source, win.valid
    cols = repeats(nearest_index(win.x0, vw, w, nw))
    counts = torch.zeros(256, dtype=torch.int64)
    for rows, a in repeats(nearest_index(win.y0, vh, h, nh)):
        band = np.take(mask, rows, axis=0)
        for c, b in cols:
            n = torch.bincount(torch.from_numpy(np.take(band, c, axis=1)).reshape(-1), minlength=256)
            counts += n if a * b == 1 else a * b * n
    return counts


CROP_TRIES = 10  # crop offsets tried with data.cat_max_ratio, as mmsegmentation's RandomCrop


def crop_tries(seed: int, epoch: int, index: int) -> np.ndarray:
    """The offsets (cy, cx) tried after the sample's own with data.cat_max_ratio, 9 x 2: a generator stream
    of their own (the key's last word 8, where `draw_params` has 7), so turning the ratio on changes no
    other draw, and a resume draws the same tries."""
    return np.random.default_rng([seed, epoch, index, 8]).random((CROP_TRIES - 1, 2))


def balanced(counts: torch.Tensor, ratio: float) -> bool:
    """Whether a window's label counts (`window_counts`) pass data.cat_max_ratio: more than one class among
    its labelled pixels, and the largest below `ratio` of them."""
    counts = counts.clone()
    counts[IGNORE] = 0
    present = int((counts > 0).sum())
    return present > 1 and int(counts.max()) / int(counts.sum()) < ratio


def choose_crop(mask: np.ndarray, p: AugParams, crop, ratio: float, key: tuple[int, int, int]
                ) -> AugParams:
    """`p` with the crop data.cat_max_ratio keeps (the rule in the module's docstring); `p` itself with the
    ratio 0 or no crop. `mask` is the source mask, `key` the sample's (seed, epoch, index). Each try is
    counted as the final mask has its pixels (`window_counts`: those of `nearest_window`, which both paths
    equal), so the kept crop truly passes; a window already refused (the scaled image no larger than the
    crop, or two tries landing on one offset) is not counted again."""
    if ratio <= 0 or not crop:
        return p
    refused = set()
    for cy, cx in [(p.cy, p.cx), *crop_tries(*key)]:
        q = replace(p, cy=float(cy), cx=float(cx))
        win = window(*mask.shape, q, crop)
        if (win.y0, win.x0) in refused:
            continue
        if balanced(window_counts(mask, win), ratio):
            return q
        refused.add((win.y0, win.x0))
    return q


def jitter_pil(im: Image.Image, p: AugParams) -> Image.Image:
    """Brightness, contrast, saturation in uint8 (PIL's ImageEnhance: the formulas of `augment_tensor`)."""
    if p.brightness != 1.0:
        im = ImageEnhance.Brightness(im).enhance(p.brightness)
    if p.contrast != 1.0:
        im = ImageEnhance.Contrast(im).enhance(p.contrast)
    if p.saturation != 1.0:
        im = ImageEnhance.Color(im).enhance(p.saturation)
    return im


@dataclass(frozen=True)
class Crop:
    """A training crop's image before its pixels are laid out: the window as PIL holds it (resized,
    jittered, flipped), and its place in the crop of `size` (h, w): at the top, from column `x0`; the rest
    is padding in the colour `fill`. The loader's collate writes it straight into its batch row (`write`),
    so the pixels leave PIL once, in the layout the batch wants, rather than as an h x w x 3 array first
    and transposed from it."""

    window: Image.Image
    size: tuple[int, int]
    x0: int
    fill: tuple[int, int, int]

    def hwc(self) -> np.ndarray:
        """The crop as uint8 h x w x 3 (the decoder's own layout)."""
        out = np.empty((*self.size, 3), np.uint8)
        self.write(out, nhwc=True)
        return out

    def write(self, out: np.ndarray, nhwc: bool) -> None:
        """Write the crop into `out`, uint8 3 x h x w (or h x w x 3 with `nhwc`). Planar, each channel comes
        from PIL packing its band (`tobytes("raw", "R")`), which costs what numpy's transposing copy of an
        h x w x 3 array costs once the pixels are out of the cache (~0.15 ms for a 512x256 crop, in a batch's
        collate), without that array: the transform no longer makes it (`np.array` of the PIL image,
        ~0.08 ms)."""
        vw, vh = self.window.size
        if nhwc:
            self._pad(out, lambda c: (slice(None), slice(None), c))
            out[:vh, self.x0:self.x0 + vw] = np.asarray(self.window)
            return
        self._pad(out, lambda c: c)
        for c, band in enumerate("RGB"):
            out[c, :vh, self.x0:self.x0 + vw] = np.frombuffer(self.window.tobytes("raw", band),
                                                              np.uint8).reshape(vh, vw)

    def _pad(self, out: np.ndarray, channel) -> None:
        """The padding around the window (below it, and beside it), channel `c` at `out[channel(c)]`."""
        (h, w), (vw, vh), x0 = self.size, self.window.size, self.x0
        if (vh, vw) == (h, w):
            return
        for c, v in enumerate(self.fill):
            o = out[channel(c)]
            o[vh:], o[:vh, :x0], o[:vh, x0 + vw:] = v, v, v


def augment_crop(data: bytes, mask: np.ndarray, p: AugParams, crop, fill: tuple[int, int, int]
                 ) -> tuple[Crop, np.ndarray]:
    """Encoded image + uint8 mask (source size) -> the `Crop` and its uint8 h x w mask: window resize,
    colour jitter, flip, padding (image `fill`, mask ignore)."""
    win = window(*mask.shape, p, crop)
    t = PARTS.mark()
    im, f = decode_pil(data, win)
    PARTS.add("decode", t)
    box = tuple(v * f for v in win.box)
    im = jitter_pil(im.resize(win.valid[::-1], Image.Resampling.BILINEAR, box=box), p)
    m = nearest_window(mask, win)
    if p.flip:
        im, m = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), m[:, ::-1]
    (vh, vw), (ch, cw) = win.valid, win.out
    x0 = cw - vw if p.flip else 0  # padding goes right (left once flipped) and at the bottom
    if (vh, vw) == (ch, cw):
        return Crop(im, (ch, cw), x0, fill), np.ascontiguousarray(m)
    out = np.full((ch, cw), IGNORE, np.uint8)
    out[:vh, x0:x0 + vw] = m
    return Crop(im, (ch, cw), x0, fill), out


def augment_pil(data: bytes, mask: np.ndarray, p: AugParams, crop, fill: tuple[int, int, int]
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment_crop` as uint8 h x w x 3 image and uint8 h x w mask tensors. Height x width x channels is
    the decoder's own layout; the device turns it into channels_last NCHW without a copy."""
    img, m = augment_crop(data, mask, p, crop, fill)
    return torch.from_numpy(img.hwc()), torch.from_numpy(m)


def mean_fill(mean) -> tuple[int, int, int]:
    """The uint8 colour that normalises to (almost exactly) 0: the padding of a crop."""
    return tuple(int(round(255 * m)) for m in mean)


def to_device(images: torch.Tensor, device, mean, std, nhwc: bool = False) -> torch.Tensor:
    """uint8 images (pinned on CUDA) -> normalised float N x 3 x H x W on `device`: the copy moves uint8.
    `nhwc`: the batch is N x H x W x 3, whose permuted view is already channels_last (for a channels_last
    model on CUDA); otherwise the workers stacked it N x 3 x H x W. Converted, then scaled and shifted in
    place: three times cheaper on a CPU than addcmul reading uint8."""
    x = images.to(device, non_blocking=True)
    if nhwc:
        x = x.permute(0, 3, 1, 2)
    scale = torch.tensor([1 / (255 * s) for s in std], device=x.device).view(1, 3, 1, 1)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], device=x.device).view(1, 3, 1, 1)
    return x.float().mul_(scale).add_(shift)


def normalize(img: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 or [0,1] float C x H x W -> normalised float32."""
    x = img.float() / 255.0 if img.dtype == torch.uint8 else img.float()
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def _gray(x: torch.Tensor) -> torch.Tensor:
    return (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)


def augment_tensor(img: torch.Tensor, mask: torch.Tensor, p: AugParams, crop: list[int] | tuple, mean, std
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The GPU path: img uint8 3xHxW, mask uint8 HxW (on the device) -> (normalised float 3xhxw, int64 hxw):
    antialiased resize, crop, colour, normalise, padding (image 0 = the mean, mask ignore), flip."""
    h, w = img.shape[-2:]
    nh, nw = max(1, round(h * p.scale)), max(1, round(w * p.scale))
    x, m = img.unsqueeze(0).float(), mask.unsqueeze(0).unsqueeze(0)
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
        m = F.interpolate(m.float(), size=(nh, nw), mode="nearest-exact").to(torch.uint8)
    x, m = x[0], m[0, 0]
    if crop:
        ch, cw = crop
        y0, x0 = int(p.cy * max(0, nh - ch)), int(p.cx * max(0, nw - cw))
        x, m = x[:, y0:y0 + ch, x0:x0 + cw], m[y0:y0 + ch, x0:x0 + cw]
    x = (x / 255.0).clamp(0, 1)
    if p.brightness != 1.0:
        x = (x * p.brightness).clamp(0, 1)
    if p.contrast != 1.0:
        g = _gray(x).mean()
        x = ((x - g) * p.contrast + g).clamp(0, 1)
    if p.saturation != 1.0:
        g = _gray(x)
        x = ((x - g) * p.saturation + g).clamp(0, 1)
    x = normalize(x, mean, std)
    m = m.long()
    if crop:
        ph, pw = ch - x.shape[-2], cw - x.shape[-1]
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph))
            m = F.pad(m, (0, pw, 0, ph), value=IGNORE)
    if p.flip:
        x = x.flip(-1)
        m = m.flip(-1)
    return x.contiguous(), m.contiguous()
