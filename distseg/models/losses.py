"""Losses as pixel *sums* plus their normaliser, so the trainer can divide by the global count across ranks
and accumulation steps: the gradient then does not depend on how a global batch is split over processes.

- CE (pixels of the ignore label, labels.IGNORE, left out), optionally class-weighted (weights from the
  train manifest's pixel histogram: ENet's inverse log frequency or median frequency balancing); its
  normaliser is the summed weight of the labelled pixels, as PyTorch's weighted mean.
- OHEM CE (as mmsegmentation's OHEMPixelSampler): per micro-batch, keep the pixels whose true-class
  probability is below `thresh`, and at least `min_kept` per image; the normaliser is the kept count (their
  summed class weights when weighted), known only after the forward pass (the trainer divides the summed
  gradients by the global count).
- BCE for binary schemes with one logit; soft Dice as a batch mean.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from distseg.labels import IGNORE


def class_weights(counts: np.ndarray, method: str) -> torch.Tensor | None:
    """Per-class CE weights from the train split's labelled pixels per class (shards/split.OpenSplit
    .class_pixels); classes never seen get the largest."""
    if method == "none":
        return None
    counts = np.asarray(counts, np.float64)
    freq = counts / max(counts.sum(), 1)
    if method == "inv_log":  # ENet: 1 / ln(1.02 + p)
        w = 1.0 / np.log(1.02 + freq)
    else:  # median frequency balancing: median(f) / f over the classes present
        present = freq[freq > 0]
        w = np.where(freq > 0, np.median(present) / np.maximum(freq, 1e-12), 0.0)
        w[freq == 0] = w.max() if w.max() > 0 else 1.0
    return torch.tensor(w, dtype=torch.float32)


def ce_sum(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy summed over labelled pixels (not the ignore label), each weighted by its class weight."""
    return F.cross_entropy(logits.float(), target, weight=weight, ignore_index=IGNORE, reduction="sum")


def ohem_mask(logits: torch.Tensor, target: torch.Tensor, thresh: float, min_kept: int) -> torch.Tensor:
    """The hard pixels of a micro-batch: true-class probability below max(thresh, the probability of the
    (min_kept x labelled images)-th easiest labelled pixel), as mmsegmentation's OHEMPixelSampler does."""
    with torch.no_grad():
        valid = target != IGNORE
        prob = logits.float().softmax(1).gather(1, target.clamp(max=logits.shape[1] - 1).unsqueeze(1))[:, 0]
        p = prob[valid]
        if p.numel() == 0:
            return valid
        images = int(valid.flatten(1).any(1).sum())  # padded (all-ignored) images do not raise the minimum
        kth = p.sort().values[min(min_kept * images, p.numel() - 1)]
        return valid & (prob < max(float(kth), thresh))


def bce_sum(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BCE-with-logits on a binary target (0/1, the ignore label left out); one logit, or two (fg - bg)."""
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
    """(w_ce * CE_sum + w_bce * BCE_sum) / normaliser (global) + w_dice * Dice; see the module docstring."""

    def __init__(self, ce: float = 1.0, dice: float = 0.0, bce: float = 0.0,
                 weight: torch.Tensor | None = None,
                 ohem: tuple[float, int] | None = None):
        self.ce, self.dice, self.bce, self.weight, self.ohem = ce, dice, bce, weight, ohem

    @property
    def count_after_forward(self) -> bool:
        """Whether the normaliser depends on the logits (OHEM): known only after the forward pass."""
        return self.ohem is not None

    def norm_count(self, target: torch.Tensor) -> torch.Tensor:
        """The normaliser known before the forward pass: labelled pixels, or their summed class weights."""
        valid = target != IGNORE
        if self.weight is None or not self.ce:
            return valid.sum(dtype=torch.float32)
        w = self.weight.to(target.device)
        return w[target.clamp(max=len(w) - 1)][valid].sum()

    def pixel_sum(self, logits: torch.Tensor, target: torch.Tensor, count: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of the per-pixel terms, its normaliser) for one micro-batch; `count`: the target's
        `norm_count` where the caller has it already (without OHEM, whose count follows the forward)."""
        if self.ohem is not None:
            keep = ohem_mask(logits, target, *self.ohem)
            target = torch.where(keep, target, torch.full_like(target, IGNORE))
        w = self.weight.to(logits.device) if self.weight is not None else None
        terms = []  # a term of weight 1 as it is: the same sum, without an operator per step for nothing
        if self.ce:
            terms.append(ce_sum(logits, target, w) if self.ce == 1 else self.ce * ce_sum(logits, target, w))
        if self.bce:
            terms.append(bce_sum(logits, target) if self.bce == 1 else self.bce * bce_sum(logits, target))
        total = sum(terms[1:], terms[0]) if terms else logits.new_zeros((), dtype=torch.float32)
        return total, self.norm_count(target) if count is None or self.ohem is not None else count

    def mean_terms(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Terms that are already means over the batch (Dice)."""
        if not self.dice:
            return logits.new_zeros((), dtype=torch.float32)
        return self.dice * dice_loss(logits, target)

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Single-process convenience: the loss normalised by this batch's own normaliser."""
        total, count = self.pixel_sum(logits, target)
        return total / count.clamp(min=1e-12) + self.mean_terms(logits, target)


def build_loss(cfg, class_pixels: np.ndarray | None, device) -> SegLoss:
    """The loss the config describes (class weights from the train split's `class_pixels`; None where no
    split is read, e.g. a benchmark on synthetic batches: then the weights are uniform)."""
    lo = cfg.loss
    weight = class_weights(class_pixels, lo.class_weights) if lo.ce and class_pixels is not None else None
    return SegLoss(lo.ce, lo.dice, lo.bce, weight.to(device) if weight is not None else None,
                   (lo.ohem_thresh, lo.ohem_min_kept) if lo.ohem else None)
