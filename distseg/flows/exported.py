"""An exported file (`distseg export`) as the model a `Segmenter` runs, so that `distseg evaluate --model`
and `distseg bench eval --model` score and time the graph through the one inference path: onnxruntime for
.onnx, torch.export's program for .pt2, each as exported (float32).

The graph folds the normalisation in, so its Segmenter normalises with mean 0 and std 1 (pixels / 255) and
`ExportedModel` hands a uint8 graph those pixels back as exact 0-255 values. A fixed-size graph runs one
image of its size at a time: images of its size run whole, larger ones are slid in windows of its size,
smaller ones are refused (`ExportedModel.fit`). An argmax graph has no logits: its class map comes back
one-hot, so overlapping slide windows, flips and scales vote per pixel instead of averaging logits, and
`differences` says so beside every other way the scoring differs from the run's own `distseg evaluate`.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from distseg.config import RUN_PRECISION, Config, load_config
from distseg.errors import UserError, missing_extra
from distseg.flows.export_info import ExportInfo, read_info
from distseg.inference.segmenter import InferenceSpec, Segmenter, default_stride

FORMATS = {".onnx": "onnxruntime", ".pt2": "torch.export"}
IDENTITY = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # mean, std of a Segmenter feeding a graph that normalises


class ExportedModel(nn.Module):
    """An exported graph: [0, 1] float N x 3 x H x W in, float32 logits (or an argmax graph's one-hot class
    map) out, on the input's device."""

    def __init__(self, path: Path, info: ExportInfo, runtime: str, graph):
        super().__init__()
        self.path, self.info, self.runtime, self.graph = path, info, runtime, graph

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Run the graph (one image at a time when it is fixed)."""
        size = self.info.size
        if size and tuple(x.shape[-2:]) != size:
            raise UserError(f"{self.path} is fixed at {size[1]}x{size[0]} and was given {x.shape[-1]}x"
                            f"{x.shape[-2]}: export it with --dynamic")
        images = (x * 255).round().clamp(0, 255).to(torch.uint8) if self.info.uint8 else x.float()
        parts = images.split(1) if size else (images,)
        out = torch.cat([self.graph(p) for p in parts]).to(x.device)
        if self.info.classes:
            return F.one_hot(out.long(), self.info.scheme.num_classes).permute(0, 3, 1, 2).float()
        return out.float()

    def describe(self) -> str:
        """`m.onnx (onnxruntime; dynamic, uint8 in, logits out, precision no, scheme trainid)`."""
        return f"{self.path} ({self.runtime}; {self.info.describe()})"

    def check_precision(self, precision: str | None) -> None:
        """The graph computes as exported: another --precision is refused in one line."""
        if precision not in (None, RUN_PRECISION, self.info.precision):
            raise UserError(f"{self.path} computes in precision {self.info.precision} as exported, and "
                            f"{self.runtime} runs it so: --precision {precision} cannot apply (omit it)")

    def config(self, overrides: tuple[str, ...] = ()) -> Config:
        """Settings to score with: the run's recorded inference settings, then `overrides`; data.mean/std
        the identity, since the graph normalises (a shard loader's batches arrive as pixels / 255)."""
        identity = [f"data.mean={list(IDENTITY[0])}", f"data.std={list(IDENTITY[1])}"]
        return load_config(None, [*self.info.run_overrides(), *overrides, *identity])

    def segmenter(self, spec: InferenceSpec, device) -> Segmenter:
        """The Segmenter that runs this graph with `spec` (from `fit`)."""
        return Segmenter(self, spec, *IDENTITY, device, self.info.precision)

    def fit(self, spec: InferenceSpec, sizes: Callable[[], set[tuple[int, int]]]
            ) -> tuple[InferenceSpec, list[str]]:
        """`spec` as this graph can run it on images of `sizes()` ((height, width), asked for a fixed graph
        only), with a note for each change; a fixed graph larger than an image (at any scale) is refused."""
        if self.info.size is None:
            return spec, []
        sizes = sizes()
        if not sizes:  # unknown (shards from before the record): a mismatch is refused as the images run
            return spec, []
        (gh, gw), notes = self.info.size, []
        views = {(max(1, round(h * s)), max(1, round(w * s))) for h, w in sizes for s in spec.scales}
        small = sorted(v for v in views if v[0] < gh or v[1] < gw)
        if small:
            scaled = " (scaled)" if spec.scales != (1.0,) else ""
            raise UserError(f"{self.path} is fixed at {gw}x{gh}, larger than the {small[0][1]}x{small[0][0]} "
                            f"images{scaled} it would see: export it at their size or with --dynamic")
        if spec.mode == "whole" and views != {(gh, gw)}:
            notes.append(f"{self.path.name} is fixed at {gw}x{gh}, smaller than the images: slid in windows "
                         "of its size")
            return replace(spec, mode="slide", crop=(gh, gw), stride=default_stride((gh, gw))), notes
        if spec.mode == "slide" and spec.crop != (gh, gw):
            notes.append(f"slide windows are {self.path.name}'s fixed {gw}x{gh}, not the {spec.crop[1]}x"
                         f"{spec.crop[0]} asked")
            fits = spec.stride and spec.stride[0] <= gh and spec.stride[1] <= gw
            stride = spec.stride if fits else default_stride((gh, gw))
            return replace(spec, crop=(gh, gw), stride=stride), notes
        return spec, notes


def differences(model: ExportedModel, spec: InferenceSpec) -> list[str]:
    """How scoring the graph with `spec` differs from the run's own `distseg evaluate` by default, each
    as one line: precision, the run's inference settings, votes instead of averaged logits, rounding."""
    info, out = model.info, []
    if info.run_precision and info.run_precision != info.precision:
        out.append(f"the export computes in precision {info.precision}; its run trained in "
                   f"{info.run_precision}, which `distseg evaluate --run` uses by default (pass it "
                   f"--precision {info.precision} to compare like with like)")
    if info.settings:
        run = InferenceSpec.from_config(load_config(None, info.run_overrides())).describe()
        if run != spec.describe():
            out.append(f"inference {spec.describe()}, where the run's own settings say {run}")
    overlap = spec.mode == "slide" and any(s < c for s, c in zip(spec.stride, spec.crop))
    voting = [what for what, on in (("overlapping slide windows", overlap), ("flips", spec.flip),
                                    ("scales", spec.scales != (1.0,))) if on]
    if info.classes and voting:
        out.append(f"the graph outputs classes, not logits: {', '.join(voting)} vote per pixel where "
                   "`distseg evaluate --run` averages logits")
    if info.uint8 and spec.scales != (1.0,):
        out.append("the uint8 graph sees rescaled images rounded to whole pixel values")
    return out


def load_exported(path: str | Path, device="cpu") -> ExportedModel:
    """An .onnx or .pt2 file written by `distseg export`, read and checked; one error line for anything
    else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--model {path}: file not found")
    if path.suffix not in FORMATS:
        raise UserError(f"--model {path}: not an exported model (expected FILE.onnx or FILE.pt2 from "
                        "`distseg export`)")
    graph, meta = _onnx(path) if path.suffix == ".onnx" else _pt2(path, torch.device(device))
    return ExportedModel(path, read_info(meta, str(path)), FORMATS[path.suffix], graph)


def first_line(e: Exception) -> str:
    """An exception's message as one short line."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _onnx(path: Path):
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise UserError(f"--model {path.name} {missing_extra(e) or e}") from None
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = torch.get_num_threads(), 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
                 if p in ort.get_available_providers()]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
        raise UserError(f"--model {path}: onnxruntime cannot load it: {first_line(e)}") from None
    name = session.get_inputs()[0].name

    def run(images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: np.ascontiguousarray(images.cpu().numpy())})[0])
    return run, dict(session.get_modelmeta().custom_metadata_map)


def _pt2(path: Path, device: torch.device):
    if not zipfile.is_zipfile(path):
        raise UserError(f"--model {path}: not a torch.export program (.pt2 files are zip archives)")
    extra = {"distseg.json": ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"--model {path}: torch.export cannot load it: {first_line(e)}") from None
    try:
        meta = json.loads(extra["distseg.json"] or "{}")
    except ValueError:
        raise UserError(f"--model {path}: its distseg.json is not JSON") from None
    if device.type != "cpu":
        program = torch.export.passes.move_to_device_pass(program, device)
    module = program.module()
    return (lambda images: module(images.to(device))), meta
