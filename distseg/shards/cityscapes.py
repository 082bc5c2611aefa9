"""Find and validate (image, labelIds) pairs in a Cityscapes tree, before any work starts.

Labels are fine (gtFine: train, val, test) or coarse (gtCoarse: train, val and train_extra, the 19,998 images
that have coarse labels only); both name their files `<city>_<seq>_<frame>_<gtFine|gtCoarse>_labelIds.png`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distseg.errors import UserError

IMG_SUFFIX = "_leftImg8bit.png"
SPLITS = ("train", "val", "test", "train_extra")
LABELS = {"fine": "gtFine", "coarse": "gtCoarse"}  # --labels: the ground-truth folder it reads
COARSE_ONLY = ("train_extra",)  # splits Cityscapes labels coarsely only


def label_suffix(labels: str = "fine") -> str:
    """The end of a labelIds file's name: `_gtFine_labelIds.png` or `_gtCoarse_labelIds.png`."""
    return f"_{LABELS[labels]}_labelIds.png"


def check_labels(split: str, labels: str, hint: str = "") -> None:
    """One line for labels a split cannot have (an unknown kind, fine labels of train_extra, coarse ones
    of test), ending with `hint`, the caller's way out."""
    if labels not in LABELS:
        raise UserError(f"--labels must be one of {', '.join(LABELS)}, not {labels!r}")
    if labels == "fine" and split in COARSE_ONLY:
        raise UserError(f"split {split!r} has coarse labels only (gtCoarse/{split}; Cityscapes has no "
                        f"gtFine/{split}){hint}")
    if labels == "coarse" and split == "test":
        raise UserError("split 'test' has no coarse labels (Cityscapes' gtCoarse holds train, val and "
                        "train_extra): shard it with --labels fine")


@dataclass(frozen=True)
class Pair:
    """One camera image and its labelIds file (fine or coarse)."""
    key: str  # <city>_<seq>_<frame>: unique, no dots (WebDataset splits keys at the first dot)
    city: str
    image: Path
    label: Path


def resolve_root(root: str | os.PathLike | None) -> Path:
    """The dataset root from --root or $CITYSCAPES_DATASET, checked to exist."""
    if root is None or str(root) == "":
        root = os.environ.get("CITYSCAPES_DATASET")
        if not root:
            raise UserError("no dataset root: pass --root or set CITYSCAPES_DATASET "
                            "(try `distseg synth --out data/cityscapes` for synthetic data)")
    p = Path(root)
    if not p.is_dir():
        raise UserError(f"dataset root not found: {p}")
    if not (p / "leftImg8bit").is_dir():
        raise UserError(f"{p} is not a Cityscapes tree: it has no leftImg8bit/ folder")
    return p


def find_pairs(root: Path, split: str, labels: str = "fine") -> list[Pair]:
    """All pairs of one split with `labels` (fine: gtFine, coarse: gtCoarse), sorted by key; every image
    must have its label file."""
    check_labels(split, labels)
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        have = sorted(d.name for d in (root / "leftImg8bit").iterdir() if d.is_dir())
        raise UserError(f"split {split!r} not found under {root / 'leftImg8bit'} (found: "
                        f"{', '.join(have) or 'none'})")
    gt_dir = root / LABELS[labels] / split
    if not gt_dir.is_dir():
        if labels == "coarse":
            raise UserError(f"no coarse labels: {gt_dir} not found (the gtCoarse download; `distseg synth "
                            "--extra N` writes synthetic ones)")
        if (root / LABELS["coarse"] / split).is_dir():
            raise UserError(f"split {split!r} has no {gt_dir.relative_to(root)} under {root}, only "
                            f"gtCoarse/{split} (`distseg shard --labels coarse` reads it)")
    pairs, missing = [], []
    for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
        city = img.parent.name
        key = img.name[: -len(IMG_SUFFIX)]
        if "." in key:
            raise UserError(f"image name has a dot in its key, which WebDataset cannot split: {img}")
        label = gt_dir / city / f"{key}{label_suffix(labels)}"
        if not label.is_file():
            missing.append(label)
            continue
        pairs.append(Pair(key, city, img, label))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise UserError(f"missing label file {missing[0]}{more}")
    if not pairs:
        raise UserError(f"no images matching */*{IMG_SUFFIX} in {img_dir}")
    keys = [p.key for p in pairs]
    if len(set(keys)) != len(keys):
        raise UserError(f"duplicate image keys in {img_dir}")
    return pairs
