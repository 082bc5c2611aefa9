"""A run's record, `summary.json`: written by the training loop at the end of every process that trained,
read by `distseg inspect`, the report, the experiment table and `bench e2e` — all through `RunSummary`.

Versions: 2 (this one) names its version; 1 (no `version` key) has the same fields, or fewer in its
earliest form: the seed's (`best_miou`) reads with the mIoU as its score, and one without `finished`
reads as finished unless preempted or interrupted (those runs ended at their last step otherwise). Keys
a newer version adds are kept in `extra` and written back unchanged, so an older reader never loses them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from distseg.files import atomic_write_json

SUMMARY_VERSION = 2


@dataclass
class RunSummary:
    """summary.json. Scores are fractions; classes absent from the validation split are null."""

    name: str = ""
    steps: int = 0  # optimizer steps done
    epochs: int = 0  # epochs completed
    best_score: float = -1.0  # the best validation's ranking score (inference/metrics.headline), -1 if none
    best_score_name: str | None = None  # mIoU, or the foreground class's IoU for a binary scheme
    best_epoch: int = 0
    best_step: int = 0
    best: dict = field(default_factory=dict)  # that validation's scores: iou per class, miou, pixel_acc, ...
    final_miou: float | None = None  # the last validation's
    final_pixels: int | None = None
    final_iou: dict = field(default_factory=dict)
    seconds: float = 0.0  # training time over all segments
    img_per_s: float = 0.0
    processes: int = 1
    preempted: bool = False  # stopped by a scheduler's signal or the stop file, checkpointed
    interrupted: bool = False  # stopped by Ctrl-C, checkpointed
    finished: bool = False  # reached its last step
    history: list = field(default_factory=list)  # one {"epoch", "step", "score"} per validation
    segments: list = field(default_factory=list)  # one per process that trained (runs/checkpoint.RunState)
    timing: dict = field(default_factory=dict)  # training/timing.RunClock.summary()
    streams: list = field(default_factory=list)  # data.streams: {shards, split, weight, samples, images}
    sampling: dict = field(default_factory=dict)  # data.sampling=rare: its settings and draws per class
    trackers: dict = field(default_factory=dict)  # train.trackers: per tracker its run id, failures and
    # last logged step of each kind (training/trackers.py)
    distseg_version: str | None = None
    git_commit: str | None = None
    config_sha256: str | None = None
    version: int = SUMMARY_VERSION
    extra: dict = field(default_factory=dict)  # keys of a newer version, kept as they were

    def with_provenance(self, provenance: dict) -> RunSummary:
        """Itself with runs/run_dir.provenance's fields (a key this type does not name goes to `extra`)."""
        return RunSummary.from_dict({**self.to_dict(), **provenance})

    @property
    def outcome(self) -> str:
        """finished, preempted, interrupted or stopped early."""
        return ("finished" if self.finished else "preempted" if self.preempted else
                "interrupted" if self.interrupted else "stopped early")

    def to_dict(self) -> dict:
        """The JSON object (extra keys at the top level, as they were read)."""
        data = asdict(self)
        return {**{k: v for k, v in data.items() if k != "extra"}, **self.extra}

    def write(self, path: Path) -> None:
        """Atomically: a reader never sees half a summary."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> RunSummary:
        """Any version's JSON object (see the module)."""
        data = dict(data)
        if "best_score" not in data and "best_miou" in data:  # the seed's
            data["best_score"], data["best_score_name"] = data.pop("best_miou"), "mIoU"
        if "finished" not in data:  # written before it was recorded: such runs ended at their last step
            data["finished"] = not data.get("preempted", False) and not data.get("interrupted", False)
        data.setdefault("version", 1)
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in data.items() if k in known},
                   extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def read(cls, path: Path) -> RunSummary | None:
        """The summary at `path`, None when it is absent or not a summary (a half-copied file)."""
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        return cls.from_dict(data) if isinstance(data, dict) else None
