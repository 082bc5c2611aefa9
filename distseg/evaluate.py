"""`distseg evaluate`: a run's checkpoint on a split, per-class IoU table (same code path as training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from distseg.errors import UserError


def load_run(run: str, checkpoint: str, overrides: tuple[str, ...] = ()):
    """(cfg, scheme, model with weights, weights path) for a run folder."""
    from distseg.checkpoint import latest_checkpoint, load_weights
    from distseg.config import load_config
    from distseg.labels import get_scheme
    from distseg.models.unet import build_model, out_channels

    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a training run (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", overrides)
    if checkpoint == "best":
        path = run_dir / "best"
        if not path.is_dir():
            raise UserError(f"{run_dir} has no best/ weights yet (no validation has finished); try --checkpoint latest")
    elif checkpoint == "latest":
        path = latest_checkpoint(run_dir / "checkpoints")
        if path is None:
            raise UserError(f"{run_dir} has no complete checkpoint")
    else:
        path = Path(checkpoint)
    scheme = get_scheme(cfg.data.scheme)
    model = build_model(cfg, out_channels(cfg, scheme.num_classes))
    sd = load_weights(path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"weights in {path} do not fit the run's model: {str(e).splitlines()[0]}") from None
    return cfg, scheme, model.eval(), path


def evaluate(run: str, checkpoint: str = "best", split: str | None = None, shards: str | None = None,
             overrides: tuple[str, ...] = (), json_out: str | None = None) -> dict:
    from accelerate import Accelerator

    from distseg.data.loader import build_loader
    from distseg.metrics import format_table
    from distseg.train import run_validation

    extra = list(overrides) + (["data.num_workers=0"] if not any(o.startswith("data.num_workers") for o in overrides) else [])
    if shards:
        extra.append(f"data.shards={shards}")
    cfg, scheme, model, path = load_run(run, checkpoint, tuple(extra))
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.train.mixed_precision)
    model = model.to(acc.device)
    loader = build_loader(cfg, split or cfg.data.val_split, acc, scheme, train=False)
    cm, _ = run_validation(model, loader, acc, scheme, cfg)
    scores = cm.scores(scheme.eval_classes)
    if acc.is_main_process:
        print(f"{path} on {split or cfg.data.val_split} ({loader.num_samples} images, {scores['pixels']} pixels)")
        print(format_table(scores, scheme.class_names))
        if json_out:
            Path(json_out).write_text(json.dumps(
                {"checkpoint": str(path), "miou": scores["miou"], "pixel_acc": scores["pixel_acc"],
                 "iou": {scheme.class_names[c]: (None if math.isnan(v) else v) for c, v in scores["iou"].items()},
                 "confusion": cm.mat.cpu().tolist()}, indent=1))
    return scores
