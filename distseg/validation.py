"""Score a model over a loader's batches, sample-exact: padded samples count nowhere and the confusion
matrix is summed over ranks. Used by validation during training and by `distseg evaluate --shards`."""

from __future__ import annotations

import torch

from distseg.data.loader import masked_targets
from distseg.inference import Segmenter
from distseg.labels import Scheme
from distseg.metrics import ConfusionMatrix


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
