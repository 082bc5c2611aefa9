"""The one path from images to class maps: normalise -> model -> logits at label size -> classes.

Validation during training, `distseg evaluate`, `distseg predict` and the report all call `Segmenter`, so
their preprocessing, test-time augmentation and resizing cannot drift apart. It takes tensors, never a
loader. Modes (as mmsegmentation reports Cityscapes results):

- `whole`: the model sees the whole (rescaled) image.
- `slide`: windows of `crop` every `stride` pixels; each pixel's logits are the sum over the windows that
  cover it divided by their count. Windows run `batch` at a time, so memory is bounded by the window
  batch, not by the image size.
- TTA: horizontal flip and/or several input scales; logits are averaged at the label size.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from distseg.config import inference_precision
from distseg.data.transforms import normalize
from distseg.errors import UserError

MODES = ("whole", "slide")


@dataclass(frozen=True)
class InferenceSpec:
    """How to run the model over an image (the `eval` section of the config)."""

    mode: str = "whole"
    crop: tuple[int, int] | None = None  # (h, w) of a slide window
    stride: tuple[int, int] | None = None  # (h, w) between windows; default: 2/3 of the crop
    flip: bool = False
    scales: tuple[float, ...] = (1.0,)
    batch: int = 4  # windows (slide) or images (whole) per forward pass

    @classmethod
    def from_config(cls, cfg) -> InferenceSpec:
        """The spec of a Config: `eval.*`, with slide windows defaulting to the training crop."""
        e = cfg.eval
        crop = tuple(e.crop or cfg.data.crop) or None
        if e.mode == "slide" and not crop:
            raise UserError("eval.mode=slide needs eval.crop (or data.crop): the window size [height, width]")
        stride = tuple(e.stride) or (default_stride(crop) if crop else None)
        return cls(e.mode, crop, stride, e.flip, tuple(e.scales), e.batch)

    def describe(self) -> str:
        """One line for logs and benchmark tables, sizes WIDTHxHEIGHT as every command-line size is written
        (the config's lists are [height, width]): `slide 1024x512/683x341 + flip @ 0.75,1`."""
        s = self.mode
        if self.mode == "slide":
            s += f" {self.crop[1]}x{self.crop[0]}/{self.stride[1]}x{self.stride[0]}"
        if self.flip:
            s += " + flip"
        if self.scales != (1.0,):
            s += " @ " + ",".join(f"{v:g}" for v in self.scales)
        return s


def default_stride(crop: tuple[int, int]) -> tuple[int, int]:
    """Slide windows every 2/3 of their size unless eval.stride says otherwise (mmsegmentation's Cityscapes
    geometry: 1024x512 windows every 683x341)."""
    return tuple(max(1, round(c * 2 / 3)) for c in crop)


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets covering [0, length) with `window`-long windows every `stride`; the last ends flush."""
    if window >= length:
        return [0]
    n = (length - window + stride - 1) // stride + 1
    return [min(i * stride, length - window) for i in range(n)]


def classes_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits N x C x H x W -> class map N x H x W (C == 1: foreground where the logit is positive)."""
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(1)


# config.PRECISIONS as autocast dtypes (None: float32, no autocast)
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Segmenter:
    """A model with its preprocessing, precision and inference spec: images in, logits or classes out."""

    def __init__(self, model, spec: InferenceSpec, mean, std, device, precision: str = "no",
                 channels_last: bool = False):
        self.model, self.spec, self.mean, self.std = model, spec, mean, std
        self.device = torch.device(device)
        self.dtype = AUTOCAST_DTYPES[precision]
        self.channels_last = channels_last and self.device.type == "cuda"

    @classmethod
    def from_config(cls, model, cfg, device, precision: str | None = None,
                    spec: InferenceSpec | None = None) -> Segmenter:
        """A run's Segmenter: its `eval` settings (or `spec`), normalisation and memory layout, in `precision`
        (config.inference_precision: `run` or None is the run's train.mixed_precision). Every caller builds
        it here, so none can drift."""
        return cls(model, spec or InferenceSpec.from_config(cfg), cfg.data.mean, cfg.data.std, device,
                   inference_precision(precision, cfg), cfg.model.channels_last)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N x 3 x H x W (any device) -> normalised float on the model's device."""
        return normalize(images.to(self.device, non_blocking=True), self.mean, self.std)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        with amp:
            return self.model(x).float()

    def _whole(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._forward(x[i:i + self.spec.batch]) for i in range(0, len(x), self.spec.batch)])

    def _slide(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        ch, cw = min(self.spec.crop[0], h), min(self.spec.crop[1], w)
        boxes = [(i, y, z) for i in range(n) for y in window_starts(h, ch, self.spec.stride[0])
                 for z in window_starts(w, cw, self.spec.stride[1])]
        out, count = None, torch.zeros(1, 1, h, w, device=x.device)
        for _, y, z in boxes[: len(boxes) // n]:  # the same grid for every image
            count[..., y:y + ch, z:z + cw] += 1
        for k in range(0, len(boxes), self.spec.batch):
            chunk = boxes[k:k + self.spec.batch]
            logits = self._forward(torch.stack([x[i, :, y:y + ch, z:z + cw] for i, y, z in chunk]))
            if out is None:
                out = torch.zeros(n, logits.shape[1], h, w, device=x.device)
            for (i, y, z), lg in zip(chunk, logits):
                out[i, :, y:y + ch, z:z + cw] += lg
        return out / count

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        return self._slide(x) if self.spec.mode == "slide" else self._whole(x)

    @torch.no_grad()
    def logits(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Normalised float N x 3 x H x W -> float32 logits N x C x size, averaged over scales and flips."""
        total, views = None, 0
        for s in self.spec.scales:
            xs = x if s == 1.0 else F.interpolate(
                x, size=(max(1, round(x.shape[-2] * s)), max(1, round(x.shape[-1] * s))), mode="bilinear",
                align_corners=False)
            for flip in (False, True) if self.spec.flip else (False,):
                lg = self._run(xs.flip(-1)).flip(-1) if flip else self._run(xs)
                if tuple(lg.shape[-2:]) != tuple(size):
                    lg = F.interpolate(lg, size=size, mode="bilinear", align_corners=False)
                total = lg if total is None else total + lg
                views += 1
        return total / views if views > 1 else total

    def classes(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Normalised float N x 3 x H x W -> class map N x size (default: the input's size)."""
        return classes_from_logits(self.logits(x, tuple(size or x.shape[-2:])))


def segment_images(segmenter: Segmenter, images: list[torch.Tensor]) -> list[torch.Tensor]:
    """uint8 3 x H x W images of any sizes -> class maps (H x W), images of one size run as one batch."""
    out: list[torch.Tensor | None] = [None] * len(images)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, im in enumerate(images):
        by_size.setdefault(tuple(im.shape[-2:]), []).append(i)
    for idx in by_size.values():
        x = segmenter.preprocess(torch.stack([images[i] for i in idx]))
        for i, c in zip(idx, segmenter.classes(x)):
            out[i] = c
    return out
