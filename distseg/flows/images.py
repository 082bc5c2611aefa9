"""What `evaluate` (on a split's source images) and `predict` share: where a run's source images are, and
the one loop that segments image files. DataLoader workers decode (a damaged file comes back as data and is
raised here as one line), images of one size run as one batch through the Segmenter, and a bar shows
progress on a terminal."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from distseg.config import Config
from distseg.errors import UserError
from distseg.inference.segmenter import Segmenter, segment_images
from distseg.processes import usable_workers
from distseg.shards.cityscapes import resolve_root
from distseg.shards.image_files import ImageFiles, ImageItem, raise_errors
from distseg.shards.manifest import manifest_location, read_manifest_text


def source_root(root: str | None, cfg: Config, split: str) -> tuple[Path, str]:
    """The Cityscapes folder of a split's source images and how it was chosen: --root, else the folder the
    run's shards were made from (when it still has the split), else $CITYSCAPES_DATASET."""
    if root:
        return resolve_root(root), "--root"
    try:
        loc = manifest_location(cfg.data.shards, split)
        source = json.loads(read_manifest_text(loc, split))["params"]["source"]
        if Path(source, "gtFine", split).is_dir():
            return Path(source), "the run's source data"
    except (OSError, ValueError, KeyError, UserError):
        pass
    if os.environ.get("CITYSCAPES_DATASET"):
        return resolve_root(None), "$CITYSCAPES_DATASET"
    raise UserError(f"where are the {split} images? pass --root CITYSCAPES (the run's shards do not name an "
                    "existing source folder)")


def segment_files(seg: Segmenter, items: list[ImageItem], batch_size: int, workers: int, desc: str,
                  progress: bool = True, with_gt: bool = False
                  ) -> Iterator[tuple[ImageItem, dict, np.ndarray]]:
    """(item, its decoded sample {"image", and "gt"/"instances" with `with_gt`}, uint8 class map) for every
    item, in batches of `batch_size` decoded by `workers` processes."""
    loader = torch.utils.data.DataLoader(ImageFiles(items, with_gt=with_gt), batch_size=batch_size,
                                         num_workers=usable_workers(workers, "--workers"), collate_fn=list)
    with tqdm(total=len(items), desc=desc, unit="img", disable=not (progress and sys.stderr.isatty())) as bar:
        for batch in loader:
            raise_errors(batch)
            for sample, cls in zip(batch, segment_images(seg, [b["image"] for b in batch])):
                yield items[sample["index"]], sample, cls.cpu().numpy().astype(np.uint8)
            bar.update(len(batch))
