"""The official Cityscapes pixel-level evaluation (class and category IoU, instance-weighted iIoU) on
label-id maps, as `cityscapesscripts`' csEvalPixelLevelSemanticLabeling defines it.

Written here rather than called, because the official package needs `np.in1d`, which numpy 2.4 removed,
and walks Python loops per pixel value; this version is vectorised (one bincount per image), streams
(only a 34 x 34 confusion matrix and per-class sums are held, whatever the number of images), can be summed
over ranks, and turns the mistakes on which the official script gives IndexErrors or NaNs into one clear
error. The conventions are the official ones, and a test runs the official script on the same files:

- IoU of a label = tp / (tp + fp + fn): fn is every other prediction on its ground truth (ignored label ids
  included), fp counts only pixels whose ground truth is a non-ignored label; 0/0 is NaN and left out of
  the means.
- iIoU weights each instance's pixels by (average instance size of its class) / (its size), with the
  benchmark's average sizes below; instances are ids > 1000 in `*_gtFine_instanceIds.png` (label id x 1000
  + k), and fp is the same as for IoU.
- Categories: the same on groups of labels; the category iIoU exists for `human` and `vehicle` only.
"""

from __future__ import annotations

import math

import numpy as np

from distseg.errors import UserError
from distseg.inference.metrics import percent
from distseg.labels import IGNORE, LABELS

NUM_IDS = 34  # Cityscapes label ids 0..33
# average instance size per class in the benchmark's training data: the iIoU weights (cityscapesScripts)
AVG_CLASS_SIZE = {"bicycle": 4672.3249222261, "caravan": 36771.8241758242, "motorcycle": 6298.7200839748,
                  "rider": 3930.4788056518, "bus": 35732.1511111111, "train": 67583.7075812274,
                  "car": 12794.0202738185, "person": 3462.4756337644, "truck": 27855.1264367816,
                  "trailer": 16926.9763313609}

_REAL = [lab for lab in LABELS if lab.id >= 0]
_ID2 = {lab.id: lab for lab in _REAL}
EVAL_IDS = [lab.id for lab in _REAL if not lab.ignoreInEval]  # the 19 classes, in label-id order
CATEGORIES = list(dict.fromkeys(lab.category for lab in LABELS))  # official order, void first
# categories whose every label has instances get an iIoU (official rule): human, vehicle
INST_CATEGORIES = [c for c in CATEGORIES if all(lab.hasInstances for lab in _REAL if lab.category == c)]
_IGNORED = np.array([_ID2[i].ignoreInEval for i in range(NUM_IDS)])
_AVG_SIZE = np.array([AVG_CLASS_SIZE.get(_ID2[i].name, 0.0) for i in range(NUM_IDS)])
_VOID_IDS = [lab.id for lab in _REAL if lab.category == "void"]


def _category_of(i: int) -> str:
    return _ID2[i].category


