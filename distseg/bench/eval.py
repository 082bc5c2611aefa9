"""`distseg bench eval`: inference img/s and peak memory for whole vs slide windows vs flip vs multi-scale,
through the same Segmenter that validation, evaluate and predict use; with `--model`, an exported file's
graph through it too (distseg/flows/exported.py), beside the config's model."""

from __future__ import annotations

import torch

from distseg.bench.common import device_name, measure, table
from distseg.config import Config, inference_precision
from distseg.errors import UserError
from distseg.flows.exported import load_exported
from distseg.inference.segmenter import InferenceSpec, Segmenter, window_starts
from distseg.labels import get_scheme
from distseg.models import build_model, out_channels

MS_SCALES = (0.75, 1.0, 1.25, 1.5, 1.75)  # mmsegmentation's Cityscapes multi-scale test
MODES = ("whole", "whole+flip", "slide", "slide+flip", "ms", "ms+flip")


def spec_for(mode: str, cfg: Config, crop: tuple[int, int], stride: tuple[int, int]) -> InferenceSpec:
    """`whole`, `slide`, `ms` (multi-scale whole), each optionally `+flip`."""
    base, _, flip = mode.partition("+")
    if base not in ("whole", "slide", "ms") or flip not in ("", "flip"):
        raise UserError(f"unknown mode {mode!r}: use {', '.join(MODES)}")
    return InferenceSpec("slide" if base == "slide" else "whole", crop, stride, flip == "flip",
                         MS_SCALES if base == "ms" else (1.0,), cfg.eval.batch)


def bench_eval(cfg: Config, modes: list[str], size: tuple[int, int], images: int, batch: int, precision: str,
               crop: tuple[int, int], stride: tuple[int, int], warmup: int = 1,
               exported: str | None = None) -> str:
    """One row per mode: img/s, forward passes per image and peak memory, on random input of `size` (W, H);
    with `exported` (a `distseg export` file), its rows for the same modes beside them."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    scheme = get_scheme(cfg.data.scheme)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes)).to(device).eval()
    if device.type == "cuda" and cfg.model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    w, h = size
    x = torch.randint(0, 256, (batch, 3, h, w), dtype=torch.uint8)
    rows = []
    for mode in modes:
        spec = spec_for(mode, cfg, crop, stride)
        seg = Segmenter.from_config(model, cfg, device, precision, spec)
        rows.append([mode, spec.describe(), *_timed(seg, x, images, warmup)])
    graph = load_exported(exported, device) if exported else None
    for mode in modes if graph else ():
        try:
            spec, _ = graph.fit(spec_for(mode, cfg, crop, stride), lambda: {(h, w)})
        except UserError as e:
            rows.append([f"{mode}, export", f"refused: {e}", "-", "-", "-"])
            continue
        seg = graph.segmenter(spec, device)
        rows.append([f"{mode}, export", spec.describe(), *_timed(seg, x, images, warmup)])
    slides = any(m.startswith("slide") for m in modes)
    head = (f"inference, U-Net base {cfg.model.base} depth {cfg.model.depth}, {w}x{h} input, batch {batch}"
            f"{slide_note(size, crop, stride, cfg.eval.batch) if slides else ''}, "
            f"precision {inference_precision(precision, cfg)}, "
            f"{device_name()}; peak memory above the model's: "
            f"{'GPU allocated' if device.type == 'cuda' else 'process RSS'}; sizes WIDTHxHEIGHT"
            + (f"; rows `, export`: {graph.describe()}, as exported" if graph else ""))
    return head + "\n\n" + table(["mode", "inference", "img/s", "forward passes per batch", "peak MB"], rows)


def _timed(seg: Segmenter, x: torch.Tensor, images: int, warmup: int) -> list[float]:
    """[img/s, forward passes per batch, peak MB] of `seg` over batches `x` (at least `images` images)."""
    calls = []
    counted = seg.model.register_forward_hook(lambda *_: calls.append(1))
    for _ in range(warmup):
        seg.classes(seg.preprocess(x))
    calls.clear()
    rounds = max(1, images // len(x))
    with measure(memory=True) as m:
        for _ in range(rounds):
            seg.classes(seg.preprocess(x))
    counted.remove()
    return [rounds * len(x) / m["wall"], len(calls) / rounds, m["peak_mb"]]


def slide_note(size: tuple[int, int], crop: tuple[int, int], stride: tuple[int, int], per_pass: int) -> str:
    """What slide does at this size: windows per image and per pass, and a warning when the window does not
    fit the image (slide then runs that side as one whole-image window)."""
    (w, h), (ch, cw), (sh, sw) = size, crop, stride
    n = len(window_starts(h, ch, sh)) * len(window_starts(w, cw, sw))
    note = f" (slide: {n} window{'s' * (n != 1)} of {cw}x{ch} per image, up to {per_pass} per pass)"
    if cw > w or ch > h:
        note += (f"; warning: the {cw}x{ch} window exceeds the {w}x{h} image, so slide covers it with "
                 f"{'one window' if n == 1 else 'fewer windows'} and differs little from whole")
    return note
