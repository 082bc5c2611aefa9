"""Find and validate (image, labelIds) pairs in a Cityscapes tree, before any work starts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from distseg.errors import UserError

IMG_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Pair:
    """One camera image and its labelIds file."""
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


def find_pairs(root: Path, split: str) -> list[Pair]:
    """All pairs of one split, sorted by key; every image must have its label file."""
    img_dir = root / "leftImg8bit" / split
    if not img_dir.is_dir():
        have = sorted(d.name for d in (root / "leftImg8bit").iterdir() if d.is_dir())
        raise UserError(f"split {split!r} not found under {root / 'leftImg8bit'} (found: "
                        f"{', '.join(have) or 'none'})")
    pairs, missing = [], []
    for img in sorted(img_dir.glob(f"*/*{IMG_SUFFIX}")):
        city = img.parent.name
        key = img.name[: -len(IMG_SUFFIX)]
        if "." in key:
            raise UserError(f"image name has a dot in its key, which WebDataset cannot split: {img}")
        label = root / "gtFine" / split / city / f"{key}{LABEL_SUFFIX}"
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