class CityscapesMetric:
    """Streaming accumulator: `add` one (prediction, ground truth, instances) triple at a time."""

    def __init__(self, with_instances: bool = True):
        self.with_instances = with_instances
        self.conf = np.zeros((NUM_IDS, NUM_IDS), np.int64)  # rows: ground truth id, columns: predicted id
        self.inst = np.zeros((2, NUM_IDS))  # weighted tp, weighted fn per label id
        self.cat_inst = np.zeros((2, len(INST_CATEGORIES)))
        self.images = 0

    # -- accumulation ------------------------------------------------------------------------------
    def add(self, pred: np.ndarray, gt: np.ndarray, instances: np.ndarray | None = None,
            name: str = "") -> None:
        """Add one image: `pred` and `gt` label-id maps (H x W), `instances` the instanceIds map."""
        check_prediction(pred, gt.shape, name)
        g = gt.astype(np.int64).ravel()
        if g.max(initial=0) >= NUM_IDS or g.min(initial=0) < 0:
            raise UserError(f"ground truth for {name or 'an image'} holds value {int(g.max())}, "
                            "which is not a Cityscapes label id")
        p = pred.astype(np.int64).ravel()
        self.conf += np.bincount(g * NUM_IDS + p, minlength=NUM_IDS * NUM_IDS).reshape(NUM_IDS, NUM_IDS)
        self.images += 1
        if self.with_instances:
            if instances is None:
                raise UserError(f"no instanceIds for {name or 'an image'}: iIoU needs "
                                "*_gtFine_instanceIds.png")
            self._add_instances(p, instances.astype(np.int64).ravel())

    def _add_instances(self, p: np.ndarray, inst: np.ndarray) -> None:
        sel = inst > 1000
        ids, pp = inst[sel], p[sel]
        if not ids.size:
            return
        uniq, inv, size = np.unique(ids, return_inverse=True, return_counts=True)
        lab = uniq // 1000
        if lab.max() >= NUM_IDS:
            raise UserError(f"instance id {int(uniq.max())} does not encode a Cityscapes label id (id x "
                            "1000 + k)")
        keep = ~_IGNORED[lab]
        weight = np.where(keep, _AVG_SIZE[lab] / size, 0.0)
        tp = np.bincount(inv, weights=(pp == lab[inv]), minlength=len(uniq))
        self.inst[0] += np.bincount(lab, weights=tp * weight, minlength=NUM_IDS)
        self.inst[1] += np.bincount(lab, weights=(size - tp) * weight, minlength=NUM_IDS)
        for k, cat in enumerate(INST_CATEGORIES):
            in_cat = np.array([_category_of(i) == cat for i in range(NUM_IDS)])
            mine = np.array([_category_of(int(i)) == cat for i in lab]) & keep
            if not mine.any():
                continue
            ctp = np.bincount(inv, weights=in_cat[pp], minlength=len(uniq))
            self.cat_inst[0, k] += (ctp * weight)[mine].sum()
            self.cat_inst[1, k] += ((size - ctp) * weight)[mine].sum()

    # -- summing over ranks ------------------------------------------------------------------------
    def state(self) -> np.ndarray:
        """Everything accumulated, as one float64 vector (counts stay exact below 2**53)."""
        return np.concatenate([self.conf.ravel().astype(np.float64), self.inst.ravel(), self.cat_inst.ravel(),
                               [self.images]])

    def load_state(self, v: np.ndarray) -> None:
        """Replace the accumulated values with `v` (e.g. the sum of every rank's `state()`)."""
        n, k = NUM_IDS * NUM_IDS, 2 * NUM_IDS
        self.conf = np.rint(v[:n]).astype(np.int64).reshape(NUM_IDS, NUM_IDS)
        self.inst = v[n:n + k].reshape(2, NUM_IDS).copy()
        self.cat_inst = v[n + k:n + k + 2 * len(INST_CATEGORIES)].reshape(2, -1).copy()
        self.images = int(round(v[-1]))

    # -- scores ------------------------------------------------------------------------------------
    def scores(self) -> dict:
        """Per-class and per-category IoU / iIoU with their means, pixel accuracy, confusion matrix."""
        c = self.conf.astype(np.float64)
        iou, iiou = {}, {}
        for i in EVAL_IDS:
            others = [j for j in EVAL_IDS if j != i]
            tp, fn, fp = c[i, i], c[i].sum() - c[i, i], c[others, i].sum()
            name = _ID2[i].name
            iou[name] = _ratio(tp, tp + fp + fn)
            if self.with_instances and _ID2[i].hasInstances:
                wtp, wfn = self.inst[:, i]
                iiou[name] = _ratio(wtp, wtp + fp + wfn)
            else:
                iiou[name] = math.nan
        cat_iou, cat_iiou = {}, {}
        for cat in CATEGORIES:
            ids = [i for i in EVAL_IDS if _category_of(i) == cat]
            outside = [j for j in EVAL_IDS if _category_of(j) != cat]
            all_ids = [i for i in range(NUM_IDS) if _category_of(i) == cat]
            if ids:
                tp = c[np.ix_(ids, ids)].sum()
                cat_iou[cat] = _ratio(tp, c[ids].sum() + c[np.ix_(outside, ids)].sum())
            else:
                cat_iou[cat] = math.nan
            if self.with_instances and cat in INST_CATEGORIES:
                k = INST_CATEGORIES.index(cat)
                fp = c[np.ix_(outside,
                              all_ids)].sum()  # the official rule uses all the category's label ids here
                cat_iiou[cat] = _ratio(self.cat_inst[0, k], self.cat_inst[0, k] + fp + self.cat_inst[1, k])
            else:
                cat_iiou[cat] = math.nan
        labelled = c[EVAL_IDS].sum()
        return {"images": self.images, "iou": iou, "iiou": iiou, "miou": nanmean(iou), "miiou": nanmean(iiou),
                "category_iou": cat_iou, "category_iiou": cat_iiou, "category_miou": nanmean(cat_iou),
                "category_miiou": nanmean(cat_iiou),
                "pixel_acc": float(np.trace(c[np.ix_(EVAL_IDS,
                                                     EVAL_IDS)]) / labelled) if labelled else math.nan,
                "pixels": int(labelled), "confusion": self.conf.tolist()}


