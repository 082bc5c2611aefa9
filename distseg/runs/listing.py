"""`distseg inspect RUN`: what a run folder holds, in the words the training log uses (epochs, percent).

Checkpoints are named by optimizer step (the unit every resume needs); the listing puts each one's epoch
beside it, says whether it is an epoch end or mid-epoch, and names the checkpoint `best/` was taken from,
so nobody has to open trainer_state.json to match them up.
"""

from __future__ import annotations

import json
from pathlib import Path

from distseg import run_files as files
from distseg.errors import UserError
from distseg.inference.metrics import percent
from distseg.runs.checkpoint import damage, list_checkpoints, read_state
from distseg.runs.run_dir import RunDir


def folder_bytes(path: Path) -> int:
    """Bytes of the files under a folder."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def checkpoint_rows(run: RunDir) -> list[str]:
    """One line per complete checkpoint: name, step, position (epoch end or mid-epoch), size, or damage."""
    rows = []
    for ck in list_checkpoints(run.checkpoints):
        broken = damage(ck)
        if broken:
            rows.append(f"  {ck.name}  damaged: {broken}")
            continue
        st = read_state(ck)
        rows.append(f"  {ck.name}  step {st.step:>6}  {st.position():<26}{folder_bytes(ck) / 1e6:>9.1f} MB")
    return rows or ["  (none yet)"]


def best_line(run: RunDir) -> str:
    """Where best/ came from: step, epoch (end or mid-epoch), score, and whether its checkpoint is kept."""
    try:
        meta = json.loads((run.best / files.META).read_text())
    except (OSError, ValueError):
        return "best: none yet (no validation has finished)"
    epoch = meta["epoch"]
    where = f"end of epoch {epoch}" if meta.get("epoch_end", True) else f"epoch {epoch + 1}, mid-epoch"
    kept = (run.checkpoints / meta["checkpoint"]).is_dir() if "checkpoint" in meta else False
    score = percent(meta.get("score"), unit="%")
    return (f"best: {meta.get('score_name', 'score')} {score} at step {meta['step']} "
            f"({where}); checkpoint {meta.get('checkpoint', '?')} "
            f"{'kept' if kept else 'pruned (train.keep_last)'}")


def summary_lines(run: RunDir) -> list[str]:
    """The summary's totals and segments, or what is known without one."""
    s = run.read_summary()
    if s is None:
        return ["summary: none yet (written when a training process ends)"]
    lines = [f"summary: {s.outcome}, {s.steps} steps, {s.epochs} epochs, {s.seconds:.0f} s, "
             f"{s.img_per_s:.1f} img/s over {len(s.segments)} segment(s)"]
    for g in s.segments:
        lines.append(f"  {g['start']} -> {g['end']}: steps {g['first_step']}-{g['last_step']}, "
                     f"{g['seconds']:.0f} s, {g['processes']} process(es)")
    if s.git_commit or s.distseg_version:
        lines.append(f"made by distseg {s.distseg_version} at commit {s.git_commit or 'unknown'}")
    return lines


def describe_run(path: Path) -> str:
    """The inspect listing of a run folder."""
    run = RunDir(path).require()
    if not run.checkpoints.is_dir() and not run.summary.is_file():
        raise UserError(f"{path} has no checkpoints yet: train first")
    head = f"run {run.path} (config {run.config})"
    return "\n".join([head, "checkpoints:", *checkpoint_rows(run), best_line(run), *summary_lines(run)])
