"""`distseg report`: one self-contained HTML page a person can open anywhere (no network: images, charts,
script and favicon are inline) comparing runs:

- training and validation curves of every run, read from its TensorBoard event files, overlaid;
- per run, the best checkpoint's per-class IoU and row-normalised confusion matrix on the val shards;
- a gallery of val images (image, ground truth, prediction, errors), ranked worst to best by the best
  checkpoint's per-image IoU, with a checkpoint chooser: the predictions of up to `checkpoints` saved
  checkpoints are precomputed for `images` images, and the chooser shows one set at a time.

Charts are drawn by matplotlib (SVG); predictions go through the one inference path
(distseg/inference/segmenter.py).
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image

from distseg import run_files as files
from distseg.config import RUN_PRECISION
from distseg.data.loader import make_loader
from distseg.errors import UserError
from distseg.files import atomic_write_text
from distseg.inference.metrics import headline, percent
from distseg.inference.scoring import score_loader
from distseg.inference.segmenter import Segmenter, segment_images
from distseg.labels import IGNORE
from distseg.models.weights import load_weights
from distseg.runs.checkpoint import list_checkpoints, read_state
from distseg.runs.run_dir import LoadedRun, RunDir, load_run
from distseg.shards.shard_reader import decode_mask, decode_rgb
from distseg.shards.split import open_split
from distseg.training.tensorboard import score_tag

FAVICON = ("data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg' viewBox='0 0 16 16'%3E%3Crect "
           "width='16' height='16' fill='%23803080'/%3E%3C/svg%3E")
THUMB_WIDTH = 512


@dataclass
class RunReport:
    """What the page shows of one run."""

    name: str
    scheme: str
    score_name: str
    iou: dict
    confusion: np.ndarray
    class_names: list
    checkpoints: list  # (label, {image key: (prediction PNG, error PNG)})
    images: list  # (key, image JPEG, ground truth PNG, score with the best checkpoint)


# --- data --------------------------------------------------------------------------------------------

def scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run.tb), size_guidance={"scalars": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"]}


def choose_checkpoints(run: RunDir, most: int) -> list[tuple[str, Path]]:
    """best, then saved checkpoints spread evenly from the newest back: at most `most` in all."""
    out = [(files.BEST, run.best)] if run.best.is_dir() else []
    saved = list_checkpoints(run.checkpoints)
    room = max(0, most - len(out))
    if saved and room:
        pick = sorted({round(i * (len(saved) - 1) / max(1, room - 1)) for i in range(room)}) if room > 1 \
            else [len(saved) - 1]
        for i in reversed(pick):
            st = read_state(saved[i])
            out.append((f"step {st.step} (epoch {st.epoch})", saved[i]))
    if not out:
        raise UserError(f"{run.path} has no checkpoints yet: train first")
    return out


def thumb(arr: np.ndarray, fmt: str) -> str:
    """A data: URI of an image at most THUMB_WIDTH wide (JPEG for photos, PNG for masks)."""
    im = Image.fromarray(arr)
    if im.width > THUMB_WIDTH:
        im = im.resize((THUMB_WIDTH, round(im.height * THUMB_WIDTH / im.width)),
                       Image.Resampling.BILINEAR if fmt == "JPEG" else Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, fmt, **({"quality": 85} if fmt == "JPEG" else {"optimize": True}))
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


def image_iou(pred: np.ndarray, gt: np.ndarray, n: int) -> float:
    """Mean IoU of one image over the classes present in its ground truth or prediction (ignore left out)."""
    keep = gt != IGNORE
    ious = []
    for c in range(n):
        p, g = (pred == c) & keep, gt == c
        union = (p | g).sum()
        if union:
            ious.append((p & g).sum() / union)
    return float(np.mean(ious)) if ious else math.nan


def errors_overlay(rgb: np.ndarray, pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The image darkened, wrong pixels red, ignored ground truth grey."""
    out = (rgb * 0.35).astype(np.uint8)
    out[(pred != gt) & (gt != IGNORE)] = (230, 30, 30)
    out[gt == IGNORE] = (90, 90, 90)
    return out


# --- one run ------------------------------------------------------------------------------------------

