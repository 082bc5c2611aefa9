"""What every rank learns from one optimizer step, in one all-reduce: the step's sums and the stop reasons.

The rule they follow: **read one step late.** `train_step` packs the flags and queues their all-reduce on
the device, and the host goes on to fetch and queue the next step; only then (`OneStepLate.swap`) does it
read the previous step's numbers, which are ready by then, so no step waits for the host. Before a
checkpoint, validation or the end, the held flags are read at once (`OneStepLate.take`). Every rank reads
the same reduced numbers, so every rank stops, raises or checkpoints alike.

A new per-step sum or stop reason is a field of `StepFlags` (its place in the vector follows from the
field order, wherever it stands; its origin from its `kind`) and, for a host flag, its source in
`host_values`; what a stop reason does is `settle`'s (distseg/training/loop.py).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields

import torch

DEVICE, HOST = "device", "host"


def _slot(kind: str, doc: str):
    return field(default=0.0, metadata={"kind": kind, "doc": doc})


@functools.cache
def _zeros(n: int, device: torch.device) -> torch.Tensor:
    """The host slots of a step where no flag is up, kept on the device (torch.cat copies it, nobody writes
    into it)."""
    return torch.zeros(n, device=device)


def nonfinite(x: torch.Tensor) -> torch.Tensor:
    """1.0 where `x` is NaN or infinite, else 0.0 (float32, as `isfinite(x).logical_not().float()`): x - x
    is +0 for a finite x and NaN for NaN or ±inf, and NaN becomes 1. Two operators where isfinite, its
    negation and the conversion are six (eq, abs, ne, mul, logical_not, to float), at every step."""
    return (x - x).nan_to_num_(nan=1.0)


@dataclass(frozen=True)
class StepFlags:
    """One step's all-reduced numbers (sums over ranks). Device slots are computed from the step's batches,
    host slots are this rank's flags at the step (0 or 1 before the reduce, a count of ranks after)."""

    loss_sum: float = _slot(DEVICE, "the step's summed pixel loss")
    norm: float = _slot(DEVICE, "its normaliser: labelled pixels (summed class weights; OHEM: kept pixels)")
    images: float = _slot(DEVICE, "valid images (padding excluded)")
    corrupt: float = _slot(DEVICE, "samples skipped as undecodable (data.on_corrupt=skip)")
    nonfinite: float = _slot(DEVICE, "ranks whose loss was NaN or infinite")
    stop: float = _slot(HOST, "ranks asked to stop (a signal or the stop file)")
    ctrl_c: float = _slot(HOST, "... of them by Ctrl-C")
    lease_lost: float = _slot(HOST, "ranks that saw the run folder's lease taken over")
    events_failed: float = _slot(HOST, "ranks whose TensorBoard writer failed")
    ckpt_busy: float = _slot(HOST, "ranks still writing their checkpoint files")
    ckpt_failed: float = _slot(HOST, "ranks whose checkpoint write failed")

    @classmethod
    @functools.cache
    def names(cls, kind: str | None = None) -> tuple[str, ...]:
        """The slots of one kind (None: all), in vector order; found once per class, as every step asks."""
        return tuple(f.name for f in fields(cls) if kind is None or f.metadata["kind"] == kind)

    @classmethod
    @functools.cache
    def summed(cls) -> tuple[str, ...]:
        """The device slots a micro-batch adds to (all but `nonfinite`, which `pack` derives)."""
        return tuple(n for n in cls.names(DEVICE) if n != "nonfinite")

    @classmethod
    def sums(cls, device, **values: torch.Tensor) -> torch.Tensor:
        """The device sums of one micro-batch, in `summed()` order, to add up over the step. Stacked with
        autograd off rather than each value detached: the loss is the only one with a graph, and a detach
        per value is an operator per slot at every step."""
        if set(values) != set(cls.summed()):
            raise TypeError(f"StepFlags.sums needs exactly {cls.summed()}, got {sorted(values)}")
        v = [values[n] for n in cls.summed()]
        with torch.no_grad():
            return torch.stack([x if x.dim() == 0 else x.reshape(()) for x in v]).to(device, torch.float32)

    @classmethod
    @functools.cache
    def _order(cls) -> torch.Tensor | None:
        """Where each field stands in `pack`'s concatenation (the summed slots, `nonfinite`, the host
        slots), or None where that already is the field order."""
        made = (*cls.summed(), "nonfinite", *cls.names(HOST))
        return None if made == cls.names() else torch.tensor([made.index(n) for n in cls.names()])

    @classmethod
    def pack(cls, sums: torch.Tensor, **host: float) -> torch.Tensor:
        """The whole vector of this rank in field order: the step's summed `sums`, whether its loss is
        finite, and the host flags, copied to the device without waiting for it (from pinned memory on
        CUDA: a pageable copy would wait for the queued steps). One concatenation of three parts: the
        vector is built at every step."""
        if set(host) != set(cls.names(HOST)):
            raise TypeError(f"StepFlags.pack needs exactly {cls.names(HOST)}, got {sorted(host)}")
        at = cls.summed().index("loss_sum")
        loss = sums.narrow(0, at, 1)
        values = [float(host[n]) for n in cls.names(HOST)]
        if not any(values):  # nearly every step: no new tensor, no copy to the device
            flags = _zeros(len(values), sums.device)
        else:
            flags = torch.tensor(values)
            if sums.device.type == "cuda":
                flags = flags.pin_memory().to(sums.device, non_blocking=True)
        vector = torch.cat([sums, nonfinite(loss), flags.to(sums.device)])
        order = cls._order()
        return vector if order is None else vector[order.to(vector.device)]

    @staticmethod
    def reduce(vector: torch.Tensor, acc) -> torch.Tensor:
        """Summed over ranks (collective); at one process, the vector itself."""
        return acc.reduce(vector, reduction="sum") if acc.num_processes > 1 else vector

    @classmethod
    def read(cls, vector: torch.Tensor) -> StepFlags:
        """The numbers, on the host (waits for the device to reach them)."""
        return cls(*vector.tolist())

    @classmethod
    def view(cls, vector: torch.Tensor) -> StepFlags:
        """The slots as 0-d tensors on the device, without waiting for them (OHEM's normaliser)."""
        return cls(*vector.unbind())


def host_values(run) -> dict[str, float]:
    """This rank's host slots at this step, from their sources: the stop flag, the lease (its heartbeat
    thread notices a takeover), TensorBoard's writer and the checkpoint writer."""
    busy, failed = run.writer.flags()
    return {"stop": run.stop.set, "ctrl_c": run.stop.interrupted,
            "lease_lost": run.lease is not None and run.lease.lost_to is not None,
            "events_failed": run.tb.failure is not None, "ckpt_busy": busy, "ckpt_failed": failed}


@dataclass(frozen=True)
class Settled:
    """A step's flags as read by the host, with the step and (1-based) epoch they belong to."""

    flags: StepFlags
    step: int
    epoch: int


class OneStepLate:
    """Holds the flags of the step just queued until the host has queued the next one (see the module)."""

    def __init__(self):
        self._held: tuple[torch.Tensor, int, int] | None = None

    def swap(self, vector: torch.Tensor, step: int, epoch: int) -> Settled | None:
        """Hold this step's flags; return the previous step's, read now (None if none were held)."""
        previous = self.take()
        self._held = (vector, step, epoch)
        return previous

    def take(self) -> Settled | None:
        """The held flags, read now, and nothing held after."""
        held, self._held = self._held, None
        if held is None:
            return None
        return Settled(StepFlags.read(held[0]), held[1], held[2])
