"""`distseg predict`: segment images into the official Cityscapes results format.

`--out` receives exactly one PNG per input image and nothing else, so `csEvalPixelLevelSemanticLabeling`
(which takes every `<city>_<seq>_<frame>*.png` under the folder) accepts it as it is: label ids for
trainid/labelid runs (`<key>_pred_labelIds.png`), the scheme's class indexes otherwise
(`<key>_pred_classes.png`). Colour masks and overlays go to `--overlays` only when asked. Images are decoded
by DataLoader workers and batched by size; under `accelerate launch` rank r predicts every world-th image,
so each image is predicted exactly once whatever the number of processes.
"""

from __future__ import annotations

import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distseg.errors import UserError
from distseg.files import atomic_save_png, atomic_write_bytes
from distseg.flows.images import segment_files, source_root
from distseg.inference.segmenter import Segmenter
from distseg.inference.visual import overlay
from distseg.labels import Scheme
from distseg.runs.run_dir import load_run
from distseg.shards.image_files import ImageItem, find_inputs


def result_name(key: str, scheme: Scheme) -> str:
    """File name of one result: the official suffix for label-id schemes."""
    return f"{key}_pred_labelIds.png" if scheme.official else f"{key}_pred_classes.png"


def predict(run: str, inputs: tuple[str, ...], out: str, checkpoint: str = "best", root: str | None = None,
            split: str | None = None, overlays: str | None = None, zip_path: str | None = None,
            alpha: float = 0.5, batch_size: int | None = None, workers: int = 2, precision: str | None = None,
            overrides: tuple[str, ...] = (), weights: str = "auto") -> int:
    """Write one result per input image; returns how many images all ranks predicted."""
    from accelerate import Accelerator

    loaded = load_run(run, checkpoint, overrides, weights)
    where = None
    if split is not None:
        where, how = source_root(root, loaded.cfg, split)
        if os.environ.get("RANK", "0") == "0":  # before the Accelerator: rank 0 of a launch, or alone
            print(f"predicting the {split} split of {where} ({how})", flush=True)
    items = find_inputs(inputs, where, split)
    out_dir = Path(out)
    if overlays and Path(overlays).resolve() == out_dir.resolve():
        raise UserError("--overlays must be another folder than --out: the official evaluation takes every "
                        "<key>*.png under the results folder")
    cfg, scheme = loaded.cfg, loaded.scheme
    acc = Accelerator(cpu=not torch.cuda.is_available())
    seg = Segmenter.from_config(loaded.model.to(acc.device), cfg, acc.device, precision)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overlays:
        Path(overlays).mkdir(parents=True, exist_ok=True)
    mine = items[acc.process_index::acc.num_processes]
    export = scheme.export_lut() if scheme.official else np.arange(256, dtype=np.uint8)
    pal = scheme.palette()
    for item, sample, c in segment_files(seg, mine, batch_size or cfg.data.val_batch_size, workers, "predict",
                                         acc.is_main_process):
        atomic_save_png(Image.fromarray(export[c]), out_dir / result_name(item.key, scheme))
        if overlays:
            _write_overlays(Path(overlays), item, sample["image"], c, pal, alpha)
    acc.wait_for_everyone()
    if acc.is_main_process:
        _warn_foreign_files(out_dir, items, scheme)
        if zip_path:
            write_zip(Path(zip_path), out_dir, items, scheme)
    return len(items)


def _write_overlays(folder: Path, item: ImageItem, image: torch.Tensor, classes: np.ndarray, pal,
                    alpha) -> None:
    rgb = image.permute(1, 2, 0).numpy()
    atomic_save_png(Image.fromarray(pal[classes]), folder / f"{item.key}_color.png")
    atomic_save_png(Image.fromarray(overlay(rgb, classes, pal, alpha)), folder / f"{item.key}_overlay.png")


def _warn_foreign_files(out_dir: Path, items: list[ImageItem], scheme: Scheme) -> None:
    """Files left in --out by something else would make the official evaluation refuse the folder."""
    ours = {result_name(it.key, scheme) for it in items}
    keys = {it.key for it in items}
    other = [p for p in out_dir.rglob("*.png")
             if p.name not in ours and any(p.name.startswith(k) for k in keys)]
    if other:
        print(f"warning: {len(other)} other file(s) in {out_dir} match these images (e.g. {other[0].name}); "
              "the official evaluation will find several predictions per image: remove them", file=sys.stderr)


def write_zip(path: Path, out_dir: Path, items: list[ImageItem], scheme: Scheme) -> None:
    """The archive the Cityscapes benchmark server takes: the result PNGs, flat, written atomically."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for it in items:
            name = result_name(it.key, scheme)
            z.write(out_dir / name, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
