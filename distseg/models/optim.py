"""Optimizer and learning-rate schedule from the config (shared by training and `distseg bench train`).

Every parameter group follows the same schedule scaled by its own factor (models/param_groups.py): a group
at 0.1 x optim.lr warms up to 0.1 x optim.lr and decays to 0.1 x sched.min_lr, so the groups' ratios hold
through the whole run.
"""

from __future__ import annotations

import torch

from distseg.errors import UserError
from distseg.models.param_groups import ParamGroup, optimizer_groups


def lr_at(step: int, cfg, max_steps: int) -> float:
    """Linear warm-up, then poly decay to sched.min_lr at max_steps (the rate of a group of factor 1)."""
    base, s = cfg.optim.lr, cfg.sched
    if s.warmup_steps and step < s.warmup_steps:
        return base * (step + 1) / s.warmup_steps
    span = max(1, max_steps - s.warmup_steps)
    frac = min(1.0, (step - s.warmup_steps) / span)
    return s.min_lr + (base - s.min_lr) * (1 - frac) ** s.power


def set_lr(optimizer, groups: list[ParamGroup], lr: float) -> None:
    """Each optimizer group at `lr` x its factor (the groups are the ones the optimizer was built from)."""
    for g, group in zip(optimizer.param_groups, groups, strict=True):
        g["lr"] = lr * group.lr_scale


def build_optimizer(cfg, groups: list[ParamGroup], on_cuda: bool):
    """AdamW or SGD over the parameter groups; fused kernels on CUDA unless optim.fused says otherwise."""
    o = cfg.optim
    fused = on_cuda if o.fused == "auto" else o.fused == "true"
    if fused and not on_cuda:
        raise UserError("optim.fused=true needs CUDA")
    kw = {"fused": True} if fused else {}
    params = optimizer_groups(groups, o.lr, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **kw)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, **kw)