def val_images(loaded: LoadedRun, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """`count` val samples spread over the split: (key, RGB uint8, mask in the run's classes)."""
    cfg = loaded.cfg
    opened = open_split(cfg.data.shards, cfg.data.val_split, loaded.scheme)
    samples = opened.samples(cfg.data)
    picks = sorted({round(i * (len(samples) - 1) / max(1, count - 1)) for i in range(count)})
    out = []
    for i in picks[:count]:
        img = decode_rgb(samples.read(i, "image")).permute(1, 2, 0).numpy()
        mask = decode_mask(samples.read(i, "mask"), opened.lut).numpy()
        out.append((samples.key(i), img, mask))
    return out


def report_run(run: RunDir, images: int, checkpoints: int, precision: str,
               weights: str = "auto") -> RunReport:
    """Scores of the best checkpoint; predictions of up to `checkpoints` checkpoints on `images` images."""
    from accelerate import Accelerator

    loaded = load_run(run.path, "best" if run.best.is_dir() else "latest", weights=weights)
    cfg, scheme = loaded.cfg, loaded.scheme
    acc = Accelerator(cpu=not torch.cuda.is_available())
    seg = Segmenter.from_config(loaded.model.to(acc.device), cfg, acc.device, precision)
    cfg.data.num_workers = 0
    cm, _ = score_loader(seg, make_loader(cfg, cfg.data.val_split, scheme, False, acc.device), scheme, acc)
    scores = cm.scores(scheme.eval_classes)
    pal = scheme.palette()
    shown = val_images(loaded, images)
    ckpts = []
    per_image = {}
    for label, path in choose_checkpoints(run, checkpoints):
        seg.model.load_state_dict(load_weights(path, weights))
        preds = segment_images(seg, [torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)
                                     for _, im, _ in shown])
        shots = {}
        for (key, rgb, gt), pred in zip(shown, preds):
            p = pred.cpu().numpy().astype(np.uint8)
            shots[key] = (thumb(pal[p], "PNG"), thumb(errors_overlay(rgb, p, gt), "PNG"))
            if label == files.BEST or not per_image.get(key):
                per_image.setdefault(key, image_iou(p, gt, scheme.num_classes))
        ckpts.append((label, shots))
    gallery = [(key, thumb(rgb, "JPEG"), thumb(pal[gt], "PNG"), per_image[key]) for key, rgb, gt in shown]
    gallery.sort(key=lambda g: (math.isnan(g[3]), g[3]))  # worst first
    iou = {scheme.class_names[c]: v for c, v in scores["iou"].items()}
    mat = cm.mat.cpu().numpy()[:, :scheme.num_classes].astype(float)
    name, score = headline(scheme, scores)
    rows = mat / np.maximum(mat.sum(1, keepdims=True), 1)
    return RunReport(run.name, scheme.name, f"{name} {percent(score, unit='%')}", iou, rows,
                     scheme.class_names, ckpts, gallery)


# --- charts ---------------------------------------------------------------------------------------------

