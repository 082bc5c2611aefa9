"""Confusion matrix -> per-class IoU, mIoU, pixel accuracy, with the official Cityscapes conventions:
ignored ground truth counts nowhere; a class absent from both ground truth and prediction has IoU NaN
and is left out of the mean."""

from __future__ import annotations

import math

import numpy as np
import torch

from distseg.labels import CATEGORIES, IGNORE, NAME2LABEL, Scheme


class ConfusionMatrix:
    """Counts of (true class, predicted class) on a device; summed over ranks by `reduce`."""
    def __init__(self, num_classes: int, device: torch.device | str = "cpu"):
        self.n = num_classes
        # one extra column for predictions outside 0..n-1 (e.g. an ignored label id in a results file):
        # they are misses for the true class, and a false positive for no class (official convention)
        self.mat = torch.zeros(num_classes, num_classes + 1, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer maps of equal shape; target pixels of the ignore label (labels.IGNORE) or
        >= num_classes are left out. Counted on the device without reading anything back (no boolean
        indexing, no bincount: both wait for the device to learn a size): ignored pixels go to a spare slot
        that is dropped."""
        t = target.reshape(-1).long()
        p = pred.reshape(-1).long().to(t.device)
        n = self.n
        keep = (t != IGNORE) & (t < n) & (t >= 0)
        p = torch.where((p >= 0) & (p < n), p, n)
        idx = torch.where(keep, t * (n + 1) + p, n * (n + 1))
        counts = torch.zeros(n * (n + 1) + 1, dtype=torch.int64, device=idx.device)
        counts.scatter_add_(0, idx, torch.ones(1, dtype=torch.int64, device=idx.device).expand_as(idx))
        self.mat += counts[:-1].reshape(n, n + 1).to(self.mat.device)

    def reduce(self, accelerator) -> "ConfusionMatrix":
        """Sum over ranks (each rank must have counted disjoint samples)."""
        if accelerator is not None and accelerator.num_processes > 1:
            self.mat = accelerator.reduce(self.mat, reduction="sum")
        return self

    def scores(self, eval_classes: list[int] | None = None) -> dict:
        """Per-class IoU, mIoU over non-NaN classes, pixel accuracy, labelled pixel count."""
        cls = list(range(self.n)) if eval_classes is None else list(eval_classes)
        m = self.mat.double().cpu().numpy()
        rows = np.zeros(self.n, bool)
        rows[cls] = True
        m[~rows] = 0  # ground truth outside the evaluated classes counts nowhere (official convention)
        tp = np.diag(m[:, : self.n])
        gt = m.sum(1)
        pred = m[:, : self.n].sum(0)
        iou = {}
        for c in cls:
            union = gt[c] + pred[c] - tp[c]
            iou[c] = float(tp[c] / union) if union > 0 else math.nan
        valid = [v for v in iou.values() if not math.isnan(v)]
        total = m.sum()
        return {"iou": iou, "miou": float(np.mean(valid)) if valid else math.nan,
                "pixel_acc": float(tp.sum() / total) if total > 0 else math.nan, "pixels": int(total)}


def category_iou(cm: ConfusionMatrix, scheme: Scheme) -> dict[str, float] | None:
    """IoU per Cityscapes category (flat, construction, ...) from the class confusion matrix, for the
    official schemes (their classes are Cityscapes labels); None for other schemes. Classes outside the
    evaluated ones count nowhere, as in the class scores."""
    if not scheme.official:
        return None
    cats = [NAME2LABEL[name].category for name in scheme.class_names]
    m = cm.mat.double().cpu().numpy()
    keep = np.zeros(cm.n, bool)
    keep[scheme.eval_classes] = True
    out = {}
    for cat in CATEGORIES:
        rows = np.array([c == cat for c in cats]) & keep
        cols = np.array([c == cat for c in cats] + [False])
        tp = m[np.ix_(rows, cols)].sum()
        union = m[rows].sum() + m[np.ix_(keep, cols)].sum() - tp
        out[cat] = float(tp / union) if union > 0 else math.nan
    return out


def headline_name(scheme: Scheme) -> str:
    """The name of the number that ranks checkpoints (`headline`)."""
    return "foreground IoU" if scheme.num_classes == 2 else "mIoU"


def headline(scheme: Scheme, scores: dict) -> tuple[str, float]:
    """The one number that ranks checkpoints, with its name: the foreground IoU of a binary scheme (its
    background IoU would flatter any model), the mIoU of every other scheme. `scores` is
    `ConfusionMatrix.scores`: per-class IoU by class index."""
    name = headline_name(scheme)
    return name, scores["iou"].get(1, math.nan) if name == "foreground IoU" else scores["miou"]


def percent(v: float | None, spec: str = ".2f", unit: str = "") -> str:
    """A score for people, the one format of every command: `43.59` (in a table headed %) or with
    unit="%" `43.59%`; `n/a` (never `n/a%`) where a class never occurred (NaN) or there is no score. JSON
    keeps fractions."""
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:{spec}}{unit}"


def format_table(scores: dict, class_names: list[str], categories: dict | None = None,
                 extra: dict | None = None) -> str:
    """Per-class IoU (then category IoU when given), mIoU, `extra` scores (e.g. a binary scheme's foreground
    IoU) and pixel accuracy as an aligned table, in percent."""
    rows = [(class_names[c], v) for c, v in scores["iou"].items()] + [("mIoU", scores["miou"])]
    rows += [(f"category {name}", v) for name, v in (categories or {}).items()]
    rows += list((extra or {}).items()) + [("pixel acc", scores["pixel_acc"])]
    width = max(16, max(len(name) for name, _ in rows) + 2)
    lines = [f"{'class':<{width}}{'IoU %':>8}"] + [f"{name:<{width}}{percent(v):>8}" for name, v in rows]
    return "\n".join(lines)
