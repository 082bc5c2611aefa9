"""`distseg evaluate`: score a run's checkpoint, or a results folder made by any tool, the official way.

A checkpoint is scored on the split's source images (the PNGs the benchmark scores, not re-encoded JPEG
shards) through the same inference path as validation and `distseg predict`
(distseg/inference/segmenter.py), each rank taking every world-th image and the sums reduced over ranks.
Runs whose scheme is `trainid` or `labelid` get the official Cityscapes scores (class and category IoU
and iIoU, distseg/inference/cityscapes_metric.py); other schemes get that scheme's IoU (foreground IoU for
binary schemes). An exported file (`--model`) is scored the same way, its graph in the Segmenter's place
(distseg/flows/exported.py) and its scheme from its metadata.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from distseg.config import inference_precision
from distseg.data.batch import Loader
from distseg.data.loader import build_loader
from distseg.errors import UserError
from distseg.files import atomic_write_json
from distseg.flows.exported import ExportedModel, differences, load_exported
from distseg.flows.images import segment_files, source_root
from distseg.inference.scoring import Scorer, score_loader
from distseg.inference.segmenter import InferenceSpec, Segmenter
from distseg.labels import Scheme, get_scheme
from distseg.runs.run_dir import load_run
from distseg.shards.cityscapes import resolve_root
from distseg.shards.image_files import ImageItem, image_sizes, labelled_items, read_array
from distseg.shards.manifest import check_scheme, load_manifest


def _report(scorer: Scorer, header: str, json_out: str | None, extra: dict) -> dict:
    """Print the scores; returns them with `extra` (what was scored, how), as the JSON file holds them."""
    scores = scorer.scores()
    print(header)
    print(scorer.table(scores))
    if json_out:
        atomic_write_json(Path(json_out), dict(extra, **scores))
        print(f"scores written to {json_out}")
    return dict(extra, **scores)


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
    inputs = _inputs(cfg, scheme, split, shards, workers, acc, lambda: source_root(root, cfg, split))
    scorer = _score(seg, inputs, scheme, cfg.data.val_batch_size, workers, acc)
    if not acc.is_main_process:
        return {}
    header = (f"{loaded.weights} on {split} ({inputs.what}, inference: {seg.spec.describe()}, precision "
              f"{precision})")
    return _report(scorer, header, json_out, {"checkpoint": str(loaded.weights), "split": split,
                                              "inference": seg.spec.describe()})


def score_export(model: str, split: str = "val", root: str | None = None, shards: str | None = None,
                 overrides: tuple[str, ...] = (), json_out: str | None = None, precision: str | None = None,
                 workers: int = 2) -> dict:
    """Score an exported file as `score_checkpoint` scores a run: the same inputs, Segmenter and metric,
    with the run's recorded inference settings (then `overrides`), the scheme from the file's metadata, and
    a `note:` line for each way this differs from the run's own evaluate (distseg/flows/exported.py)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=not torch.cuda.is_available())
    exported = load_exported(model, acc.device)
    exported.check_precision(precision)
    cfg, scheme = exported.config(overrides), exported.info.scheme
    if shards:
        _check_shards_scheme(shards, split, exported)
    inputs = _inputs(cfg, scheme, split, shards, workers, acc, lambda: _given_root(root))
    spec, notes = exported.fit(InferenceSpec.from_config(cfg), inputs.sizes)
    notes += differences(exported, spec)
    seg = exported.segmenter(spec, acc.device)
    scorer = _score(seg, inputs, scheme, cfg.data.val_batch_size, workers, acc)
    if not acc.is_main_process:
        return {}
    for note in notes:
        print(f"note: {note}")
    header = (f"{exported.describe()} on {split} ({inputs.what}, inference: {spec.describe()}, precision "
              f"{exported.info.precision})")
    return _report(scorer, header, json_out, {"model": str(model), "split": split,
                                              "inference": spec.describe(), "notes": notes})


def _given_root(root: str | None) -> tuple[Path, str]:
    """An exported file does not know its run's source data: --root, else $CITYSCAPES_DATASET."""
    return resolve_root(root), "--root" if root else "$CITYSCAPES_DATASET"


def _check_shards_scheme(shards: str, split: str, exported: ExportedModel) -> None:
    man = load_manifest(shards, split)
    try:
        check_scheme(man, exported.info.scheme)
    except UserError:
        have = man["scheme"]["name"]
        raise UserError(f"{shards} holds {split} shards of scheme {have!r} but {exported.path} predicts "
                        f"scheme {exported.info.scheme.name!r}: score it on shards of its scheme (or labelid "
                        "shards), or on the source images with --root") from None


@dataclass
class _Inputs:
    """What a split is scored on: its source images (`items`) or a shard loader, and how to say so."""

    what: str
    items: list[ImageItem] | None = None
    loader: Loader | None = None
    with_instances: bool = False

    def sizes(self) -> set[tuple[int, int]]:
        """The images' (height, width): the shards' manifest record (empty when it predates it), or the
        source files' headers."""
        if self.loader is None:
            return image_sizes(self.items)
        sizes = self.loader.split.manifest.get("image_sizes", {})
        return {(h, w) for w, h in (map(int, wxh.split("x")) for wxh in sizes)}


def _inputs(cfg, scheme: Scheme, split: str, shards: str | None, workers: int, acc, source) -> _Inputs:
    """The split's shards when `shards` is given, else its source images, under the folder `source()`
    names (with how it was chosen)."""
    if shards:
        cfg.data.shards, cfg.data.num_workers = shards, workers
        loader = build_loader(cfg, split, acc, scheme, train=False)
        return _Inputs(f"{loader.num_samples} images from the shards in {shards}", loader=loader)
    where, how = source()
    items = labelled_items(where, split)
    with_inst = scheme.official and all(it.instances for it in items)
    note = "" if with_inst or not scheme.official else " (no instanceIds files: iIoU not computed)"
    return _Inputs(f"{len(items)} source images in {where} ({how}){note}", items, with_instances=with_inst)


def _score(seg: Segmenter, inputs: _Inputs, scheme: Scheme, batch_size: int, workers: int, acc) -> Scorer:
    if inputs.loader is not None:
        cm, _ = score_loader(seg, inputs.loader, scheme, acc)
        return Scorer(scheme, with_instances=False, confusion=cm)  # shard masks hold scheme classes
    scorer = Scorer(scheme, inputs.with_instances)
    _score_items(seg, scorer, inputs.items[acc.process_index::acc.num_processes], batch_size, workers,
                 acc.is_main_process)
    scorer.reduce(acc)
    return scorer


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
