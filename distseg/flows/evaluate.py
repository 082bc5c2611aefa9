"""`distseg evaluate`: score a run's checkpoint, or a results folder made by any tool, the official way.

A checkpoint is scored on the split's source images (the PNGs the benchmark scores, not re-encoded JPEG
shards) through the same inference path as validation and `distseg predict`
(distseg/inference/segmenter.py), each rank taking every world-th image and the sums reduced over ranks.
Runs whose scheme is `trainid` or `labelid` get the official Cityscapes scores (class and category IoU
and iIoU, distseg/inference/cityscapes_metric.py); other schemes get that scheme's IoU (foreground IoU for
binary schemes).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from distseg.config import inference_precision
from distseg.data.loader import build_loader
from distseg.errors import UserError
from distseg.files import atomic_write_json
from distseg.flows.images import segment_files, source_root
from distseg.inference.scoring import Scorer, score_loader
from distseg.inference.segmenter import Segmenter
from distseg.labels import get_scheme
from distseg.runs.run_dir import load_run
from distseg.shards.cityscapes import resolve_root
from distseg.shards.image_files import ImageItem, labelled_items, read_array


def _report(scorer: Scorer, header: str, json_out: str | None, extra: dict) -> dict:
    scores = scorer.scores()
    print(header)
    print(scorer.table(scores))
    if json_out:
        atomic_write_json(Path(json_out), dict(extra, **scores))
        print(f"scores written to {json_out}")
    return scores


def score_checkpoint(run: str, checkpoint: str = "best", split: str | None = None, root: str | None = None,
                     shards: str | None = None, overrides: tuple[str, ...] = (), json_out: str | None = None,
                     precision: str | None = None, workers: int = 2, weights: str = "auto") -> dict:
    """Score a run's weights on a split's source images (or on shards when `shards` is given)."""
    from accelerate import Accelerator

    loaded = load_run(run, checkpoint, overrides, weights)
    cfg, scheme = loaded.cfg, loaded.scheme
    split = split or cfg.data.val_split
    precision = inference_precision(precision, cfg)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    seg = Segmenter.from_config(loaded.model.to(acc.device), cfg, acc.device, precision)
    if shards:
        cfg.data.shards, cfg.data.num_workers = shards, workers
        loader = build_loader(cfg, split, acc, scheme, train=False)
        cm, _ = score_loader(seg, loader, scheme, acc)
        scorer = Scorer(scheme, with_instances=False, confusion=cm)  # shard masks hold scheme classes
        what = f"{loader.num_samples} images from the shards in {shards}"
    else:
        where, how = source_root(root, cfg, split)
        items = labelled_items(where, split)
        with_inst = scheme.official and all(it.instances for it in items)
        scorer = Scorer(scheme, with_inst)
        _score_items(seg, scorer, items[acc.process_index::acc.num_processes], cfg.data.val_batch_size,
                     workers,
                     acc.is_main_process)
        scorer.reduce(acc)
        what = f"{len(items)} source images in {where} ({how})" + ("" if with_inst or not scorer.official else
                                                 " (no instanceIds files: iIoU not computed)")
    if not acc.is_main_process:
        return {}
    header = f"{loaded.weights} on {split} ({what}, inference: {seg.spec.describe()}, precision {precision})"
    return _report(scorer, header, json_out, {"checkpoint": str(loaded.weights), "split": split,
                                              "inference": seg.spec.describe()})


def _score_items(seg: Segmenter, scorer: Scorer, items: list[ImageItem], batch_size: int, workers: int,
                 progress: bool) -> None:
    for item, sample, classes in segment_files(seg, items, batch_size, workers, "evaluate", progress,
                                               with_gt=True):
        scorer.add_classes(classes, sample["gt"], sample["instances"], str(item.image))


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