def _ratio(num: float, den: float) -> float:
    return float(num / den) if den > 0 else math.nan


def nanmean(scores: dict) -> float:
    """Mean over the entries that are not NaN (NaN when none is): the official averaging."""
    valid = [v for v in scores.values() if not math.isnan(v)]
    return float(np.mean(valid)) if valid else math.nan


def check_prediction(pred: np.ndarray, gt_shape: tuple[int, ...], name: str = "") -> None:
    """One clear error for the results-file mistakes the official script meets with IndexErrors or NaNs."""
    what = name or "a prediction"
    if pred.ndim != 2:
        raise UserError(f"{what} has {pred.shape[-1] if pred.ndim == 3 else pred.ndim} channels: save a "
                        "single-channel PNG of Cityscapes label ids (mode L)")
    if pred.shape != tuple(gt_shape):
        raise UserError(f"{what} is {pred.shape[1]}x{pred.shape[0]} but its ground truth is "
                        f"{gt_shape[1]}x{gt_shape[0]}: predictions must have the label image's size")
    top = int(pred.max(initial=0))
    if top >= NUM_IDS or int(pred.min(initial=0)) < 0:
        hint = f" (trainIds with {IGNORE} = ignore saved by mistake? convert them to label ids)"
        hint = hint if top == IGNORE else ""
        raise UserError(f"{what} holds value {top}, which is not a Cityscapes label id (0-33){hint}")
    if top <= 18 and np.isin(pred, _VOID_IDS).mean() > 0.5:
        raise UserError(f"{what} looks like trainIds (values 0-{top}, mostly void label ids): results must "
                        "hold label ids, e.g. 7 for road and 26 for car")


def format_table(s: dict) -> str:
    """The official result table (classes and categories, IoU and iIoU, their averages) in percent with
    n/a, as training prints its scores; the JSON keeps fractions."""
    def f(v):
        return f"{percent(v):>7}"

    w = max(14, *map(len, s["iou"]))
    rule = "-" * (w + 20)
    lines = [f"{'classes':<{w}}  {'IoU %':>7}  {'iIoU %':>7}", rule]
    lines += [f"{name:<{w}}  {f(v)}  {f(s['iiou'][name])}" for name, v in s["iou"].items()]
    lines += [rule, f"{'Score Average':<{w}}  {f(s['miou'])}  {f(s['miiou'])}", rule, "",
              f"{'categories':<{w}}  {'IoU %':>7}  {'iIoU %':>7}", rule]
    lines += [f"{cat:<{w}}  {f(v)}  {f(s['category_iiou'][cat])}" for cat, v in s["category_iou"].items()
              if not math.isnan(v) or not math.isnan(s["category_iiou"][cat])]
    lines += [rule, f"{'Score Average':<{w}}  {f(s['category_miou'])}  {f(s['category_miiou'])}", rule,
              f"{'pixel accuracy':<{w}}  {f(s['pixel_acc'])}"]
    return "\n".join(lines)
