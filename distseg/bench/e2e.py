"""`distseg bench e2e`: a whole training run, timed. It starts the real training entry (distseg/train.py, the
same code as `distseg train`, under `python -m distseg.launch` for several processes) into a temporary run
folder, reads the timing block every run writes into summary.json (distseg/training/timing.py), and sets the
whole run's img/s beside the training step alone on synthetic input (`bench train`, the same model, batch
and precision, on this machine, in this call)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from distseg.bench.common import device_name, measure, table
from distseg.bench.train import time_variant
from distseg.bench.tune import changed_line
from distseg.config import flat_settings, load_config
from distseg.errors import UserError
from distseg.labels import get_scheme
from distseg.models import out_channels
from distseg.runs.run_dir import RunDir
from distseg.runs.summary import RunSummary

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train.py"


def step_variant(cfg, cuda: bool) -> str:
    """The `bench train` variant a run's settings amount to."""
    name = {"no": "tf32" if cuda else "fp32", "bf16": "bf16", "fp16": "bf16"}[cfg.train.mixed_precision]
    if cuda and cfg.model.channels_last and name == "bf16":
        name += "+cl"
        if cfg.model.compile:
            name += "+compile"
    return name


def run_training(config: str | None, overrides: list[str], procs: int, folder: Path) -> RunSummary:
    """Train into `folder` with the real entry; returns the run's summary."""
    args = [str(TRAIN_SCRIPT), *(["--config", config] if config else []), *overrides,
            f"output_dir={folder}", "name=e2e", "train.resume=never", "train.progress=false"]
    cmd = [sys.executable, *args] if procs == 1 else \
        [sys.executable, "-m", "distseg.launch", "--multi_gpu", "--num_processes", str(procs),
         "--num_machines", "1", "--dynamo_backend", "no", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    if p.returncode:
        last = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UserError(f"the benchmarked training failed (exit status {p.returncode}): {last}")
    summary = RunDir(folder / "e2e").read_summary()
    if summary is None:
        raise UserError(f"the benchmarked training wrote no readable summary in {folder / 'e2e'}")
    return summary


def model_only_val(cfg, device, images: int = 4) -> float:
    """img/s of the run's inference (Segmenter, eval settings, val batch) alone, on random pixels of the val
    images' size: validation's time beyond this is spent outside the model."""
    from distseg.inference.segmenter import Segmenter
    from distseg.models import build_model
    from distseg.shards.split import open_split

    opened = open_split(cfg.data.shards, cfg.data.val_split, get_scheme(cfg.data.scheme))
    samples = opened.samples(cfg.data, log=lambda *a: None)
    w, h = json.loads(samples.read(0, "json"))["size"]
    model = build_model(cfg, out_channels(cfg, opened.scheme.num_classes)).to(device).eval()
    seg = Segmenter.from_config(model, cfg, device)
    x = torch.randint(0, 256, (cfg.data.val_batch_size, 3, h, w), dtype=torch.uint8)
    seg.classes(seg.preprocess(x))  # warm-up
    rounds = max(1, images // cfg.data.val_batch_size)
    with measure() as m:
        for _ in range(rounds):
            seg.classes(seg.preprocess(x))
    return rounds * cfg.data.val_batch_size / m["wall"]


def fmt(v, unit: str = "", digits: int = 2) -> str:
    """A figure for the table, '-' when the run did not measure it."""
    return "-" if v is None else f"{v:.{digits}f}{unit}"


def bench_e2e(config: str | None, overrides: list[str], procs: int = 1, steps: int = 20, warmup: int = 3,
              keep: str | None = None) -> str:
    """The table: where a whole run's time went, against the step alone on synthetic input."""
    cfg = load_config(config, overrides)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory(prefix="distseg-bench-e2e-") as tmp:
        folder = Path(keep) if keep else Path(tmp)
        s = run_training(config, overrides, procs, folder)
    t = s.timing
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cudnn.benchmark = True
    variant = step_variant(cfg, cuda)
    nc = out_channels(cfg, get_scheme(cfg.data.scheme).num_classes)
    synthetic, _ = time_variant(cfg, nc, variant, device, None, steps, warmup, min_seconds=20.0)
    model_val = model_only_val(cfg, device)
    outside = 1 - t["validation_img_per_s"] / model_val if t["validation_img_per_s"] else None
    rows = [["start-up: process start -> end of the first step", fmt(t["start_up_s"], " s")],
            ["steady img/s inside epochs", fmt(t["steady_img_per_s"])],
            ["a step inside an epoch", fmt(t["step_s"], " s", 3)],
            ["the step that opens an epoch / a step inside", fmt(t["first_step_of_epoch_vs_inner"], "x")],
            ["stall per epoch boundary (refill + epoch-end checkpoint)",
             f"{fmt(t['epoch_boundary_stall_s'], ' s', 3)} (refill "
             f"{fmt(t['epoch_boundary_refill_s'], ' s', 3)}, checkpoint "
             f"{fmt(t['epoch_boundary_checkpoint_s'], ' s', 3)})"],
            ["validation img/s (steady; first batch apart) / share of the run",
             f"{fmt(t['validation_img_per_s'])} / {100 * t['validation_share']:.1f}%"],
            ["validation start-up (first batch)", fmt(t["validation_start_up_s"], " s")],
            ["the model alone on the val images' size (same inference settings) img/s", fmt(model_val)],
            ["validation time outside the model (steady)",
             "-" if outside is None else f"{100 * outside:.1f}%"],
            ["checkpoint stall on the critical path / share", f"{fmt(t['checkpoint_stall_s'], ' s')} / "
                                                             f"{100 * t['checkpoint_share']:.1f}%"],
            ["data wait inside epochs (share of the steps' time)",
             "-" if t["data_wait_share"] is None else f"{100 * t['data_wait_share']:.1f}%"],
            ["whole run img/s (images / wall time from process start)", fmt(t["whole_run_img_per_s"])],
            [f"bench train {variant}, synthetic input (same settings)", fmt(synthetic)],
            ["whole run / synthetic step", f"{t['whole_run_img_per_s'] / synthetic:.2f}x"]]
    if "gpu_idle_share" in t:
        rows.insert(9, ["GPU idle between steps (share of the steps' time)",
                        "-" if t["gpu_idle_share"] is None else f"{100 * t['gpu_idle_share']:.1f}%"])
    d = cfg.data
    head = (f"whole run: {procs} process(es), {device_name()}, {d.loader} loader, {d.num_workers} workers, "
            f"batch {d.batch_size}, crop {'x'.join(map(str, d.crop[::-1])) if d.crop else 'full'}, "
            f"data.repeat {d.repeat}, {s.steps} steps in {s.epochs} epochs, "
            f"{t['images']} images, {t['wall_s']:.1f} s")
    return head + "\n\n" + table(["measure", "value"], rows)


def chosen_keys(config: str | None, tuned: str) -> set[str]:
    """The settings a tuned.yaml chose: the keys of its header's `settings changed:` line, or, in a file
    without that header, every setting where it differs from the config."""
    line = changed_line(tuned)
    if line:
        return {part.split("=", 1)[0] for part in line.split() if "=" in part}
    given, other = flat_settings(load_config(config)), flat_settings(load_config(tuned))
    return {k for k, v in other.items() if given.get(k) != v}


def tuned_runs(config: str | None, tuned: str, overrides: list[str]) -> list[tuple[str | None, list[str]]]:
    """The two whole runs' (config, settings): the settings given here go to both, so one that sets a
    setting tuned.yaml chose is refused in one line: in the tuned run it would replace the choice, and the
    two runs would compare the same settings."""
    if not Path(tuned).is_file():
        raise UserError(f"--tuned: no such file {tuned}")
    chosen = chosen_keys(config, tuned)
    for o in overrides:
        key = o.partition("=")[0].strip()
        if key in chosen:
            raise UserError(f"{o}: {tuned} chose {key}, and a setting given here goes to both runs, so the "
                            f"tuned run would not run its choice: leave it out (or put it in the config and "
                            f"tune again)")
    load_config(config, overrides)
    load_config(tuned, overrides)
    return [(config, overrides), (tuned, overrides)]


def bench_e2e_tuned(config: str | None, tuned: str, overrides: list[str], procs: int = 1) -> str:
    """Whole runs of the config and of its tuned.yaml (distseg tune), one after the other with the same
    further settings given here (none that tuned.yaml chose: `tuned_runs`): their img/s and where the time
    went, side by side."""
    runs = []
    for path, settings in tuned_runs(config, tuned, overrides):
        with tempfile.TemporaryDirectory(prefix="distseg-bench-e2e-") as tmp:
            runs.append(run_training(path, settings, procs, Path(tmp)).timing)

    def pct(v):
        return "-" if v is None else f"{100 * v:.1f}%"
    measures = [("whole run img/s (images / wall time from process start)", "whole_run_img_per_s", fmt),
                ("steady img/s inside epochs", "steady_img_per_s", fmt),
                ("start-up: process start -> end of the first step", "start_up_s", lambda v: fmt(v, " s")),
                ("data wait inside epochs (share of the steps' time)", "data_wait_share", pct),
                ("validation share of the run", "validation_share", pct),
                ("wall time", "wall_s", lambda v: fmt(v, " s", 1))]
    rows = []
    for name, key, show in measures:
        a, b = runs[0].get(key), runs[1].get(key)
        ratio = f"{b / a:.2f}x" if a and b is not None and key.endswith("img_per_s") else ""
        rows.append([name, show(a), show(b), ratio])
    head = (f"whole runs, {procs} process(es), {device_name()}: {config or 'the defaults'} against {tuned} "
            f"(it changes: {changed_line(tuned) or 'see the file'}), both with "
            f"{' '.join(overrides) or 'no further settings'}")
    return head + "\n\n" + table(["measure", config or "the defaults", tuned, "tuned / config"], rows)
