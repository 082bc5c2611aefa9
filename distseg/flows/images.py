"""The one loop that segments image files, shared by `evaluate` (on a split's source images) and `predict`:
DataLoader workers decode (a damaged file comes back as data and is raised here as one line), images of one
size run as one batch through the Segmenter, and a bar shows progress on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from distseg.data.image_files import ImageFiles, ImageItem, raise_errors
from distseg.inference.segmenter import Segmenter, segment_images


def segment_files(seg: Segmenter, items: list[ImageItem], batch_size: int, workers: int, desc: str,
                  progress: bool = True, with_gt: bool = False
                  ) -> Iterator[tuple[ImageItem, dict, np.ndarray]]:
    """(item, its decoded sample {"image", and "gt"/"instances" with `with_gt`}, uint8 class map) for every
    item, in batches of `batch_size` decoded by `workers` processes."""
    loader = torch.utils.data.DataLoader(ImageFiles(items, with_gt=with_gt), batch_size=batch_size,
                                         num_workers=workers, collate_fn=list)
    with tqdm(total=len(items), desc=desc, unit="img", disable=not (progress and sys.stderr.isatty())) as bar:
        for batch in loader:
            raise_errors(batch)
            for sample, cls in zip(batch, segment_images(seg, [b["image"] for b in batch])):
                yield items[sample["index"]], sample, cls.cpu().numpy().astype(np.uint8)
            bar.update(len(batch))
