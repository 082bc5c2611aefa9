"""The metadata an exported file carries: `distseg export` writes it, `distseg evaluate --model` and `distseg
bench eval --model` read it back, so that a graph can be fed and scored without its run or its scheme file.

Version 1 is one JSON record under the key `distseg` (a string in ONNX metadata_props; an object in the
.pt2's `distseg.json` extra file), beside the prose keys earlier readers know (producer, weights, scheme,
classes, input, output, shape, model), which stay as they were. The record holds: the input's dtype,
layout, channels and value range and the normalisation folded in; whether the output is logits or the
argmax's class map; the fixed (height, width), or null for any batch and size; the precision the graph
computes in; the scheme (name, classes, class -> label id, label id -> class, the classes mIoU counts, the
ignore label); the run's weights, precision and inference settings, the defaults of scoring the export.

A file from before version 1 (prose only) is read when its prose parses and names a built-in scheme (whose
tables distseg knows); otherwise it is refused in one line that says to export it again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import numpy as np

from distseg.config import Config
from distseg.errors import UserError
from distseg.labels import BUILTIN_SCHEMES, IGNORE, Scheme, get_scheme

VERSION = 1
GRAPH_PRECISION = "no"  # export writes float32 graphs (config.PRECISIONS' name for it)
# the run's settings that scoring the export starts from (the user's settings come after them)
RUN_SETTINGS = ("eval.mode", "eval.crop", "eval.stride", "eval.flip", "eval.scales", "eval.batch",
                "data.crop", "data.val_batch_size")
REEXPORT = "export it again with `distseg export` from its run"


@dataclass(frozen=True)
class ExportInfo:
    """What an exported graph takes and gives, and what its run was."""

    version: int  # 0: prose metadata only (a file from before version 1)
    uint8: bool  # input uint8 0-255, else float32 0-1; RGB N x 3 x H x W with the normalisation folded in
    classes: bool  # output: the int64 class map N x H x W, else float32 logits N x C x H x W
    size: tuple[int, int] | None  # fixed (height, width) at batch 1; None: any batch, height and width
    precision: str  # what the graph computes in (config.PRECISIONS)
    scheme: Scheme
    run_precision: str | None = None  # the run's train.mixed_precision; None: not recorded
    settings: dict = field(default_factory=dict)  # the run's RUN_SETTINGS; empty: not recorded

    def describe(self) -> str:
        """One line: `dynamic, uint8 in, logits out, float32, scheme trainid`."""
        shape = f"fixed {self.size[1]}x{self.size[0]}" if self.size else "dynamic"
        out = "classes" if self.classes else "logits"
        return (f"{shape}, {'uint8' if self.uint8 else 'float32'} in, {out} out, precision {self.precision}, "
                f"scheme {self.scheme.name}"
                + ("" if self.version else ", metadata from before version 1"))

    def run_overrides(self) -> list[str]:
        """The run's recorded inference settings as section.key=value, for config.load_config."""
        return [f"{k}={json.dumps(v)}" for k, v in self.settings.items()]


def _scheme_record(scheme: Scheme) -> dict:
    return {"name": scheme.name, "class_names": scheme.class_names, "label_ids": scheme.to_label_id,
            "lut": scheme.lut.tolist(), "eval_classes": scheme.eval_classes,
            "colors": [list(c) for c in scheme.colors], "source": scheme.source, "ignore": IGNORE,
            "fingerprint": scheme.fingerprint()}


def record(cfg: Config, scheme: Scheme, weights: str, uint8: bool, argmax: bool,
           size: tuple[int, int] | None) -> dict:
    """The version 1 record of a graph exported from a run with `cfg`; `size` None: dynamic."""
    settings = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in RUN_SETTINGS}
    return {"version": VERSION,
            "input": {"dtype": "uint8" if uint8 else "float32", "layout": "NCHW", "channels": "RGB",
                      "range": [0, 255] if uint8 else [0, 1],
                      "normalisation": {"folded_in": True, "mean": list(cfg.data.mean),
                                        "std": list(cfg.data.std)}},
            "output": "classes" if argmax else "logits",
            "size": list(size) if size else None,
            "precision": GRAPH_PRECISION,
            "scheme": _scheme_record(scheme),
            "run": {"weights": weights, "precision": cfg.train.mixed_precision,
                    "model": f"{cfg.model.encoder} base {cfg.model.base}", "settings": settings}}


