"""From images to class maps and scores: the Segmenter (whole / slide / flip / scales), scoring over batches,
the confusion-matrix metrics and the official Cityscapes metric, and pictures of predictions.

Takes tensors and batches; never builds a loader or reads a run folder. Imports the leaves, `data` (the batch
contract) and `models`."""
