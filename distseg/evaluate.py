"""`distseg evaluate`: score a run's checkpoint, or a results folder made by any tool, the official way.

A checkpoint is scored on the split's source images (the PNGs the benchmark scores, not re-encoded JPEG
shards) through the same inference path as validation and `distseg predict` (distseg/inference.py), with
each rank taking every world-th image and the sums reduced over ranks. Runs whose scheme is `trainid` or
`labelid` get the official Cityscapes scores (class and category IoU and iIoU, distseg/cityscapes_metric.py);
other schemes get that scheme's IoU (foreground IoU for binary schemes).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distseg.cityscapes_metric import CityscapesMetric
from distseg.cityscapes_metric import format_table as official_table
from distseg.data.cityscapes import resolve_root
from distseg.data.image_files import ImageFiles, ImageItem, labelled_items, raise_errors, read_array
from distseg.data.loader import build_loader
from distseg.data.manifest import manifest_location, read_manifest_text
from distseg.errors import UserError
from distseg.files import atomic_write_json
from distseg.inference import InferenceSpec, Segmenter, segment_images
from distseg.labels import Scheme, get_scheme
from distseg.metrics import ConfusionMatrix
from distseg.metrics import format_table as scheme_table
from distseg.runs import load_run
from distseg.validation import score_loader


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
        t = scheme_table({"iou": dict(enumerate(scores["iou"].values())), "miou": scores["miou"],
                          "pixel_acc": scores["pixel_acc"]}, list(scores["iou"]))
        if "foreground_iou" in scores:
            fg = scores["foreground_iou"]
            t += f"\n{'foreground IoU':<16}{'  n/a' if math.isnan(fg) else f'{100 * fg:8.2f}'}"
        return t


def _report(scorer: Scorer, header: str, json_out: str | None, extra: dict) -> dict:
    scores = scorer.scores()
    print(header)
    print(scorer.table(scores))
    if json_out:
        atomic_write_json(Path(json_out), dict(extra, **scores))
        print(f"scores written to {json_out}")
    return scores


def eval_root(root: str | None, cfg, split: str) -> Path:
    """--root, else the Cityscapes folder the run's shards were made from, else $CITYSCAPES_DATASET."""
    if root:
        return resolve_root(root)
    try:
        loc = manifest_location(cfg.data.shards, split)
        source = json.loads(read_manifest_text(loc, split))["params"]["source"]
        if Path(source, "gtFine", split).is_dir():
            return Path(source)
    except (OSError, ValueError, KeyError, UserError):
        pass
    if os.environ.get("CITYSCAPES_DATASET"):
        return resolve_root(None)
    raise UserError(f"where are the {split} images? pass --root CITYSCAPES (the run's shards do not name an "
                    "existing source folder), or --shards to score the shards")


def score_checkpoint(run: str, checkpoint: str = "best", split: str | None = None, root: str | None = None,
                     shards: str | None = None, overrides: tuple[str, ...] = (), json_out: str | None = None,
                     precision: str | None = None, workers: int = 2, weights: str = "auto") -> dict:
    """Score a run's weights on a split's source images (or on shards when `shards` is given)."""
    from accelerate import Accelerator

    loaded = load_run(run, checkpoint, overrides, weights)
    cfg, scheme = loaded.cfg, loaded.scheme
    split = split or cfg.data.val_split
    precision = precision or cfg.train.mixed_precision
    acc = Accelerator(cpu=not torch.cuda.is_available())
    seg = Segmenter(loaded.model.to(acc.device), InferenceSpec.from_config(cfg), cfg.data.mean, cfg.data.std,
                    acc.device, precision, cfg.model.channels_last)
    if shards:
        cfg.data.shards, cfg.data.num_workers = shards, workers
        loader = build_loader(cfg, split, acc, scheme, train=False)
        cm, _ = score_loader(seg, loader, scheme, acc)
        scorer = Scorer(scheme, with_instances=False, confusion=cm)  # shard masks hold scheme classes
        what = f"{loader.num_samples} images from the shards in {shards}"
    else:
        items = labelled_items(eval_root(root, cfg, split), split)
        with_inst = scheme.official and all(it.instances for it in items)
        scorer = Scorer(scheme, with_inst)
        _score_items(seg, scorer, items[acc.process_index::acc.num_processes], cfg.data.val_batch_size,
                     workers,
                     acc.is_main_process)
        scorer.reduce(acc)
        what = f"{len(items)} source images" + ("" if with_inst or not scorer.official else
                                                 " (no instanceIds files: iIoU not computed)")
    if not acc.is_main_process:
        return {}
    header = f"{loaded.weights} on {split} ({what}, inference: {seg.spec.describe()}, precision {precision})"
    return _report(scorer, header, json_out, {"checkpoint": str(loaded.weights), "split": split,
                                              "inference": seg.spec.describe()})


def _score_items(seg: Segmenter, scorer: Scorer, items: list[ImageItem], batch_size: int, workers: int,
                 progress: bool) -> None:
    loader = torch.utils.data.DataLoader(ImageFiles(items, with_gt=True), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    with tqdm(total=len(items), desc="evaluate", unit="img",
              disable=not (progress and sys.stderr.isatty())) as bar:
        for batch in loader:
            raise_errors(batch)
            for it, cls in zip(batch, segment_images(seg, [b["image"] for b in batch])):
                item = items[it["index"]]
                scorer.add_classes(cls.cpu().numpy().astype(np.uint8), it["gt"], it["instances"],
                                   str(item.image))
            bar.update(len(batch))


_KEY = re.compile(r"^(.+?_\d{6}_\d{6})")


def match_results(results: Path, items: list[ImageItem]) -> list[Path]:
    """The one prediction per ground truth, found as the official script finds it: a `<key>*.png` anywhere
    under `results`. None or several -> one error naming the ground truth."""
    if not results.is_dir():
        raise UserError(f"results folder not found: {results}")
    found: dict[str, list[Path]] = {}
    for p in results.rglob("*.png"):
        m = _KEY.match(p.name)
        if m:
            found.setdefault(m.group(1), []).append(p)
    out = []
    for it in items:
        hits = found.get(it.key, [])
        if not hits:
            raise UserError(f"no prediction for ground truth {it.gt} (expected {it.key}*.png under "
                            f"{results})")
        if len(hits) > 1:
            names = ", ".join(str(h.relative_to(results)) for h in sorted(hits)[:3])
            raise UserError(f"several predictions for ground truth {it.gt}: {names}; keep one per image "
                            "(colour masks and overlays belong in another folder)")
        out.append(hits[0])
    return out


def score_results(results: str, root: str | None, split: str = "val", scheme: str = "trainid",
                  json_out: str | None = None) -> dict:
    """Score a folder of result PNGs against a Cityscapes split's ground truth, one image at a time."""
    sch = get_scheme(scheme)
    items = labelled_items(resolve_root(root), split)
    preds = match_results(Path(results), items)
    scorer = Scorer(sch, with_instances=sch.official and all(it.instances for it in items))
    for it, p in tqdm(list(zip(items, preds)), desc="evaluate", unit="img", disable=not sys.stderr.isatty()):
        gt = read_array(it.gt, "ground truth")
        inst = read_array(it.instances, "instance ids") if it.instances else None
        scorer.add_result(read_array(p, "prediction"), gt, inst, str(p))
    header = f"{results} against {split} ground truth ({len(items)} images, scheme {sch.name})"
    return _report(scorer, header, json_out, {"results": str(results), "split": split})
