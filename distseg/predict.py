"""`distseg predict`: segment images; write labelId PNGs in the official Cityscapes results format
(<key>_pred_labelIds.png, values = Cityscapes label ids) and colour overlays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distseg.data.manifest import atomic_save_png
from distseg.errors import UserError


def find_images(inputs: tuple[str, ...]) -> list[Path]:
    out = []
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            found = sorted(p.rglob("*_leftImg8bit.png")) or sorted(
                q for q in p.rglob("*") if q.suffix.lower() in (".png", ".jpg", ".jpeg"))
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"input not found: {p}")
    if not out:
        raise UserError("no images found in the inputs")
    return out


def key_of(path: Path) -> str:
    name = path.stem
    return name[: -len("_leftImg8bit")] if name.endswith("_leftImg8bit") else name


@torch.no_grad()
def predict(run: str, inputs: tuple[str, ...], out: str, checkpoint: str = "best", alpha: float = 0.5) -> int:
    from distseg.evaluate import load_run
    from distseg.models.unet import predict_classes
    from distseg.tb import overlay
    from distseg.data.transforms import prepare_val

    cfg, scheme, model, _ = load_run(run, checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    out_dir = Path(out)
    (out_dir / "overlay").mkdir(parents=True, exist_ok=True)
    export, pal = scheme.export_lut(), scheme.palette()
    images = find_images(inputs)
    for path in images:
        try:
            rgb = np.array(Image.open(path).convert("RGB"))
        except Exception as e:
            raise UserError(f"cannot read image {path}: {e}") from None
        img = torch.from_numpy(rgb).permute(2, 0, 1).to(device)
        x, _ = prepare_val(img, torch.zeros(1), cfg.data.mean, cfg.data.std, cfg.data.val_scale)
        logits = model(x.unsqueeze(0))
        if logits.shape[-2:] != rgb.shape[:2]:
            logits = F.interpolate(logits.float(), size=rgb.shape[:2], mode="bilinear", align_corners=False)
        cls = predict_classes(logits)[0].cpu().numpy().astype(np.uint8)
        key = key_of(path)
        atomic_save_png(Image.fromarray(export[cls]), out_dir / f"{key}_pred_labelIds.png")
        atomic_save_png(Image.fromarray(overlay(rgb, cls, pal, alpha)), out_dir / "overlay" / f"{key}_overlay.png")
    return len(images)
