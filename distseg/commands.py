"""CLI commands that need torch (train, evaluate, predict, bench); torch is imported inside each."""

from __future__ import annotations

import sys

import click

from distseg.cli import cli


@cli.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--config", "-c", default=None, help="YAML config")
@click.argument("overrides", nargs=-1)
def train(config, overrides) -> None:
    """Train in this process (for several processes: accelerate launch distseg/train.py ...)."""
    from distseg.train import main as train_main

    code = train_main((["--config", config] if config else []) + list(overrides))
    if code:
        sys.exit(code)


@cli.command()
@click.option("--run", required=True, help="run folder (runs/<name>)")
@click.option("--checkpoint", default="best", show_default=True, help="best, latest or a checkpoint path")
@click.option("--split", default=None, help="split to evaluate [default: the run's val split]")
@click.option("--shards", default=None, help="shard folder [default: the run's]")
@click.option("--json", "json_out", default=None, help="also write scores and confusion matrix here")
@click.argument("overrides", nargs=-1)
def evaluate(run, checkpoint, split, shards, json_out, overrides) -> None:
    """Per-class IoU, mIoU and pixel accuracy of a run's weights."""
    from distseg.evaluate import evaluate as run_eval

    run_eval(run, checkpoint, split, shards, tuple(overrides), json_out)


@cli.command()
@click.option("--run", required=True, help="run folder (runs/<name>)")
@click.option("--checkpoint", default="best", show_default=True)
@click.option("--out", required=True, help="results folder")
@click.option("--alpha", default=0.5, show_default=True, help="overlay opacity")
@click.argument("inputs", nargs=-1, required=True)
def predict(run, checkpoint, out, alpha, inputs) -> None:
    """Segment images (files or folders): labelId PNGs (official results format) + overlays."""
    from distseg.predict import predict as run_predict

    n = run_predict(run, tuple(inputs), out, checkpoint, alpha)
    click.echo(f"wrote {n} predictions to {out} (overlays in {out}/overlay)")


@cli.group()
def bench() -> None:
    """Throughput benchmarks (Markdown tables)."""


def _emit(text: str, out: str | None) -> None:
    click.echo(text)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n\n")


@bench.command("data")
@click.option("--config", "-c", default=None, help="training config (data section is used)")
@click.option("--root", default=None, help="Cityscapes root for the raw-PNG baseline [$CITYSCAPES_DATASET]")
@click.option("--split", default="train", show_default=True)
@click.option("--batches", default=20, show_default=True)
@click.option("--modes", default="png,torch-cpu,torch-gpu,dali", show_default=True)
@click.option("--out", default=None, help="append the table to this file")
@click.argument("overrides", nargs=-1)
def bench_data_cmd(config, root, split, batches, modes, out, overrides) -> None:
    """Raw PNG folder vs torch loader (CPU / GPU decode) vs DALI: img/s and CPU use."""
    from distseg.bench import bench_data
    from distseg.config import load_config

    cfg = load_config(config, overrides)
    _emit(bench_data(cfg, root, split, batches, modes.split(",")), out)


@bench.command("train")
@click.option("--config", "-c", default=None)
@click.option("--variants", default="fp32,tf32,bf16,bf16+cl,bf16+cl+compile", show_default=True)
@click.option("--steps", default=10, show_default=True)
@click.option("--warmup", default=3, show_default=True)
@click.option("--loader", "real_loader", is_flag=True, help="feed the real shard loader instead of synthetic tensors")
@click.option("--out", default=None, help="append the table to this file")
@click.argument("overrides", nargs=-1)
def bench_train_cmd(config, variants, steps, warmup, real_loader, out, overrides) -> None:
    """Training-step img/s, TFLOP/s, MFU and data-wait for precision/layout/compile variants."""
    from distseg.bench import bench_train
    from distseg.config import load_config

    cfg = load_config(config, overrides)
    _emit(bench_train(cfg, variants.split(","), steps, warmup, real_loader), out)


@bench.command("shard")
@click.option("--root", default=None)
@click.option("--split", default="train", show_default=True)
@click.option("--limit", default=50, show_default=True, help="images to encode")
@click.option("--out", default=None)
def bench_shard_cmd(root, split, limit, out) -> None:
    """Shard encoding speed per core and size vs the raw PNGs, JPEG vs PNG."""
    from distseg.bench import bench_shard

    _emit(bench_shard(root, split, 1, limit), out)
