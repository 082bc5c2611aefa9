"""TensorBoard: a writer on rank 0 only, whose write failures (a full disk) stop every rank with one line."""

from __future__ import annotations

import threading


class NullWriter:
    """Stands in for SummaryWriter on ranks other than 0: every call does nothing."""

    failure = None

    def __getattr__(self, name):
        return lambda *a, **k: None


class EventWriter:
    """A SummaryWriter that keeps its first write failure instead of raising it. TensorBoard writes on a
    thread and re-raises a full disk at some later call (an add_scalar, an add_image in validation, close);
    the loop instead checks `failure` at every step, so that all ranks stop together with one line."""

    def __init__(self, log_dir, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir, self.failure = log_dir, None
        self._w = SummaryWriter(str(log_dir), purge_step=purge_step)

    def __getattr__(self, name):
        method = getattr(self._w, name)

        def call(*args, **kwargs):
            if self.failure is not None:
                return None
            try:
                return method(*args, **kwargs)
            except Exception as e:  # OSError from the writer thread, "Writer is closed" after it
                self.failure = e
                return None
        return call


def _quiet_writer_threads(args) -> None:
    """threading.excepthook: TensorBoard's writer thread dies of a full disk with a traceback; EventWriter
    reports that error as one line, so the traceback is left out. Other threads keep the default hook."""
    if type(args.thread).__name__ == "_AsyncWriterThread":
        return
    threading.__excepthook__(args)


def make_writer(log_dir, enabled: bool, purge_step: int | None = None):
    """An EventWriter on rank 0, a NullWriter elsewhere. purge_step (a resumed run's first new step) tells
    TensorBoard to hide the points at and after it that an earlier process wrote before it was killed, so
    a resumed curve has one point per step."""
    if not enabled:
        return NullWriter()
    threading.excepthook = _quiet_writer_threads
    return EventWriter(log_dir, purge_step)


def score_tag(class_names: list[str]) -> str:
    """The TensorBoard tag of the score that ranks checkpoints (distseg.inference.metrics.headline): the
    foreground class's IoU for a binary scheme, the mIoU otherwise."""
    return f"val_iou/{class_names[1]}" if len(class_names) == 2 else "val/mIoU"
