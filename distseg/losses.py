"""Losses as pixel *sums* plus the number of valid pixels, so the trainer can normalise by the global
count across ranks: the gradient then does not depend on how a global batch is split over processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distseg.labels import IGNORE


def ce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy summed over labelled pixels (255 ignored)."""
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE, reduction="sum")


def bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on a binary target (0/1, 255 ignored); one logit channel, or two (fg - bg)."""
    valid = target != IGNORE
    z = logits[:, 0] if logits.shape[1] == 1 else logits[:, 1] - logits[:, 0]
    loss = F.binary_cross_entropy_with_logits(z.float(), (target == 1).float(), reduction="none")
    return (loss * valid).sum()


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean soft Dice over classes present in prediction or target (ignored pixels masked out)."""
    valid = (target != IGNORE).unsqueeze(1)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.float())
        probs = torch.cat([1 - p, p], 1)
    else:
        probs = logits.float().softmax(1)
    onehot = F.one_hot(target.clamp(max=probs.shape[1] - 1) * (target != IGNORE), probs.shape[1])
    onehot = onehot.permute(0, 3, 1, 2).float() * valid
    probs = probs * valid
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = denom > 0
    if not present.any():
        return logits.sum() * 0.0
    dice = (2 * inter + eps) / (denom + eps)
    return 1 - dice[present].mean()


class SegLoss:
    """Weighted sum: (w_ce * CE_sum + w_bce * BCE_sum) / N_valid_global + w_dice * Dice."""

    def __init__(self, ce: float = 1.0, dice: float = 0.0, bce: float = 0.0):
        self.ce, self.dice, self.bce = ce, dice, bce

    def pixel_sum(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The per-pixel loss terms summed over labelled pixels (normalised by the trainer)."""
        total = logits.new_zeros((), dtype=torch.float32)
        if self.ce:
            total = total + self.ce * ce_sum(logits, target)
        if self.bce:
            total = total + self.bce * bce_sum(logits, target)
        return total

    def mean_terms(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Terms that are already means over the batch (Dice)."""
        if not self.dice:
            return logits.new_zeros((), dtype=torch.float32)
        return self.dice * dice_loss(logits, target)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Single-process convenience: the loss normalised by this batch's own valid pixels."""
        n = (target != IGNORE).sum().clamp(min=1)
        return self.pixel_sum(logits, target) / n + self.mean_terms(logits, target)
