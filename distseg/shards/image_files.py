"""Image files for `distseg predict` and `distseg evaluate`: which files an input names, and a Dataset that
decodes them (with their Cityscapes ground truth when scoring).

Decoding errors travel back from DataLoader workers as data, so the user sees one `error:` line naming the
file instead of a worker traceback.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from distseg.errors import UserError
from distseg.shards.cityscapes import IMG_SUFFIX, find_pairs

IMAGE_EXTS = (".png", ".jpg", ".jpeg")
CAMERA = re.compile(r"^(.+_\d{6}_\d{6})_leftImg8bit\.(png|jpe?g)$", re.IGNORECASE)
# ground truth and our own outputs: never inputs to predict
NOT_CAMERA = re.compile(r"_(gtFine|gtCoarse)_|labelIds|instanceIds|labelTrainIds|_pred_"
                        r"|_overlay\.png$|_color\.png$")


@dataclass(frozen=True)
class ImageItem:
    """One input image, with its ground truth files when it has them."""

    image: Path
    key: str  # <city>_<seq>_<frame> for Cityscapes names, else the file's stem
    gt: Path | None = None
    instances: Path | None = None


def key_of(path: Path) -> str:
    """<city>_<seq>_<frame> of a Cityscapes camera image, else the file's stem."""
    m = CAMERA.match(path.name)
    return m.group(1) if m else path.stem


def _images_in(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    camera = [p for p in files if CAMERA.match(p.name)]
    if camera:  # a Cityscapes folder: only the camera images, never gtFine or results files beside them
        return camera
    inputs = [p for p in files if not NOT_CAMERA.search(p.name)]
    if files and not inputs:
        raise UserError(f"{folder} holds only label or result images ({files[0].name}, ...), not camera "
                        "images: "
                        "pass leftImg8bit/<split> or use --root ROOT --split SPLIT")
    return inputs


def find_inputs(inputs: tuple[str, ...] = (), root: str | Path | None = None, split: str | None = None
                ) -> list[ImageItem]:
    """Files, folders (searched recursively) and/or a split of a Cityscapes root, in a stable order."""
    paths: list[Path] = []
    if split is not None:
        if root is None:
            raise UserError("--split needs --root (or $CITYSCAPES_DATASET): the Cityscapes folder")
        folder = Path(root) / "leftImg8bit" / split
        if not folder.is_dir():
            raise UserError(f"split {split!r} not found: no folder {folder}")
        paths += sorted(folder.glob(f"*/*{IMG_SUFFIX}"))
    for s in inputs:
        p = Path(s)
        if p.is_dir():
            paths += _images_in(p)
        elif p.is_file():
            if NOT_CAMERA.search(p.name):
                raise UserError(f"{p} is a label or result image, not a camera image")
            paths.append(p)
        else:
            raise UserError(f"input not found: {p}")
    if not paths:
        raise UserError("no images found in the inputs")
    items, seen = [], {}
    for p in paths:
        key = key_of(p)
        if key in seen and seen[key] != p:
            raise UserError(f"two inputs would write the same result: {seen[key]} and {p}")
        if key not in seen:
            seen[key] = p
            items.append(ImageItem(p, key))
    return items


def labelled_items(root: Path, split: str) -> list[ImageItem]:
    """Every camera image of a split with its labelIds and (when present) instanceIds files."""
    items = []
    for pair in find_pairs(root, split):
        inst = pair.label.with_name(pair.label.name.replace("_labelIds.png", "_instanceIds.png"))
        items.append(ImageItem(pair.image, pair.key, pair.label, inst if inst.is_file() else None))
    return items


def image_sizes(items: list[ImageItem]) -> set[tuple[int, int]]:
    """The distinct (height, width) of the items' images, from their headers (no decoding): what a
    fixed-size exported graph must fit before the first image runs."""
    sizes = set()
    for it in items:
        try:
            with Image.open(it.image) as im:
                sizes.add((im.height, im.width))
        except Exception as e:
            raise UserError(f"cannot read image {it.image}: {e}") from None
    return sizes


def read_rgb(path: Path) -> torch.Tensor:
    """uint8 3 x H x W."""
    from torchvision.io import ImageReadMode, decode_image, read_file

    try:
        return decode_image(read_file(str(path)), ImageReadMode.RGB)
    except Exception as e:  # torchvision raises RuntimeError/ValueError for damaged or unknown files
        raise UserError(f"cannot read image {path}: {str(e).splitlines()[0]}") from None


def read_array(path: Path, what: str) -> np.ndarray:
    """A label, instance or result PNG as a numpy array (16-bit instance ids kept)."""
    try:
        with Image.open(path) as im:
            return np.array(im)
    except Exception as e:
        raise UserError(f"cannot read {what} {path}: {e}") from None


class ImageFiles(Dataset):
    """Decodes item i: {"index", "image" (uint8 3xHxW), and "gt"/"instances" arrays when asked}."""

    def __init__(self, items: list[ImageItem], with_gt: bool = False):
        self.items, self.with_gt = items, with_gt

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        it = self.items[i]
        try:
            out = {"index": i, "image": read_rgb(it.image)}
            if self.with_gt:
                out["gt"] = read_array(it.gt, "ground truth")
                out["instances"] = read_array(it.instances, "instance ids") if it.instances else None
                if out["gt"].shape != tuple(out["image"].shape[1:]):
                    raise UserError(f"size mismatch: image {it.image} and its ground truth {it.gt}")
            return out
        except UserError as e:  # raised again in the main process, as one line
            return {"index": i, "error": str(e)}


def raise_errors(batch: list[dict]) -> list[dict]:
    """Re-raise, in the main process, the first decoding error a worker returned as data."""
    for it in batch:
        if "error" in it:
            raise UserError(it["error"])
    return batch
