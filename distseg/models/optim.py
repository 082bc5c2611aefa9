"""Optimizer and learning-rate schedule from the config (shared by training and `distseg bench train`)."""

from __future__ import annotations

import torch

from distseg.errors import UserError


def lr_at(step: int, cfg, max_steps: int) -> float:
    """Linear warm-up, then poly decay to sched.min_lr at max_steps."""
    base, s = cfg.optim.lr, cfg.sched
    if s.warmup_steps and step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    span = max(1, max_steps - s.warmup_steps)
    frac = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + (base - s.min_lr) * (1 - frac) ** s.power


def build_optimizer(cfg, params, on_cuda: bool):
    """AdamW or SGD from the config; fused kernels on CUDA unless optim.fused says otherwise."""
    o = cfg.optim
    fused = on_cuda if o.fused == "auto" else o.fused == "true"
    if fused and not on_cuda:
        raise UserError("optim.fused=true needs CUDA")
    kw = {"fused": True} if fused else {}
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **kw)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **kw)