def svg(fig: Figure) -> str:
    """A matplotlib figure as inline SVG markup (the object-oriented API: no pyplot, no GUI backend)."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def series_chart(series: dict[str, list[tuple[int, float]]], title: str, ylabel: str) -> str:
    """One line per run, overlaid."""
    fig = Figure(figsize=(7, 3.4))
    ax = fig.subplots()
    for name, points in series.items():
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, ms=3, label=name)
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    return svg(fig)


def confusion_chart(r: RunReport) -> str:
    """Row-normalised confusion matrix (rows: ground truth) as a heatmap."""
    n = len(r.class_names)
    size = min(9, 2.5 + 0.35 * n)
    fig = Figure(figsize=(size, size * 0.85))
    ax = fig.subplots()
    im = ax.imshow(r.confusion, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(n), r.class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), r.class_names, fontsize=7)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(f"{r.name}: confusion (rows sum to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return svg(fig)


# --- page ------------------------------------------------------------------------------------------------

CSS = """body{font:14px system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px}figure.chart{display:inline-block;margin:8px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}.row{display:flex;gap:6px;align-items:flex-start;margin:6px 0}
.row img{width:256px;height:auto}.row .meta{width:140px;font-size:12px;overflow-wrap:anywhere}
select{font-size:14px}"""

SCRIPT = """document.querySelectorAll('select.checkpoint').forEach(function (s) {
  s.addEventListener('change', function () {
    document.querySelectorAll('[data-run="' + s.dataset.run + '"] .predictions').forEach(function (d) {
      d.hidden = d.dataset.checkpoint !== s.value;
    });
  });
});"""


def run_section(k: int, r: RunReport) -> str:
    """Per-class table, confusion heatmap and gallery with its checkpoint chooser."""
    e = html.escape
    rows = "".join(f"<tr><td>{e(c)}</td><td>{percent(v, unit='%')}</td></tr>" for c, v in r.iou.items())
    labels = [label for label, _ in r.checkpoints]
    options = "".join(f'<option value="{j}">{e(label)}</option>' for j, label in enumerate(labels))
    gallery = []
    for key, img, gt, score in r.images:
        preds = "".join(
            f'<div class="predictions" data-checkpoint="{j}"{"" if j == 0 else " hidden"}>'
            f'<img alt="prediction {e(key)}" src="{shots[key][0]}"> <img alt="errors {e(key)}" '
            f'src="{shots[key][1]}"></div>'
            for j, (_, shots) in enumerate(r.checkpoints))
        gallery.append(f'<div class="row"><div class="meta">{e(key)}<br>IoU {percent(score, unit="%")}</div>'
                       f'<img alt="image {e(key)}" src="{img}"><img alt="ground truth {e(key)}" src="{gt}">'
                       f'{preds}</div>')
    return (f'<section data-run="{k}"><h2>{e(r.name)} ({e(r.scheme)}, best checkpoint: '
            f'{e(r.score_name)})</h2>'
            f'<table><tr><th>class</th><th>IoU %</th></tr>{rows}</table>'
            f'<figure class="chart">{confusion_chart(r)}</figure>'
            f'<h3>Val images, worst to best</h3><label>checkpoint <select class="checkpoint" data-run="{k}">'
            f'{options}</select></label><div>image | ground truth | prediction | errors (red)</div>'
            f'{"".join(gallery)}</section>')


def inputs_fingerprint(dirs: list[RunDir], *options) -> str:
    """A hash of everything a report is built from: the options, distseg's version, and the name, size and
    modification time of every file in the runs' summary, best/, checkpoints/ and tb/. Equal hashes: the
    page would come out the same, so it is not rebuilt."""
    from distseg import __version__

    h = hashlib.sha256(json.dumps([__version__, *map(str, options)]).encode())
    for d in dirs:
        files = [d.summary, *[p for part in (d.best, d.checkpoints, d.tb) for p in sorted(part.rglob("*"))]]
        for p in files:
            if p.is_file():
                st = p.stat()
                h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def built_from(path: Path) -> str | None:
    """The inputs fingerprint an existing report was built from (its head's distseg-inputs meta tag)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            head = f.read(4096)
    except OSError:
        return None
    m = re.search(r'<meta name="distseg-inputs" content="([0-9a-f]{64})">', head)
    return m.group(1) if m else None


def write_report(run_dirs: list[str], out: str, images: int = 8, checkpoints: int = 5,
                 precision: str = RUN_PRECISION, weights: str = "auto", log=print,
                 preface: str = "") -> tuple[Path, bool]:
    """Build the page for `run_dirs` and write it atomically to `out`, saying how far it got; returns its
    path and whether it was built (False: the page there was built from the same runs and options).
    `preface` is HTML shown above the curves (an experiment's table over seeds)."""
    dirs = [RunDir(Path(r)).require() for r in run_dirs]
    if images < 1 or not 1 <= checkpoints <= 20:
        raise UserError("--images must be >= 1 and --checkpoints between 1 and 20")
    path = Path(out)
    fingerprint = inputs_fingerprint(dirs, images, checkpoints, precision, weights, preface)
    if built_from(path) == fingerprint:
        return path, False
    curves = {d.name: scalars(d) for d in dirs}
    reports = []
    for k, d in enumerate(dirs, 1):
        t = time.time()
        log(f"report {k}/{len(dirs)}: {d.name}: scoring the val split, then up to {checkpoints} checkpoints "
            f"on {images} images")
        reports.append(report_run(d, images, checkpoints, precision, weights))
        log(f"report {k}/{len(dirs)}: {d.name} done in {time.time() - t:.0f} s")
    page = render_page(dirs, curves, reports, fingerprint, preface)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, page)
    return path, True


def render_page(dirs: list[RunDir], curves: dict, reports: list[RunReport], fingerprint: str,
                preface: str = "") -> str:
    """The HTML page: the runs' summaries (and the preface), the overlaid curves, then one section per run."""
    val_tag = {r.name: score_tag(r.class_names) for r in reports}

    def series(tag_of) -> dict:
        return {n: sc.get(tag_of(n), []) for n, sc in curves.items()}
    charts = [series_chart(series(lambda n: "train/loss"), "training loss", "loss"),
              series_chart(series(val_tag.get), "validation score (mIoU; foreground IoU for binary runs)",
                           "score"),
              series_chart(series(lambda n: "train/lr"), "learning rate", "lr")]
    summary = {d.name: d.read_summary() for d in dirs if d.read_summary() is not None}
    head = "".join(f"<li>{html.escape(n)}: {s.steps} steps, {s.epochs} epochs, best "
                   f"{html.escape(str(s.best_score_name))} {percent(s.best_score, unit='%')} "
                   f"(epoch {s.best_epoch})</li>" for n, s in summary.items())
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="distseg-inputs" content="{fingerprint}"><title>distseg report</title>'
            f'<link rel="icon" href="{FAVICON}"><style>{CSS}</style></head><body>'
            f'<h1>distseg report: {html.escape(", ".join(d.name for d in dirs))}</h1><ul>{head}</ul>{preface}'
            f'<h2>Curves</h2>{"".join(f"<figure class=chart>{c}</figure>" for c in charts)}'
            f'{"".join(run_section(k, r) for k, r in enumerate(reports))}<script>{SCRIPT}</script>'
            '</body></html>')
