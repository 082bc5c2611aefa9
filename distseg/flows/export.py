"""`distseg export`: a run's weights as an ONNX file or a `torch.export` program (.pt2, the successor of
TorchScript) for serving without distseg.

The exported graph takes RGB images N x 3 x H x W — uint8 pixels (default) or float32 in [0, 1] — with the
training normalisation folded in, and returns float32 logits N x C x H x W or, with `argmax`, the int64
class map N x H x W. Fixed sizes, or with `dynamic` any batch and size: the models pad to their stride
inside the graph and crop back. The file's metadata (ONNX metadata_props; a `distseg.json` extra file in
the .pt2) says so in prose and, for `distseg evaluate --model`, as the versioned record of
distseg/flows/export_info.py (scheme tables included).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from distseg.errors import UserError
from distseg.files import atomic_write_bytes
from distseg.flows.export_info import record
from distseg.inference.segmenter import classes_from_logits
from distseg.runs.run_dir import LoadedRun
from distseg.shards.manifest import load_manifest


class Deployable(nn.Module):
    """The model with its input normalisation folded in and, optionally, the argmax."""

    def __init__(self, model: nn.Module, mean, std, uint8: bool, argmax: bool):
        super().__init__()
        self.model, self.uint8, self.argmax = model, uint8, argmax
        scale = 255.0 if uint8 else 1.0
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1) * scale)
        self.register_buffer("inv_std", 1 / (torch.tensor(std).view(1, 3, 1, 1) * scale))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images (uint8 0..255 or float 0..1) -> logits, or the class map with argmax."""
        logits = self.model((images.float() - self.mean) * self.inv_std)
        return classes_from_logits(logits) if self.argmax else logits


def run_image_size(loaded: LoadedRun) -> tuple[int, int] | None:
    """(height, width) of the run's validation images, as its val shards stored them (their most common
    size), or None when the shards are gone or predate the size record."""
    cfg = loaded.cfg
    try:
        man = load_manifest(cfg.data.shards, cfg.data.val_split)
    except (UserError, OSError):
        return None
    if man.get("image_sizes"):
        w, h = map(int, next(iter(man["image_sizes"])).split("x"))
        return h, w
    resize = man["params"].get("resize")
    return (resize[1], resize[0]) if resize else None


def metadata(loaded: LoadedRun, uint8: bool, argmax: bool, dynamic: bool, size: tuple[int, int]) -> dict:
    """What a consumer must know to use the file: prose keys for people (and readers older than the record),
    the record under `distseg` for programs."""
    cfg = loaded.cfg
    rec = record(cfg, loaded.scheme, str(loaded.weights), uint8, argmax, None if dynamic else size)
    return {"producer": "distseg", "weights": str(loaded.weights), "scheme": loaded.scheme.name,
            "classes": json.dumps(loaded.scheme.class_names),
            "input": ("uint8 RGB N x 3 x H x W, 0-255" if uint8 else "float32 RGB N x 3 x H x W, 0-1")
            + f"; normalisation folded in (mean {cfg.data.mean}, std {cfg.data.std})",
            "output": "int64 class map N x H x W" if argmax else "float32 logits N x C x H x W",
            "shape": "dynamic batch, height and width" if dynamic else f"fixed {size[0]}x{size[1]} (H x W)",
            "model": f"{cfg.model.encoder} base {cfg.model.base}", "distseg": rec}


def export_run(loaded: LoadedRun, fmt: str, out: str, height: int, width: int, dynamic: bool = False,
               argmax: bool = False, input_dtype: str = "uint8") -> Path:
    """Write the exported file atomically; returns its path."""
    if fmt not in ("onnx", "pt2"):
        raise UserError(f"--format must be onnx or pt2, not {fmt!r}")
    if height < 8 or width < 8:
        raise UserError("--height and --width must be at least 8")
    uint8 = input_dtype == "uint8"
    module = Deployable(loaded.model.eval(), loaded.cfg.data.mean, loaded.cfg.data.std, uint8, argmax).eval()
    # dynamic: an odd example size, so the graph keeps the padding path for every size, and batch 2 (a
    # dimension of size 1 would be specialised)
    n, h, w = (2, height | 1, width | 1) if dynamic else (1, height, width)
    example = torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8) if uint8 else torch.rand(n, 3, h, w)
    auto = torch.export.Dim.AUTO
    dims = ({0: auto, 2: auto, 3: auto},) if dynamic else None
    meta = metadata(loaded, uint8, argmax, dynamic, (height, width))
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch.export wants its suffix
    with torch.no_grad():
        if fmt == "onnx":
            output = "classes" if argmax else "logits"
            onnx_program = torch.onnx.export(module, (example,), dynamo=True, dynamic_shapes=dims,
                                             verbose=False, input_names=["images"], output_names=[output])
            onnx_program.save(str(tmp))
            _finish_onnx(tmp, dict(meta, distseg=json.dumps(meta["distseg"])), dynamic)
        else:
            program = torch.export.export(module, (example,), dynamic_shapes=dims)
            torch.export.save(program, str(tmp), extra_files={"distseg.json": json.dumps(meta)})
    atomic_write_bytes(path, tmp.read_bytes())
    tmp.unlink()
    return path


def _finish_onnx(path: Path, meta: dict, dynamic: bool) -> None:
    """Add the metadata and, for a dynamic graph, name its axes batch/height/width (the exporter names them
    s34, s14, ...): a consumer sees `images: [batch, 3, height, width]`. The same symbols are renamed
    wherever they occur (outputs, intermediate shapes), so the graph stays consistent."""
    import onnx

    model = onnx.load(str(path))
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, str(v)
    if dynamic:
        dims = model.graph.input[0].type.tensor_type.shape.dim
        names = {dims[i].dim_param: new for i, new in ((0, "batch"), (2, "height"), (3, "width"))
                 if dims[i].dim_param}
        for value in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
            for d in value.type.tensor_type.shape.dim:
                if d.dim_param in names:
                    d.dim_param = names[d.dim_param]
    onnx.save(model, str(path))


def input_shape(uint8: bool, dynamic: bool, size: tuple[int, int]) -> str:
    """The exported graph's input as a person reads it."""
    dtype = "uint8 0-255" if uint8 else "float32 0-1"
    dims = "batch x 3 x height x width (any)" if dynamic else f"1 x 3 x {size[0]} x {size[1]}"
    return f"images {dims}, {dtype} RGB"
