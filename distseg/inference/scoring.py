"""Scores. `score_loader`: a model over a loader's batches, sample-exact (padded samples count nowhere, the
confusion matrix is summed over ranks), for validation during training and `distseg evaluate --shards`.
`Scorer`: class maps or result files against label-id ground truth, the official Cityscapes metric for
label-id schemes and the scheme's own IoU otherwise, for `distseg evaluate`."""

from __future__ import annotations

import numpy as np
import torch

from distseg.data.batch import masked_targets
from distseg.errors import UserError
from distseg.inference.cityscapes_metric import CityscapesMetric
from distseg.inference.cityscapes_metric import format_table as official_table
from distseg.inference.metrics import ConfusionMatrix
from distseg.inference.metrics import format_table as scheme_table
from distseg.inference.segmenter import Segmenter
from distseg.labels import Scheme


@torch.no_grad()
def score_loader(segmenter: Segmenter, loader, scheme: Scheme, accelerator, n_examples: int = 0):
    """(ConfusionMatrix summed over ranks, up to `n_examples` (image, ground truth, prediction) on CPU)."""
    model = segmenter.model
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(scheme.num_classes, accelerator.device)
    examples = []
    loader.set_epoch(0)
    for b in loader:
        mask = masked_targets(b)
        pred = segmenter.classes(b["image"], mask.shape[-2:])
        cm.update(pred, mask)
        for i in range(len(pred)):
            if len(examples) < n_examples and bool(b["valid"][i]):
                examples.append((b["image"][i].float().cpu(), b["mask"][i].cpu(), pred[i].cpu()))
    cm.reduce(accelerator)
    model.train(was_training)
    return cm, examples


class Scorer:
    """Official metric for label-id schemes, the scheme's own confusion matrix otherwise."""

    def __init__(self, scheme: Scheme, with_instances: bool, confusion: ConfusionMatrix | None = None):
        self.scheme = scheme
        self.official = scheme.official and confusion is None
        self.metric = confusion or (CityscapesMetric(with_instances) if self.official
                                    else ConfusionMatrix(scheme.num_classes))
        self.export = scheme.export_lut()

    def add_classes(self, classes: np.ndarray, gt_ids: np.ndarray, instances, name: str) -> None:
        """A model's class map (scheme classes) against labelIds ground truth."""
        if self.official:
            self.metric.add(self.export[classes], gt_ids, instances, name)
        else:
            self.metric.update(torch.from_numpy(classes.astype(np.int64)),
                               torch.from_numpy(self.scheme.remap(gt_ids).astype(np.int64)))

    def add_result(self, pred: np.ndarray, gt_ids: np.ndarray, instances, name: str) -> None:
        """A results file: label ids (official schemes) or the scheme's class values."""
        if self.official:
            self.metric.add(pred, gt_ids, instances, name)
            return
        if pred.ndim != 2 or pred.shape != gt_ids.shape:
            raise UserError(f"{name}: a single-channel class map of the ground truth's size is needed")
        if int(pred.max(initial=0)) >= self.scheme.num_classes:
            raise UserError(f"{name} holds class {int(pred.max())}; scheme {self.scheme.name} has "
                            f"{self.scheme.num_classes} classes")
        self.add_classes(pred, gt_ids, None, name)

    def reduce(self, accelerator) -> None:
        """Sum every rank's counts (each rank scored disjoint images)."""
        if accelerator is None or accelerator.num_processes == 1:
            return
        if self.official:
            v = torch.from_numpy(self.metric.state()).to(accelerator.device)
            self.metric.load_state(accelerator.reduce(v, reduction="sum").cpu().numpy())
        else:
            self.metric.reduce(accelerator)

    def scores(self) -> dict:
        """Official scores, or the scheme's {"iou", "miou", "pixel_acc", ...} (+ foreground_iou if binary)."""
        if self.official:
            return dict(self.metric.scores(), scheme=self.scheme.name, official=True)
        s = self.metric.scores(self.scheme.eval_classes)
        out = {"scheme": self.scheme.name, "official": False,
               "iou": {self.scheme.class_names[c]: v for c, v in s["iou"].items()},
               "miou": s["miou"], "pixel_acc": s["pixel_acc"], "pixels": s["pixels"],
               "confusion": self.metric.mat.cpu().tolist()}
        if self.scheme.num_classes == 2:
            out["foreground_iou"] = s["iou"][1]
        return out

    def table(self, scores: dict) -> str:
        """The printed result table."""
        if self.official:
            return official_table(scores)
        extra = {"foreground IoU": scores["foreground_iou"]} if "foreground_iou" in scores else None
        return scheme_table({"iou": dict(enumerate(scores["iou"].values())), "miou": scores["miou"],
                             "pixel_acc": scores["pixel_acc"]}, list(scores["iou"]), extra=extra)
