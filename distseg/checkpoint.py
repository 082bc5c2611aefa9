"""Atomic checkpoints: written under a temp name by all ranks (Accelerate's save_state), then renamed by
rank 0 once complete, so `latest` always names a checkpoint that can be loaded."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from distseg.errors import UserError

STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d{8})$")


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if _STEP.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_STEP.match(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    ck = list_checkpoints(ckpt_dir)
    return ck[-1] if ck else None


def read_state(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{ckpt} is not a complete distseg checkpoint: {e}") from None


def save_checkpoint(accelerator, ckpt_dir: Path, state: dict, keep_last: int, rank_files: dict | None = None) -> Path:
    """Collective: every rank must call it at the same step. `rank_files` ({name: str or bytes}) are written by
    each rank with its index appended (e.g. a DALI reader position, which differs per rank)."""
    final = ckpt_dir / f"step-{state['step']:08d}"
    tmp = ckpt_dir / f".{final.name}.tmp"
    if accelerator.is_main_process:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    for name, data in (rank_files or {}).items():
        f = tmp / f"{name}_{accelerator.process_index}"
        f.write_bytes(data) if isinstance(data, bytes) else f.write_text(data)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(ckpt_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_weights(state_dict: dict, out_dir: Path, meta: dict) -> None:
    """Model weights alone (for evaluate/predict/fine-tune), replaced atomically."""
    from safetensors.torch import save_file

    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, str(tmp / "model.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    old = out_dir.with_name(f".{out_dir.name}.old")
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint folder (model.safetensors inside) or a .safetensors / .pt file."""
    p = Path(path)
    if p.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin", "model.pt"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise UserError(f"no model weights (model.safetensors) in {path}")
    if not p.is_file():
        raise UserError(f"weights not found: {path}")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p))
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot read weights {p}: {e}") from None
    # strip wrappers' prefixes (DDP, torch.compile)
    return {k.replace("module.", "", 1).replace("_orig_mod.", "", 1): v for k, v in sd.items()}
