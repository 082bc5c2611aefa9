"""`distseg bench data|train|shard|eval|e2e|index|gpu-check`: benchmarks printed as Markdown tables."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import click

from distseg.bench.data import DATA_VARIANTS, bench_data, bench_storage, shuffle_report
from distseg.bench.e2e import bench_e2e, bench_e2e_tuned
from distseg.bench.eval import MODES, bench_eval
from distseg.bench.gpu_check import PHASES, QUICK, default_phases, gpu_check
from distseg.bench.index import bench_index
from distseg.bench.shard import bench_shard
from distseg.bench.train import FEEDS, VARIANTS, bench_train
from distseg.commands.options import SETTINGS_HELP, precision_option, set_option, settings
from distseg.config import load_config
from distseg.data.dali_loader import dali_available
from distseg.errors import UserError
from distseg.models import check_encoder
from distseg.shards.manifest import load_manifest
from distseg.units import parse_wxh


@click.group()
def bench() -> None:
    """Throughput benchmarks (Markdown tables; --out appends them to a file such as docs/BENCHMARKS.md)."""


def _bench_here(*args) -> str:
    """`distseg bench ARGS` in this process (the phases of gpu-check: no new interpreter's start-up); what
    it printed, or RuntimeError with its one error line."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            bench.main([str(a) for a in args], prog_name="distseg bench", standalone_mode=False)
    except (UserError, click.ClickException, OSError) as e:
        raise RuntimeError(f"distseg bench {args[0]} failed: {e}") from None
    return out.getvalue()


def _emit(text: str, out: str | None) -> None:
    click.echo(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")


def one_split_config(config: str | None, overrides: list[str]):
    """The config for `bench data` and `bench train`, which time the pipelines of one split: with
    data.streams, data.shards is benchmarked (said in one line), as every row and the heading read it."""
    cfg = load_config(config, overrides)
    if cfg.data.streams:
        click.echo(f"note: data.streams is not benchmarked here: the rows read data.shards "
                   f"({cfg.data.shards})")
        cfg.data.streams, cfg.data.epoch_samples = [], 0
    return cfg


@bench.command("data", epilog=SETTINGS_HELP)
@click.option("--config", "-c", default=None, help="training config (data section is used)")
@click.option("--root", default=None, help="Cityscapes root for the raw-PNG baseline [$CITYSCAPES_DATASET]")
@click.option("--split", default="train", show_default=True, help="split whose shards to read")
@click.option("--batches", default=20, show_default=True, help="batches timed per pipeline")
@click.option("--modes", default="decode,transform,torch-cpu,torch-gpu,dali,dali-gpu,tv-png,tv-jpg",
              show_default=True,
              help="pipelines, comma-separated ('' for none); PIPELINE+VARIANT times it with other data "
                   "settings, beside PIPELINE: " + "; ".join(f"+{k}: {v.label} ({', '.join(v.modes)})"
                                                            for k, v in DATA_VARIANTS.items()))
@click.option("--json", "as_json", is_flag=True, help="print the pipeline figures as JSON (for machines)")
@click.option("--shards", "url", default=None,
              help="also read the same shards from this URL: local vs cold vs warm cache (median of "
                   "--repeats)")
@click.option("--repeats", default=3, show_default=True, help="runs per storage row")
@click.option("--profile", is_flag=True,
              help="also the torch loader's CPU time per image by part: member reads, decode, transform, "
                   "collate, hand-off in its workers; wait, receive, finish in the main process")
@click.option("--out", default=None, help="append the table to this file")
@set_option
@click.argument("overrides", nargs=-1)
def bench_data_cmd(config, root, split, batches, modes, as_json, url, repeats, profile, out, set_values,
                   overrides) -> None:
    """Decode-only vs torch loader (CPU / GPU decode) vs DALI vs torchvision's reference pipeline (PNG folder,
    JPEG shards): img/s, CPU use, per busy core; shuffle quality and bytes per rank; with --shards URL,
    remote shards through the cache. OVERRIDES: config settings."""
    cfg = one_split_config(config, settings(overrides, set_values))
    if as_json:
        click.echo(bench_data(cfg, root, split, batches, modes.split(","), as_json=True, profile=profile))
        return
    if modes or profile:
        _emit(bench_data(cfg, root, split, batches, [m for m in modes.split(",") if m], profile=profile), out)
    man = load_manifest(cfg.data.shards, split)
    _emit(shuffle_report(man, cfg.data.batch_size, seed=cfg.train.seed, window=cfg.data.shuffle_window), out)
    if url:
        _emit(bench_storage(cfg, url, split, batches, repeats), out)


@bench.command("train", epilog=SETTINGS_HELP)
@click.option("--config", "-c", default=None, help="training config")
@click.option("--variants", default="plain,fp32,tf32,bf16,bf16+cl,plain+compile,bf16+cl+compile",
              show_default=True, help=f"comma-separated, of {', '.join(VARIANTS)}")
@click.option("--feeds", default="synthetic", show_default=True,
              help=f"comma-separated, of {', '.join(FEEDS)}")
@click.option("--min-steps", default=200, show_default=True, help="timed steps per row (or --min-seconds)")
@click.option("--min-seconds", default=20.0, show_default=True, help="timed seconds per row (or --min-steps)")
@click.option("--warmup", default=5, show_default=True, help="untimed steps first")
@click.option("--encoders", default=None,
              help="comma-separated model.encoder values to compare (e.g. unet,resnet18,resnet50,"
                   "convnext_tiny,efficientnet_b0,timm:resnet50d) [default: the config's]")
@click.option("--profile", is_flag=True, help="also the top operators by device time (torch.profiler)")
@click.option("--launch-bound", "launch_steps", default=0, show_default=True, type=click.IntRange(min=0),
              help="also the training loop's step against the plain loop on a tiny U-Net and crop, about "
                   "this many steps each (taken in 10 alternating rounds, so a multiple of 10; the table "
                   "says how many): ms and aten ops per step, the host's overhead (0: off)")
@click.option("--out", default=None, help="append the table to this file")
@set_option
@click.argument("overrides", nargs=-1)
def bench_train_cmd(config, variants, feeds, min_steps, min_seconds, warmup, encoders, profile, launch_steps,
                    out, set_values, overrides) -> None:
    """Training-step img/s, ÷ synthetic, TFLOP/s, MFU and data wait / GPU idle per encoder, variant and feed,
    every row timed alike, against a plain-PyTorch row. OVERRIDES: config settings."""
    cfg = one_split_config(config, settings(overrides, set_values))
    names = encoders.split(",") if encoders else None
    for name in names or []:
        check_encoder(name)
    _emit(bench_train(cfg, variants.split(","), warmup, min_steps, min_seconds, feeds.split(","), names,
                      profile, launch_steps), out)


@bench.command("shard")
@click.option("--root", default=None, help="Cityscapes root [$CITYSCAPES_DATASET]")
@click.option("--split", default="train", show_default=True, help="split to encode")
@click.option("--limit", default=50, show_default=True, help="images to encode")
@click.option("--out", default=None, help="append the table to this file")
def bench_shard_cmd(root, split, limit, out) -> None:
    """Shard encoding speed per core and size vs the raw PNGs, JPEG vs PNG."""
    _emit(bench_shard(root, split, 1, limit), out)


@bench.command("eval", epilog=SETTINGS_HELP)
@click.option("--config", "-c", default=None, help="config whose model and eval.batch to use")
@click.option("--modes", default=",".join(MODES), show_default=True, help="comma-separated")
@click.option("--size", default="2048x1024", show_default=True, help="WIDTHxHEIGHT of the input images")
@click.option("--images", default=4, show_default=True, help="timed images per mode")
@click.option("--batch", default=1, show_default=True, help="images per batch")
@click.option("--crop", default="1024x512", show_default=True, help="slide window WIDTHxHEIGHT")
@click.option("--stride", default="683x341", show_default=True, help="slide stride WIDTHxHEIGHT")
@precision_option("the config's")
@click.option("--model", default=None,
              help="also time this file of `distseg export` (.onnx, .pt2) in every mode, as exported")
@click.option("--out", default=None, help="append the table to this file")
@set_option
@click.argument("overrides", nargs=-1)
def bench_eval_cmd(config, modes, size, images, batch, crop, stride, precision, model, out, set_values,
                   overrides) -> None:
    """Inference img/s and peak memory: whole vs slide vs flip vs multi-scale, and an exported model's beside
    the config's (-c runs/NAME/config.yaml: the run's model). OVERRIDES: config settings."""
    cfg = load_config(config, settings(overrides, set_values))
    cw, ch = parse_wxh(crop)
    sw, sh = parse_wxh(stride)
    _emit(bench_eval(cfg, modes.split(","), parse_wxh(size), images, batch, precision, (ch, cw), (sh, sw),
                     exported=model), out)


@bench.command("index")
@click.option("--samples", default=1_000_000, show_default=True, help="fake samples in the split")
@click.option("--workers", default=8, show_default=True, help="DataLoader workers doing an epoch of lookups")
@click.option("--dali/--no-dali", default=True, show_default=True,
              help="also measure DALI's reader over the same index files")
@click.option("--out", default=None, help="append the table to this file")
def bench_index_cmd(samples, workers, dali, out) -> None:
    """The sample index at scale: bytes per sample, open + lookups, workers' private memory, start-up."""
    if samples < 1 or workers < 1:
        raise UserError("--samples and --workers must be at least 1")
    _emit(bench_index(samples, workers, dali and dali_available()), out)


@bench.command("e2e", context_settings={"ignore_unknown_options": True}, epilog=SETTINGS_HELP)
@click.option("--config", "-c", default=None, help="training config")
@click.option("--procs", default=1, show_default=True, help="training processes (python -m distseg.launch)")
@click.option("--steps", default=20, show_default=True, help="timed steps of the synthetic-input row")
@click.option("--keep", default=None, help="keep the run folder here instead of a temporary one")
@click.option("--tuned", default=None,
              help="a tuned.yaml of `distseg tune`: whole runs of the config and of it, side by side")
@click.option("--out", default=None, help="append the table to this file")
@set_option
@click.argument("overrides", nargs=-1)
def bench_e2e_cmd(config, procs, steps, keep, tuned, out, set_values, overrides) -> None:
    """A whole training run through the real entry: start-up, steady img/s, epoch boundaries, validation,
    checkpoints and whole-run img/s against the step alone; with --tuned, whole runs of the config and of
    its tuned.yaml side by side. OVERRIDES: config settings (given to both)."""
    if tuned:
        if keep:
            raise UserError("--keep is for one run: without --tuned")
        _emit(bench_e2e_tuned(config, tuned, list(settings(overrides, set_values)), procs), out)
        return
    _emit(bench_e2e(config, list(settings(overrides, set_values)), procs, steps, keep=keep), out)


@bench.command("gpu-check")
@click.option("--phases", default=None,
              help=f"comma-separated, of {', '.join(PHASES)} [default: every phase with --dry-run, else "
                   f"--quick]")
@click.option("--quick", is_flag=True, help=f"the phases {', '.join(QUICK)} (the default on a GPU)")
@click.option("--dry-run", is_flag=True,
              help="on the CPU with tiny sizes, tests only collected: every phase unless --phases or --quick "
                   "picks")
@click.option("--out", default="gpu-report.md", show_default=True, help="the Markdown report to write")
@click.option("--data", default=".gpu-check", show_default=True,
              help="folder for the synthetic data, shards and run (reused while there)")
def bench_gpu_check_cmd(phases, quick, dry_run, out, data) -> None:
    """Everything a GPU machine should show, in one report: the GPU tests, the step against plain PyTorch, the
    loader feeds, the data pipelines, inference, a whole run and `distseg tune` (tools/gpu-check.sh runs
    this)."""
    names = list(QUICK) if quick else list(default_phases(dry_run)) if phases is None else \
        [p for p in phases.split(",") if p]
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        raise UserError(f"unknown phase {unknown[0]!r}: use {', '.join(PHASES)}")
    path = gpu_check(names, Path(out), dry_run, Path(data), _bench_here, click.echo)
    click.echo(f"report written to {path}")