def read_info(meta: dict, where: str) -> ExportInfo:
    """The ExportInfo of a file's metadata (ONNX metadata_props or the .pt2's distseg.json); one error line
    for a file distseg did not write, a newer version, or old prose that does not parse."""
    rec = meta.get("distseg")
    if rec is not None:
        try:
            rec = json.loads(rec) if isinstance(rec, str) else rec
        except ValueError:
            raise UserError(f"{where}: its distseg metadata is not JSON: {REEXPORT}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("version"), int):
            raise UserError(f"{where}: its distseg metadata has no version: {REEXPORT}")
        if rec["version"] > VERSION:
            raise UserError(f"{where} has distseg metadata version {rec['version']}; this distseg reads up "
                            f"to {VERSION}: upgrade distseg")
        return _from_record(rec, where)
    if meta.get("producer") != "distseg":
        raise UserError(f"{where} carries no distseg metadata: only files written by `distseg export` can be "
                        "scored")
    return _from_prose(meta, where)


def _from_record(rec: dict, where: str) -> ExportInfo:
    try:
        inp, sch, run = rec["input"], rec["scheme"], rec.get("run") or {}
        scheme = Scheme(str(sch["name"]), list(sch["class_names"]), np.array(sch["lut"], np.uint8),
                        [tuple(c) for c in sch["colors"]], list(sch["label_ids"]), str(sch.get("source", "")),
                        list(sch["eval_classes"]))
        size = tuple(rec["size"]) if rec["size"] else None
        info = ExportInfo(rec["version"], inp["dtype"] == "uint8", rec["output"] == "classes", size,
                          str(rec["precision"]), scheme, run.get("precision"), dict(run.get("settings", {})))
        bad = (inp["dtype"] not in ("uint8", "float32") or rec["output"] not in ("logits", "classes")
               or scheme.fingerprint() != sch["fingerprint"] or (info.size and len(info.size) != 2))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{where}: its distseg metadata lacks {e}: {REEXPORT}") from None
    if bad:
        raise UserError(f"{where}: its distseg metadata is damaged (dtype, output, size or scheme): "
                        f"{REEXPORT}")
    return info


PROSE_FIXED = re.compile(r"fixed (\d+)x(\d+) \(H x W\)$")
PROSE_DYNAMIC = "dynamic batch, height and width"


def _from_prose(meta: dict, where: str) -> ExportInfo:
    """Version 0: the prose of `distseg export` before the record (see distseg/flows/export.py's keys)."""
    def unreadable(key: str, why: str) -> UserError:
        return UserError(f"{where} predates distseg's machine-readable export metadata and its {key!r} "
                         f"{why}: {REEXPORT}")

    name = meta.get("scheme", "")
    if name not in BUILTIN_SCHEMES:
        raise unreadable("scheme", f"({name!r}) is not a built-in scheme, whose label ids only a newer "
                                   "export records")
    scheme = get_scheme(name)
    try:
        classes = json.loads(meta.get("classes", ""))
    except ValueError:
        classes = None
    if classes != scheme.class_names:
        raise unreadable("classes", f"are not scheme {name}'s")
    inp, out, shape = meta.get("input", ""), meta.get("output", ""), meta.get("shape", "")
    if not inp.startswith(("uint8 RGB", "float32 RGB")) or "normalisation folded in" not in inp:
        raise unreadable("input", f"({inp!r}) does not say its dtype and normalisation")
    if not out.startswith(("int64 class map", "float32 logits")):
        raise unreadable("output", f"({out!r}) says neither logits nor class map")
    fixed = PROSE_FIXED.match(shape)
    if shape != PROSE_DYNAMIC and not fixed:
        raise unreadable("shape", f"({shape!r}) says neither fixed HxW nor dynamic")
    return ExportInfo(0, inp.startswith("uint8"), out.startswith("int64"),
                      (int(fixed[1]), int(fixed[2])) if fixed else None, GRAPH_PRECISION, scheme)
