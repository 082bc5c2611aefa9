"""Weights folders and files: what `best/` and every checkpoint hold for evaluate, predict, export and
fine-tuning (`model.safetensors`, `ema.safetensors` when training keeps a weight average, `meta.json`), and
reading weights written by distseg or other tools (safetensors, torch state dicts, wrapped checkpoints).

The models room owns this format because a model is built from it (fine-tuning, pretrained encoders from a
distseg run); run folders and checkpoints (distseg/runs/) store their weights through it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from distseg import run_files as files
from distseg.errors import UserError


def save_weights(state_dict: dict, out_dir: Path, meta: dict, ema_state: dict | None = None) -> None:
    """Model weights alone (for evaluate/predict/fine-tune), and their EMA when training keeps one, replaced
    atomically."""
    tmp = out_dir.with_name(files.staging_name(out_dir.name))
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        write_safetensors(state_dict, tmp / files.WEIGHTS)
        if ema_state is not None:
            write_safetensors(ema_state, tmp / files.EMA_WEIGHTS)
        (tmp / files.META).write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = out_dir.with_name(files.replaced_name(out_dir.name))
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def write_safetensors(state_dict: dict, path: Path) -> None:
    """A state dict as safetensors (CPU, contiguous)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(path))


def weights_file(folder: Path, which: str = "auto") -> Path:
    """The weights file of a checkpoint or best/ folder: `ema` (the weight average), `raw` (the trained
    weights) or `auto` (the average when the run keeps one)."""
    ema = folder / files.EMA_WEIGHTS
    if which == "ema" or (which == "auto" and ema.is_file()):
        if not ema.is_file():
            raise UserError(f"{folder} has no EMA weights (the run had train.ema_decay=0): use --weights raw")
        return ema
    for name in (files.WEIGHTS, "pytorch_model.bin", "model.pt"):  # and other tools' names
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"no model weights ({files.WEIGHTS}) in {folder}")


def load_weights(path: str | os.PathLike, which: str = "auto") -> dict[str, torch.Tensor]:
    """A checkpoint folder (see `weights_file`) or a .safetensors / .pt file."""
    p = Path(path)
    if p.is_dir():
        p = weights_file(p, which)
    if not p.is_file():
        raise UserError(f"weights not found: {path}")
    try:
        if p.suffix == ".safetensors":  # read whole: an mmap would break if the file changes while in use
            from safetensors.torch import load

            sd = load(p.read_bytes())
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights {p}: {str(e).strip().splitlines()[0][:200]}") from None
    for key in ("state_dict", "model"):  # training checkpoints of other tools wrap the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{p} holds no state dict of tensors (save model.state_dict(), not the model)")
    # strip wrappers' prefixes (DDP, torch.compile)
    return {k.replace("module.", "", 1).replace("_orig_mod.", "", 1): v for k, v in sd.items()}
